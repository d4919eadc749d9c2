"""`vllm`, `vllm-fp8kv`, `vllm-spec`: vLLM's async engine (paged attention, continuous batching) in process.

AsyncLLM lives on a private event-loop thread; stream() submits a request there and hands its outputs
back through a queue, so callers see a plain iterator. Outputs come as deltas (RequestOutputKind.DELTA):
each carries the new token ids, so one speculative step that accepts three tokens is one event of
three tokens. Closing the iterator cancels the request's task, and vLLM's generate() aborts the
request in the engine core on that cancellation. KV and speculative counters come from this engine's
own stat logger (engines/vllm_stats.py); memory is read over the process tree, since the engine core
is a child process.

Options: kv_cache_dtype (auto|fp8|fp8_e4m3|fp8_e5m2), gpu_memory_utilization (this engine's share of
the GPU), kv_cache_gb (fixed KV size; on CPU the default is 1 GiB or VLLM_CPU_KVCACHE_SPACE),
max_model_len (default 4096), max_num_seqs, block_size, enforce_eager, enable_prefix_caching, dtype,
load_format, seed, and for speculation: speculative (ngram|draft|eagle|eagle3), num_speculative_tokens,
prompt_lookup_min/max (ngram), draft_model (draft or EAGLE head, resolved like the target).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from engines.models import ModelSource, resolve_model
from engines.protocol import (EngineError, EngineStats, EngineUnavailable, GenerationParams,
                              ProgressCallback, StreamEvent, validate_prompt)
from engines.registry import has_gpu
from engines.telemetry import GB, GenerationRecorder, MemoryProbe, nvml_device_used_gb

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
SPECULATIVE_METHODS = ("ngram", "draft", "eagle", "eagle3")
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_GPU_MEMORY_UTILIZATION = 0.3
DEFAULT_CPU_KV_CACHE_GB = 1.0
ENGINE_ARG_OPTIONS = ("max_num_seqs", "block_size", "enforce_eager", "enable_prefix_caching", "dtype",
                      "load_format", "seed")
OWN_OPTIONS = ("kv_cache_dtype", "gpu_memory_utilization", "kv_cache_gb", "max_model_len", "speculative",
               "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "draft_model", "device")
# Transformers-only options a shared CLI or bench may pass to every engine; they mean nothing to vLLM.
IGNORED_OPTIONS = ("attn_implementation", "compile", "dummy_weights")
_DONE = object()
_request_numbers = itertools.count()


def fp8_kv_unavailable_reason(head_dim: int | None) -> str | None:
    """vLLM's own CPU rule (v1/attention/backends/cpu_attn.py _get_attn_isa), checked before loading."""
    import torch
    if head_dim is not None and head_dim % 32 != 0 and head_dim % 16 == 0:
        return f"FP8 KV cache on CPU requires head_size divisible by 32; this model's is {head_dim}"
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return "FP8 KV cache on CPU requires x86 with AVX-512 or AMX (vLLM); this CPU has neither"
    return None


@dataclass
class RequestTiming:
    """One request of a concurrent batch; times count from the batch's submit."""
    num_tokens: int
    ttft_s: float | None
    total_s: float


