"""The engine contract (engines/protocol.py), checked on every registry entry that can run here: exact
token counts, text that is the decoded ids, prompt cancellation when the stream is closed, and clear
errors for bad parameters. Engines come from the session fixtures where one exists (loaded once for
the whole suite); the others load here once for this module."""
from __future__ import annotations

import time

import pytest

from engines.protocol import EngineError, GenerationParams, Scoring
from engines.registry import SPECS, create_engine, unavailable_reason
from tests.conftest import VLLM_TEST_OPTIONS

SESSION_FIXTURES = {"bf16": "bf16_engine", "spec": "spec_engine", "gptq-int4": "gptq_engine",
                    "vllm": "vllm_engine"}
OPTIONS = {"vllm-spec": VLLM_TEST_OPTIONS, "vllm-fp8kv": VLLM_TEST_OPTIONS, "vllm-int4": VLLM_TEST_OPTIONS}
# The remote engine needs a running server: tests/test_remote.py runs its contract against `vllm serve`.
NEEDS_A_SERVER = ("remote",)
PROMPT = "The capital of France is"
CONTRACT_ENGINES = [name for name in SPECS if name not in NEEDS_A_SERVER]


@pytest.fixture(scope="module")
def module_engines():
    loaded = {}
    yield loaded
    for engine in loaded.values():
        engine.unload()


@pytest.fixture
def engine(request, module_engines):
    name = request.param
    reason = unavailable_reason(SPECS[name])
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    if name in SESSION_FIXTURES:
        return request.getfixturevalue(SESSION_FIXTURES[name])
    if name not in module_engines:
        engine = create_engine(name, **OPTIONS.get(name, {}))
        engine.load()
        module_engines[name] = engine
    return module_engines[name]


@pytest.mark.slow
@pytest.mark.parametrize("engine", CONTRACT_ENGINES, indirect=True)
def test_token_count_is_exact_and_text_is_the_decoded_ids(engine):
    events = list(engine.stream(PROMPT, GenerationParams(max_new_tokens=6)))
    stats = engine.stats()
    assert all(event.num_tokens >= 1 for event in events)
    assert sum(event.num_tokens for event in events) == stats.num_tokens
    assert stats.num_tokens == 6 or stats.finish_reason == "eos"
    assert stats.ttft_s is not None and stats.ttft_s <= stats.total_s
    assert isinstance(engine, Scoring)
    assert len(engine.last_token_ids) == stats.num_tokens
    assert "".join(event.text for event in events) == engine.decode(engine.last_token_ids)


@pytest.mark.slow
@pytest.mark.parametrize("engine", CONTRACT_ENGINES, indirect=True)
def test_closing_the_stream_cancels_it_within_about_a_token(engine):
    stream = engine.stream(PROMPT, GenerationParams(max_new_tokens=64))
    first = next(stream)
    closed_at = time.perf_counter()
    stream.close()
    elapsed_s = time.perf_counter() - closed_at
    stats = engine.stats()
    assert first.num_tokens >= 1
    assert stats.finish_reason == "cancelled"
    assert stats.num_tokens < 64
    # A decode step of these engines takes well under a second on 2 cores; 10 s is margin for a busy machine.
    assert elapsed_s < 10, elapsed_s


@pytest.mark.slow
@pytest.mark.parametrize("engine", CONTRACT_ENGINES, indirect=True)
@pytest.mark.parametrize("prompt, params, message", [
    (PROMPT, GenerationParams(max_new_tokens=0), "max_new_tokens must be between 1"),
    (PROMPT, GenerationParams(temperature=-1.0), "temperature must be between 0"),
    (PROMPT, GenerationParams(top_p=0.0), "top_p must be in"),
    ("   ", GenerationParams(), "the prompt is empty"),
])
def test_bad_parameters_raise_a_clear_engine_error(engine, prompt, params, message):
    with pytest.raises(EngineError, match=message):
        list(engine.stream(prompt, params))


@pytest.mark.parametrize("name", list(SPECS))
def test_an_unknown_option_is_a_clear_error(name):
    reason = unavailable_reason(SPECS[name])
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    with pytest.raises(EngineError, match="unknown option"):
        create_engine(name, no_such_option=1)
