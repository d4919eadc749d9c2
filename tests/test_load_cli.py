"""Issue 18, item 7: `engines load` with open-loop Poisson arrivals (--rate), goodput and SLO attainment
(--goodput), and the search for the highest level meeting the SLO (--find-max).

The search logic and the queueing of a one-at-a-time engine are checked on a scripted engine whose
timing is known; the command itself runs on the bf16 engine with a few tokens, and one check drives
vLLM's event loop with timed arrivals (the session's vllm engine)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from engines.measure.load import (
    LoadLevel,
    find_max,
    measure_level,
    measure_rate,
    poisson_arrivals,
    results_json,
    to_markdown,
)
from engines.protocol import EngineError, GenerationParams
from engines.telemetry import GenerationRecorder, MemoryProbe
from engines.variants.streaming import Chunk, start_in_thread, stream_request
from tests.test_cli import cli

TOKEN_S = 0.05


class ScriptedEngine:
    """A stand-in with an exact clock (a real model's token times vary too much to check the load arithmetic
    against): one request at a time through the real stream loop, every token taking TOKEN_S."""
    name = "scripted"

    def __init__(self):
        self.recorder = GenerationRecorder(self.name, MemoryProbe("cpu"))
        self._lock = threading.Lock()

    def stream(self, prompt, params, cancel=None):
        def work(emit, stop):
            for _ in range(params.max_new_tokens):
                if stop.is_set():
                    return
                time.sleep(TOKEN_S)
                self.recorder.on_tokens(1)
                emit(Chunk(text="x", num_tokens=1))

        return stream_request(name=self.name, recorder=self.recorder, start=start_in_thread(self.name, work),
                              max_new_tokens=params.max_new_tokens, lock=self._lock, cancel=cancel)

    def stats(self):
        return self.recorder.snapshot()


def test_poisson_arrivals_are_vllms_construction_and_follow_the_seed():
    arrivals = poisson_arrivals(16, rate=4.0, seed=0)
    assert len(arrivals) == 16 and arrivals == sorted(arrivals) and arrivals[0] > 0
    assert arrivals[-1] == pytest.approx(16 / 4.0)          # rescaled: the last arrival at N / rate
    assert poisson_arrivals(16, 4.0, seed=0) == arrivals and poisson_arrivals(16, 4.0, seed=1) != arrivals
    import numpy as np
    raw = np.cumsum(np.random.RandomState(0).gamma(1.0, 1 / 4.0, 16))
    assert arrivals == pytest.approx(list(raw * (4.0 / raw[-1])))
    with pytest.raises(EngineError, match="positive"):
        poisson_arrivals(4, 0.0)


def test_a_sequential_engine_queues_arrivals_and_the_wait_is_in_ttft():
    params = GenerationParams(max_new_tokens=2)
    level = measure_level(ScriptedEngine(), 3, params, prompts=["a"], slos_ms={"ttft": 1000.0})
    assert level.serving == "sequential" and level.num_requests == 3 and level.num_tokens == 6
    # One wave of 3: the third waited for two whole requests (2 x 2 tokens) before its first token.
    assert level.ttft_s_p95 >= 4 * TOKEN_S and level.ttft_s_p50 >= 2 * TOKEN_S
    assert level.tpot_ms_p50 == pytest.approx(TOKEN_S * 1000, rel=0.5)
    assert level.meets_slo and level.slo_attainment == 1.0 and level.goodput_req_s > 0
    # A rate far above what it serves: the queue grows, so later arrivals wait longer.
    fast = measure_rate(ScriptedEngine(), 200.0, params, prompts=["a"], num_requests=6, slos_ms={"ttft": 120.0})
    assert fast.request_rate == 200.0 and fast.concurrency is None and fast.num_requests == 6
    assert fast.ttft_s_p95 > fast.ttft_s_p50 and fast.slo_attainment < 1.0


def test_find_max_doubles_then_bisects_to_the_highest_passing_concurrency():
    # Request k of a wave (0-based) sees its first token after k x 100 ms + 50 ms: with TTFT <= 300 ms,
    # k <= 2 pass, so attainment >= 0.9 holds up to concurrency 3 and fails at 4.
    search = find_max(ScriptedEngine(), GenerationParams(max_new_tokens=2), {"ttft": 300.0}, prompts=["a"],
                      is_warm=True)
    assert [level.concurrency for level in search.levels] == [1, 2, 3, 4]
    assert search.best.concurrency == 3 and search.stop_reason == "converged"
    assert [level.meets_slo for level in search.levels] == [True, True, True, False]
    assert "Highest level meeting the SLO: concurrency 3" in search.summary


def test_find_max_says_when_no_level_meets_the_slo():
    search = find_max(ScriptedEngine(), GenerationParams(max_new_tokens=2), {"ttft": 1.0}, mode="concurrency",
                      start=4, prompts=["a"], is_warm=True)
    assert search.best is None and search.stop_reason == "no level meets the SLO"
    assert [level.concurrency for level in search.levels] == [1, 2, 4]
    assert search.summary.startswith("No level meets the SLO")
    table = to_markdown("scripted", search.levels, {"ttft": 1.0}, search)
    assert "No level meets the SLO" in table and "| concurrency 4 |" in table
    with pytest.raises(EngineError, match="needs SLOs"):
        find_max(ScriptedEngine(), GenerationParams(max_new_tokens=2), {})


def test_find_max_bounds_its_steps_on_rates():
    search = find_max(ScriptedEngine(), GenerationParams(max_new_tokens=1), {"ttft": 10_000.0}, mode="rate",
                      start=8.0, upper=32.0, max_steps=2, prompts=["a"], num_requests=2, is_warm=True)
    assert [level.request_rate for level in search.levels] == [8.0, 16.0]
    assert search.stop_reason == "step budget spent" and search.best.request_rate == 16.0


def test_results_json_names_its_metrics_and_slos():
    level = LoadLevel(concurrency=1, serving="sequential", num_tokens=2, wall_s=1.0, aggregate_tok_s=2.0,
                      ttft_s_p50=0.1, ttft_s_p95=0.1, kv_peak_used_frac=None, num_requests=1, slo_attainment=0.0,
                      meets_slo=False, goodput_req_s=0.0)
    data = results_json("scripted", GenerationParams(max_new_tokens=2), [level], {"ttft": 1.0})
    assert data["slos_ms"] == {"ttft": 1.0} and "No level meets the SLO" in data["slo_summary"]
    assert data["metrics"]["tpot_ms"]["formula"] == "tpot = (e2el - ttft) / (output_tokens - 1)"


@pytest.mark.slow
def test_load_command_rate_and_goodput_give_per_level_rows():
    result = cli("load", "--engine", "bf16", "--concurrency", "2", "--rate", "2,8", "--num-requests", "3",
                 "--max-new-tokens", "4", "--goodput", "ttft_ms:60000,tpot_ms:60000", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    levels = data["levels"]
    assert [(level["concurrency"], level["request_rate"]) for level in levels] == [(2, None), (None, 2.0), (None, 8.0)]
    for level in levels:
        assert level["serving"] == "sequential" and level["num_requests"] == 3
        assert level["num_tokens"] == 4 * level["num_requests"]
        assert level["ttft_s_p50"] > 0 and level["tpot_ms_p50"] > 0 and level["e2el_s_p95"] >= level["ttft_s_p95"]
        assert level["slo_attainment"] == 1.0 and level["meets_slo"] and level["goodput_req_s"] > 0
    assert data["slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert "Met at: concurrency 2, rate 2 req/s, rate 8 req/s." in data["slo_summary"]
    assert data["manifest"]["mode"] == "load" and data["manifest"]["engines"] == {"bf16": {}}


@pytest.mark.slow
def test_load_command_says_when_no_level_meets_the_slo():
    result = cli("load", "--engine", "bf16", "--rate", "4", "--num-requests", "2", "--max-new-tokens", "2",
                 "--goodput", "ttft_ms:0.001")
    assert result.returncode == 0, result.stderr
    assert "| rate 4 req/s | sequential | 2 | 4 |" in result.stdout
    assert "No level meets the SLO (best attainment 0.00, at rate 4 req/s)." in result.stdout
    print("\n" + result.stdout)


def test_load_command_refuses_bad_rates_and_slos_before_loading():
    from engines.cli import main
    assert main(["load", "--engine", "bf16", "--rate", "0"]) == 2
    assert main(["load", "--engine", "bf16", "--rate", "fast"]) == 2
    assert main(["load", "--engine", "bf16", "--goodput", "itl_ms:5"]) == 2
    assert main(["load", "--engine", "bf16", "--find-max"]) == 2


@pytest.mark.slow
def test_vllm_serves_timed_arrivals_on_its_event_loop(vllm_engine):
    params = GenerationParams(max_new_tokens=8)
    # A second between arrivals, and up to 0.75 s of lateness allowed on a shared 2-core machine: each request
    # still arrives after the previous one's offset and before the next one's.
    offsets = [0.0, 1.0, 2.0]
    timings = vllm_engine.run_arrivals(["The capital of France is", "Water boils at", "Once upon a time"],
                                       offsets, params)
    for offset, timing in zip(offsets, timings):
        assert offset - 0.01 <= timing.arrival_s <= offset + 0.75
        assert timing.num_tokens == 8 == sum(count for _, count in timing.chunk_times_s)
        assert timing.ttft_s == timing.chunk_times_s[0][0] > 0
    level = measure_rate(vllm_engine, 4.0, params, num_requests=4, slos_ms={"ttft": 60_000.0, "tpot": 60_000.0})
    assert level.serving == "batched" and level.num_requests == 4 and level.num_tokens == 32
    assert level.tpot_ms_p50 > 0 and level.meets_slo and level.kv_peak_used_frac > 0
