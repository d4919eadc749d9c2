"""The transformers baseline (`bf16`, `bf16-compiled`) and the base class of every in-process
transformers variant (nf4, int8, gptq-int4, spec).

One plain generate() runs in the engine's own single worker thread, with a streamer
(engines/variants/transformers/token_stream.py) that stamps tokens there. The worker is one persistent
thread, not one per request, because CUDA graphs captured by torch.compile (bf16-compiled) belong to the thread that
captured them: replaying them from another thread asserts. Subclasses override `_load_model()` (how
weights are built) and `_generate_kwargs()` (what generate() gets extra).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from engines.hardware import has_gpu
from engines.models.catalog import ModelSource, trust_remote_code
from engines.models.sources import resolve_model
from engines.options import parse_options
from engines.protocol import (
    GIB,
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
from engines.telemetry import DTYPE_BYTES, GenerationRecorder, MemoryProbe, release_freed_memory
from engines.variants.streaming import Detokenizer, RequestStream, stream_request
from engines.variants.transformers import shared_weights
from engines.variants.transformers.attention import attention_unavailable_reason, sdpa_backend_context
from engines.variants.transformers.options import TransformersOptions
from engines.variants.transformers.token_stream import TokenStreamer


class TransformersEngine(Scoring):
    """An in-process transformers model. load() is idempotent; stream() serves one request at a time
    (a second one waits its turn)."""
    options_class: type[TransformersOptions] = TransformersOptions

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        self.name = name
        self.model_name = model
        self.options = parse_options(self.options_class, name, dict(options or {}))
        self.device = self.options.device or ("cuda" if has_gpu() else "cpu")
        self.source: ModelSource | None = None
        self.model = None
        self.tokenizer = None
        self.recorder: GenerationRecorder | None = None
        self.last_token_ids: list[int] = []
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def max_context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self.model is not None:
            return
        attn = self.options.attn_implementation
        reason = attention_unavailable_reason(attn, self.device)
        if reason:
            raise EngineUnavailable(reason)
        self.source = resolve_model(self.model_name, progress)
        from transformers import AutoTokenizer
        if progress:
            progress(f"{self.name}: loading {self.source.name} on {self.device}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source.path, trust_remote_code=trust_remote_code())
            self.model = self._load_model(self.source, progress).eval()
        except EngineError:
            raise
        except Exception as error:
            hint = " It runs only if the operator sets PLAYGROUND_TRUST_REMOTE_CODE=1." \
                if "custom code" in str(error) and not trust_remote_code() else ""
            raise EngineError(f"{self.name}: could not load {self.source.name}: "
                              f"{describe_error(error)}{hint}") from error
        self.recorder = GenerationRecorder(self.name, MemoryProbe(self.device))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-generate")
        # Random-weight shapes have their own vocabulary; the bench warms them up with prompts that fit it.
        if self.options.compile and self.device != "cpu" and not self._is_dummy():
            if progress:
                progress(f"{self.name}: compiling and capturing CUDA graphs (first run, about a minute)")
            for _ in self.stream("Warm-up.", GenerationParams(max_new_tokens=8)):
                pass
        if progress:
            progress(f"{self.name}: ready")

    def _is_dummy(self) -> bool:
        return self.source.origin == "dummy" or self.options.dummy_weights

    def _torch_dtype(self):
        import torch
        return getattr(torch, self.options.dtype)

    def _load_model(self, source: ModelSource, progress: ProgressCallback | None):
        from transformers import AutoModelForCausalLM
        attn = self.options.attn_implementation

        def build():
            if self._is_dummy():
                from engines.models.dummy import random_model
                return random_model(source.path, self._torch_dtype(), self.device, attn)
            return AutoModelForCausalLM.from_pretrained(
                source.path, dtype=self._torch_dtype(), attn_implementation=attn,
                trust_remote_code=trust_remote_code()).to(self.device)

        # Engines declaring the same weights (weights_key) share one copy (transformers/shared_weights.py).
        model = shared_weights.load_model(self.weights_key(), source.path, attn, build)
        if self.options.compile:
            # A static cache gives torch.compile fixed shapes; generate() then compiles the forward.
            model.generation_config.cache_implementation = "static"
        return model

    def weights_key(self) -> "shared_weights.WeightsKey | None":
        """Engines with equal keys share one copy of their weights (and the memory plan counts it once);
        None for quantized subclasses, whose precision() reports packed linear weights."""
        return shared_weights.weights_key(self)

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        """Extra generate() arguments; the speculative variant adds its drafting here."""
        return {}

    def encode(self, prompt: "str | ChatPrompt"):
        """Prompt -> (input ids, attention mask) on the engine's device: a text with BOS first (Gemma needs
        it), a chat prompt as its template's ids; callers check the length against max_context_tokens."""
        import torch
        if isinstance(prompt, ChatPrompt):
            input_ids = torch.tensor([prompt.token_ids], dtype=torch.long)
            return input_ids.to(self.device), torch.ones_like(input_ids).to(self.device)
        encoded = self.tokenizer(prompt, return_tensors="pt")
        return encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device)

    def stream(self, prompt: "str | ChatPrompt", params: GenerationParams,
               cancel: threading.Event | None = None) -> RequestStream:
        if self.model is None:
            raise EngineError(f"{self.name}: not loaded")
        prompt = validate_prompt(prompt)
        params = params.validate()
        input_ids, attention_mask = self.encode(prompt)
        num_prompt_tokens = input_ids.shape[1]
        if num_prompt_tokens + params.max_new_tokens > self.max_context_tokens:
            raise EngineError(f"the prompt is {num_prompt_tokens} tokens and {params.max_new_tokens} new tokens "
                              f"were asked for; {self.name} accepts {self.max_context_tokens} tokens in all")
        self.last_token_ids = token_ids = []

        # A chat turn ends at its template's end-of-turn token (generate stops at any id of the list).
        stop_ids = list(prompt.stop_token_ids) if isinstance(prompt, ChatPrompt) else None

        def start(emit, stop):
            streamer = TokenStreamer(self.recorder, emit)
            return self._executor.submit(self._run_generate, input_ids, attention_mask, params, streamer, stop,
                                         stop_ids)

        return stream_request(name=self.name, recorder=self.recorder, start=start,
                              max_new_tokens=params.max_new_tokens, num_prompt_tokens=num_prompt_tokens,
                              lock=self._lock, cancel=cancel, token_ids=token_ids,
                              detokenizer=Detokenizer(self.tokenizer))

    def _run_generate(self, input_ids, attention_mask, params, streamer, stop_event, stop_ids=None) -> None:
        """Runs in the engine's worker thread; an exception reaches stream() through the future."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return torch.full((ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=ids.device)

        torch.manual_seed(params.seed)
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
            if not params.is_greedy else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if stop_ids:
            sampling["eos_token_id"] = stop_ids
        with torch.inference_mode(), sdpa_backend_context(self.options.sdpa_backend):
            self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=params.max_new_tokens,
                min_new_tokens=0, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]),
                pad_token_id=self.tokenizer.pad_token_id, **sampling, **self._generate_kwargs(params))

    def perplexity(self, text: str) -> float:
        """exp(mean next-token loss) of `text` under the loaded weights, with BOS first as Gemma needs."""
        if self.model is None:
            raise EngineError(f"{self.name}: not loaded")
        input_ids, _ = self.encode(text)
        if input_ids.shape[1] < 2:
            raise EngineError("perplexity needs a text of at least one token")
        if input_ids[0, 0].item() != self.tokenizer.bos_token_id:
            raise EngineError(f"{self.name}: the tokenizer did not add BOS; perplexity without it is meaningless")
        if input_ids.shape[1] > self.max_context_tokens:
            raise EngineError(f"the text is {input_ids.shape[1]} tokens; {self.name} accepts {self.max_context_tokens}")
        with self._lock:
            import torch
            with torch.inference_mode():
                loss = self.model(input_ids=input_ids, labels=input_ids).loss
            return float(torch.exp(loss.float()).item())

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def weight_footprint_gib(self) -> float:
        """Bytes held by parameters and buffers (packed quantized weights included), in GiB."""
        if self.model is None:
            raise EngineError(f"{self.name}: not loaded")
        return self.model.get_memory_footprint() / GIB

    def precision(self) -> Precision:
        """Weights and KV cache in the compute dtype; quantized subclasses override the linear bytes."""
        dtype_bytes = DTYPE_BYTES[self.options.dtype]
        return Precision.of_dtype(dtype_bytes, label=self.options.dtype)

    def stats(self) -> EngineStats:
        return self.recorder.snapshot() if self.recorder else EngineStats(engine=self.name)

    def unload(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        shared_weights.release(self.model)
        self.model = None
        self.tokenizer = None
        release_freed_memory()
        if self.device != "cpu":
            import torch
            torch.cuda.empty_cache()

