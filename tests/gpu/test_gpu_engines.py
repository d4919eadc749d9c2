"""On the GPU: vllm-int4 serves the GPTQ checkpoint through Marlin, names its kernel and the roofline bytes it
reads; gptq-int4 runs the backend it is told (the automatic choice tries to download CUTLASS offline); vLLM's
unload returns device memory to within 5% of its level before load."""
from __future__ import annotations

import time

import pytest

from engines.protocol import GenerationParams
from engines.registry import create_engine
from engines.telemetry import nvml_device_used_gib

pytestmark = pytest.mark.gpu

PROMPT = "The capital of France is"
VLLM_OPTIONS = {"gpu_memory_utilization": 0.15, "max_num_seqs": 16, "max_model_len": 2048}


def generate(engine, max_new_tokens: int = 32) -> str:
    return "".join(event.text for event in engine.stream(PROMPT, GenerationParams(max_new_tokens=max_new_tokens)))


def test_vllm_int4_runs_the_gptq_checkpoint_through_marlin():
    engine = create_engine("vllm-int4", **VLLM_OPTIONS)
    engine.load()
    try:
        assert engine.kernel_name == "MarlinLinearKernel", engine.kernel_name
        assert engine.checkpoint_path.parent.name == "gptq"
        assert generate(engine).strip()
        stats = engine.stats()
        assert stats.num_tokens == 32 and stats.decode_tok_s > 0 and stats.kv_blocks_total
        assert engine.precision().linear_bytes_per_weight == pytest.approx(0.5 + 2 / 128)
    finally:
        engine.unload()


def test_gptq_int4_runs_the_named_triton_backend():
    engine = create_engine("gptq-int4", backend="gptq_triton")
    engine.load()
    try:
        assert engine.backend == "gptq_triton" and "Triton" in engine.kernel_name
        assert generate(engine, 16).strip()
    finally:
        engine.unload()


def test_vllm_unload_returns_device_memory_within_5_percent():
    import torch
    torch.cuda.init()  # the CUDA context stays for the process; create it before the first reading
    before = nvml_device_used_gib()
    engine = create_engine("vllm", **VLLM_OPTIONS)
    engine.load()
    loaded = nvml_device_used_gib()
    generate(engine, 16)
    engine.unload()
    time.sleep(3)
    after = nvml_device_used_gib()
    assert loaded - before > 1.0  # the share was taken
    assert after <= before * 1.05, (before, loaded, after)


@pytest.mark.parametrize("name", ["bf16", "bf16-compiled", "nf4", "int8", "spec"])
def test_in_process_unload_returns_device_memory_within_5_percent(name):
    """The H100 reliability table's in-process rows: NVML (whole device) before load, loaded, after unload."""
    import torch
    torch.cuda.init()
    before = nvml_device_used_gib()
    engine = create_engine(name, device="cuda")
    engine.load()
    generate(engine, 16)
    loaded = nvml_device_used_gib()
    engine.unload()
    time.sleep(1)
    after = nvml_device_used_gib()
    assert loaded > before, (name, before, loaded)
    assert after <= before * 1.05, (name, before, loaded, after)


def test_a_real_out_of_memory_is_a_readable_error_and_the_engine_works_after():
    """A filler takes nearly all free device memory, so a long prompt runs out inside generate(); the error
    says so in words, and once the filler is freed the same engine generates again without a reload."""
    import torch

    from engines.protocol import EngineError
    engine = create_engine("bf16", device="cuda")
    engine.load()
    try:
        torch.cuda.empty_cache()
        free_bytes, _ = torch.cuda.mem_get_info()
        filler = torch.empty(max(0, free_bytes - 16 * 1024 ** 2), dtype=torch.uint8, device="cuda")
        with pytest.raises(EngineError, match="out of memory"):
            list(engine.stream(" ".join(["history"] * 6000), GenerationParams(max_new_tokens=64)))
        del filler
        torch.cuda.empty_cache()
        assert generate(engine, 16).strip()
    finally:
        engine.unload()
