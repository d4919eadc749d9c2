"""From generate()'s token ids to the text deltas a pane shows, for the transformers engines.

`TokenStreamer` follows transformers' streamer protocol (put/end) and runs in the generate thread, where
it stamps each step's tokens on the recorder, so the consumer's pace never shifts a timestamp.
`text_deltas()` runs in the consumer's thread and turns the queued ids into StreamEvents.
"""
from __future__ import annotations

import queue
from typing import Iterator

from engines.protocol import StreamEvent
from engines.telemetry import GenerationRecorder

_END = object()


class TokenStreamer:
    """put() gets the prompt first, then each step's new token ids: one per step normally, several for
    an assisted-generation step."""

    def __init__(self, recorder: GenerationRecorder):
        self.recorder = recorder
        self.queue: queue.Queue = queue.Queue()
        self._is_prompt = True

    def put(self, token_ids) -> None:
        if self._is_prompt:
            self._is_prompt = False
            return
        ids = token_ids.reshape(-1).tolist()
        self.recorder.on_tokens(len(ids))
        self.queue.put(ids)

    def end(self) -> None:
        self.queue.put(_END)


def text_deltas(streamer: TokenStreamer, tokenizer, token_ids: list[int]) -> Iterator[StreamEvent]:
    """Append every received id to `token_ids` and yield the new text. Text is decoded from all ids so
    far, so a multi-byte character split over tokens comes out whole; tokens whose text is still
    pending ride on the next event. The events' num_tokens add up to len(token_ids)."""
    emitted_text, pending_tokens = "", 0
    while (chunk := streamer.queue.get()) is not _END:
        token_ids.extend(chunk)
        pending_tokens += len(chunk)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        delta = text[len(emitted_text):]
        if delta:
            yield StreamEvent(delta, pending_tokens)
            emitted_text, pending_tokens = text, 0
    if pending_tokens:
        final_text = tokenizer.decode(token_ids, skip_special_tokens=True)
        yield StreamEvent(final_text[len(emitted_text):], pending_tokens)
