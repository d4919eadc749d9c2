"""What this machine can do, detected without importing torch or vLLM: a GPU through NVML, CPU features
through /proc/cpuinfo. Machines of one kind differ (AVX2 only on one, AVX-512 on another), so the
registry and the variants branch on these readings, never on a machine name.
"""
from __future__ import annotations

import os
from functools import lru_cache

# vLLM's rule for an FP8 KV cache on CPU; engines/variants/vllm/support.py checks it again with torch's own predicates.
FP8_KV_CPU_ISA_REASON = "FP8 KV cache on CPU requires x86 with AVX-512 or AMX (vLLM); this CPU has neither"


@lru_cache(maxsize=1)
def has_gpu() -> bool:
    if os.environ.get("PLAYGROUND_FORCE_CPU") == "1":
        return False
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
