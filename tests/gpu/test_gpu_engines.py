"""On the GPU: vllm-int4 serves the GPTQ checkpoint through Marlin, names its kernel and the roofline bytes it
reads; gptq-int4 runs the backend it is told (the automatic choice tries to download CUTLASS offline); vLLM's
unload returns device memory to within 5% of its level before load."""
from __future__ import annotations

import time

import pytest

from engines.protocol import GenerationParams
from engines.registry import create_engine
from engines.telemetry import nvml_device_used_gb

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
    before = nvml_device_used_gb()
    engine = create_engine("vllm", **VLLM_OPTIONS)
    engine.load()
    loaded = nvml_device_used_gb()
    generate(engine, 16)
    engine.unload()
    time.sleep(3)
    after = nvml_device_used_gb()
    assert loaded - before > 1.0  # the share was taken
    assert after <= before * 1.05, (before, loaded, after)
