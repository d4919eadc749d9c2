"""One copy of the weights for every in-process engine that runs the same weights at the same precision.

`bf16`, `bf16[attn_implementation=eager]`, `bf16-compiled` and `spec` (prompt lookup) all run the
checkpoint's weights unquantized in one dtype. Loaded side by side they used to hold one copy each
(0.5 GiB apiece for the embedded model, 16 GiB for an 8B shape). Here a process-wide cache, keyed by
(checkpoint path, dtype, device, random weights or not) and reference-counted, lets the second engine's
load reuse the first one's parameter tensors:

- The first engine builds its model as before (`build()`: from_pretrained, or random weights for a
  dummy shape) and the cache keeps its parameters, its buffers and a copy of its config and
  generation config, taken before the engine changes either (bf16-compiled sets a static cache).
- Every later engine builds its own model on the meta device from that config with its own
  `attn_implementation` (`PreTrainedModel._from_config` under `torch.device("meta")`, which is how
  transformers 5.19's from_pretrained itself starts), then assigns the cached Parameter objects into it
  by name (tied weights such as Gemma's lm_head/embed_tokens stay one tensor) and gives it its own
  clone of every buffer (rotary inv_freq and embedding scales are non-persistent buffers, absent from a
  state dict, and small; a dynamic-RoPE model updates inv_freq in place, so buffers are not shared).
  Each engine thus has its own module tree, config, generation config and attention, over one set of
  weight tensors. Nothing in generation writes to parameters, so sharing cannot change any engine's text.
- `release(model)` (the engine's unload) drops one reference; when the last user releases, the cache
  forgets the tensors and they are freed with the last model. A model that is garbage-collected without
  release() releases through a weakref finalizer, so a forgotten unload cannot pin the weights.

Which engines share is declared by data: `weights_key(engine)` is None unless the engine's own
precision() says every weight is stored in its compute dtype (quantized variants report fewer bytes per
linear weight, so nf4, int8 and gptq-int4 never share), and `load_model(None, ...)` just builds.
Should a rebuild ever not match (a parameter name missing, a tensor left on meta), the engine gets an
unshared model of its own instead: sharing is an optimisation and never a reason to fail a load.
"""
from __future__ import annotations

import copy
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engines.models.catalog import DUMMY_PREFIX, default_model_name
from engines.telemetry import DTYPE_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsKey:
    """What an engine declares about its weights before loading: engines with equal keys share one copy.
    `model` is the name the engine was created with (the default model when none); the cache itself is
    keyed by the resolved checkpoint path."""
    model: str
    dtype: str
    device: str
    is_random: bool = False

    def describe(self) -> str:
        return f"{self.model} {self.dtype} on {self.device}" + (" (random weights)" if self.is_random else "")


def normalize_device(device: str) -> str:
    """'cuda' is device 0 in this project (engines never change the current device)."""
    return "cuda:0" if device == "cuda" else device


def weights_key(engine) -> WeightsKey | None:
    """The engine's shareable-weights declaration, or None when its weights are its own. Reads only the
    created (not loaded) engine: its options (dtype, dummy_weights), device, model name and precision()."""
    options = engine.options
    dtype = options.dtype
    precision = engine.precision()
    if not options.share_weights or dtype not in DTYPE_BYTES or precision is None:
        return None
    dtype_bytes = DTYPE_BYTES[dtype]
    if precision.linear_bytes_per_weight != dtype_bytes or precision.other_bytes_per_weight != dtype_bytes:
        return None  # quantized: the weights are packed per engine
    model = engine.model_name or default_model_name()
    is_random = options.dummy_weights or model.startswith(DUMMY_PREFIX)
    return WeightsKey(model, dtype, normalize_device(str(engine.device)), is_random)


@dataclass
class _Entry:
    key: WeightsKey
    model_class: type
    config: object                      # a private copy of the first model's config
    generation_config: object           # likewise, copied before any engine edits its own
    parameters: dict                    # name -> Parameter (tied names map to the same object)
    buffers: dict                       # name -> tensor, cloned into each later model
    users: int = 0


