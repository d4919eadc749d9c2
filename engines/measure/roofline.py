"""Batch-1 decode roofline: every generated token reads all weights once plus the KV cache so far, so

    roofline tok/s = measured memory bandwidth / (weight bytes read per token + KV bytes at the context)

Bandwidth is measured once per run with a large copy on the engines' device: device-to-device on a GPU
(timed with CUDA events after a synchronize), RAM-to-RAM on a CPU. A copy reads and writes every byte,
so bandwidth = 2 * size / time, the median of the repeats after one warm-up; units are 1e9 bytes/s.
On a CPU decode is often compute-bound rather than memory-bound, so the CPU fraction is a lower bound
on how well an engine uses the machine, not a target.

Weight bytes come from the model shape (engines/models/shape.py), not from the loaded engine, so the
same figure serves engines whose weights live in another process (vLLM). The embedding table is not
counted (a token reads one row of it); the output head is read in full.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from engines.measure.kv_calc import kv_bytes
from engines.models.shape import ModelShape

GROUP_SIZE = 128
# Bytes per weight of the quantized linear layers, the output head staying in the model dtype, as the
# variants configure them: GPTQ 4-bit with an fp16 scale and a 4-bit zero point per group of 128;
# bitsandbytes NF4 with an fp32 absmax per block of 64 (no double quantization); LLM.int8 with one fp32
# scale per output row (negligible, left out).
QUANTIZED_LINEAR_BYTES = {
    "gptq-int4": 0.5 + 2 / GROUP_SIZE + 0.5 / GROUP_SIZE,
    "nf4": 0.5 + 4 / 64,
    "int8": 1.0,
}
FP8_KV_ENGINES = ("vllm-fp8kv",)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass
class Bandwidth:
    bandwidth_gb_s: float       # 1e9 bytes per second, read + write
    copy_bytes: int
    num_repeats: int
    device: str
    method: str


@dataclass
class Roofline:
    bytes_per_token: float
    weight_bytes: float
    kv_bytes: float
    context_tokens: int
    roofline_tok_s: float


def measure_bandwidth(device: str, copy_bytes: int | None = None, num_repeats: int = 10) -> Bandwidth:
    """Median copy bandwidth of `device` ("cuda", "cuda:N" or "cpu")."""
    import torch
    is_cuda = device.startswith("cuda")
    copy_bytes = copy_bytes or (2 * 1024 ** 3 if is_cuda else 256 * 1024 ** 2)
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: first touch of the pages, kernel selection
    seconds = []
    for _ in range(num_repeats):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            target.copy_(source)
            end.record()
            torch.cuda.synchronize(device)
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            target.copy_(source)
            seconds.append(time.perf_counter() - started)
    del source, target
    if is_cuda:
        torch.cuda.empty_cache()
    method = "torch device-to-device copy, CUDA events" if is_cuda else "torch RAM-to-RAM copy, perf_counter"
    return Bandwidth(2 * copy_bytes / statistics.median(seconds) / 1e9, copy_bytes, num_repeats, device, method)


def linear_bytes_per_weight(engine: str, dtype: str = "bfloat16") -> float:
    return QUANTIZED_LINEAR_BYTES.get(engine, DTYPE_BYTES.get(dtype, 2))


def kv_bytes_per_element(engine: str, dtype: str = "bfloat16") -> float:
    return 1 if engine in FP8_KV_ENGINES else DTYPE_BYTES.get(dtype, 2)


def decode_roofline(shape: ModelShape, engine: str, bandwidth_gb_s: float, context_tokens: int,
                    dtype: str = "bfloat16") -> Roofline:
    """The batch-1 decode ceiling of `engine` on `shape` at an average context of `context_tokens`."""
    head_bytes = DTYPE_BYTES.get(dtype, 2)
    weight_bytes = shape.num_linear_params * linear_bytes_per_weight(engine, dtype) \
        + shape.num_lm_head_params * head_bytes
    kv = kv_bytes(shape, context_tokens, kv_bytes_per_element(engine, dtype))
    total = weight_bytes + kv
    return Roofline(total, weight_bytes, kv, context_tokens, bandwidth_gb_s * 1e9 / total)
