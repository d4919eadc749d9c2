"""`vllm`, `vllm-fp8kv`, `vllm-spec`: vLLM's async engine (paged attention, continuous batching) in process.

AsyncLLM lives on a private event-loop thread; stream() submits a request there and hands its outputs
back through a queue, so callers see a plain iterator. Outputs come as deltas (RequestOutputKind.DELTA):
each carries the new token ids, so one speculative step that accepts three tokens is one event of
three tokens. Closing the iterator cancels the request's task, and vLLM's generate() aborts the
request in the engine core on that cancellation. KV and speculative counters come from this engine's
own stat logger; memory is read over the process tree, since the engine core is a child process.
Options and everything else that faces vLLM's configuration live in engines/variants/vllm/support.py; the
coroutines that drive AsyncLLM live in engines/variants/vllm/requests.py.

For other modules: `last_token_ids` (of the latest stream), `perplexity(text)`, `run_concurrent()`
(many requests at once, for the load command), `run_arrivals()` (requests at scheduled times, per-output
times), `kv_stats()`, `num_unfinished_requests()`, `load_s`.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from engines.hardware import has_gpu
from engines.models.catalog import ModelSource, trust_remote_code
from engines.models.sources import resolve_model
from engines.protocol import (
    Batching,
    ChatPrompt,
    EngineError,
    EngineStats,
    EngineUnavailable,
    GenerationParams,
    Precision,
    ProgressCallback,
    Scoring,
    describe_error,
    validate_prompt,
)
from engines.telemetry import DTYPE_BYTES, GenerationRecorder, MemoryProbe, nvml_device_used_gib, release_freed_memory
from engines.variants.streaming import RequestStream, stream_request
from engines.variants.vllm.requests import (
    RequestTiming,
    arrivals_timed,
    cancel_pending_tasks,
    gather_timed,
    produce_deltas,
    prompt_perplexity,
)
from engines.variants.vllm.support import (
    KvTelemetry,
    VllmOptions,
    fp8_kv_unavailable_reason,
    num_unfinished_requests,
    stat_logger_factory,
)

# vLLM logs to stdout unless told otherwise; the CLI's tables and --json own stdout. Read when vLLM is
# first imported (after this module), and inherited by the engine core's processes.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


class VllmEngine(Scoring, Batching):
    """One AsyncLLM with its own event-loop thread, stat logger and memory share."""

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        self.name = name
        self.model_name = model
        self.options = VllmOptions.from_dict(name, dict(options or {}))
        self.device = self.options.device or ("cuda" if has_gpu() else "cpu")
        self.max_model_len = self.options.max_model_len
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
        try:
            config = json.loads((self.source.path / "config.json").read_text())
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(self.source.path, trust_remote_code=trust_remote_code())
        except Exception as error:
            raise EngineError(f"{self.name}: could not read {self.source.name}: {describe_error(error)}") from error
        head_dim = config.get("head_dim") or config.get("text_config", {}).get("head_dim")
        if self.device == "cpu" and self.options.kv_cache_dtype != "auto":
            reason = fp8_kv_unavailable_reason(head_dim)
            if reason:
                raise EngineUnavailable(f"{self.name}: {reason}")
        self.telemetry = KvTelemetry()
        draft = resolve_model(self.options.draft_model, progress) if self.options.draft_model else None
        try:
            engine_args = self.options.to_engine_args(str(self.source.path), self.device, draft and str(draft.path))
        except Exception as error:
            raise EngineError(f"{self.name}: vLLM refused the options: {describe_error(error)}") from error
        baseline_gib = nvml_device_used_gib() if self.device != "cpu" else None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"{self.name}-loop", daemon=True)
        self._loop_thread.start()
        if progress:
            progress(f"{self.name}: starting vLLM on {self.device} for {self.source.name} "
                     f"(KV {self.options.kv_cache_dtype}, max_model_len {self.max_model_len})")
        started = time.perf_counter()
        try:
            self._llm = self._call(self._create(engine_args, stat_logger_factory(self.telemetry)))
        except Exception as error:
            self._stop_loop()
            raise EngineError(f"{self.name}: vLLM could not load {self.source.name}: "
                              f"{describe_error(error)}") from error
        self.load_s = time.perf_counter() - started
        self.memory = MemoryProbe(self.device, is_in_process=False, baseline_device_gib=baseline_gib)
        self.recorder = GenerationRecorder(self.name, self.memory, kv_probe=self.telemetry.snapshot)
        if progress:
            progress(f"{self.name}: ready in {self.load_s:.0f} s, {self.telemetry.kv_blocks_total} KV blocks "
                     f"of {self.telemetry.kv_block_size} tokens")

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

    def encode(self, prompt: "str | ChatPrompt", max_new_tokens: int) -> list[int]:
        """Prompt -> token ids: a text with BOS (Gemma needs it), a chat prompt as its template's ids;
        checked against the context length."""
        prompt_ids = list(prompt.token_ids) if isinstance(prompt, ChatPrompt) else self.tokenizer(prompt).input_ids
        if len(prompt_ids) + max_new_tokens > self.max_model_len:
            raise EngineError(f"the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens were asked "
                              f"for; {self.name} accepts {self.max_model_len} tokens in all (option max_model_len)")
        return prompt_ids

    def stream(self, prompt: "str | ChatPrompt", params: GenerationParams,
               cancel: threading.Event | None = None) -> RequestStream:
        """Requests run concurrently (vLLM batches them); each has its own recorder, and stats() reads the
        newest request's."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        params = params.validate()
        prompt_ids = self.encode(validate_prompt(prompt), params.max_new_tokens)
        recorder = GenerationRecorder(self.name, self.memory, kv_probe=self.telemetry.snapshot)
        self.recorder = recorder
        self.telemetry.reset_counters()
        self.last_token_ids = token_ids = []
        # A chat turn ends at its template's end-of-turn token.
        stops = {"stop_token_ids": list(prompt.stop_token_ids)} if isinstance(prompt, ChatPrompt) else {}

        def start(emit, stop):
            return asyncio.run_coroutine_threadsafe(
                produce_deltas(self._llm, self.name, prompt_ids, self._sampling_params(params, **stops), recorder,
                               emit), self._loop)

        return stream_request(name=self.name, recorder=recorder, start=start,
                              max_new_tokens=params.max_new_tokens, num_prompt_tokens=len(prompt_ids),
                              cancel=cancel, token_ids=token_ids, join_timeout_s=10.0)

    def run_concurrent(self, prompts: list[str], params: GenerationParams) -> list[RequestTiming]:
        """Submit every prompt at once (continuous batching) and time each request from that moment."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        params = params.validate()
        all_ids = [self.encode(validate_prompt(prompt), params.max_new_tokens) for prompt in prompts]
        self.telemetry.reset_counters()
        return self._call(gather_timed(self._llm, self.name, all_ids, self._sampling_params(params)))

    def run_arrivals(self, prompts: list, arrival_offsets_s: list[float], params: GenerationParams,
                     max_concurrency: int | None = None) -> list[RequestTiming]:
        """Submit prompt i at arrival_offsets_s[i] seconds from now (open-loop arrivals; at most
        max_concurrency in flight when given); each timed from its arrival, with every output's time."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        params = params.validate()
        all_ids = [self.encode(validate_prompt(prompt), params.max_new_tokens) for prompt in prompts]
        # Chat turns end at the template's end-of-turn token, as in stream().
        first = prompts[0] if prompts else None
        stops = {"stop_token_ids": list(first.stop_token_ids)} if isinstance(first, ChatPrompt) else {}
        self.telemetry.reset_counters()
        return self._call(arrivals_timed(self._llm, self.name, all_ids, self._sampling_params(params, **stops),
                                         list(arrival_offsets_s), max_concurrency))

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of the text's tokens after BOS, from vLLM's prompt_logprobs.
        Text longer than max_model_len - 1 tokens is cut there."""
        if self._llm is None:
            raise EngineError(f"{self.name}: not loaded")
        prompt_ids = self.tokenizer(validate_prompt(text)).input_ids[: self.max_model_len - 1]
        if len(prompt_ids) < 2:
            raise EngineError("perplexity needs a text of at least one token")
        sampling = self._sampling_params(GenerationParams(max_new_tokens=1), prompt_logprobs=0)
        return self._call(prompt_perplexity(self._llm, self.name, prompt_ids, sampling))

    def precision(self) -> Precision:
        """Weights in the checkpoint dtype (bf16 here); KV in kv_cache_dtype: any fp8 variant is 1 byte."""
        weight_bytes = DTYPE_BYTES.get(self.options.engine_args.get("dtype", "auto"), 2)
        kv = 1 if self.options.kv_cache_dtype.startswith("fp8") else weight_bytes
        return Precision.of_dtype(weight_bytes, kv, f"{weight_bytes}-byte weights, KV {self.options.kv_cache_dtype}")

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def weight_footprint_gib(self) -> float | None:
        """The weights live in the engine core's process; this process cannot count them."""
        return None

    def stats(self) -> EngineStats:
        return self.recorder.snapshot() if self.recorder else EngineStats(engine=self.name)

    def num_unfinished_requests(self) -> int:
        """Requests vLLM still holds; 0 after a closed stream shows that the abort reached the engine."""
        return num_unfinished_requests(self._llm) if self._llm is not None else 0

    def kv_stats(self) -> dict:
        """The engine's KV and speculative counters right now (EngineStats field names)."""
        return self.telemetry.snapshot() if self.telemetry else {}

    def unload(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Cancelling the output handler first keeps it from reporting the engine core's exit as a crash.
            self._call(cancel_pending_tasks())
            llm.shutdown()
        self._stop_loop()
        import multiprocessing
        release_freed_memory()
        # vLLM kills a stuck engine core without joining it; polling the children reaps the zombie.
        multiprocessing.active_children()

    def _stop_loop(self) -> None:
        if self._loop is not None:
            # vLLM's output tasks outlive shutdown(); cancelling them lets the loop close cleanly.
            self._call(cancel_pending_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = self._loop_thread = None

