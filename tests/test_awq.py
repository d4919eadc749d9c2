"""`awq-int4` (GPTQModel's AWQ) on CPU: it quantizes the embedded Gemma-3-270M on first use (about 2 minutes
on 2 cores, once per machine), caches it with a manifest and reuses the cache, loads an AWQ checkpoint as it
is (or the one the catalogue names), names its kernel, and stays close to bf16. The roofline bytes of both
INT4 engines match a hand computation for the embedded shape.

One quantization serves the module (the `awq_engine` fixture). A corrupt or partial cache is rebuilt by the
code GPTQ and AWQ share (engines/variants/transformers/int4_cache.py), which tests/test_quantized.py checks
on GPTQ: a second and third AWQ quantization here would cost minutes and test nothing more.
"""
from __future__ import annotations

import json

import pytest

from engines.measure.quality import evaluate_quality
from engines.measure.roofline import decode_roofline
from engines.models.sources import load_shape
from engines.protocol import EngineError
from engines.registry import create_engine, get_spec
from engines.variants.transformers import awq, int4_cache
from engines.variants.transformers.int4_cache import MANIFEST, cache_problem
from tests import test_quantized
from tests.conftest import loaded_engine, run_stream

STORY = test_quantized.STORY


def quantized(messages: list[str]) -> bool:
    return any("quantizing" in message for message in messages)


@pytest.fixture(scope="module")
def awq_engine():
    """The embedded model in INT4 AWQ: quantized once per machine, then cached."""
    with loaded_engine("awq-int4") as engine:
        yield engine


@pytest.mark.slow
def test_the_embedded_model_is_quantized_to_awq_gemm_with_a_manifest_on_a_named_cpu_kernel(awq_engine):
    folder = awq_engine.checkpoint_path
    assert folder.parent.name == "awq" and cache_problem(folder) is None and (folder / MANIFEST).is_file()
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("awq", 4, 128)
    assert config["zero_point"] is True and config["version"] == "gemm"
    assert awq_engine.backend in awq.BACKENDS["cpu"]
    assert awq_engine.backend == "awq_torch_aten" and awq_engine.kernel_name == "TorchAtenAwqLinear"


@pytest.mark.slow
def test_an_awq_checkpoint_loads_as_it_is_with_the_named_backend(awq_engine):
    messages = []
    direct = create_engine("awq-int4", checkpoint=str(awq_engine.checkpoint_path), backend="awq_torch")
    direct.load(progress=messages.append)
    try:
        assert direct.checkpoint_path == awq_engine.checkpoint_path and not quantized(messages), messages
        assert direct.backend == "awq_torch" and direct.kernel_name == "AwqTorchLinear"
        _, _, stats = run_stream(direct, STORY, max_new_tokens=4)
        assert stats.num_tokens == 4 and len(direct.last_token_ids) == 4
    finally:
        direct.unload()


def test_the_catalogued_awq_checkpoint_is_what_loads():
    assert create_engine("awq-int4", model="qwen2.5-7b-instruct").model_name == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert create_engine("awq-int4", model="llama-3.1-8b-instruct").model_name == \
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"
    assert create_engine("awq-int4", model="qwen2.5-7b-instruct", checkpoint="/x").model_name == "/x"
    assert create_engine("awq-int4").model_name is None      # the embedded model has none: quantized here


@pytest.mark.slow
def test_bad_options_and_foreign_checkpoints_fail_with_a_message(awq_engine, tmp_path):
    with pytest.raises(EngineError, match="group_size must be one of 32, 64, 128, got 256"):
        create_engine("awq-int4", group_size=256)
    with pytest.raises(EngineError, match="unknown option.*desc_act"):
        create_engine("awq-int4", desc_act=True)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(EngineError, match="already quantized with 'gptq'; awq-int4 takes a plain or a AWQ"):
        int4_cache.is_checkpoint_of(tmp_path, awq.AWQ)
    with pytest.raises(EngineError, match="no AWQ kernel loaded.*no_such_kernel"):
        create_engine("awq-int4", checkpoint=str(awq_engine.checkpoint_path), backend="no_such_kernel").load()


@pytest.mark.parametrize("name", ["awq-int4", "gptq-int4"])
def test_roofline_bytes_match_a_hand_computation_for_the_embedded_shape(name):
    shape = load_shape("gemma-3-270m")
    # 18 layers; per layer q 640x1024, k and v 640x256, o 1024x640, gate/up 640x2048, down 2048x640.
    linear = 18 * (640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048)
    head = 262144 * 640                                 # tied to the embeddings, read in full, in bf16
    per_weight = 0.5 + 2 / 128 + 0.5 / 128              # the nibble, an fp16 scale and a 4-bit zero per group
    context = 100                                       # below the 512-token window: every layer holds it all
    kv = 2 * 18 * 1 * 256 * 2 * context                 # K and V, 18 layers, 1 KV head of 256, bf16
    engine = create_engine(name)
    precision = engine.precision()
    assert precision.linear_bytes_per_weight == pytest.approx(per_weight)
    roofline = decode_roofline(shape, precision, bandwidth_gb_s=100, context_tokens=context)
    assert roofline.weight_bytes == pytest.approx(linear * per_weight + head * 2)
    assert roofline.kv_bytes == pytest.approx(kv)
    assert roofline.roofline_tok_s == pytest.approx(100e9 / (linear * per_weight + head * 2 + kv))
    # INT4 saves only on the linear layers: the bf16 head (262144 x 640, tied) stays the largest read.
    bf16 = decode_roofline(shape, create_engine("bf16").precision(), bandwidth_gb_s=100, context_tokens=context)
    assert bf16.weight_bytes - roofline.weight_bytes == pytest.approx(linear * (2 - per_weight))


def test_the_registry_spec():
    spec = get_spec("awq-int4")
    assert spec.label == "INT4 AWQ (GPTQModel)" and spec.random_weights == "saved"
    assert spec.target == "engines.variants.transformers.awq:AwqEngine"


@pytest.mark.slow
def test_awq_on_the_embedded_model_is_close_to_bf16(awq_engine, quality_reference, record_property):
    report = evaluate_quality(awq_engine, quality_reference)
    record_property("perplexity", report.perplexity)
    record_property("greedy_agreement", report.greedy_agreement)
    print(f"awq-int4: perplexity {report.perplexity:.2f} ({report.perplexity_ratio:.2f}x bf16's "
          f"{quality_reference.perplexity:.2f}), greedy agreement {report.greedy_agreement:.2f}")
    assert report.perplexity <= 1.5 * quality_reference.perplexity, report
    assert quality_reference.perplexity < report.perplexity * 1.1, "AWQ rarely beats bf16 by much"
    assert not report.is_suspect, report.reason
    text, _, _ = run_stream(awq_engine, STORY, max_new_tokens=24)
    test_quantized.assert_coherent_english(text)


@pytest.mark.slow
def test_awq_reuses_the_embedded_models_cache(awq_engine):
    messages = []
    second = create_engine("awq-int4")
    second.load(progress=messages.append)
    try:
        assert second.checkpoint_path == awq_engine.checkpoint_path and not quantized(messages), messages
        run_stream(second, STORY, max_new_tokens=8)
        run_stream(awq_engine, STORY, max_new_tokens=8)
        assert second.last_token_ids == awq_engine.last_token_ids
    finally:
        second.unload()
