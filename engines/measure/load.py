"""Load against ONE engine: closed-loop concurrency levels, open-loop Poisson arrivals, goodput under
SLOs, and a search for the highest level that meets them. The CLI (engines/cli/load.py) parses and
prints; the app's Load tab calls these functions.

Levels:
- concurrency C (`measure_level`): N requests (default N = C, one wave), at most C in flight; a request
  is sent when one of the C clients is free (a closed loop, `vllm bench serve --max-concurrency`).
- rate R (`measure_rate`): N requests whose arrival times are a Poisson process of R requests/s, built as
  `vllm bench serve --request-rate R` builds them (gamma intervals of shape `burstiness`, 1 = Poisson,
  rescaled so the last arrival is at N / R), from a seed. Open loop: arrivals do not wait for answers.
Serving: vLLM engines (the Batching capability) get every request on their own event loop at its time
(`VllmEngine.run_arrivals`) and batch them continuously. Engines without a batched path (transformers)
serve one request after another: a request that arrives while another runs waits, and the wait is in
its TTFT and E2EL, as a server's queue would be. The `serving` column says which.

Each request's TTFT, TPOT, ITL and E2EL are vLLM bench serve's (engines/measure/metrics.py), counted from
the request's arrival; percentiles interpolate linearly (numpy's default, as vLLM reports them). With
SLOs, goodput is the requests meeting every SLO per second of the level, attainment their share, and a
level meets the SLO when its attainment reaches the target (default 0.9).
`find_max` doubles the level from a start until it fails, then bisects between the highest passing and
the lowest failing level, within a step budget; if the start fails it halves toward the minimum, and
says so when no level meets the SLO.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from engines.measure import metrics
from engines.models.catalog import ASSETS
from engines.protocol import Batching, EngineError, GenerationParams

MAX_CONCURRENCY = 1024
MAX_RATE = 10_000.0
MAX_REQUESTS = 100_000
DEFAULT_RATE_REQUESTS = 16
DEFAULT_ATTAINMENT = 0.9
MAX_SEARCH_STEPS = 8
RATE_SEARCH_TOLERANCE = 0.1     # bisection on rates stops when the bracket is within 10%
Say = Callable[[str], None]


@dataclass
class RequestRecord:
    """One request of a level: its arrival from the level's start and vLLM's per-request metrics."""
    arrival_s: float
    num_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    e2el_s: float | None
    itls_s: list[float] = field(default_factory=list)

    @classmethod
    def from_chunks(cls, arrival_s: float, chunk_times_s: list[tuple[float, int]]) -> "RequestRecord":
        """From (seconds since arrival, tokens) of each output."""
        return cls(arrival_s, sum(count for _, count in chunk_times_s), metrics.ttft_s(chunk_times_s),
                   metrics.tpot_s(chunk_times_s), metrics.e2el_s(chunk_times_s), metrics.itls_s(chunk_times_s))


@dataclass
class LoadLevel:
    concurrency: int | None         # closed-loop clients; None for a rate level
    serving: str                    # "batched" or "sequential"
    num_tokens: int
    wall_s: float                   # first arrival window start to last token
    aggregate_tok_s: float          # output tokens / wall_s (vLLM's output throughput)
    ttft_s_p50: float | None
    ttft_s_p95: float | None
    kv_peak_used_frac: float | None
    request_rate: float | None = None       # open-loop arrivals per second; None for a concurrency level
    num_requests: int = 0
    request_throughput: float | None = None  # completed requests / wall_s
    tpot_ms_p50: float | None = None
    tpot_ms_p95: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p95: float | None = None
    e2el_s_p50: float | None = None
    e2el_s_p95: float | None = None
    goodput_req_s: float | None = None      # requests meeting every SLO / wall_s; None without SLOs
    slo_attainment: float | None = None     # their share of the completed requests
    meets_slo: bool | None = None           # slo_attainment >= the target

    @property
    def label(self) -> str:
        return f"rate {self.request_rate:g} req/s" if self.request_rate is not None else \
            f"concurrency {self.concurrency}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """What find_max tried (in level order), the highest level that met the SLO, and why it stopped."""
    mode: str                       # "concurrency" or "rate"
    levels: list[LoadLevel]
    best: LoadLevel | None
    stop_reason: str                # "converged", "upper bound reached", "no level meets the SLO", "step budget spent"
    num_steps: int
    target_attainment: float

    def to_dict(self) -> dict:
        return {"mode": self.mode, "best": self.best.to_dict() if self.best else None,
                "best_level": _level_value(self.best) if self.best else None, "stop_reason": self.stop_reason,
                "num_steps": self.num_steps, "target_attainment": self.target_attainment}

    @property
    def summary(self) -> str:
        if self.best is None:
            best = max(self.levels, key=lambda level: level.slo_attainment or 0.0, default=None)
            seen = f"; best attainment {best.slo_attainment:.2f} at {best.label}" if best else ""
            return (f"No level meets the SLO (attainment >= {self.target_attainment:g}){seen}; "
                    f"{self.num_steps} level(s) tried.")
        return (f"Highest level meeting the SLO: {self.best.label} (goodput {self.best.goodput_req_s:.2f} req/s, "
                f"attainment {self.best.slo_attainment:.2f}); {self.stop_reason} after {self.num_steps} level(s).")


def _level_value(level: LoadLevel) -> float:
    return level.request_rate if level.request_rate is not None else float(level.concurrency)


def sample_prompts() -> list[str]:
    lines = (ASSETS / "prompts.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Arrival offsets (s) of `num_requests` at `rate` requests/s, as vllm bench serve's get_request builds
    them: intervals from a gamma distribution (shape burstiness, scale 1 / (rate * burstiness); 1 is a
    Poisson process), summed, then rescaled so the last arrival is at num_requests / rate. Same seed, same
    arrivals. inf rate: everything at 0."""
    if num_requests < 1:
        raise EngineError(f"the number of requests must be at least 1, got {num_requests}")
    if not rate > 0:
        raise EngineError(f"the request rate must be positive, got {rate}")
    if not burstiness > 0:
        raise EngineError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    import numpy as np
    generator = np.random.RandomState(seed)
    intervals = generator.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)
    offsets = np.cumsum(intervals)
    offsets *= (num_requests / rate) / offsets[-1]
    return [float(offset) for offset in offsets]


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default, vLLM's np.percentile); None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = int(math.floor(rank))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def summarize(records: list[RequestRecord], wall_s: float, serving: str, kv_peak: float | None,
              concurrency: int | None = None, request_rate: float | None = None,
              slos_ms: dict[str, float] | None = None, target_attainment: float = DEFAULT_ATTAINMENT) -> LoadLevel:
    """One LoadLevel from its requests (vLLM's calculate_metrics, per level)."""
    completed = [record for record in records if record.ttft_s is not None]
    num_tokens = sum(record.num_tokens for record in records)
    ttfts = [record.ttft_s for record in completed]
    tpots = [record.tpot_s for record in completed if record.tpot_s is not None]
    itls = [gap for record in completed for gap in record.itls_s]
    e2els = [record.e2el_s for record in completed if record.e2el_s is not None]
    wall_s = max(wall_s, 1e-9)
    level = LoadLevel(
        concurrency=concurrency, serving=serving, num_tokens=num_tokens, wall_s=wall_s,
        aggregate_tok_s=num_tokens / wall_s, ttft_s_p50=percentile(ttfts, 0.5), ttft_s_p95=percentile(ttfts, 0.95),
        kv_peak_used_frac=kv_peak, request_rate=request_rate, num_requests=len(records),
        request_throughput=len(completed) / wall_s,
        tpot_ms_p50=_scaled(percentile(tpots, 0.5), 1000), tpot_ms_p95=_scaled(percentile(tpots, 0.95), 1000),
        itl_ms_p50=_scaled(percentile(itls, 0.5), 1000), itl_ms_p95=_scaled(percentile(itls, 0.95), 1000),
        e2el_s_p50=percentile(e2els, 0.5), e2el_s_p95=percentile(e2els, 0.95))
    if slos_ms:
        good = sum(metrics.meets_slos(slos_ms, record.ttft_s, record.tpot_s, record.e2el_s) for record in completed)
        level.goodput_req_s = good / wall_s
        level.slo_attainment = good / len(completed) if completed else 0.0
        level.meets_slo = level.slo_attainment >= target_attainment
    return level


