"""`gguf`: llama.cpp (llama-cpp-python's CPU build) on a GGUF file as it ships: the embedded model's own
file (Q4_K_M for Gemma, Q4_1 for SmolLM2), a local .gguf (option `path`), or a rung of the ladder written
once from it (option `type`: q8_0, f16; engines/variants/llamacpp/ladder.py). On a GPU machine this
build still runs on the CPU.

One token per event, stamped in the generating thread (llama.cpp decodes one token per step). Greedy is
top_k=1; sampling uses the same temperature, top_p and seed as the other engines. KV: llama.cpp's cells
for the sequence (positions held) against the context size, charted like vLLM's blocks with one token
per cell; the cache is cleared after each request. `llama_perf()` reads llama.cpp's own eval timing of
the last request, to compare the engine's decode tok/s with the library's.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engines.models.sources import resolve_model
from engines.options import option, parse_options
from engines.protocol import (
    GIB,
    ChatPrompt,
    EngineError,
    EngineStats,
    GenerationParams,
    Precision,
    ProgressCallback,
    Scoring,
    say,
    validate_prompt,
)
from engines.telemetry import GenerationRecorder, MemoryProbe, release_freed_memory
from engines.variants.llamacpp.ladder import LADDER, ensure_rung
from engines.variants.streaming import Chunk, Detokenizer, RequestStream, start_in_thread, stream_request

TYPES = ("shipped", *LADDER)
# llama.cpp's default KV cache type is F16.
KV_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class GgufOptions:
    type: str = option("shipped", choices=TYPES, doc="the shipped file, or a ladder rung written from it")
    path: str | None = option(None, doc="a local .gguf file to run instead of the model's own")
    n_threads: int | None = option(None, minimum=1, doc="CPU threads (default: the machine's cores)")
    n_ctx: int = option(4096, minimum=16, doc="context length in tokens")


class _Tokenizer:
    """The stream loop's Detokenizer asks for a Hugging Face style decode()."""

    def __init__(self, llm):
        self.llm = llm

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(token_ids, special=not skip_special_tokens).decode("utf-8", errors="replace")


