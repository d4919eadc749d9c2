"""Batch-1 decode roofline: every generated token reads all weights once plus the KV cache so far, so

    roofline tok/s = measured memory bandwidth / (weight bytes read per token + KV bytes at the context)

Bandwidth is measured once per run with a large copy on the engines' device: device-to-device on a GPU
(timed with CUDA events after a synchronize), RAM-to-RAM on a CPU. A copy reads and writes every byte,
so bandwidth = 2 * size / time, the median of the repeats after one warm-up; units are 1e9 bytes/s.
On a CPU decode is often compute-bound rather than memory-bound, so the CPU fraction is a lower bound
on how well an engine uses the machine, not a target.

Weight counts come from the model shape (engines/models/shape.py) and bytes per element from the
engine's own `precision()` (its resolved options: quantization, compute dtype, KV dtype), never from
its name, so the same figure serves engines whose weights live in another process (vLLM). The
embedding table is not counted (a token reads one row of it); the output head is read in full.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from engines.measure.kv_calc import kv_bytes
from engines.models.shape import ModelShape
from engines.protocol import GIB, EngineStats, Precision
from engines.telemetry import DTYPE_BYTES  # noqa: F401  (re-exported for the variants' own roofline bytes)


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
    copy_bytes = copy_bytes or (2 * GIB if is_cuda else 256 * 1024 ** 2)
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


def decode_roofline(shape: ModelShape, precision: Precision, bandwidth_gb_s: float, context_tokens: int) -> Roofline:
    """The batch-1 decode ceiling on `shape` at an average context of `context_tokens`, for an engine
    that reads what `precision` says per weight and per KV element."""
    weight_bytes = shape.num_linear_params * precision.linear_bytes_per_weight \
        + shape.num_lm_head_params * precision.other_bytes_per_weight
    kv = kv_bytes(shape, context_tokens, precision.kv_bytes_per_element)
    total = weight_bytes + kv
    return Roofline(total, weight_bytes, kv, context_tokens, bandwidth_gb_s * 1e9 / total)


def live_roofline_frac(shape: ModelShape, precision: Precision, bandwidth_gb_s: float,
                       stats: EngineStats) -> float | None:
    """The fraction of its batch-1 decode roofline a running request is at: its decode tok/s over the
    ceiling for the bytes the engine declares it reads per token (weights, and KV at the request's
    average context so far). An estimate: a speculative engine, which reads the weights once for several
    tokens, can pass 1. None before the request has a decode rate."""
    if not stats.decode_tok_s or not bandwidth_gb_s:
        return None
    context_tokens = (stats.num_prompt_tokens or 0) + stats.num_tokens // 2
    return stats.decode_tok_s / decode_roofline(shape, precision, bandwidth_gb_s, context_tokens).roofline_tok_s
