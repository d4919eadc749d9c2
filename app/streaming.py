"""Runs one request through several engines and merges their streams for the UI.

Each engine runs in its own worker thread (parallel mode) or all run one after another in a single
worker (fair mode, for clean timings). Workers push messages onto one queue, so no pane waits on
another; the consumer applies them to a RunRecord and hands it out at most `refresh_hz` times a
second. Token times are stamped in the engines' own threads, so the consumer's pace never shifts
them. Errors stay in their pane. Setting the stop event, or closing the iterator, closes every
engine generator, which is how the engines cancel.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from app.session import EnginePool
from engines.protocol import Drafting, EngineStats, GenerationParams, Scoring, describe_error

PARALLEL, FAIR = "parallel", "fair"
MODES = (PARALLEL, FAIR)
WORKER_JOIN_S = 30.0
WAITING_FOR_ENGINE = "waiting for the engine: a request of another session is running on it"


@dataclass
class PaneResult:
    """One pane's state; status is waiting, loading, ready, running, done, stopped or error."""
    key: str
    label: str
    status: str = "waiting"
    text: str = ""
    message: str = ""
    stats: EngineStats | None = None
    quality: dict | None = None
    prompt: object = None       # this pane's own ChatPrompt in chat mode (its own history); else the record's
    token_ids: list[int] = field(default_factory=list)   # this pane's own request's generated ids (race view)
    drafted: list | None = None  # speculative panes, once done: (token text, is an accepted draft) per token
    draft_note: str = ""         # why a speculative pane shows no per-token drafts


@dataclass
class RunRecord:
    """Everything one run produced: what was asked and each pane's text, stats and quality."""
    model: str
    prompt: str | None          # the prompt, or in chat mode the user's new message
    params: GenerationParams
    mode: str
    panes: list[PaneResult]
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    is_finished: bool = False
    margins: dict | None = None  # pane key -> top-2 margin at its divergence (TopTwo), once the run finished

    @property
    def is_load_only(self) -> bool:
        return self.prompt is None


class StreamMerger:
    """One request, many engines. Iterate `updates()`; each item is the same, updated RunRecord."""

    def __init__(self, pool: EnginePool, record: RunRecord, stop_event: threading.Event,
                 refresh_hz: float = 5.0):
        self.pool = pool
        self.record = record
        self.stop_event = stop_event
        self.refresh_s = 1.0 / refresh_hz
        self._messages: queue.Queue = queue.Queue()
        self._panes = {pane.key: pane for pane in record.panes}
        self._requests: dict = {}           # pane key -> its engine Request, once streaming starts

    def updates(self) -> Iterator[RunRecord]:
        keys = list(self._panes)
        groups = [keys] if self.record.mode == FAIR else [[key] for key in keys]
        all_loaded = threading.Barrier(len(groups))
        workers = [threading.Thread(target=self._work, args=(group, all_loaded), name=f"pane-{'+'.join(group)}",
                                    daemon=True) for group in groups]
        for worker in workers:
            worker.start()
        next_refresh = time.perf_counter()
        try:
            while any(worker.is_alive() for worker in workers) or not self._messages.empty():
                self._drain(timeout=max(0.0, next_refresh - time.perf_counter()))
                if time.perf_counter() >= next_refresh:
                    self._refresh_live_stats()
                    yield self.record
                    next_refresh = time.perf_counter() + self.refresh_s
            self._drain(timeout=0.0)
            self.record.is_finished = True
            yield self.record
        finally:
            self.stop_event.set()
            for worker in workers:
                worker.join(timeout=WORKER_JOIN_S)

    def _drain(self, timeout: float) -> None:
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._apply(*message)
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, key: str, payload) -> None:
        pane = self._panes[key]
        if kind == "text":
            pane.text += payload
        elif kind == "stats":
            pane.stats = payload
        elif kind == "ids":
            pane.token_ids = payload
        elif kind == "drafted":
            pane.drafted, pane.draft_note = payload
        else:
            pane.status, pane.message = kind, payload

    def _refresh_live_stats(self) -> None:
        """Each running pane reads its own request's stats (another session may share the engine)."""
        for key, request in list(self._requests.items()):
            pane = self._panes[key]
            if pane.status != "running":
                continue
            pane.message = WAITING_FOR_ENGINE if request.is_waiting else ""
            pane.stats = request.stats()
            pane.token_ids = list(request.token_ids)

    def _work(self, keys: list[str], all_loaded: threading.Barrier) -> None:
        """Load this worker's engines, wait until every worker has loaded, then stream: a load in one
        pane would otherwise slow another pane's generation and spoil its timings."""
        loaded = [key for key in keys if self._guarded(key, self._load_pane)]
        all_loaded.wait()
        if self.record.is_load_only:
            return
        for key in loaded:
            if self.stop_event.is_set():
                self._messages.put(("stopped", key, "stopped before it started"))
            else:
                self._guarded(key, self._stream_pane)

    def _guarded(self, key: str, step) -> bool:
        try:
            step(key)
            return True
        except Exception as error:  # a pane shows any failure as text; the other panes go on
            self._messages.put(("error", key, describe_error(error)))
        return False

    def _load_pane(self, key: str) -> None:
        put = self._messages.put
        if not self.pool.is_loaded(key):
            put(("loading", key, "waiting to load (one engine loads at a time)"))
            self.pool.load(key, progress=lambda message: put(("loading", key, message)))
        put(("ready", key, "loaded" if self.record.is_load_only else "loaded; waiting for the other engines"))

    def _stream_pane(self, key: str) -> None:
        put = self._messages.put
        engine = self.pool.engine(key)
        put(("running", key, ""))
        pane = self._panes[key]
        prompt = pane.prompt if pane.prompt is not None else self.record.prompt
        request = engine.stream(prompt, self.record.params, cancel=self.stop_event)
        self._requests[key] = request
        try:
            for event in request:
                put(("text", key, event.text))
                if self.stop_event.is_set():
                    break
        finally:
            request.close()
            put(("stats", key, request.stats()))
            put(("ids", key, list(request.token_ids)))
            put(("drafted", key, drafted_pieces(engine, request)))
        put(("stopped", key, "stopped by the user") if self.stop_event.is_set() else ("done", key, ""))


AGGREGATE_ONLY = ("accepted drafts: aggregate counts only. vLLM counts them per scheduler step across all "
                  "requests (SpecDecodingStats); its request outputs carry no per-request draft counts")


def drafted_pieces(engine, request) -> tuple[list | None, str]:
    """(token text, is an accepted draft) per token of a speculative engine's request, or why there is none."""
    if not isinstance(engine, Drafting):
        return None, AGGREGATE_ONLY if request.stats().acceptance_rate is not None else ""
    flags, ids = engine.accepted_draft_flags(), list(request.token_ids)
    if not isinstance(engine, Scoring) or len(flags) != len(ids):
        return None, f"accepted drafts: {len(flags)} counted for {len(ids)} tokens; not shown"
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = engine.decode(ids[:end])
        pieces.append((text[len(previous):], flags[end - 1]))
        previous = text
    return pieces, ""
