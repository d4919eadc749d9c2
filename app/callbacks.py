"""What the page's events do: pick engines, load, run (streamed), stop, unload, quality, export.

One `Playground` is created per app in main(); it holds the engine pool and the per-session stop
flags. app/layout.py builds the page and hands the Playground its `PlaygroundPage`, the named handles
of the components the events write to. Event functions return `{component: value}` dicts keyed by
those handles; a component left out keeps its value. Tests build the same page (no server, no
browser) and read the updates by name.
Every input is checked here (app/inputs.py), because the page's API passes whatever a client sends:
bad input becomes a status line before anything loads; an engine's failure stays in its own pane.
"""
from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from app import charts, text
from app.export import summary_rows, write_run_files
from app.inputs import chat_histories, flag, model_name, names, one_of, real_number, text_of, whole_number
from app.session import EnginePool, RunControls, model_choices
from app.streaming import MODES, PaneResult, RunRecord, StreamMerger
from engines.protocol import EngineError, GenerationParams, Scoring, describe_error, validate_prompt

if TYPE_CHECKING:
    from app.layout import PlaygroundPage

REFERENCE_ENGINE = "bf16"
RACE = "race"           # the race view's key in PlaygroundPage.charts
LIVE_STATUSES = ("waiting", "loading", "running")
TEMPERATURE_MAX = 2.0   # the page's slider; the engines accept up to 5
SEED_LIMIT = 2 ** 63     # GenerationParams.validate: 0 <= seed < 2**63
CHAT, COMPLETION = "Chat", "Completion"
PROMPT_KINDS = (CHAT, COMPLETION)
SYSTEM_MAX_CHARS = 4000


def default_prompt_kind(model: str) -> str:
    """Chat for a catalogue model with a chat template, completion otherwise."""
    from engines.models.catalog import find_entry
    entry = find_entry(model)
    return CHAT if entry is not None and entry.is_chat else COMPLETION


