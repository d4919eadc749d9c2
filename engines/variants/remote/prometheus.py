"""Reads an inference server's Prometheus /metrics into the playground's stat fields.

Understood metric names (sample names as exposed; counters carry `_total`):
- KV cache: vLLM `vllm:kv_cache_usage_perc` (a fraction despite the name), the older
  `vllm:gpu_cache_usage_perc`, SGLang `sglang:token_usage`; KV blocks from vLLM's
  `vllm:cache_config_info` labels (num_gpu_blocks, block_size).
- Preemptions: vLLM `vllm:num_preemptions_total`.
- Speculative decoding: vLLM `vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total`;
  SGLang's `sglang:spec_accept_length` gauge (mean accepted length).
Counters are cumulative over the server's life and over all its clients, so `MetricsDelta` reports
them as the change since a baseline read at the request's submit. Gauges of several engines
(data-parallel ranks) are averaged, counters summed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engines.protocol import speculation_stats

KV_USAGE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
COUNTERS = {
    "num_preemptions": "vllm:num_preemptions_total",
    "num_drafts": "vllm:spec_decode_num_drafts_total",
    "num_draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
}


@dataclass
class MetricsReading:
    kv_used_frac: float | None = None
    kv_blocks_total: int | None = None
    kv_block_size: int | None = None
    sglang_accept_length: float | None = None
    counters: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str, model_name: str | None = None) -> MetricsReading:
    """Parse exposition text; samples labelled with another model_name are skipped."""
    from prometheus_client.parser import text_string_to_metric_families
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            served = sample.labels.get("model_name")
            if model_name and served and served != model_name:
                continue
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    reading = MetricsReading()
    for name in KV_USAGE_GAUGES:
        if samples.get(name):
            values = [value for _, value in samples[name]]
            reading.kv_used_frac = sum(values) / len(values)
            break
    for labels, _ in samples.get("vllm:cache_config_info", []):
        if labels.get("num_gpu_blocks", "").isdigit():
            reading.kv_blocks_total = (reading.kv_blocks_total or 0) + int(labels["num_gpu_blocks"])
        if labels.get("block_size", "").isdigit():
            reading.kv_block_size = int(labels["block_size"])
    if samples.get("sglang:spec_accept_length"):
        reading.sglang_accept_length = samples["sglang:spec_accept_length"][0][1]
    for field_name, sample_name in COUNTERS.items():
        if samples.get(sample_name):
            reading.counters[field_name] = sum(value for _, value in samples[sample_name])
    return reading


class MetricsDelta:
    """Turns successive readings into EngineStats fields, counters relative to the first reading."""

    def __init__(self, baseline: MetricsReading):
        self.baseline = baseline

    def fields(self, reading: MetricsReading) -> dict:
        result: dict = {}
        if reading.kv_used_frac is not None:
            result["kv_used_frac"] = reading.kv_used_frac
        if reading.kv_blocks_total:
            result["kv_blocks_total"] = reading.kv_blocks_total
            result["kv_block_size"] = reading.kv_block_size
            if reading.kv_used_frac is not None:
                result["kv_blocks_used"] = round(reading.kv_used_frac * reading.kv_blocks_total)
        for name, value in reading.counters.items():
            result[name] = int(value - self.baseline.counters.get(name, 0.0))
        derived = speculation_stats(result.get("num_drafts", 0), result.get("num_draft_tokens", 0),
                                    result.get("num_accepted_tokens", 0))
        for name in ("acceptance_rate", "mean_accepted_len"):
            if derived[name] is not None:
                result[name] = derived[name]
        if "mean_accepted_len" not in result and reading.sglang_accept_length is not None:
            result["mean_accepted_len"] = reading.sglang_accept_length
        return result


class MetricsScraper:
    """Scrapes one server's /metrics; `probe()` is the KvProbe a GenerationRecorder samples with."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 2.0):
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_name: str | None = None  # set once load() knows the served model
        self.timeout_s = timeout_s
        self.error = ""
        self._delta = MetricsDelta(MetricsReading())

    def read(self) -> MetricsReading | None:
        """One scrape; None (and `error` says why) when the endpoint cannot be read."""
        import httpx
        try:
            response = httpx.get(self.url, timeout=self.timeout_s, headers=self.headers)
            response.raise_for_status()
            self.error = ""
            return parse_metrics(response.text, self.model_name)
        except Exception as error:
            self.error = f"{self.url}: {type(error).__name__}: {error}"
            return None

    def set_baseline(self) -> None:
        self._delta = MetricsDelta(self.read() or MetricsReading())

    def probe(self) -> dict:
        reading = self.read()
        return {} if reading is None else self._delta.fields(reading)
