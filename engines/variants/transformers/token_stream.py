"""generate()'s streamer for the transformers engines.

`TokenStreamer` follows transformers' streamer protocol (put/end) and runs in the generate thread, where
it stamps each step's tokens on the recorder and hands them to the shared stream loop
(engines/variants/streaming.py), so the consumer's pace never shifts a timestamp.
"""
from __future__ import annotations

from typing import Callable

from engines.telemetry import GenerationRecorder
from engines.variants.streaming import Chunk


class TokenStreamer:
    """put() gets the prompt first, then each step's new token ids: one per step normally, several for
    an assisted-generation step."""

    def __init__(self, recorder: GenerationRecorder, emit: Callable[[Chunk], None]):
        self.recorder = recorder
        self.emit = emit
        self._is_prompt = True

    def put(self, token_ids) -> None:
        if self._is_prompt:
            self._is_prompt = False
            return
        ids = token_ids.reshape(-1).tolist()
        self.recorder.on_tokens(len(ids))
        self.emit(Chunk(token_ids=ids))

    def end(self) -> None:
        """The stream loop learns of the end from the generate future."""
