"""The engine handles the playground holds: one pool per app, created in main(), never at import.

Engines are heavy (a model each) and one GPU is shared by every visitor, so loaded engines belong to
the app, not to a browser session; Gradio's queue lets one engine event run at a time. A browser
session owns only its stop flag (RunControls), so Stop or a closed tab ends that session's run.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from engines.models.catalog import allowed_models, catalog_entries, default_model_name, is_hosted
from engines.protocol import Engine, EngineError, ProgressCallback, describe_error, say
from engines.registry import create_engine, list_engines

# What `make play` serves when neither --model nor PLAYGROUND_MODEL names one: the embedded instruct model
# in chat mode (a first visitor's question gets an answer). The catalogue's own default (the Gemma base)
# stays what the engines and their tests use when no model is named.
APP_DEFAULT_MODEL = "smollm2-135m-instruct"


def app_default_model(environ=os.environ) -> str:
    """The model the app starts with: PLAYGROUND_MODEL, else APP_DEFAULT_MODEL where it is allowed (hosted
    pages take only allow-listed models), else the catalogue's default."""
    if environ.get("PLAYGROUND_MODEL"):
        return environ["PLAYGROUND_MODEL"]
    if not is_hosted() or APP_DEFAULT_MODEL in allowed_models():
        return APP_DEFAULT_MODEL
    return default_model_name()


def can_download(environ=os.environ) -> bool:
    """Whether hub models are offered: PLAYGROUND_PREFER_HUB=1, or HF_HUB_OFFLINE explicitly 0 (a machine
    known to reach the hub). Unset counts as offline: the machines this runs on mostly cannot download."""
    return environ.get("PLAYGROUND_PREFER_HUB") == "1" or environ.get("HF_HUB_OFFLINE", "").strip() in ("0", "false")


def model_choices(current: str | None, environ=os.environ) -> list[str]:
    """The model switcher's list: hosted, the allow-listed models only; else the catalogue models that can
    run here (embedded ones always, hub ones when this machine can download), plus `current` (--model)."""
    if is_hosted():
        names = list(allowed_models())
    else:
        names = [name for name, entry in catalog_entries().items() if entry.is_embedded or can_download(environ)]
    if current and current not in names:
        names.append(current)
    return names


@dataclass(frozen=True)
class PaneChoice:
    """One entry of the engine picker: a registry engine, optionally with engine options."""
    key: str
    engine: str
    label: str
    options: dict = field(default_factory=dict)
    is_available: bool = True
    reason: str = ""


# A second transformers configuration of the baseline, so two panes can compare attention kernels.
EXTRA_CHOICES = (("bf16-eager", "bf16", "BF16, eager attention", {"attn_implementation": "eager"}),)


def build_choices() -> list[PaneChoice]:
    """Every registry engine (available or not, with its reason), then the extra configurations."""
    engines = list_engines()
    choices = [PaneChoice(row["name"], row["name"], row["label"], {}, row["is_available"], row["reason"])
               for row in engines]
    by_name = {row["name"]: row for row in engines}
    for key, engine, label, options in EXTRA_CHOICES:
        base = by_name[engine]
        choices.append(PaneChoice(key, engine, label, options, base["is_available"], base["reason"]))
    return choices


