"""Telemetry arithmetic on real clocks: a recorder fed from a producing thread."""
from __future__ import annotations

import threading
import time

import pytest

from engines.telemetry import GenerationRecorder, MemoryProbe, percentile


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(101)), 0.95) == 95


def test_chunks_count_every_token_and_itl_is_per_token():
    recorder = GenerationRecorder("t", MemoryProbe("cpu"), sample_interval_s=0.01)
    recorder.start(num_prompt_tokens=3)

    def produce():
        time.sleep(0.05)
        recorder.on_tokens(1)
        time.sleep(0.06)
        recorder.on_tokens(3)  # a speculative step: three tokens at once
    worker = threading.Thread(target=produce)
    worker.start()
    worker.join()
    stats = recorder.finish("length")
    assert stats.num_tokens == 4
    assert stats.ttft_s >= 0.05
    # three per-token gaps of ~0.02 s, not one chunk gap of 0.06 s
    assert stats.itl_ms_p50 == pytest.approx(stats.decode_s * 1000 / 3)
    assert stats.decode_tok_s == pytest.approx(3 / stats.decode_s)
    assert stats.total_s >= stats.ttft_s + stats.decode_s
    assert len(stats.samples) >= 3 and stats.peak_memory_gib > 0
