"""Attention choices of the transformers engines: which implementation a model is built with, and
which of PyTorch SDPA's own kernels a generate() call may use."""
from __future__ import annotations

import contextlib
import importlib.util

from engines.protocol import EngineError

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# PyTorch SDPA's kernels (torch.nn.attention.SDPBackend names); "auto" lets PyTorch choose per call.
SDPA_BACKENDS = ("auto", "cudnn", "efficient", "flash", "math")
_SDPA_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                       "math": "MATH"}


def attention_unavailable_reason(attn_implementation: str, device: str) -> str | None:
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        return f"unknown attention '{attn_implementation}'; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
    if attn_implementation == "flash_attention_2":
        if device == "cpu":
            return "flash_attention_2 needs a CUDA GPU"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attention_2 needs the flash-attn package, which is not installed"
    return None


def sdpa_backend_context(backend: str):
    """A context manager that pins PyTorch SDPA to one kernel family, or does nothing for "auto"."""
    if backend == "auto":
        return contextlib.nullcontext()
    if backend not in SDPA_BACKENDS:
        raise EngineError(f"unknown sdpa_backend '{backend}'; choose one of {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKEND_NAMES[backend])])
