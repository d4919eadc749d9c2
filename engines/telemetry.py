"""Telemetry measured where the work happens: token clocks in the producing thread, memory per process.

Definitions (DESIGN.md):
- ttft_s is from submit (GenerationRecorder.start) to the first generated token.
- decode_tok_s is (num_tokens - 1) / (last_token_time - first_token_time).
- ITL is per token: a chunk of k tokens that arrives dt after the previous chunk gives k gaps of dt/k.
- Memory is read from the process that holds the engine: NVML per process on a GPU (with the torch peak
  where the engine is in-process), resident set size on CPU.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from engines.protocol import GIB, EngineStats, StatSample

# Bytes per element of the dtypes engines compute in; vLLM's 'auto' is the checkpoint's bf16.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
KvProbe = Callable[[], dict]


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[rank]


def _nvml_handle(device_index: int):
    import pynvml
    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def nvml_process_memory_gib(pids: set[int], device_index: int = 0) -> float | None:
    """GPU memory used by the given processes, or None when NVML cannot attribute it (no GPU, or a
    container whose PID namespace hides the processes)."""
    try:
        import pynvml
        handle = _nvml_handle(device_index)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    used = [p.usedGpuMemory for p in processes if p.pid in pids and p.usedGpuMemory is not None]
    return sum(used) / GIB if used else None


def nvml_device_used_gib(device_index: int = 0) -> float | None:
    try:
        import pynvml
        return pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(device_index)).used / GIB
    except Exception:
        return None


def process_tree_pids() -> set[int]:
    """This process and its descendants: vLLM's EngineCore runs as a child."""
    root = psutil.Process(os.getpid())
    return {root.pid} | {child.pid for child in root.children(recursive=True)}


@dataclass
class MemoryReading:
    memory_gib: float | None  # None: nothing on this machine can measure it (kind says why)
    kind: str


class MemoryProbe:
    """Reads the memory of the engine's process tree. On CPU: RSS. On a GPU: NVML per process,
    falling back to torch's reserved bytes (in-process engines) or the device delta since load."""

    def __init__(self, device: str, is_in_process: bool = True, baseline_device_gib: float | None = None):
        self.device = device
        # "cuda:1" reads GPU 1; "cuda" is the current device, 0 unless the process chose another.
        self.device_index = int(device.partition(":")[2] or 0)
        self.is_in_process = is_in_process
        self.baseline_device_gib = baseline_device_gib

    def read(self) -> MemoryReading:
        if self.device == "cpu":
            rss = sum(_rss(pid) for pid in process_tree_pids())
            return MemoryReading(rss / GIB, "rss")
        gpu_gib = nvml_process_memory_gib(process_tree_pids(), self.device_index)
        if gpu_gib is not None:
            return MemoryReading(gpu_gib, "nvml-process")
        if self.is_in_process:
            import torch
            return MemoryReading(torch.cuda.memory_reserved(self.device_index) / GIB, "torch-reserved")
        device_gib = nvml_device_used_gib(self.device_index)
        if device_gib is not None and self.baseline_device_gib is not None:
            return MemoryReading(device_gib - self.baseline_device_gib, "nvml-device-delta")
        return MemoryReading(None, "unavailable")

    def torch_peak_gib(self) -> float | None:
        if self.device == "cpu" or not self.is_in_process:
            return None
        import torch
        return torch.cuda.max_memory_allocated(self.device_index) / GIB


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS. glibc keeps freed arenas mapped, so
    without malloc_trim an unloaded model's memory stays in the RSS (about 150 MiB of the embedded
    model's 850 MiB, measured) although nothing uses it."""
    import ctypes
    import ctypes.util
    import gc
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; musl and macOS lack it
            libc.malloc_trim(0)
    except OSError:
        pass


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class GenerationRecorder:
    """Clocks one generation. on_tokens() runs in the thread that produces tokens, so UI work never
    delays a timestamp; a sampler thread records memory and KV usage over time for the charts."""

    def __init__(self, engine: str, memory: MemoryProbe, kv_probe: KvProbe | None = None,
                 sample_interval_s: float = 0.1):
        self.engine = engine
        self.memory = memory
        self.kv_probe = kv_probe
        self.sample_interval_s = sample_interval_s
        self._lock = threading.Lock()
        self._stats = EngineStats(engine=engine)
        self._chunk_times: list[tuple[float, int]] = []
        self._submit_time = 0.0
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self, num_prompt_tokens: int = 0) -> None:
        self._submit_time = time.perf_counter()
        with self._lock:
            self._stats = EngineStats(engine=self.engine, num_prompt_tokens=num_prompt_tokens)
            self._chunk_times = []
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample_loop, name=f"{self.engine}-sampler", daemon=True)
        self._sampler.start()

    def on_tokens(self, num_tokens: int) -> None:
        now = time.perf_counter()
        if num_tokens <= 0:
            return
        with self._lock:
            self._chunk_times.append((now, num_tokens))
            self._stats.num_tokens += num_tokens

    def update(self, **fields) -> None:
        """Engine-specific counters (KV blocks, speculative acceptance) set by the engine."""
        with self._lock:
            for key, value in fields.items():
                setattr(self._stats, key, value)

    def finish(self, reason: str = "stop") -> EngineStats:
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        self._take_sample()
        with self._lock:
            self._stats.is_finished = True
            self._stats.finish_reason = reason
            self._stats.total_s = time.perf_counter() - self._submit_time
        return self.snapshot()

    def snapshot(self) -> EngineStats:
        with self._lock:
            stats = EngineStats(**{**self._stats.__dict__, "samples": list(self._stats.samples)})
            chunks = list(self._chunk_times)
        if chunks:
            first_time, last_time = chunks[0][0], chunks[-1][0]
            stats.ttft_s = first_time - self._submit_time
            stats.decode_s = last_time - first_time
            if stats.num_tokens > 1 and stats.decode_s > 0:
                stats.decode_tok_s = (stats.num_tokens - 1) / stats.decode_s
            gaps = [(t - t_prev) / k for (t_prev, _), (t, k) in zip(chunks, chunks[1:]) for _ in range(k)]
            stats.itl_ms_p50 = _ms(percentile(gaps, 0.5))
            stats.itl_ms_p95 = _ms(percentile(gaps, 0.95))
        if not stats.is_finished:
            stats.total_s = time.perf_counter() - self._submit_time
        return stats

    def _sample_loop(self) -> None:
        while not self._stop_sampling.wait(self.sample_interval_s):
            self._take_sample()

    def _take_sample(self) -> None:
        reading = self.memory.read()
        kv = self.kv_probe() if self.kv_probe else {}
        now = time.perf_counter()
        with self._lock:
            window_start = now - 1.0
            recent = sum(k for t, k in self._chunk_times if t >= window_start)
            stats = self._stats
            stats.memory_gib = reading.memory_gib
            stats.memory_kind = reading.kind
            stats.torch_peak_gib = self.memory.torch_peak_gib()
            if reading.memory_gib is not None:
                stats.peak_memory_gib = max(stats.peak_memory_gib or 0.0, reading.memory_gib)
            for key, value in kv.items():
                setattr(stats, key, value)
            if kv.get("kv_used_frac") is not None:
                stats.kv_peak_used_frac = max(stats.kv_peak_used_frac or 0.0, kv["kv_used_frac"])
            stats.samples.append(StatSample(
                t_s=now - self._submit_time, num_tokens=stats.num_tokens, decode_tok_s=float(recent),
                memory_gib=reading.memory_gib, kv_used_frac=kv.get("kv_used_frac"),
                kv_blocks_used=kv.get("kv_blocks_used")))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