def run_requests(engine, prompts: list, params: GenerationParams, arrival_offsets_s: list[float] | None = None,
                 max_concurrency: int | None = None) -> tuple[list[RequestRecord], float, str, float | None]:
    """Serve `prompts` with arrivals at `arrival_offsets_s` (default: all at 0) and at most
    `max_concurrency` in flight (None: no limit). Returns (records, wall seconds, serving, peak KV frac)."""
    offsets = list(arrival_offsets_s) if arrival_offsets_s is not None else [0.0] * len(prompts)
    if len(offsets) != len(prompts):
        raise EngineError(f"{len(prompts)} prompts but {len(offsets)} arrival times")
    started = time.perf_counter()
    if isinstance(engine, Batching):
        if hasattr(engine, "run_arrivals"):
            timings = engine.run_arrivals(prompts, offsets, params, max_concurrency=max_concurrency)
            records = [RequestRecord.from_chunks(timing.arrival_s, timing.chunk_times_s) for timing in timings]
        elif not any(offsets) and (max_concurrency is None or max_concurrency >= len(prompts)):
            timings = engine.run_concurrent(prompts, params)
            records = [RequestRecord(0.0, timing.num_tokens, timing.ttft_s,
                                     (timing.total_s - timing.ttft_s) / (timing.num_tokens - 1)
                                     if timing.ttft_s is not None and timing.num_tokens > 1 else None,
                                     timing.total_s) for timing in timings]
        else:
            raise EngineError(f"{engine.name} takes a batch at once but not timed arrivals")
        wall_s = time.perf_counter() - started
        return records, wall_s, "batched", engine.kv_stats().get("kv_peak_used_frac")
    records, ends = [], []
    kv_peak = None
    for index, prompt in enumerate(prompts):
        if max_concurrency is not None:
            # A closed loop: this request's client sent it when its previous request ended.
            arrival = 0.0 if index < max_concurrency else ends[index - max_concurrency]
        else:
            arrival = offsets[index]
        delay = started + arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        chunks = []
        request = engine.stream(prompt, params)
        for event in request:
            chunks.append((time.perf_counter() - started - arrival, event.num_tokens))
        ends.append(time.perf_counter() - started)
        records.append(RequestRecord.from_chunks(arrival, chunks))
        peak = request.stats().kv_peak_used_frac
        kv_peak = peak if kv_peak is None or (peak is not None and peak > kv_peak) else kv_peak
    return records, time.perf_counter() - started, "sequential", kv_peak


