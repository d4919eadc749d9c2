"""Issue 8, item 3, load: 20 concurrent gradio_client sessions, each running 3 prompts on 2 engines
through the page's own Gradio API, against the real app served on 127.0.0.1 in this test.

The queue's max_size is small on purpose, so that the "queue full" path is exercised: every request
must either complete with both panes done or be refused with Gradio's "queue full" message; nothing
hangs (the whole test has a deadline), and the server still answers afterwards. Throughput and the p95
wait (submit to result, completed requests) are printed. Engines: bf16 (the session's) and bf16-eager,
4 new tokens each, so the test stays cheap on 2 cores.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from gradio_client import Client
from gradio_client.utils import QueueError

from app.callbacks import AppConfig, Playground
from app.layout import build_app, launch_options
from app.session import EnginePool, build_choices
from engines.telemetry import percentile
from tests.conftest import free_loopback_port

NUM_SESSIONS = 20
PROMPTS = ("The capital of France is", "Water boils at", "The largest planet is")
ENGINES = ["bf16", "bf16-eager"]
MAX_NEW_TOKENS = 4
MAX_QUEUE = 4
DEADLINE_S = 300


@pytest.fixture(scope="module")
def server(bf16_engine):
    port = free_loopback_port()
    pool = EnginePool(None, build_choices())
    pool.adopt("bf16", bf16_engine)
    pool.load("bf16-eager")
    playground = Playground(AppConfig(port=port, max_queue=MAX_QUEUE), pool)
    demo = build_app(playground)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(playground))
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    pool.unload("bf16-eager")


def run_prompt(client: Client, prompt: str):
    return client.predict(prompt, MAX_NEW_TOKENS, 0.0, 0, "parallel", ENGINES, "Completion", "", api_name="/run")


def test_twenty_sessions_complete_or_get_queue_full_and_the_server_stays_up(server):
    outcomes: list[tuple[str, float, str]] = []  # (kind, seconds from submit to answer, detail)
    lock = threading.Lock()

    def session(index: int) -> None:
        client = Client(server, verbose=False, download_files=False)
        for prompt in PROMPTS:
            submitted = time.perf_counter()
            try:
                result = run_prompt(client, prompt)
                kind, detail = "completed", result[0]
            except QueueError as error:
                kind, detail = "queue_full", str(error)
            except Exception as error:  # any other answer is a failure the assertions below report
                kind, detail = "failed", f"{type(error).__name__}: {error}"
            with lock:
                outcomes.append((kind, time.perf_counter() - submitted, detail))

    started = time.perf_counter()
    threads = [threading.Thread(target=session, args=(index,), name=f"load-session-{index}", daemon=True)
               for index in range(NUM_SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, DEADLINE_S - (time.perf_counter() - started)))
    wall_s = time.perf_counter() - started
    assert not any(thread.is_alive() for thread in threads), f"sessions still waiting after {DEADLINE_S} s"
    assert len(outcomes) == NUM_SESSIONS * len(PROMPTS)

    completed = [outcome for outcome in outcomes if outcome[0] == "completed"]
    refused = [outcome for outcome in outcomes if outcome[0] == "queue_full"]
    failed = [outcome for outcome in outcomes if outcome[0] == "failed"]
    assert not failed, failed[:3]
    for _, _, status in completed:
        assert status.startswith("Run finished") and f"{len(ENGINES)} done" in status, status
    for _, _, message in refused:
        assert "Queue is full" in message
    assert completed and refused, (len(completed), len(refused))  # both paths were exercised
    waits = [seconds for _, seconds, _ in completed]
    print(f"\nload: {NUM_SESSIONS} sessions x {len(PROMPTS)} prompts x {len(ENGINES)} engines, queue max {MAX_QUEUE}: "
          f"{len(completed)} completed, {len(refused)} queue full, {wall_s:.1f} s; throughput "
          f"{len(completed) / wall_s:.2f} requests/s ({len(completed) * len(ENGINES) * MAX_NEW_TOKENS / wall_s:.1f} "
          f"tokens/s at most); wait p50 {percentile(waits, 0.5):.2f} s, p95 {percentile(waits, 0.95):.2f} s")

    # The server is still up and serving: the page loads and one more request completes.
    assert httpx.get(server, timeout=30).status_code == 200
    client = Client(server, verbose=False, download_files=False)
    status = run_prompt(client, PROMPTS[0])[0]
    assert status.startswith("Run finished") and f"{len(ENGINES)} done" in status
    # Issue 8, item 1, end to end: a 1 MB paste crosses the real server and comes back as a clear message.
    assert "the limit is 200,000" in run_prompt(client, "a" * 1_000_000)[0]