class VllmEngine:
    """One AsyncLLM with its own event-loop thread, stat logger and memory share."""

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        self.name = name
        self.model_name = model
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - set(ENGINE_ARG_OPTIONS) - set(OWN_OPTIONS) - set(IGNORED_OPTIONS))
        if unknown:
            raise EngineError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(OWN_OPTIONS + ENGINE_ARG_OPTIONS)}")
        self.kv_cache_dtype = str(self.options.get("kv_cache_dtype", "auto"))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineError(f"{name}: kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got '{self.kv_cache_dtype}'")
        self.speculative = self.options.get("speculative")
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise EngineError(f"{name}: speculative must be one of {', '.join(SPECULATIVE_METHODS)}, "
                              f"got '{self.speculative}'")
        if self.speculative in ("draft", "eagle", "eagle3") and not self.options.get("draft_model"):
            raise EngineError(f"{name}: speculative={self.speculative} needs the option draft_model")
        self.device = self.options.get("device") or ("cuda" if has_gpu() else "cpu")
        self.max_model_len = int(self.options.get("max_model_len", DEFAULT_MAX_MODEL_LEN))
        self.source: ModelSource | None = None
        self.tokenizer = None
        self.telemetry = None
        self.recorder: GenerationRecorder | None = None
        self.memory: MemoryProbe | None = None
        self.last_token_ids: list[int] = []
        self.load_s: float | None = None
        self._llm = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    @property
    def is_loaded(self) -> bool:
        return self._llm is not None

    @property
    def max_context_tokens(self) -> int:
        return self.max_model_len

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self._llm is not None:
            return
        self.source = resolve_model(self.model_name, progress)
        config = json.loads((self.source.path / "config.json").read_text())
        head_dim = config.get("head_dim") or config.get("text_config", {}).get("head_dim")
        if self.device == "cpu" and self.kv_cache_dtype != "auto":
            reason = fp8_kv_unavailable_reason(head_dim)
            if reason:
                raise EngineUnavailable(f"{self.name}: {reason}")
        from transformers import AutoTokenizer
        from engines.vllm_stats import KvTelemetry, stat_logger_factory
        self.tokenizer = AutoTokenizer.from_pretrained(self.source.path)
        self.telemetry = KvTelemetry()
        baseline_gb = nvml_device_used_gb() if self.device != "cpu" else None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"{self.name}-loop", daemon=True)
        self._loop_thread.start()
        if progress:
            progress(f"{self.name}: starting vLLM on {self.device} for {self.source.name} "
                     f"(KV {self.kv_cache_dtype}, max_model_len {self.max_model_len})")
        started = time.perf_counter()
        try:
            self._llm = self._call(self._create(self._engine_args(), stat_logger_factory(self.telemetry)))
        except Exception as error:
            self._stop_loop()
            raise EngineError(f"{self.name}: vLLM could not load {self.source.name}: {_describe(error)}") from error
        self.load_s = time.perf_counter() - started
        self.memory = MemoryProbe(self.device, is_in_process=False, baseline_device_gb=baseline_gb)
        self.recorder = GenerationRecorder(self.name, self.memory, kv_probe=self.telemetry.snapshot)
        if progress:
            progress(f"{self.name}: ready in {self.load_s:.0f} s, {self.telemetry.kv_blocks_total} KV blocks "
                     f"of {self.telemetry.kv_block_size} tokens")

    def _engine_args(self):
        from vllm import AsyncEngineArgs
        args = {key: self.options[key] for key in ENGINE_ARG_OPTIONS if key in self.options}
        args.update(model=str(self.source.path), tokenizer=str(self.source.path), max_model_len=self.max_model_len,
                    kv_cache_dtype=self.kv_cache_dtype, disable_log_stats=False)
        kv_cache_gb = self.options.get("kv_cache_gb")
        if kv_cache_gb is None and self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            args["kv_cache_memory_bytes"] = int(float(kv_cache_gb) * GB)
        else:
            args["gpu_memory_utilization"] = float(self.options.get("gpu_memory_utilization",
                                                                    DEFAULT_GPU_MEMORY_UTILIZATION))
        if self.speculative:
            args["speculative_config"] = self._speculative_config()
        return AsyncEngineArgs(**args)

    def _speculative_config(self) -> dict:
        config = {"num_speculative_tokens": int(self.options.get("num_speculative_tokens", 4))}
        if self.speculative == "ngram":
            config.update(method="ngram", prompt_lookup_min=int(self.options.get("prompt_lookup_min", 2)),
                          prompt_lookup_max=int(self.options.get("prompt_lookup_max", 4)))
        else:
            draft = resolve_model(str(self.options["draft_model"]))
            config.update(model=str(draft.path))
            if self.speculative != "draft":
                config["method"] = self.speculative
        return config

    async def _create(self, engine_args, logger_factory):
        # Built inside the loop so that AsyncLLM's output handler task belongs to this loop.
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM.from_engine_args(engine_args, stat_loggers=[logger_factory])

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _sampling_params(self, params: GenerationParams, **extra):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        sampling = {"temperature": 0.0} if params.is_greedy else \
            {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
        return SamplingParams(max_tokens=params.max_new_tokens, output_kind=RequestOutputKind.DELTA,
                              **sampling, **extra)

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Prompt -> token ids with BOS (Gemma needs it), checked against the context length."""
        prompt_ids = self.tokenizer(prompt).input_ids
        if len(prompt_ids) + max_new_tokens > self.max_model_len:
            raise EngineError(f"the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens were asked "
                              f"for; {self.name} accepts {self.max_model_len} tokens in all (option max_model_len)")
        return prompt_ids

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[StreamEvent]:
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        params = params.validate()
        prompt_ids = self.encode(validate_prompt(prompt), params.max_new_tokens)
        recorder = GenerationRecorder(self.name, self.memory, kv_probe=self.telemetry.snapshot)
        self.recorder = recorder
        self.telemetry.reset_counters()
        outputs: queue.Queue = queue.Queue()
        recorder.start(len(prompt_ids))
        future = asyncio.run_coroutine_threadsafe(
            self._produce(prompt_ids, self._sampling_params(params), recorder, outputs), self._loop)
        token_ids: list[int] = []
        self.last_token_ids = token_ids
        finish_reason = "cancelled"
        try:
            while (item := outputs.get()) is not _DONE:
                if isinstance(item, BaseException):
                    finish_reason = "error"
                    raise EngineError(f"{self.name}: generation failed: {_describe(item)}") from item
                text, new_ids, reason = item
                token_ids.extend(new_ids)
                if reason:
                    finish_reason = {"stop": "eos"}.get(reason, reason)
                if new_ids:
                    yield StreamEvent(text, len(new_ids))
        finally:
            if not future.done():
                future.cancel()
            recorder.finish(finish_reason)

    async def _produce(self, prompt_ids, sampling, recorder, outputs: queue.Queue) -> None:
        request_id = f"{self.name}-{next(_request_numbers)}"
        try:
            async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id):
                completion = output.outputs[0]
                recorder.on_tokens(len(completion.token_ids))
                outputs.put((completion.text, list(completion.token_ids), completion.finish_reason))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            outputs.put(error)
        finally:
            outputs.put(_DONE)

    def run_concurrent(self, prompts: list[str], params: GenerationParams) -> list[RequestTiming]:
        """Submit every prompt at once (continuous batching) and time each request from that moment."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        params = params.validate()
        all_ids = [self.encode(validate_prompt(prompt), params.max_new_tokens) for prompt in prompts]
        self.telemetry.reset_counters()
        return self._call(self._gather(all_ids, self._sampling_params(params)))

    async def _gather(self, all_ids, sampling) -> list[RequestTiming]:
        submitted = time.perf_counter()

        async def one(prompt_ids) -> RequestTiming:
            first, num_tokens = None, 0
            async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, sampling,
                                                   f"{self.name}-{next(_request_numbers)}"):
                num_tokens += len(output.outputs[0].token_ids)
                if first is None and num_tokens:
                    first = time.perf_counter() - submitted
            return RequestTiming(num_tokens, first, time.perf_counter() - submitted)
        return list(await asyncio.gather(*(one(prompt_ids) for prompt_ids in all_ids)))

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of the text's tokens after BOS, from vLLM's prompt_logprobs.
        Text longer than max_model_len - 1 tokens is cut there."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        prompt_ids = self.tokenizer(validate_prompt(text)).input_ids[: self.max_model_len - 1]
        if len(prompt_ids) < 2:
            raise EngineError("perplexity needs a text of at least one token")
        sampling = self._sampling_params(GenerationParams(max_new_tokens=1), prompt_logprobs=0)
        return self._call(self._perplexity(prompt_ids, sampling))

    async def _perplexity(self, prompt_ids, sampling) -> float:
        prompt_logprobs = None
        async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, sampling,
                                               f"{self.name}-ppl-{next(_request_numbers)}"):
            prompt_logprobs = output.prompt_logprobs or prompt_logprobs
        scored = [position[token].logprob for token, position in zip(prompt_ids[1:], prompt_logprobs[1:])]
        return math.exp(-sum(scored) / len(scored))

    def stats(self) -> EngineStats:
        return self.recorder.snapshot() if self.recorder else EngineStats(engine=self.name)

    def kv_stats(self) -> dict:
        """The engine's KV and speculative counters right now (EngineStats field names)."""
        return self.telemetry.snapshot() if self.telemetry else {}

    def unload(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()
        self._stop_loop()
        import gc
        gc.collect()

    def _stop_loop(self) -> None:
        if self._loop is not None:
            # vLLM's output tasks outlive shutdown(); cancelling them lets the loop close cleanly.
            self._call(_cancel_pending_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = self._loop_thread = None


async def _cancel_pending_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _describe(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None and not str(cause).strip():
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