class GgufEngine(Scoring):
    """One llama.cpp context; one request at a time (a second waits its turn)."""

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        self.name = name
        self.model_name = model
        self.options = parse_options(GgufOptions, name, dict(options or {}))
        self.device = "cpu"
        self.n_threads = self.options.n_threads or os.cpu_count() or 1
        self.gguf_path: Path | None = None
        self.llm = None
        self.recorder: GenerationRecorder | None = None
        self.last_token_ids: list[int] = []
        self._precision: Precision | None = None
        self._perf = None
        self._lock = threading.Lock()

    @property
    def max_context_tokens(self) -> int:
        return self.options.n_ctx

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self.llm is not None:
            return
        path = Path(self.options.path).expanduser() if self.options.path else \
            resolve_model(self.model_name, progress).gguf_path
        if path is None:
            raise EngineError(f"{self.name}: model '{self.model_name}' has no GGUF file here; give one with "
                              "--option path=FILE.gguf")
        if not path.is_file():
            raise EngineError(f"{self.name}: {path} does not exist")
        if self.options.type != "shipped":
            path = ensure_rung(path, self.options.type, progress)
        say(progress, f"{self.name}: loading {path.name} with llama.cpp ({self.n_threads} threads)")
        from llama_cpp import Llama
        try:
            self.llm = Llama(model_path=str(path), n_ctx=self.options.n_ctx, n_threads=self.n_threads,
                             n_threads_batch=self.n_threads, logits_all=False, verbose=False)
        except Exception as error:
            raise EngineError(f"{self.name}: llama.cpp could not load {path} (not a valid GGUF model?): "
                              f"{type(error).__name__}: {error}") from None
        self.gguf_path = path
        self._precision = _file_precision(path)
        self.recorder = GenerationRecorder(self.name, MemoryProbe("cpu"), kv_probe=self._kv_probe)
        say(progress, f"{self.name}: ready")

    def encode(self, prompt: "str | ChatPrompt") -> list[int]:
        """A text with BOS where the GGUF asks for it (Gemma's does), or a chat prompt's template ids."""
        if isinstance(prompt, ChatPrompt):
            return list(prompt.token_ids)
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def stream(self, prompt: "str | ChatPrompt", params: GenerationParams,
               cancel: threading.Event | None = None) -> RequestStream:
        if self.llm is None:
            raise EngineError(f"{self.name}: not loaded")
        prompt = validate_prompt(prompt)
        params = params.validate()
        prompt_ids = self.encode(prompt)
        if len(prompt_ids) + params.max_new_tokens > self.options.n_ctx:
            raise EngineError(f"the prompt is {len(prompt_ids)} tokens and {params.max_new_tokens} new tokens were "
                              f"asked for; {self.name} accepts {self.options.n_ctx} tokens in all (option n_ctx)")
        stop_ids = set(prompt.stop_token_ids) if isinstance(prompt, ChatPrompt) else {self.llm.token_eos()}
        self.last_token_ids = token_ids = []

        def work(emit, stop):
            self._generate(prompt_ids, params, stop_ids, emit, stop)

        return stream_request(name=self.name, recorder=self.recorder,
                              start=start_in_thread(f"{self.name}-decode", work),
                              max_new_tokens=params.max_new_tokens, num_prompt_tokens=len(prompt_ids),
                              lock=self._lock, cancel=cancel, token_ids=token_ids,
                              detokenizer=Detokenizer(_Tokenizer(self.llm)))

    def _generate(self, prompt_ids, params: GenerationParams, stop_ids: set[int], emit, stop) -> None:
        import llama_cpp
        sampling = {"temp": 0.0, "top_k": 1} if params.is_greedy else \
            {"temp": params.temperature, "top_p": params.top_p, "top_k": 0}
        self.llm.set_seed(params.seed)
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        num_tokens = 0
        try:
            for token in self.llm.generate(prompt_ids, reset=True, repeat_penalty=1.0, **sampling):
                num_tokens += 1
                self.recorder.on_tokens(1)
                is_stop = token in stop_ids
                emit(Chunk(token_ids=[token], finish_reason="eos" if is_stop else None))
                if is_stop or num_tokens >= params.max_new_tokens or stop.is_set():
                    break
        finally:
            llama_cpp.llama_synchronize(self.llm.ctx)
            self._perf = llama_cpp.llama_perf_context(self.llm.ctx)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
            self.llm.reset()

    def llama_perf(self) -> dict:
        """llama.cpp's own counters for the last request: decode tokens and milliseconds, and their rate."""
        perf = self._perf
        if perf is None:
            raise EngineError(f"{self.name}: no request has run yet")
        return {"n_eval": perf.n_eval, "t_eval_ms": perf.t_eval_ms, "n_p_eval": perf.n_p_eval,
                "t_p_eval_ms": perf.t_p_eval_ms,
                "eval_tok_s": perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else None}

    def _kv_probe(self) -> dict:
        import llama_cpp
        used = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self.llm.ctx), 0) + 1
        total = self.llm.n_ctx()
        return {"kv_blocks_used": used, "kv_blocks_total": total, "kv_block_size": 1, "kv_used_frac": used / total}

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of the text's tokens after BOS, from a scoring context of
        its own (logits for every position; the streaming context keeps only the last)."""
        import numpy as np
        from llama_cpp import Llama
        if self.llm is None:
            raise EngineError(f"{self.name}: not loaded")
        ids = self.encode(validate_prompt(text))[:1024]
        if len(ids) < 2:
            raise EngineError("perplexity needs a text of at least one token")
        with self._lock:
            scorer = Llama(model_path=str(self.gguf_path), n_ctx=len(ids) + 8, n_threads=self.n_threads,
                           logits_all=True, verbose=False)
            try:
                scorer.eval(ids)
                logits = np.asarray(scorer.scores[: len(ids) - 1], dtype=np.float64)
            finally:
                scorer.close()
        top = logits.max(axis=1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))

    def decode(self, token_ids: list[int]) -> str:
        return _Tokenizer(self.llm).decode(token_ids)

    def weight_footprint_gib(self) -> float | None:
        """The file's bytes: llama.cpp maps the weights as they are stored."""
        return self.gguf_path.stat().st_size / GIB if self.gguf_path else None

    def precision(self) -> Precision:
        """Bytes per weight as stored in the file (read on load); before load, the shipped type is unknown."""
        return self._precision or Precision(0.0, 0.0, KV_BYTES_PER_ELEMENT, "GGUF (type read at load)")

    def stats(self) -> EngineStats:
        return self.recorder.snapshot() if self.recorder else EngineStats(engine=self.name)

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None
        release_freed_memory()


def _file_precision(path: Path) -> Precision:
    """Bytes per weight of the file's linear layers and of its embedding/output tensors, as stored."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    sizes = {"linear": [0, 0], "other": [0, 0]}
    for tensor in reader.tensors:
        if len(tensor.shape) < 2:
            continue
        kind = "other" if tensor.name.startswith(("token_embd", "output.")) else "linear"
        sizes[kind][0] += int(tensor.n_bytes)
        sizes[kind][1] += int(tensor.n_elements)
    linear = sizes["linear"][0] / max(sizes["linear"][1], 1)
    other = sizes["other"][0] / max(sizes["other"][1], 1)
    return Precision(linear, other, KV_BYTES_PER_ELEMENT, f"GGUF {path.name}: {linear:.3f} B/weight linear")
