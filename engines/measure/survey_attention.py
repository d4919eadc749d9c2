"""Attention choices of the survey's speed table: transformers' implementations and PyTorch SDPA's own
kernels, a cheap check that a kernel runs on this device before any engine is loaded for it, and the
switch of a loaded engine's kernel between generations."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

from engines.variants.transformers.attention import sdpa_backend_context

# key -> (attn_implementation the model is built with, SDPA kernel pinned per generate)
ATTENTION_CHOICES = {"eager": ("eager", "auto"), "sdpa": ("sdpa", "auto"), "sdpa-flash": ("sdpa", "flash"),
                     "sdpa-efficient": ("sdpa", "efficient"), "sdpa-cudnn": ("sdpa", "cudnn"),
                     "sdpa-math": ("sdpa", "math"), "flash_attention_2": ("flash_attention_2", "auto")}
PRIMARY_ATTENTION = "sdpa"


def sdpa_kernel_reason(backend: str, device: str, dtype_name: str, head_dim: int) -> str | None:
    """None when PyTorch SDPA's `backend` kernel runs a causal attention of this head size and dtype on
    `device`, else why not (tried on a tiny tensor; the model itself may still refuse, e.g. a mask)."""
    if backend == "auto":
        return None
    import torch
    import torch.nn.functional as F
    query = torch.zeros(1, 2, 4, head_dim, dtype=getattr(torch, dtype_name), device=device)
    try:
        with warnings.catch_warnings(), sdpa_backend_context(backend):
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(query, query, query, is_causal=True)
    except RuntimeError as error:
        where = "a GPU-only kernel (PyTorch has no CPU implementation)" if device == "cpu" else \
            f"not for head_dim {head_dim} in {dtype_name} on this GPU"
        return f"SDPA {backend}: {where}; torch: {str(error).split('. ')[0][:120]}"
    return None


@contextlib.contextmanager
def sdpa_backend_of(engine, backend: str):
    """Pin a loaded transformers engine's SDPA kernel for the block (its own option, read per generate)."""
    original = getattr(engine, "options", None)
    if not hasattr(original, "sdpa_backend"):
        yield
        return
    engine.options = dataclasses.replace(original, sdpa_backend=backend)
    try:
        yield
    finally:
        engine.options = original
