"""The one stream loop that every streaming engine shares (transformers, vLLM, remote, llama.cpp).

An engine supplies `start(emit, stop) -> Future`: it begins the work on its own thread or event loop,
calls `emit(Chunk)` from there for every step (after stamping the tokens on its recorder, so the
consumer's pace never shifts a timestamp), and completes the future when the work ends; an
exception in the future is the generation's failure. `stream_request()` runs in the consumer's thread
and turns the chunks into StreamEvents. It owns what each engine used to repeat: the queue and its
end sentinel, the engine's request lock, the finish reason, `recorder.finish`, and cancellation.

Invariants:
- the events' num_tokens add up to the tokens emitted; tokens whose text is still pending (half a
  multi-byte character, an EOS without text) ride on the next event, or on a last text-less event;
- Stop is seen within POLL_S even when nothing arrives (a silent server): the consumer waits on the
  queue in POLL_S slices and checks `cancel` between them; closing the iterator does the same;
- the lock is held from submit to finish, so one request's stats are never another's. A request
  that finds the engine busy waits its turn (cancellable); `wait_s` in the stats says how long, and
  its RequestStream says `is_waiting` meanwhile, which the app shows as "waiting for the engine";
- `stream_request` returns a RequestStream whose stats() and token_ids are that request's own, so
  callers that share an engine (two browser sessions, a session and an API client) read their own.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

from engines.protocol import EngineError, EngineStats, StreamEvent, describe_error

POLL_S = 0.05
_END = object()


@dataclass
class Chunk:
    """One step's output: its token ids (their count is the step's token count) and its text, or None
    to have the stream decode the ids with its Detokenizer."""
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    num_tokens: int | None = None          # when the ids are unknown (a remote server's chunk)
    finish_reason: str | None = None

    @property
    def count(self) -> int:
        return len(self.token_ids) if self.num_tokens is None else self.num_tokens


class Detokenizer:
    """Ids -> text deltas. Decodes all ids so far, so a character split over tokens comes out whole;
    while the text ends in U+FFFD (an incomplete character) the delta waits for the next ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._emitted = ""

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        delta, self._emitted = text[len(self._emitted):], text
        return delta


Starter = Callable[[Callable[[Chunk], None], threading.Event], Future]


def acquire_turn(lock: threading.Lock, cancel: threading.Event | None) -> bool:
    """Wait for the engine's lock in POLL_S slices; False if cancelled while waiting."""
    while not lock.acquire(timeout=POLL_S):
        if cancel is not None and cancel.is_set():
            return False
    return True


class RequestStream:
    """One request: an iterator of its StreamEvents that also answers for this request alone, however
    many callers share the engine. `stats()` is this request's (live while it runs, frozen when it ends,
    so a request that starts next on the same engine cannot overwrite it), `token_ids` its generated
    ids, and `is_waiting` is True while it waits for an engine busy with another request."""

    def __init__(self, recorder, token_ids: list[int]):
        self.token_ids = token_ids
        self.is_waiting = False
        self._recorder = recorder
        self._final_stats: EngineStats | None = None
        self._events: Iterator[StreamEvent] | None = None

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        """Cancel the request (as closing a generator does); its stats stay readable."""
        self._events.close()

    def stats(self) -> EngineStats:
        if self._final_stats is not None:
            return self._final_stats
        if self.is_waiting:  # the recorder is still the request's ahead of this one
            return EngineStats(engine=self._recorder.engine)
        return self._recorder.snapshot()


def stream_request(*, name: str, recorder, start: Starter, max_new_tokens: int, num_prompt_tokens: int = 0,
                   lock: threading.Lock | None = None, cancel: threading.Event | None = None,
                   token_ids: list[int] | None = None, detokenizer: Detokenizer | None = None,
                   abort: Callable[[], None] | None = None, join_timeout_s: float = 60.0) -> RequestStream:
    """The RequestStream of one request; nothing runs until it is first iterated. `token_ids` (if given)
    receives every generated id; `abort` is called on cancellation to unblock work that `stop` alone
    cannot reach (an HTTP read)."""
    request = RequestStream(recorder, token_ids if token_ids is not None else [])
    request._events = _events(request, name=name, recorder=recorder, start=start, max_new_tokens=max_new_tokens,
                              num_prompt_tokens=num_prompt_tokens, lock=lock, cancel=cancel,
                              detokenizer=detokenizer, abort=abort, join_timeout_s=join_timeout_s)
    return request


def _events(request: RequestStream, *, name: str, recorder, start: Starter, max_new_tokens: int,
            num_prompt_tokens: int, lock: threading.Lock | None, cancel: threading.Event | None,
            detokenizer: Detokenizer | None, abort: Callable[[], None] | None,
            join_timeout_s: float) -> Iterator[StreamEvent]:
    token_ids = request.token_ids
    waited_from = time.perf_counter()
    if lock is not None:
        request.is_waiting = lock.locked()
        if not acquire_turn(lock, cancel):
            request.is_waiting = False
            request._final_stats = EngineStats(engine=name, finish_reason="cancelled",
                                               wait_s=time.perf_counter() - waited_from)
            return
        request.is_waiting = False
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    future: Future | None = None
    finish_reason, num_tokens, pending = "cancelled", 0, 0
    try:
        recorder.start(num_prompt_tokens)
        recorder.update(wait_s=time.perf_counter() - waited_from)
        future = start(items.put, stop)
        future.add_done_callback(lambda _: items.put(_END))
        explicit_reason = None
        while True:
            try:
                item = items.get(timeout=POLL_S)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    return
                continue
            if item is _END:
                break
            explicit_reason = item.finish_reason or explicit_reason
            token_ids.extend(item.token_ids)
            num_tokens += item.count
            pending += item.count
            text = detokenizer.add(item.token_ids) if item.text is None and detokenizer else (item.text or "")
            if text:
                yield StreamEvent(text, pending)
                pending = 0
            if cancel is not None and cancel.is_set():
                return
        error = None if future.cancelled() else future.exception()
        if error is not None:
            finish_reason = "error"
            raise error if isinstance(error, EngineError) else \
                EngineError(f"{name}: generation failed: {describe_error(error)}") from error
        tail = detokenizer.flush() if detokenizer else ""
        if pending or tail:
            yield StreamEvent(tail, pending)
        finish_reason = explicit_reason or ("length" if num_tokens >= max_new_tokens else "eos")
    finally:
        stop.set()
        if future is not None and not future.done():
            future.cancel()
            if abort is not None:
                abort()
            _wait(future, join_timeout_s)
        recorder.finish(finish_reason)
        request._final_stats = recorder.snapshot()  # before the lock lets the next request reset the recorder
        if lock is not None:
            lock.release()


def _wait(future: Future, timeout_s: float) -> None:
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    done.wait(timeout_s)


def start_in_thread(name: str, work: Callable[[Callable[[Chunk], None], threading.Event], None]) -> Starter:
    """A Starter that runs `work(emit, stop)` on a fresh daemon thread (HTTP, llama.cpp)."""
    def start(emit, stop) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def run():
            try:
                work(emit, stop)
            except BaseException as error:  # the consumer raises it as the generation's failure
                future.set_exception(error)
            else:
                future.set_result(None)
        threading.Thread(target=run, name=name, daemon=True).start()
        return future
    return start
