"""`remote`: any OpenAI-compatible server (vllm serve, SGLang, TGI, llama.cpp) as one more engine.

Configured by URL, served model name and optional API key: from the UI (constructor options `url`,
`served_model`, `api_key` or `api_key_env`, `metrics_url`, `timeout_s`, `api`), or per server in a TOML file
(PLAYGROUND_REMOTE_CONFIG, else assets/remote.toml; see assets/remote.example.toml), each of which
engines.registry.remote_specs lists as `remote:<label>`. Completions stream through the openai client
in a worker thread that stamps tokens as they arrive, so TTFT, tok/s and ITL are client-side and
include the network.
Token counts per chunk come from the chunk's logprobs (one entry per token); the final usage field
(stream_options include_usage) is authoritative, and without logprobs or usage the count is the
number of non-empty chunks, which `is_token_count_exact` then says. KV usage, preemptions and
speculative acceptance are scraped from the server's Prometheus /metrics while the request runs.
The server's memory is not visible from here, so memory fields stay None.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from engines.options import parse_options
from engines.protocol import (
    ChatPrompt,
    EngineError,
    EngineStats,
    GenerationParams,
    ProgressCallback,
    validate_prompt,
)
from engines.telemetry import GenerationRecorder, MemoryReading
from engines.variants.remote.http_errors import explain_http_error
from engines.variants.remote.prometheus import MetricsScraper
from engines.variants.streaming import Chunk, RequestStream, start_in_thread, stream_request

CONNECT_TIMEOUT_S = 5.0
# Finish reasons (vLLM's FINISH_REASON_STRINGS) that mean the server gave up, not that the text ended.
SERVER_FAILURE_REASONS = ("abort", "error")


class _NotMeasured:
    """The server's memory lives on another machine; say so instead of reporting this process's RSS."""

    def read(self) -> MemoryReading:
        return MemoryReading(None, "remote: not measured")

    def torch_peak_gib(self) -> None:
        return None


@dataclass(frozen=True)
class RemoteOptions:
    """The keys of a [remote.<label>] table (assets/remote.example.toml), or --option on `remote`."""
    url: str = ""
    served_model: str | None = None
    api: str = "completions"
    timeout_s: float = 60.0
    api_key: str | None = None
    api_key_env: str | None = None
    metrics_url: str | None = None


class RemoteEngine:
    """One OpenAI-compatible server. load() checks it answers and serves the model."""

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        self.name = name
        self.device = "remote"  # the server's; nothing here reads its memory
        self.options = parse_options(RemoteOptions, name, dict(options or {}))
        url = self.options.url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineError(f"{name}: give the server's base URL as http(s)://host:port/v1, got '{url}'")
        self.base_url = url if parts.path.endswith("/v1") else url + "/v1"
        self.metrics_url = self.options.metrics_url or f"{parts.scheme}://{parts.netloc}/metrics"
        self.served_model = self.options.served_model or model
        self.api = self.options.api
        if self.api not in ("completions", "chat"):
            raise EngineError(f"{name}: api must be 'completions' or 'chat', got '{self.api}'")
        self.timeout_s = self.options.timeout_s
        if not 0 < self.timeout_s <= 3600:
            raise EngineError(f"{name}: timeout_s must be a number of seconds in (0, 3600], got {self.timeout_s!r}")
        env_name = self.options.api_key_env
        self.api_key = self.options.api_key or (os.environ.get(env_name) if env_name else None)
        self.client = None
        self.recorder: GenerationRecorder | None = None
        self.is_token_count_exact = True
        self.metrics = MetricsScraper(self.metrics_url, self.api_key)
        self._lock = threading.Lock()

    @property
    def is_loaded(self) -> bool:
        return self.client is not None

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self.client is not None:
            return
        import httpx
        import openai
        # The openai client insists on a key; servers started without --api-key ignore it.
        client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                               timeout=httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S))
        if progress:
            progress(f"{self.name}: asking {self.base_url} which models it serves")
        try:
            served = [model.id for model in client.models.list()]
        except Exception as error:
            raise EngineError(self._explain(error, "listing its models")) from None
        if not self.served_model and served:
            self.served_model = served[0]
        if self.served_model not in served:
            raise EngineError(f"{self.name}: {self.base_url} does not serve '{self.served_model}'; "
                              f"it serves: {', '.join(served) or 'nothing'}")
        self.client = client
        self.metrics.model_name = self.served_model
        self.recorder = GenerationRecorder(self.name, _NotMeasured(), kv_probe=self.metrics.probe,
                                           sample_interval_s=0.5)

    def stream(self, prompt: "str | ChatPrompt", params: GenerationParams,
               cancel: threading.Event | None = None) -> RequestStream:
        if self.client is None:
            raise EngineError(f"{self.name}: not loaded")
        prompt = validate_prompt(prompt)
        params = params.validate()
        responses: list = []

        def work(emit, stop):
            self.metrics.set_baseline()
            self.is_token_count_exact = True
            self._run_request(prompt, params, emit, stop, responses)

        def abort():
            # Closing the response unblocks a read that is waiting on a silent server. A request still
            # waiting for the headers cannot be reached; its daemon thread ends at the first chunk
            # (it checks stop) or at timeout_s, so the stream does not wait for it beyond 0.2 s.
            for response in responses:
                response.close()

        return stream_request(name=self.name, recorder=self.recorder,
                              start=start_in_thread(f"{self.name}-http", work),
                              max_new_tokens=params.max_new_tokens, lock=self._lock, cancel=cancel, abort=abort,
                              join_timeout_s=0.2)

    def _api_for(self, prompt: "str | ChatPrompt") -> str:
        """A chat prompt always goes to /v1/chat/completions, with the same messages the local engines'
        template was given; a text goes where the `api` option says."""
        return "chat" if isinstance(prompt, ChatPrompt) else self.api

    def _request(self, prompt: "str | ChatPrompt", params: GenerationParams):
        common = {"model": self.served_model, "max_tokens": params.max_new_tokens, "stream": True,
                  "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                  "stream_options": {"include_usage": True}}
        if isinstance(prompt, ChatPrompt):
            return self.client.chat.completions.create(messages=list(prompt.messages), logprobs=True, **common)
        if self.api == "chat":
            return self.client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], logprobs=True, **common)
        return self.client.completions.create(prompt=prompt, logprobs=0, **common)

    def _run_request(self, prompt, params, emit, stop: threading.Event, responses: list) -> None:
        num_tokens, finish_reason, api = 0, None, self._api_for(prompt)
        try:
            with self._request(prompt, params) as response:
                responses.append(response)
                for chunk in response:
                    if chunk.usage is not None:
                        self._apply_usage(chunk.usage)
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    text, count = self._text_and_count(choice, api)
                    if count:
                        num_tokens += count
                        self.recorder.on_tokens(count)
                        emit(Chunk(text=text, num_tokens=count))
                    finish_reason = choice.finish_reason or finish_reason
                    if stop.is_set():
                        return
        except Exception as error:
            if stop.is_set():
                return
            raise error if isinstance(error, EngineError) else \
                EngineError(self._explain(error, f"streaming (after {num_tokens} tokens)")) from None
        # vllm serve stopping with shutdown_timeout=0 ends in-flight streams with finish_reason "abort".
        if finish_reason is None or finish_reason in SERVER_FAILURE_REASONS:
            why = f"finish_reason '{finish_reason}'" if finish_reason else "no finish_reason"
            raise EngineError(f"{self.name}: {self.base_url} ended the request ({why}) "
                              f"while streaming (after {num_tokens} tokens)")
        emit(Chunk(num_tokens=0, finish_reason={"stop": "eos"}.get(finish_reason, finish_reason)))

    def _text_and_count(self, choice, api: str) -> tuple[str, int]:
        if api == "chat":
            text = (choice.delta.content or "") if choice.delta else ""
            entries = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
        else:
            text = choice.text or ""
            entries = choice.logprobs.tokens if choice.logprobs and choice.logprobs.tokens else None
        if entries is not None:
            return text, len(entries)
        if text:
            self.is_token_count_exact = False
            return text, 1
        return "", 0

    def _apply_usage(self, usage) -> None:
        fields = {"num_prompt_tokens": usage.prompt_tokens}
        if usage.completion_tokens is not None:
            fields["num_tokens"] = usage.completion_tokens
            self.is_token_count_exact = True
        self.recorder.update(**fields)

    def _explain(self, error: BaseException, doing: str) -> str:
        return explain_http_error(error, f"{self.name}: {self.base_url}", doing, self.timeout_s)

    def precision(self) -> None:
        """The server's weights and KV dtype are not visible from the client."""
        return None

    def stats(self) -> EngineStats:
        return self.recorder.snapshot() if self.recorder else EngineStats(engine=self.name)

    def unload(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