_lock = threading.RLock()               # guards _entries and _key_locks; re-entrant for finalizers run by gc
_entries: dict[tuple, _Entry] = {}
_key_locks: dict[tuple, threading.RLock] = {}
_finalizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_key(key: WeightsKey, path: Path | str) -> tuple:
    return (str(Path(path).resolve()), key.dtype, key.device, key.is_random)


def load_model(key: WeightsKey | None, path: Path | str, attn_implementation: str, build: Callable[[], object]):
    """The model for one engine: `build()` for the first user of (path, dtype, device) or when `key` is
    None; for later users, a model of their own over the first one's parameter tensors."""
    if key is None:
        return build()
    cache_key = _cache_key(key, path)
    with _lock:
        key_lock = _key_locks.setdefault(cache_key, threading.RLock())
    with key_lock:  # one build per key; loads of other keys go on meanwhile
        with _lock:
            entry = _entries.get(cache_key)
        if entry is None:
            model = build()
            entry = _entry_from(key, model)
            with _lock:
                _entries[cache_key] = entry
        else:
            model = _rebuild(entry, attn_implementation)
            if model is None:
                return build()
        with _lock:
            entry.users += 1
            _entries.setdefault(cache_key, entry)  # back in, should the last user have left meanwhile
            _finalizers[model] = weakref.finalize(model, _release_key, cache_key, entry)
    return model


def release(model) -> None:
    """One user fewer for the model's weights (an engine's unload); a model not from the cache is ignored."""
    if model is None:
        return
    with _lock:
        finalizer = _finalizers.pop(model, None)
    if finalizer is not None:
        finalizer()  # runs _release_key once; a later garbage collection of the model does nothing


def _release_key(cache_key: tuple, entry: _Entry) -> None:
    with _lock:
        entry.users -= 1
        if entry.users <= 0 and _entries.get(cache_key) is entry:
            del _entries[cache_key]  # the tensors go with the last model that holds them


def resident_keys() -> set[WeightsKey]:
    """The declared keys whose weights are loaded in this process now (the memory plan counts them as paid)."""
    with _lock:
        return {entry.key for entry in _entries.values()}


def num_users(key: WeightsKey, path: Path | str) -> int:
    """How many loaded engines use these weights now (0: not in the cache)."""
    with _lock:
        entry = _entries.get(_cache_key(key, path))
        return entry.users if entry else 0


def _entry_from(key: WeightsKey, model) -> _Entry:
    return _Entry(key=key, model_class=type(model), config=copy.deepcopy(model.config),
                  generation_config=copy.deepcopy(getattr(model, "generation_config", None)),
                  parameters=dict(model.named_parameters(remove_duplicate=False)),
                  buffers=dict(model.named_buffers(remove_duplicate=False)))


def _rebuild(entry: _Entry, attn_implementation: str):
    """A new model of the entry's class and config with this engine's attention, holding the entry's
    parameters; None when the result would not match the first model exactly."""
    import torch
    dtype = getattr(torch, entry.key.dtype)
    try:
        with torch.device("meta"):
            model = entry.model_class._from_config(copy.deepcopy(entry.config), dtype=dtype,
                                                   attn_implementation=attn_implementation)
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        buffer_names = [name for name, _ in model.named_buffers(remove_duplicate=False)]
        if set(names) != set(entry.parameters) or set(buffer_names) != set(entry.buffers):
            raise ValueError("the rebuilt model's parameter or buffer names differ from the first model's")
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._parameters[leaf] = entry.parameters[name]
        for name in buffer_names:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = entry.buffers[name].clone()
        left_on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if left_on_meta:
            raise ValueError(f"tensors left on the meta device: {', '.join(left_on_meta[:3])}")
        if entry.generation_config is not None:
            model.generation_config = copy.deepcopy(entry.generation_config)
        return model.eval()
    except Exception as error:  # sharing is an optimisation: fall back to a copy of its own
        logger.warning("shared weights: could not reuse %s (%s); loading a separate copy", entry.key.describe(), error)
        return None
