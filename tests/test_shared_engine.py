"""One loaded engine reached by several callers at once (two browser sessions, a session and an API client).

Each family has one behaviour, and each caller reads its own request's stats and ids from the Request
that `stream()` returns:
- transformers (and llama.cpp, remote): requests queue; the one that waits says so (`is_waiting`, and
  "waiting for the engine" in its pane), then runs; its stats count its own tokens and the time it waited;
- vLLM: requests are batched; neither waits, and each counts its own tokens.
A request cancelled while it waits leaves the engine free, as does one that failed.
"""
from __future__ import annotations

import threading
import time

from app.callbacks import AppConfig, Playground
from app.layout import build_app
from app.session import EnginePool, build_choices
from app.streaming import WAITING_FOR_ENGINE
from engines.protocol import GenerationParams

PROMPT = "The capital of France is"
LONG, SHORT = 24, 4


def _drain(request, into: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(request), daemon=True)
    thread.start()
    return thread


def _wait_for(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_second_request_on_a_busy_transformers_engine_waits_then_keeps_its_own_stats(bf16_engine):
    first = bf16_engine.stream(PROMPT, GenerationParams(max_new_tokens=LONG))
    first_events: list = []
    first_thread = _drain(first, first_events)
    assert _wait_for(lambda: first_events), "the first request produced nothing"
    second = bf16_engine.stream(PROMPT, GenerationParams(max_new_tokens=SHORT))
    second_events: list = []
    was_waiting = []
    second_thread = threading.Thread(target=lambda: second_events.extend(second), daemon=True)
    second_thread.start()
    assert _wait_for(lambda: second.is_waiting or second_events)
    was_waiting.append(second.is_waiting)
    first_thread.join(120)
    second_thread.join(120)
    assert was_waiting == [True], "the second request did not wait for the first"
    assert first.stats().num_tokens == LONG and len(first.token_ids) == LONG
    assert second.stats().num_tokens == SHORT and len(second.token_ids) == SHORT
    assert second.stats().wait_s > 0 and not second.is_waiting
    # Greedy on the same prompt: the short answer is the long one's beginning.
    assert second.token_ids == first.token_ids[:SHORT]
    assert "".join(event.text for event in second_events) == bf16_engine.decode(second.token_ids)


def test_a_request_cancelled_while_it_waits_leaves_the_engine_free(bf16_engine):
    first = bf16_engine.stream(PROMPT, GenerationParams(max_new_tokens=LONG))
    first_events: list = []
    first_thread = _drain(first, first_events)
    assert _wait_for(lambda: first_events)
    cancel = threading.Event()
    waiting = bf16_engine.stream(PROMPT, GenerationParams(max_new_tokens=SHORT), cancel=cancel)
    waiting_events: list = []
    waiting_thread = _drain(waiting, waiting_events)
    assert _wait_for(lambda: waiting.is_waiting)
    cancel.set()
    waiting_thread.join(5)
    assert not waiting_thread.is_alive() and waiting_events == []
    assert waiting.stats().finish_reason == "cancelled" and waiting.stats().num_tokens == 0
    first_thread.join(120)
    assert first.stats().num_tokens == LONG
    after = bf16_engine.stream(PROMPT, GenerationParams(max_new_tokens=2))
    assert sum(event.num_tokens for event in after) == 2 and after.stats().wait_s < 1.0


def test_concurrent_requests_on_vllm_are_batched_and_count_their_own_tokens(vllm_engine):
    short = vllm_engine.stream(PROMPT, GenerationParams(max_new_tokens=SHORT))
    long = vllm_engine.stream(PROMPT, GenerationParams(max_new_tokens=LONG))
    short_events: list = []
    long_events: list = []
    threads = [_drain(long, long_events), _drain(short, short_events)]
    for thread in threads:
        thread.join(120)
    assert not short.is_waiting and not long.is_waiting
    assert short.stats().num_tokens == SHORT == sum(event.num_tokens for event in short_events)
    assert long.stats().num_tokens == LONG == sum(event.num_tokens for event in long_events)
    assert short.token_ids == long.token_ids[:SHORT]


def test_two_sessions_on_one_engine_the_second_pane_says_it_waits(bf16_engine):
    """Two page sessions (two run events of one app) on the one bf16 engine of the app's pool."""
    pool = EnginePool(None, build_choices())
    pool.adopt("bf16", bf16_engine)
    playground = Playground(AppConfig(refresh_hz=20.0, chart_interval_s=0.5), pool)
    build_app(playground)
    first_outputs: list = []
    first = threading.Thread(target=lambda: first_outputs.extend(
        playground.run(PROMPT, LONG, 0.0, 0, "parallel", ["bf16"])), daemon=True)
    first.start()
    assert _wait_for(lambda: any(pane.text for output in list(first_outputs) if playground.page.record in output
                                 for pane in output[playground.page.record].panes))
    second_outputs = list(playground.run(PROMPT, SHORT, 0.0, 0, "parallel", ["bf16"]))
    first.join(120)

    def shown(outputs) -> str:
        return " ".join(str(value) for output in outputs for value in output.values())

    assert WAITING_FOR_ENGINE in shown(second_outputs)
    assert WAITING_FOR_ENGINE not in shown(first_outputs)
    first_record = first_outputs[-1][playground.page.record]
    second_record = second_outputs[-1][playground.page.record]
    assert [pane.status for pane in first_record.panes] == ["done"]
    assert [pane.status for pane in second_record.panes] == ["done"]
    assert first_record.panes[0].stats.num_tokens == LONG and second_record.panes[0].stats.num_tokens == SHORT
    assert second_record.panes[0].stats.wait_s > 0