def _batch(prompts: list | None, num_requests: int) -> list:
    prompts = prompts or sample_prompts()
    return [prompts[index % len(prompts)] for index in range(num_requests)]


def measure_level(engine, concurrency: int, params: GenerationParams, prompts: list | None = None,
                  num_requests: int | None = None, slos_ms: dict[str, float] | None = None,
                  target_attainment: float = DEFAULT_ATTAINMENT) -> LoadLevel:
    """A closed-loop level: num_requests (default `concurrency`) with at most `concurrency` in flight."""
    check_concurrency(concurrency)
    num_requests = check_num_requests(num_requests or concurrency)
    records, wall_s, serving, kv_peak = run_requests(engine, _batch(prompts, num_requests), params,
                                                     max_concurrency=concurrency)
    return summarize(records, wall_s, serving, kv_peak, concurrency=concurrency, slos_ms=slos_ms,
                     target_attainment=target_attainment)


def measure_rate(engine, rate: float, params: GenerationParams, prompts: list | None = None,
                 num_requests: int | None = None, seed: int = 0, burstiness: float = 1.0,
                 slos_ms: dict[str, float] | None = None, target_attainment: float = DEFAULT_ATTAINMENT) -> LoadLevel:
    """An open-loop level: num_requests (default 16) arriving as a Poisson process of `rate` req/s."""
    check_rate(rate)
    num_requests = check_num_requests(num_requests or DEFAULT_RATE_REQUESTS)
    offsets = poisson_arrivals(num_requests, rate, seed, burstiness)
    records, wall_s, serving, kv_peak = run_requests(engine, _batch(prompts, num_requests), params, offsets)
    return summarize(records, wall_s, serving, kv_peak, request_rate=rate, slos_ms=slos_ms,
                     target_attainment=target_attainment)


def warm_up(engine, prompts: list | None = None) -> None:
    for _ in engine.stream((prompts or sample_prompts())[0], GenerationParams(max_new_tokens=4)):
        pass


