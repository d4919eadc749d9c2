"""One long job of a tab (bench, load, survey) in a worker thread, its progress lines streamed to the page.

A Gradio generator cannot block for minutes without going silent, so the tab hands `follow_job` a
`work(say)` function: it runs in a daemon thread, `say(line)` queues a progress line, and the
generator yields the tab's own output frame for the last lines every time one arrives. What `work`
returns, or the readable message of what it raised, comes back as a `JobOutcome`: never a traceback.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from engines.protocol import describe_error

POLL_S = 0.25
NUM_SHOWN_LINES = 8


@dataclass
class JobOutcome:
    """What the job returned (`value`), or why it failed (`error`, a readable line; None when it did not)."""
    value: object = None
    error: str | None = None


def follow_job(work: Callable[[Callable[[str], None]], object], name: str,
               frame: Callable[[str], tuple]) -> Iterator[tuple]:
    """Run `work(say)` in a thread named `name`; yield `frame(status)` as progress lines come; return a
    JobOutcome (use as `outcome = yield from follow_job(...)`)."""
    messages: queue.Queue = queue.Queue()
    outcome = JobOutcome()

    def run():
        try:
            outcome.value = work(messages.put)
        except Exception as error:  # shown in the tab, never a traceback
            outcome.error = describe_error(error)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    lines: list[str] = []
    while worker.is_alive() or not messages.empty():
        try:
            lines.append(str(messages.get(timeout=POLL_S)))
        except queue.Empty:
            continue
        yield frame("Running…\n\n" + "\n".join(f"- {line}" for line in lines[-NUM_SHOWN_LINES:]))
    worker.join()
    return outcome