class EnginePool:
    """Loaded engines by pane key. Thread-safe: panes load and stream from worker threads."""

    def __init__(self, model: str | None, choices: list[PaneChoice],
                 engine_factory: Callable[..., Engine] = create_engine):
        self.model = model
        self.extra_options: dict[str, dict] = {}   # per key, e.g. a vLLM gpu_memory_utilization from the memory plan
        self.choices = {choice.key: choice for choice in choices}
        self._engine_factory = engine_factory
        self._engines: dict[str, Engine] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        # One load at a time: transformers' lazy imports are not safe when two threads import first,
        # and two models materialising at once can need twice the peak memory.
        self._load_lock = threading.Lock()
        self.bandwidth_gb_s: dict[str, float] = {}   # device -> copy bandwidth, measured once per process
        self._shape = None                             # the model's shape, for the live roofline

    @property
    def model_name(self) -> str:
        return self.model or default_model_name()

    def plan_label(self, key: str) -> str:
        """The memory planner's label of a pane key: the engine with its options in brackets."""
        choice = self.choice(key)
        if not choice.options:
            return choice.engine
        return f"{choice.engine}[{','.join(f'{name}={value}' for name, value in choice.options.items())}]"

    def switch_model(self, model: str, progress: ProgressCallback | None = None) -> list[str]:
        """Unload every engine of the current model (saying which, one by one), then use `model`."""
        with self._lock:
            engines, self._engines = self._engines, {}
            unloaded, self._loaded = sorted(self._loaded), set()
        for key, engine in engines.items():
            say(progress, f"unloading {key} ({self.model_name})")
            engine.unload()
        self.model = model
        self.extra_options = {}
        self._shape = None
        return unloaded

    def choice(self, key: str) -> PaneChoice:
        if key not in self.choices:
            raise EngineError(f"unknown engine '{key}'. Known engines: {', '.join(self.choices)}")
        return self.choices[key]

    def adopt(self, key: str, engine: Engine) -> None:
        """Hand the pool an engine that is already loaded (the tests share one across files)."""
        with self._lock:
            self._engines[key] = engine
            self._loaded.add(key)

    def engine(self, key: str) -> Engine:
        choice = self.choice(key)
        if not choice.is_available:
            raise EngineError(f"{key} is unavailable here: {choice.reason}")
        with self._lock:
            if key not in self._engines:
                options = {**choice.options, **self.extra_options.get(key, {})}
                self._engines[key] = self._engine_factory(choice.engine, model=self.model, **options)
            return self._engines[key]

    def is_loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._loaded

    def load(self, key: str, progress: ProgressCallback | None = None) -> Engine:
        engine = self.engine(key)
        with self._load_lock:
            engine.load(progress)
            self._prepare_roofline(engine, progress)
        with self._lock:
            self._loaded.add(key)
        return engine

    def _prepare_roofline(self, engine: Engine, progress: ProgressCallback | None) -> None:
        """Measure the engine's device bandwidth once and read the model's shape, at load time (never
        while a pane streams, which the copy would slow down)."""
        from engines.measure.roofline import measure_bandwidth
        from engines.models.sources import load_shape
        if engine.precision() is None or engine.device == "remote":
            return
        try:
            if engine.device not in self.bandwidth_gb_s:
                say(progress, f"measuring {engine.device} memory bandwidth once, for the live roofline")
                self.bandwidth_gb_s[engine.device] = measure_bandwidth(engine.device).bandwidth_gb_s
            if self._shape is None:
                self._shape = load_shape(self.model_name)
        except Exception as error:  # the roofline is an estimate beside the pane; never a reason to fail a load
            say(progress, f"no live roofline: {describe_error(error)}")

    def roofline_frac(self, key: str, stats) -> float | None:
        """The pane's estimated fraction of its batch-1 decode roofline (engines/measure/roofline.py), from
        the engine's declared bytes per weight and KV element; None before its load measured the bandwidth."""
        from engines.measure.roofline import live_roofline_frac
        if stats is None or not self.is_loaded(key):
            return None
        engine = self.engine(key)
        precision = engine.precision()
        bandwidth_gb_s = self.bandwidth_gb_s.get(engine.device)
        if precision is None or bandwidth_gb_s is None or self._shape is None:
            return None
        return live_roofline_frac(self._shape, precision, bandwidth_gb_s, stats)

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def unload(self, key: str) -> bool:
        """Unload one engine and forget it, so its next run loads afresh (a reload after a fault)."""
        with self._lock:
            engine = self._engines.pop(key, None)
            was_loaded = key in self._loaded
            self._loaded.discard(key)
        if engine is not None:
            engine.unload()
        return was_loaded

    def unload_all(self) -> list[str]:
        """Unload every engine and forget it, so the next run loads afresh (a reload)."""
        with self._lock:
            engines, self._engines = self._engines, {}
            unloaded, self._loaded = sorted(self._loaded), set()
        for engine in engines.values():
            engine.unload()
        return unloaded


class RunControls:
    """Stop flags by browser session, so Stop or a closed tab reaches that session's workers."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> bool:
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]
