"""The small contract every engine variant keeps, and the dataclasses that cross it.

An engine is loaded once, then streams any number of prompts. `stream()` yields `StreamEvent`s whose
`num_tokens` is exact: a speculative step that accepts three tokens yields one event with
`num_tokens=3`. `stats()` may be called at any time, from any thread, and returns a snapshot.
Also here, because every engine and the UI share them: the input limits and `validate_prompt`, and
`describe_error`, which turns a library exception into the one line a user sees, and
`speculation_stats`, the one definition of acceptance rate and mean accepted length.
"""
from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

# Bounds that keep one request from pinning the machine; the UI and CLI validate against them.
GIB = 1024 ** 3     # the one memory unit of the code: every `*_gib` field and GiB label is bytes / GIB
MAX_NEW_TOKENS_LIMIT = 8192
MAX_PROMPT_CHARS = 200_000

ProgressCallback = Callable[[str], None]


def say(progress: ProgressCallback | None, message: str) -> None:
    """Report progress to whoever asked for it; loads run silently when nobody did."""
    if progress is not None:
        progress(message)


class EngineError(RuntimeError):
    """An error meant for the user: its message is shown as it is, without a traceback."""


class EngineUnavailable(EngineError):
    """The variant cannot run on this machine; the message says why."""


def speculation_stats(num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> dict:
    """EngineStats' speculative fields from three counters, one definition for every engine:
    acceptance_rate = accepted / proposed draft tokens; mean_accepted_len = tokens per verification step
    = 1 + accepted / drafts (the step's own target token counts as one). None where nothing was drafted."""
    return {"num_drafts": num_drafts, "num_draft_tokens": num_draft_tokens, "num_accepted_tokens": num_accepted_tokens,
            "acceptance_rate": num_accepted_tokens / num_draft_tokens if num_draft_tokens else None,
            "mean_accepted_len": 1 + num_accepted_tokens / num_drafts if num_drafts else None}


def describe_error(error: BaseException) -> str:
    """The message a user sees for any exception: an EngineError's own text, which is already written
    for them; for a library exception, its type and first line, the first cause with a message when the
    outer one has none (vLLM wraps engine-core failures that way), and what to do on out-of-memory."""
    if isinstance(error, EngineError):
        return str(error)
    cause = error
    while cause.__cause__ is not None and not str(cause).strip():
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    if not lines:
        return type(cause).__name__
    if "out of memory" in lines[0].lower():
        return f"out of memory: {lines[0]}. Unload another engine or lower max new tokens."
    return f"{type(cause).__name__}: {lines[0]}"


@dataclass
class GenerationParams:
    """What the user asks of one generation. temperature 0 means greedy."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "GenerationParams":
        """Return a checked copy, or raise EngineError with a message that names the bad field."""
        try:
            max_new_tokens = int(self.max_new_tokens)
            temperature = float(self.temperature)
            top_p = float(self.top_p)
            seed = int(self.seed)
        except (TypeError, ValueError) as error:
            raise EngineError(f"generation parameters must be numbers: {error}") from None
        if isinstance(self.max_new_tokens, float) and not self.max_new_tokens.is_integer():
            raise EngineError(f"max_new_tokens must be a whole number, got {self.max_new_tokens}")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise EngineError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
        if math.isnan(temperature) or not 0.0 <= temperature <= 5.0:
            raise EngineError(f"temperature must be between 0 (greedy) and 5, got {self.temperature}")
        if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= seed < 2 ** 63:  # torch, vLLM and the servers take a signed 64-bit seed
            raise EngineError(f"seed must be from 0 to 2**63 - 1, got {seed}")
        return GenerationParams(max_new_tokens, temperature, top_p, seed)


def validate_prompt(prompt: object) -> "str | ChatPrompt":
    """Return the prompt if it can be generated from, else raise EngineError saying why. A ChatPrompt's
    messages were checked when it was built; its ids must not be empty."""
    if isinstance(prompt, ChatPrompt):
        if not prompt.token_ids:
            raise EngineError("the chat prompt has no token ids")
        return prompt
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise EngineError("the prompt is not valid UTF-8 text") from None
    if not isinstance(prompt, str):
        raise EngineError(f"the prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise EngineError("the prompt is empty: type some text first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise EngineError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    # Invalid bytes reach Python as lone surrogates (a CLI argument decoded with surrogateescape, a
    # broken paste); no tokenizer can encode them.
    surrogate = next((index for index, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff"), None)
    if surrogate is not None:
        raise EngineError(f"the prompt is not valid UTF-8 text (an undecodable byte at character {surrogate})")
    # Control characters other than tab/newline/carriage return carry no meaning for a language model
    # and some tokenizers choke on them; refusing them says so, where dropping them would change the
    # prompt behind the user's back.
    control = next((index for index, ch in enumerate(prompt)
                    if ch not in "\t\n\r" and (ord(ch) < 32 or 0x7f <= ord(ch) < 0xa0)), None)
    if control is not None:
        raise EngineError(f"the prompt contains a control character (U+{ord(prompt[control]):04X} at character "
                          f"{control}); only tab, newline and carriage return are accepted")
    return prompt


@dataclass(frozen=True)
class ChatPrompt:
    """A chat turn as token ids, built once from the model's chat template (engines/models/chat.py), so
    every local engine is given the same ids; remote engines send `messages` to /v1/chat/completions.
    An engine's stream() takes a plain string (completion mode) or one of these."""
    messages: tuple[dict[str, str], ...]    # what the template was given (the system message first, if any)
    text: str                               # the rendered template, ending with the assistant's header
    token_ids: tuple[int, ...]              # the prompt every local engine feeds the model
    stop_token_ids: tuple[int, ...]         # end of turn first, then EOS; generation stops at any of them
    stop_strings: tuple[str, ...]           # those tokens' text, for engines that stop on strings

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    """New text since the previous event and the exact number of tokens it carries (>= 1)."""
    text: str
    num_tokens: int


@dataclass
class StatSample:
    """One point of the time series the UI charts; t_s counts from the request's submit."""
    t_s: float
    num_tokens: int
    decode_tok_s: float
    memory_gib: float | None
    kv_used_frac: float | None = None
    kv_blocks_used: int | None = None


@dataclass
class EngineStats:
    """A snapshot of one engine's latest generation. Units are in the names; None is 'not measured'."""
    engine: str
    num_tokens: int = 0
    num_prompt_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    decode_s: float | None = None
    decode_tok_s: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p95: float | None = None
    memory_gib: float | None = None
    peak_memory_gib: float | None = None
    torch_peak_gib: float | None = None
    memory_kind: str = ""
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    kv_block_size: int | None = None
    kv_used_frac: float | None = None
    kv_peak_used_frac: float | None = None
    num_preemptions: int | None = None
    prefix_cache_hit_frac: float | None = None
    num_drafts: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    acceptance_rate: float | None = None
    mean_accepted_len: float | None = None
    wait_s: float | None = None             # waited for the engine behind another request
    is_finished: bool = False
    finish_reason: str = ""
    samples: list[StatSample] = field(default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        data = asdict(self)
        if not with_samples:
            data.pop("samples")
        return data


@dataclass(frozen=True)
class Precision:
    """What one generated token reads, per element, as the engine resolved its own options: bytes per
    weight of the linear layers (packed quantized weights plus their scales and zero points), of the
    layers left in the compute dtype (embeddings, output head), and of one KV-cache element."""
    linear_bytes_per_weight: float
    other_bytes_per_weight: float
    kv_bytes_per_element: float
    label: str

    @classmethod
    def of_dtype(cls, dtype_bytes: float, kv_bytes_per_element: float | None = None, label: str = "") -> "Precision":
        kv = dtype_bytes if kv_bytes_per_element is None else kv_bytes_per_element
        return cls(dtype_bytes, dtype_bytes, kv, label or f"{dtype_bytes:g}-byte weights, {kv:g}-byte KV")


@runtime_checkable
class Request(Protocol):
    """What Engine.stream returns: one request's StreamEvents, and what belongs to that request alone
    when callers share the engine (engines/variants/streaming.py RequestStream)."""
    token_ids: list[int]        # the ids this request generated so far
    is_waiting: bool            # waiting for an engine that is busy with another request

    def __iter__(self) -> Iterator[StreamEvent]: ...

    def __next__(self) -> StreamEvent: ...

    def close(self) -> None:
        """Cancel the request."""
        ...

    def stats(self) -> EngineStats:
        """This request's stats: live while it runs, final once it ended."""
        ...


class Engine(Protocol):
    """What every variant implements. load() is idempotent; unload() returns the memory."""
    name: str
    device: str     # where the weights live: "cpu", "cuda", "cuda:N", or "remote" (a server's)

    def load(self, progress: ProgressCallback | None = None) -> None: ...

    def stream(self, prompt: "str | ChatPrompt", params: GenerationParams,
               cancel: threading.Event | None = None) -> Request:
        """Checks the prompt and parameters now (EngineError); generation starts at the first next()."""
        ...

    def stats(self) -> EngineStats:
        """The newest request's stats (one caller's view; callers that share an engine ask their Request)."""
        ...

    def unload(self) -> None: ...

    def precision(self) -> Precision | None:
        """None where the engine cannot know (a remote server's weights)."""
        ...


class Scoring(ABC):
    """A capability declared by subclassing: the engine exposes its token ids and scores text, for the
    quality columns (greedy agreement, perplexity, weight footprint)."""
    last_token_ids: list[int]

    @abstractmethod
    def perplexity(self, text: str) -> float: ...

    @abstractmethod
    def weight_footprint_gib(self) -> float | None: ...

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """The text of these ids as the engine's own stream shows it (special tokens skipped)."""


class Drafting(ABC):
    """A capability declared by subclassing: the engine speculates and knows, for its newest request, how
    many tokens each verification step streamed (the accepted drafts, then the target's own token)."""

    @abstractmethod
    def draft_steps(self) -> list[int]:
        """Tokens per verification step of the newest request, in order (k: k - 1 accepted drafts + 1)."""

    def accepted_draft_flags(self) -> list[bool]:
        """Per generated token of the newest request: True where it was an accepted draft."""
        flags: list[bool] = []
        for num_tokens in self.draft_steps():
            flags += [True] * (num_tokens - 1) + [False]
        return flags


class Batching(ABC):
    """A capability declared by subclassing: the engine serves many requests at once (continuous
    batching) and reports its KV cache; the load command sends it every request at once."""

    @abstractmethod
    def run_concurrent(self, prompts: list[str], params: GenerationParams) -> list: ...

    @abstractmethod
    def kv_stats(self) -> dict: ...
