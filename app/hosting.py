"""Hosting specifics: Hugging Face ZeroGPU lends a GPU only inside functions wrapped in spaces.GPU.

On a ZeroGPU Space (SPACES_ZERO_GPU set and the `spaces` package importable) the event functions
that run transformers generation are wrapped, so each run holds the GPU for its duration; vLLM is
reported unavailable there by the registry. Everywhere else the functions are returned unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

ZERO_GPU_DURATION_S = 120


def is_zero_gpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def on_zero_gpu(function: Callable) -> Callable:
    if not is_zero_gpu():
        return function
    import spaces
    return spaces.GPU(duration=ZERO_GPU_DURATION_S)(function)