def measure_levels(engine, levels: list[int], params: GenerationParams, say: Say | None = None,
                   prompts: list | None = None, rates: list[float] | None = None, num_requests: int | None = None,
                   slos_ms: dict[str, float] | None = None, seed: int = 0, burstiness: float = 1.0,
                   target_attainment: float = DEFAULT_ATTAINMENT) -> list[LoadLevel]:
    """Warm up once, then one LoadLevel per concurrency level and per rate, in the order given. `prompts`
    (texts or chat prompts) default to assets/prompts.txt."""
    prompts = prompts or sample_prompts()
    warm_up(engine, prompts)
    results = []
    for level in levels:
        if say:
            say(f"{engine.name}: concurrency {level}, {num_requests or level} request(s) of "
                f"{params.max_new_tokens} tokens")
        results.append(measure_level(engine, level, params, prompts, num_requests, slos_ms, target_attainment))
    for rate in rates or []:
        if say:
            say(f"{engine.name}: {num_requests or DEFAULT_RATE_REQUESTS} request(s) arriving at {rate:g}/s "
                f"(Poisson, seed {seed})")
        results.append(measure_rate(engine, rate, params, prompts, num_requests, seed, burstiness, slos_ms,
                                    target_attainment))
    return results


def find_max(engine, params: GenerationParams, slos_ms: dict[str, float], mode: str = "concurrency",
             start: float | None = None, upper: float | None = None, max_steps: int = MAX_SEARCH_STEPS,
             prompts: list | None = None, num_requests: int | None = None, seed: int = 0, burstiness: float = 1.0,
             target_attainment: float = DEFAULT_ATTAINMENT, say: Say | None = None,
             is_warm: bool = False) -> SearchResult:
    """The highest concurrency (mode "concurrency", whole numbers from `start`, default 1, up to `upper`,
    default 1024) or arrival rate (mode "rate", from `start`, default 1 req/s, up to `upper`, default
    1024 x start) whose level meets the SLOs: doubling, then bisection, at most `max_steps` levels."""
    if not slos_ms:
        raise EngineError("the search for the highest level needs SLOs (--goodput ttft_ms:500,tpot_ms:50)")
    if mode not in ("concurrency", "rate"):
        raise EngineError(f"find-max searches 'concurrency' or 'rate', got '{mode}'")
    if max_steps < 1:
        raise EngineError(f"the search needs at least one step, got {max_steps}")
    is_rate = mode == "rate"
    start = float(start if start is not None else 1.0)
    upper = float(upper if upper is not None else (start * MAX_CONCURRENCY if is_rate else MAX_CONCURRENCY))
    lowest = start / 16 if is_rate else 1.0
    if is_rate:
        check_rate(start)
        check_rate(upper)
    else:
        check_concurrency(int(start))
        check_concurrency(int(upper))
    prompts = prompts or sample_prompts()
    if not is_warm:
        warm_up(engine, prompts)
    tried: dict[float, LoadLevel] = {}
    best_pass: float | None = None
    lowest_fail: float | None = None
    value, reason = (start if is_rate else float(int(start))), "step budget spent"
    while len(tried) < max_steps:
        if say:
            say(f"{engine.name}: find-max step {len(tried) + 1}/{max_steps}: "
                + (f"rate {value:g} req/s" if is_rate else f"concurrency {int(value)}"))
        if is_rate:
            level = measure_rate(engine, value, params, prompts, num_requests, seed, burstiness, slos_ms,
                                 target_attainment)
        else:
            level = measure_level(engine, int(value), params, prompts, num_requests, slos_ms, target_attainment)
        tried[value] = level
        if level.meets_slo:
            best_pass = value if best_pass is None else max(best_pass, value)
        else:
            lowest_fail = value if lowest_fail is None else min(lowest_fail, value)
        following = _next_value(best_pass, lowest_fail, value, is_rate, lowest, upper)
        if isinstance(following, str):
            reason = following
            break
        if following in tried:  # whole-number bisection has nothing left between the bounds
            reason = "converged"
            break
        value = following
    levels = [tried[key] for key in sorted(tried)]
    return SearchResult(mode, levels, tried[best_pass] if best_pass is not None else None, reason, len(tried),
                        target_attainment)


