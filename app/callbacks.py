"""What the page's events do: pick engines, load, run (streamed), stop, unload, quality, export.

One `Playground` is created per app in main(); it holds the engine pool and the per-session stop
flags. Event functions return tuples in the order of the output lists that app/layout.py builds
(`run_outputs`), so the callbacks never touch components and can be tested without a browser.
Bad input becomes a status line; an engine's failure stays in its own pane.
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr

from app import charts, text
from app.export import summary_rows, write_run_files
from app.session import EnginePool, RunControls
from app.streaming import MODES, PaneResult, RunRecord, StreamMerger
from engines.protocol import EngineError, GenerationParams, describe_error, validate_prompt

REFERENCE_ENGINE = "bf16"
LIVE_STATUSES = ("waiting", "loading", "running")


@dataclass(frozen=True)
class AppConfig:
    """How the app was started: `python -m app` options, or the Space's environment."""
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_panes: int = 6
    refresh_hz: float = 5.0
    chart_interval_s: float = 1.0
    max_queue: int = 16
    export_dir: str | None = None
    quality_num_tokens: int | None = None   # None: the whole bf16 reference (engines/measure/quality.py)
    quality_max_prompts: int | None = None


class Playground:
    """The app's event functions, bound to one engine pool."""

    def __init__(self, config: AppConfig, pool: EnginePool):
        self.config = config
        self.pool = pool
        self.controls = RunControls()
        self._reference = None
        self._reference_lock = threading.Lock()

    # Engine picker -----------------------------------------------------------------------------
    def select(self, keys: list[str] | None):
        """Show one pane per chosen engine, titled, and hide the rest."""
        keys = list(keys or [])
        shown = keys[:self.config.max_panes]
        note = (f"Only the first {self.config.max_panes} engines get a pane; {len(keys) - len(shown)} left out."
                if len(keys) > len(shown) else "")
        columns, titles = [], []
        for index in range(self.config.max_panes):
            is_shown = index < len(shown)
            columns.append(gr.update(visible=is_shown))
            titles.append(text.pane_title(self.pool.choice(shown[index]).label, shown[index], "waiting")
                          if is_shown else "")
        return (note, *columns, *titles)

    # Load, run, stop, unload ---------------------------------------------------------------------
    def load(self, keys: list[str] | None, request: gr.Request | None = None):
        """Load the chosen engines in parallel, each pane showing its own progress."""
        yield from self._stream(keys, None, GenerationParams(), "parallel", request)

    def run(self, prompt, max_new_tokens, temperature, seed, mode, keys, request: gr.Request | None = None):
        """Stream the prompt through every chosen engine; yields page updates, throttled."""
        try:
            params = GenerationParams(max_new_tokens=_whole(max_new_tokens, "max new tokens"),
                                      temperature=temperature if temperature is not None else float("nan"),
                                      seed=_whole(seed, "seed")).validate()
            prompt = validate_prompt(prompt)
            if mode not in MODES:
                raise EngineError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        except EngineError as error:
            yield self._message_only(f"⚠️ {error}")
            return
        yield from self._stream(keys, prompt, params, mode, request)

    def _stream(self, keys, prompt, params, mode, request):
        keys = list(keys or [])
        if not keys:
            yield self._message_only("⚠️ pick at least one engine")
            return
        try:
            panes = [PaneResult(key, self.pool.choice(key).label) for key in keys[:self.config.max_panes]]
        except EngineError as error:
            yield self._message_only(f"⚠️ {error}")
            return
        record = RunRecord(self.pool.model or "", prompt, params, mode, panes)
        session = _session(request)
        stop_event = self.controls.start(session)
        merger = StreamMerger(self.pool, record, stop_event, self.config.refresh_hz)
        next_chart = 0.0
        try:
            for record in merger.updates():
                is_chart_due = record.is_finished or time.perf_counter() >= next_chart
                if is_chart_due:
                    next_chart = time.perf_counter() + self.config.chart_interval_s
                yield self.render(record, with_charts=is_chart_due)
        finally:
            self.controls.finish(session, stop_event)

    def stop(self, request: gr.Request | None = None) -> str:
        is_running = self.controls.stop(_session(request))
        return "Stopping every engine…" if is_running else "Nothing is running."

    def after_stop(self, record: RunRecord | None):
        """The page after Stop cancelled a run: unfinished panes read 'stopped', with final stats."""
        if record is None:
            return self._message_only("Stopped.")
        for pane in record.panes:
            if pane.status in LIVE_STATUSES or (pane.status == "ready" and not record.is_load_only):
                if pane.status == "running":
                    pane.stats = self.pool.engine(pane.key).stats()
                pane.status, pane.message = "stopped", "stopped by the user"
        record.is_finished = True
        outputs = list(self.render(record, with_charts=True))
        outputs[0] = text.run_status(record, is_stopped=True)
        return tuple(outputs)

    def unload(self) -> tuple[str, str]:
        unloaded = self.pool.unload_all()
        with self._reference_lock:
            self._reference = None
        status = f"Unloaded {', '.join(unloaded)}; they load again on the next run." if unloaded \
            else "No engine was loaded."
        return status, text.loaded_summary(self.pool.loaded_keys())

    def on_tab_closed(self, request: gr.Request) -> None:
        self.controls.stop(_session(request))

    # Quality and export --------------------------------------------------------------------------
    def quality(self, record: RunRecord | None, is_enabled: bool):
        """Greedy agreement and perplexity against bf16 (engines/measure/quality.py), for the finished panes.
        A generator, so the page says that quality is being computed while it is."""
        if record is None or record.is_load_only or not is_enabled:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        from engines.measure.quality import build_reference, evaluate_quality
        yield gr.skip(), gr.skip(), "Computing quality against bf16 (greedy agreement, perplexity)…"
        problems = []
        try:
            reference = self._quality_reference(build_reference)
        except Exception as error:  # any failure (out of memory too) must replace "Computing quality…"
            yield record, self._summary(record), f"Quality: n/a ({describe_error(error)})"
            return
        for pane in record.panes:
            if pane.status != "done":
                continue
            try:
                report = evaluate_quality(self.pool.engine(pane.key), reference, self.config.quality_num_tokens,
                                          self.config.quality_max_prompts)
            except Exception as error:  # one engine's failure leaves the others' quality standing
                problems.append(f"not computed for {pane.key}: {describe_error(error)}")
                continue
            pane.quality = asdict(report)
            if report.is_suspect:
                problems.append(f"⚠️ {pane.key} looks broken: {report.reason}")
        yield record, self._summary(record), "Quality computed against bf16." + (" " + "; ".join(problems)
                                                                                 if problems else "")

    def _quality_reference(self, build_reference):
        with self._reference_lock:
            if self._reference is None:
                self._reference = build_reference(self.pool.load(REFERENCE_ENGINE))
            return self._reference

    def export(self, record: RunRecord | None):
        if record is None or record.is_load_only:
            return gr.skip(), "Nothing to export yet: run a prompt first."
        root = Path(self.config.export_dir) if self.config.export_dir else Path(tempfile.gettempdir())
        out_dir = Path(tempfile.mkdtemp(prefix="playground-run-", dir=root))
        paths, note = write_run_files(record, out_dir)
        return gr.update(value=[str(path) for path in paths], visible=True), note or f"Exported {len(paths)} files."

    # Rendering -----------------------------------------------------------------------------------
    def render(self, record: RunRecord, with_charts: bool) -> tuple:
        """All run outputs: status, record, loaded engines, pane titles/texts/metrics, 3 charts, summary."""
        titles, texts, metrics = [], [], []
        for index in range(self.config.max_panes):
            if index < len(record.panes):
                pane = record.panes[index]
                titles.append(text.pane_title(pane.label, pane.key, pane.status))
                texts.append(pane.text)
                metrics.append(text.pane_metrics_html(pane.stats, pane.message, pane.status))
            else:
                titles.append(gr.skip()), texts.append(gr.skip()), metrics.append(gr.skip())
        figures = charts.run_figures(record.panes) if with_charts else {}
        chart_outputs = [figures[name] for name in ("tokens_per_second", "memory", "kv_blocks")] if figures \
            else [gr.skip()] * 3
        summary = self._summary(record) if record.is_finished and not record.is_load_only else gr.skip()
        return (text.run_status(record), record, text.loaded_summary(self.pool.loaded_keys()),
                *titles, *texts, *metrics, *chart_outputs, summary)

    def _summary(self, record: RunRecord):
        return text.summary_table(summary_rows(record))

    def _message_only(self, message: str) -> tuple:
        return (message, *[gr.skip()] * (1 + 1 + 3 * self.config.max_panes + 3 + 1))


def _whole(value, name: str):
    """Gradio numbers arrive as floats (None when the box is empty); GenerationParams checks the rest."""
    if value is None:
        raise EngineError(f"{name} is empty: type a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise EngineError(f"{name} must be a whole number, got {value}")
        return int(value)
    return value


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"