def plan_on_this_device(labels: list[str], model: str | None):
    from engines.measure.memory_plan import plan_for_device
    return plan_for_device(labels, model)


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
    """The app's event functions, bound to one engine pool and, once app/layout.py built it, one page."""

    def __init__(self, config: AppConfig, pool: EnginePool, planner=plan_on_this_device):
        self.config = config
        self.pool = pool
        self.planner = planner      # (plan labels, model) -> MemoryPlan; tests give simulated capacities
        self.controls = RunControls()
        self._page: PlaygroundPage | None = None
        self._reference = None
        self._reference_lock = threading.Lock()
        self._started_at = time.perf_counter()
        self._preload = {"state": "idle", "note": "", "ready_s": None}   # this app's background load, by one thread

    @property
    def page(self) -> PlaygroundPage:
        if self._page is None:
            raise RuntimeError("the page is not built yet: call app.layout.build_app(playground) first")
        return self._page

    def attach(self, page: PlaygroundPage) -> None:
        """Called by app/layout.py with the components that the events write to."""
        self._page = page

    # Background load at start ---------------------------------------------------------------------
    def default_keys(self) -> list[str]:
        """The picker's initial choice (app/layout.py uses the same): the first available engine."""
        return [next(key for key, choice in self.pool.choices.items() if choice.is_available)][:1]

    def start_preload(self, keys: list[str] | None = None) -> threading.Thread:
        """Load the page's default engines in a background thread (started by main()/create()), so a
        first visitor's Run finds them ready; the page shows progress through its timer."""
        keys = self.default_keys() if keys is None else keys
        self._preload.update(state="loading", note=f"loading {', '.join(keys)} in the background…")
        thread = threading.Thread(target=self._run_preload, args=(keys,), name="preload", daemon=True)
        thread.start()
        return thread

    def _run_preload(self, keys: list[str]) -> None:
        try:
            self._plan(keys)
            for key in keys:
                self.pool.load(key, progress=lambda message, key=key: self._preload.update(note=f"{key}: {message}"))
        except Exception as error:  # the first Run loads (and shows the same failure in its pane)
            self._preload.update(state="failed", note=f"background load failed: {describe_error(error)}")
            return
        ready_s = time.perf_counter() - self._started_at
        self._preload.update(state="ready", ready_s=ready_s, note=f"ready {ready_s:.1f} s after start")
        print(f"playground: {', '.join(keys)} on {self.pool.model_name} ready {ready_s:.1f} s after start",
              file=sys.stderr, flush=True)

    def preload_progress(self) -> dict:
        """The timer's tick: the loaded engines and the background load's progress; the timer stops when done."""
        page, state = self.page, self._preload
        line = text.loaded_summary(self.pool.loaded_keys())
        if state["state"] != "idle":
            line += f" · {state['note']}"
        is_done = state["state"] != "loading"
        return {page.loaded: line, page.preload_timer: gr.Timer(active=not is_done)}

    # Engine picker -----------------------------------------------------------------------------
    def select(self, keys):
        """Show one pane per chosen engine, titled, and hide the rest."""
        page = self.page
        try:
            keys = self._engine_keys(keys)
        except EngineError as error:
            return {page.status: f"⚠️ {error}"}
        shown = keys[:self.config.max_panes]
        note = (f"Only the first {self.config.max_panes} engines get a pane; {len(keys) - len(shown)} left out."
                if len(keys) > len(shown) else "")
        updates = {page.status: note}
        for index, (column, title) in enumerate(zip(page.columns, page.titles)):
            is_shown = index < len(shown)
            updates[column] = gr.update(visible=is_shown)
            updates[title] = (text.pane_title(self.pool.choice(shown[index]).label, shown[index], "waiting",
                                              self.pool.model_name)
                              if is_shown else "")
        return updates

    def _engine_keys(self, keys) -> list[str]:
        """The picker's value: distinct known engines, each one that can run here."""
        keys = names(keys, "engines")
        for key in keys:
            choice = self.pool.choice(key)
            if not choice.is_available:
                raise EngineError(f"{key} is unavailable here: {choice.reason}")
        return keys

    # Load, run, stop, unload ---------------------------------------------------------------------
    def load(self, keys, request: gr.Request | None = None):
        """Load the chosen engines in parallel, each pane showing its own progress."""
        yield from self._stream(keys, None, GenerationParams(), "parallel", request)

    def run(self, prompt, max_new_tokens, temperature, seed, mode, keys, prompt_kind=COMPLETION, system="",
            histories=None, request: gr.Request | None = None):
        """Stream the prompt through every chosen engine; yields page updates, throttled. In chat mode each
        pane's prompt is the model's chat template over [system] + that pane's own earlier turns + the new
        message, and its answer joins its own history (`histories`, a per-session gr.State by pane key)."""
        try:
            prompt_kind = one_of(prompt_kind, "prompt kind", PROMPT_KINDS)
            system = text_of(system or "", "system prompt", SYSTEM_MAX_CHARS).strip() or None
            histories = chat_histories(histories)
            temperature = real_number(temperature, "temperature")
            if not 0.0 <= temperature <= TEMPERATURE_MAX:   # the page's own range, both ends
                raise EngineError(f"temperature must be between 0 (greedy) and {TEMPERATURE_MAX:g}, got {temperature}")
            params = GenerationParams(max_new_tokens=whole_number(max_new_tokens, "max new tokens"),
                                      temperature=temperature, seed=whole_number(seed, "seed")).validate()
            prompt = validate_prompt(prompt)
            mode = one_of(mode, "mode", MODES)
        except EngineError as error:
            yield self._message_only(f"⚠️ {error}")
            return
        chat = (system, histories) if prompt_kind == CHAT else None
        yield from self._stream(keys, prompt, params, mode, request, chat)

    def _chat_prompts(self, panes: list[PaneResult], prompt: str, system: str | None, histories: dict) -> None:
        """Each pane's ChatPrompt, built once per pane from the provisioned checkpoint, so every local engine
        gets the same ids; EngineError (a model without a chat template) before anything loads."""
        from engines.models.chat import chat_messages, chat_prompt_for
        from engines.models.sources import resolve_model
        path = resolve_model(self.pool.model).path
        history_of = histories.get(self.pool.model_name, {})
        for pane in panes:
            pane.prompt = chat_prompt_for(path, chat_messages(prompt, system, history_of.get(pane.key, [])))

    def _plan(self, keys: list[str]) -> str:
        """The memory plan of the engines not yet loaded, as Markdown; EngineError when they cannot fit.
        On a GPU, each vLLM engine's share goes into its creation options."""
        from engines.measure.memory_plan import require_fit, to_markdown, vllm_share_options
        new = [key for key in keys if not self.pool.is_loaded(key)]
        if not new:
            return ""
        memory_plan = self.planner([self.pool.plan_label(key) for key in new], self.pool.model)
        markdown = to_markdown(memory_plan)
        try:
            require_fit(memory_plan)
        except EngineError as error:
            raise PlanRefused(str(error), markdown) from None
        for key, options in zip(new, vllm_share_options(memory_plan).values()):
            if options:
                self.pool.extra_options[key] = options
        return markdown

    def _stream(self, keys, prompt, params, mode, request, chat=None):
        try:
            keys = self._engine_keys(keys)
        except EngineError as error:
            yield self._message_only(f"⚠️ {error}")
            return
        if not keys:
            yield self._message_only("⚠️ pick at least one engine")
            return
        panes = [PaneResult(key, self.pool.choice(key).label) for key in keys[:self.config.max_panes]]
        page = self.page
        plan_update = {}
        try:
            if chat is not None:
                self._chat_prompts(panes, prompt, *chat)
            markdown = self._plan([pane.key for pane in panes])
            if markdown:
                plan_update = {page.plan: markdown}
        except PlanRefused as refused:
            yield {page.status: f"⚠️ {refused}", page.plan: refused.markdown}
            return
        except EngineError as error:
            yield self._message_only(f"⚠️ {error}")
            return
        except Exception as error:  # a fault in the planner must not cost the run (nor show a traceback)
            if chat is not None and any(pane.prompt is None for pane in panes):
                yield self._message_only(f"⚠️ {describe_error(error)}")
                return
            plan_update = {page.plan: f"The memory plan could not be made ({describe_error(error)}); "
                                      f"the engines load without one."}
        record = RunRecord(self.pool.model_name, prompt, params, mode, panes)
        session = _session(request)
        stop_event = self.controls.start(session)
        merger = StreamMerger(self.pool, record, stop_event, self.config.refresh_hz)
        next_chart = 0.0
        try:
            for record in merger.updates():
                is_chart_due = record.is_finished or time.perf_counter() >= next_chart
                if is_chart_due:
                    next_chart = time.perf_counter() + self.config.chart_interval_s
                updates = {**self.render(record, with_charts=is_chart_due), **plan_update}
                plan_update = {}
                if record.is_finished and chat is not None:
                    updates[page.histories] = self._with_answers(record, chat[1])
                yield updates
        finally:
            self.controls.finish(session, stop_event)

    def _with_answers(self, record: RunRecord, histories: dict) -> dict:
        """The histories with this turn added to each pane that finished: the user's message and that pane's
        own answer (a pane that failed or was stopped keeps its history as it was)."""
        model = {**histories.get(record.model, {})}
        for pane in record.panes:
            if pane.status == "done":
                model[pane.key] = [*model.get(pane.key, []), {"role": "user", "content": record.prompt},
                                   {"role": "assistant", "content": pane.text}]
        return {**histories, record.model: model}

    def clear_chat(self) -> dict:
        """Forget every pane's conversation (this browser session's only) and empty the panes' text."""
        page = self.page
        return {page.histories: {}, page.status: "Conversation cleared: the next message starts a new chat.",
                **{body: "" for body in page.texts}}

    def switch_model(self, model):
        """Unload the old model's engines, with progress, and use the new one; its chat default follows."""
        page = self.page
        try:
            model = model_name(model, model_choices(self.config.model or self.pool.model))
        except EngineError as error:
            yield {page.status: f"⚠️ {error}"}
            return
        if model == self.pool.model_name:
            yield {page.status: f"Already on `{model}`."}
            return
        old = self.pool.model_name
        yield {page.status: f"Switching from `{old}` to `{model}`: unloading its engines…"}
        notes = []
        unloaded = self.pool.switch_model(model, progress=notes.append)
        with self._reference_lock:
            self._reference = None
        done = f"unloaded {', '.join(unloaded)}" if unloaded else "no engine was loaded"
        yield {page.status: f"Switched to `{model}` ({done}); engines load on the next run, or with Load.",
               page.model_info: text.model_summary(model), page.loaded: text.loaded_summary(self.pool.loaded_keys()),
               page.prompt_kind: default_prompt_kind(model), page.plan: ""}

    def stop(self, request: gr.Request | None = None) -> dict:
        is_running = self.controls.stop(_session(request))
        return {self.page.status: "Stopping every engine…" if is_running else "Nothing is running."}

    def after_stop(self, record: RunRecord | None):
        """The page after Stop cancelled a run: unfinished panes read 'stopped', with final stats."""
        if not isinstance(record, RunRecord):
            return self._message_only("Stopped.")
        for pane in record.panes:
            if pane.status in LIVE_STATUSES or (pane.status == "ready" and not record.is_load_only):
                # a running pane keeps its last live stats, its own request's (the engine may be shared)
                pane.status, pane.message = "stopped", "stopped by the user"
        record.is_finished = True
        updates = self.render(record, with_charts=True)
        updates[self.page.status] = text.run_status(record, is_stopped=True)
        return updates

    def unload(self) -> dict:
        unloaded = self.pool.unload_all()
        with self._reference_lock:
            self._reference = None
        status = f"Unloaded {', '.join(unloaded)}; they load again on the next run." if unloaded \
            else "No engine was loaded."
        return {self.page.status: status, self.page.loaded: text.loaded_summary(self.pool.loaded_keys())}

    def on_tab_closed(self, request: gr.Request) -> None:
        self.controls.stop(_session(request))

    # Quality and export --------------------------------------------------------------------------
    def quality(self, record: RunRecord | None, is_enabled):
        """Greedy agreement and perplexity against bf16 (engines/measure/quality.py), for the finished panes.
        A generator, so the page says that quality is being computed while it is."""
        page = self.page
        try:
            is_enabled = flag(is_enabled, "compute quality")
        except EngineError as error:
            yield {page.status: f"⚠️ {error}"}
            return
        if not isinstance(record, RunRecord) or record.is_load_only or not is_enabled:
            yield gr.skip()
            return
        from engines.measure.quality import build_reference, evaluate_quality
        yield {page.status: "Computing quality against bf16 (greedy agreement, perplexity)…"}
        problems = []
        try:
            reference = self._quality_reference(build_reference)
        except Exception as error:  # any failure (out of memory too) must replace "Computing quality…"
            yield {page.record: record, page.summary: self._summary(record),
                   page.status: f"Quality: n/a ({describe_error(error)})"}
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
        yield {page.record: record, page.summary: self._summary(record),
               page.status: "Quality computed against bf16." + (" " + "; ".join(problems) if problems else "")}

    def _quality_reference(self, build_reference):
        with self._reference_lock:
            if self._reference is None:
                self._reference = build_reference(self.pool.load(REFERENCE_ENGINE))
            return self._reference

    def export(self, record: RunRecord | None) -> dict:
        page = self.page
        if not isinstance(record, RunRecord) or record.is_load_only:
            return {page.export_note: "Nothing to export yet: run a prompt first."}
        root = Path(self.config.export_dir) if self.config.export_dir else Path(tempfile.gettempdir())
        out_dir = Path(tempfile.mkdtemp(prefix="playground-run-", dir=root))
        from engines.measure.manifest import engine_options_of
        options = {pane.key: engine_options_of(self.pool.engine(pane.key)) for pane in record.panes
                   if self.pool.is_loaded(pane.key)}
        paths, note = write_run_files(record, out_dir, options)
        return {page.export_files: gr.update(value=[str(path) for path in paths], visible=True),
                page.export_note: note or f"Exported {len(paths)} files."}

    # Rendering -----------------------------------------------------------------------------------
    def render(self, record: RunRecord, with_charts: bool) -> dict:
        """The run's updates: status, record, loaded engines, each used pane's title, text and metrics,
        the three charts when with_charts, and the summary once a run (not a load) has finished."""
        page = self.page
        updates = {page.status: text.run_status(record), page.record: record,
                   page.loaded: text.loaded_summary(self.pool.loaded_keys())}
        reports = self._divergences(record)
        for pane, title, body, metrics in zip(record.panes, page.titles, page.texts, page.metrics):
            updates[title] = text.pane_title(pane.label, pane.key, pane.status, record.model)
            updates[body] = charts.mark_divergence(pane.text, reports.get(pane.key))
            updates[metrics] = text.pane_metrics_html(pane.stats, pane.message, pane.status,
                                                      text.draft_map_html(pane.drafted, pane.draft_note),
                                                      self.pool.roofline_frac(pane.key, pane.stats))
        if with_charts:
            for name, figure in charts.run_figures(record.panes).items():
                updates[page.charts[name]] = figure
            updates[page.charts[RACE]] = charts.race_figure(record.panes, reports, record.mode, REFERENCE_ENGINE,
                                                            record.margins)
        if record.is_finished and not record.is_load_only:
            updates[page.summary] = self._summary(record)
            if record.margins is None:
                record.margins = self._margins(record, reports)
            updates[page.race] = charts.race_summary(record.panes, reports, REFERENCE_ENGINE, record.margins,
                                                     record.params.is_greedy)
        return updates

    def _divergences(self, record: RunRecord) -> dict:
        """Each pane's divergence from the bf16 pane's greedy tokens (none unless greedy, with a bf16 pane)."""
        if record.is_load_only or not record.params.is_greedy:
            return {}
        panes = [pane for pane in record.panes if pane.token_ids]
        decode = {pane.key: engine.decode for pane in panes
                  if self.pool.is_loaded(pane.key) and isinstance(engine := self.pool.engine(pane.key), Scoring)}
        return charts.divergences(panes, {pane.key: pane.token_ids for pane in panes}, REFERENCE_ENGINE, decode,
                                  is_complete=record.is_finished)

    def _margins(self, record: RunRecord, reports: dict) -> dict:
        """The top-2 logit margin at each divergence, from the engines that expose logits (once per run)."""
        from engines.measure.divergence import top2_margin
        margins = {}
        for pane in record.panes:
            report = reports.get(pane.key)
            if report is None or report.divergence_index is None or not self.pool.is_loaded(pane.key):
                continue
            try:
                margin = top2_margin(self.pool.engine(pane.key), pane.prompt if pane.prompt is not None
                                     else record.prompt, pane.token_ids, report.divergence_index)
            except Exception as error:  # the race summary stands without this pane's margin
                print(f"[race] top-2 margin of {pane.key}: {describe_error(error)}", file=sys.stderr)
                continue
            if margin is not None:
                margins[pane.key] = margin
        return margins

    def _summary(self, record: RunRecord):
        return text.summary_table(summary_rows(record))

    def _message_only(self, message: str) -> dict:
        return {self.page.status: message}


class PlanRefused(EngineError):
    """The memory plan refused the chosen engines; carries the plan's Markdown for the page."""

    def __init__(self, message: str, markdown: str):
        super().__init__(message)
        self.markdown = markdown


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"