def _next_value(best_pass, lowest_fail, value, is_rate, lowest, upper):
    """The next level to try, or the reason to stop."""
    if lowest_fail is None:  # nothing failed yet: double
        if value >= upper:
            return "upper bound reached"
        return min(value * 2, upper)
    if best_pass is None:  # the lowest tried failed: halve toward the minimum
        if value <= lowest:
            return "no level meets the SLO"
        return max(lowest, value / 2 if is_rate else float(int(value // 2)))
    if is_rate:
        if lowest_fail <= best_pass * (1 + RATE_SEARCH_TOLERANCE):
            return "converged"
        return (best_pass + lowest_fail) / 2
    if lowest_fail - best_pass <= 1:
        return "converged"
    return float((int(best_pass) + int(lowest_fail)) // 2)


def check_concurrency(level: int) -> int:
    if not 1 <= level <= MAX_CONCURRENCY:
        raise EngineError(f"concurrency levels must be between 1 and {MAX_CONCURRENCY}, got {level}")
    return level


def check_rate(rate: float) -> float:
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise EngineError(f"request rates must be positive numbers of requests/s up to {MAX_RATE:g}, got {rate}")
    return rate


def check_num_requests(num_requests: int) -> int:
    if not 1 <= num_requests <= MAX_REQUESTS:
        raise EngineError(f"the number of requests must be between 1 and {MAX_REQUESTS}, got {num_requests}")
    return num_requests


def results_json(engine_name: str, params: GenerationParams, levels: list[LoadLevel],
                 slos_ms: dict[str, float] | None = None, search: SearchResult | None = None,
                 target_attainment: float = DEFAULT_ATTAINMENT, manifest: dict | None = None) -> dict:
    """The load export: levels, SLOs and search, the metric definitions used, and the manifest."""
    data = {"engine": engine_name, "max_new_tokens": params.max_new_tokens, "slos_ms": slos_ms or {},
            "target_attainment": target_attainment if slos_ms else None,
            "levels": [level.to_dict() for level in levels],
            "metrics": metrics.definitions(["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "request_throughput",
                                            "output_tok_s", "goodput_req_s", "slo_attainment"])}
    if slos_ms:
        data["slo_summary"] = slo_summary(levels, slos_ms, target_attainment, search)
    if search is not None:
        data["find_max"] = search.to_dict()
    if manifest is not None:
        data["manifest"] = manifest
    return data


def slo_summary(levels: list[LoadLevel], slos_ms: dict[str, float], target_attainment: float,
                search: SearchResult | None = None) -> str:
    """One sentence: which levels met the SLO, or that none did."""
    bounds = ", ".join(f"{name.upper()} <= {bound:g} ms" for name, bound in slos_ms.items())
    head = f"SLO: {bounds}; a level meets it when at least {target_attainment:.0%} of its requests do."
    if search is not None:
        return f"{head} {search.summary}"
    passing = [level for level in levels if level.meets_slo]
    if not passing:
        best = max(levels, key=lambda level: level.slo_attainment or 0.0, default=None)
        seen = f" (best attainment {best.slo_attainment:.2f}, at {best.label})" if best else ""
        return f"{head} No level meets the SLO{seen}."
    return f"{head} Met at: {', '.join(level.label for level in passing)}."


def to_markdown(engine_name: str, levels: list[LoadLevel], slos_ms: dict[str, float] | None = None,
                search: SearchResult | None = None, target_attainment: float = DEFAULT_ATTAINMENT) -> str:
    def fmt(value, digits=3, scale=1.0):
        return "n/a" if value is None else f"{value * scale:.{digits}f}"
    has_slo = bool(slos_ms)
    header = ("| level | serving | requests | tokens | wall s | req/s | output tok/s | TTFT p50 ms | TTFT p95 ms "
              "| TPOT p50 ms | TPOT p95 ms | ITL p50 ms | E2EL p95 s | peak KV used frac |"
              + (" goodput req/s | SLO attained | meets SLO |" if has_slo else ""))
    rows = []
    for level in levels:
        row = (f"| {level.label} | {level.serving} | {level.num_requests} | {level.num_tokens} "
               f"| {fmt(level.wall_s, 2)} | {fmt(level.request_throughput, 2)} | {fmt(level.aggregate_tok_s, 1)} "
               f"| {fmt(level.ttft_s_p50, 1, 1000)} | {fmt(level.ttft_s_p95, 1, 1000)} | {fmt(level.tpot_ms_p50, 1)} "
               f"| {fmt(level.tpot_ms_p95, 1)} | {fmt(level.itl_ms_p50, 1)} | {fmt(level.e2el_s_p95, 2)} "
               f"| {fmt(level.kv_peak_used_frac, 4)} |")
        if has_slo:
            row += (f" {fmt(level.goodput_req_s, 2)} | {fmt(level.slo_attainment, 2)} "
                    f"| {'yes' if level.meets_slo else 'no'} |")
        rows.append(row)
    lines = [f"### load: {engine_name}", "", header, "|" + "---|" * (header.count("|") - 1), *rows, "",
             "TTFT, TPOT, ITL and E2EL as vllm bench serve defines them, from each request's arrival "
             "(docs/metrics.md)."]
    if has_slo:
        lines += ["", slo_summary(levels, slos_ms, target_attainment, search)]
    return "\n".join(lines)
