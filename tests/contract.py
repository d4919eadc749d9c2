"""The engine contract's checks (engines/protocol.py), as functions any test module can run on an engine
it has loaded anyway: tests/test_contract.py runs them over the registry, and the modules that load an
engine of their own for other reasons (vllm-fp8kv and vllm-spec in test_vllm.py, vllm-int4 in
test_vllm_int4.py) run them there, so that no engine is started twice for the contract."""
from __future__ import annotations

import time

import pytest

from engines.protocol import EngineError, GenerationParams, Scoring

PROMPT = "The capital of France is"
BAD_REQUESTS = [
    (PROMPT, GenerationParams(max_new_tokens=0), "max_new_tokens must be between 1"),
    (PROMPT, GenerationParams(temperature=-1.0), "temperature must be between 0"),
    (PROMPT, GenerationParams(top_p=0.0), "top_p must be in"),
    ("   ", GenerationParams(), "the prompt is empty"),
]


def check_token_count_is_exact_and_text_is_the_decoded_ids(engine) -> None:
    request = engine.stream(PROMPT, GenerationParams(max_new_tokens=6))
    events = list(request)
    stats = request.stats()
    assert all(event.num_tokens >= 1 for event in events)
    assert sum(event.num_tokens for event in events) == stats.num_tokens
    assert stats.num_tokens == 6 or stats.finish_reason == "eos"
    assert stats.ttft_s is not None and stats.ttft_s <= stats.total_s
    assert engine.stats().num_tokens == stats.num_tokens, "with one caller, the engine's stats are its request's"
    assert isinstance(engine, Scoring)
    assert engine.last_token_ids == request.token_ids and len(request.token_ids) == stats.num_tokens
    assert "".join(event.text for event in events) == engine.decode(request.token_ids)


def check_closing_the_stream_cancels_it_within_about_a_token(engine) -> None:
    request = engine.stream(PROMPT, GenerationParams(max_new_tokens=64))
    first = next(request)
    closed_at = time.perf_counter()
    request.close()
    elapsed_s = time.perf_counter() - closed_at
    stats = request.stats()
    assert first.num_tokens >= 1
    assert stats.finish_reason == "cancelled"
    assert stats.num_tokens < 64
    # A decode step of these engines takes well under a second on 2 cores; 10 s is margin for a busy machine.
    assert elapsed_s < 10, elapsed_s


def check_bad_parameters_raise_a_clear_engine_error(engine) -> None:
    for prompt, params, message in BAD_REQUESTS:
        with pytest.raises(EngineError, match=message):
            list(engine.stream(prompt, params))


def check_contract(engine) -> None:
    """Every check, on one loaded engine."""
    check_token_count_is_exact_and_text_is_the_decoded_ids(engine)
    check_closing_the_stream_cancels_it_within_about_a_token(engine)
    check_bad_parameters_raise_a_clear_engine_error(engine)
