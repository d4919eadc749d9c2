"""The engine contract (engines/protocol.py, checks in tests/contract.py), on every registry entry that can
run here: exact token counts, text that is the decoded ids, prompt cancellation when the stream is closed,
and clear errors for bad parameters.

One engine is loaded at a time: the `engine` fixture is module-scoped and parametrized, so pytest runs every
check of one engine, unloads it, then loads the next (all of them at once did not fit in 24 GB). Engines
with a session fixture come from it; the vLLM variants that other modules load anyway are checked there."""
from __future__ import annotations

import pytest

from engines.protocol import EngineError
from engines.registry import SPECS, create_engine, unavailable_reason
from tests.contract import (
    check_bad_parameters_raise_a_clear_engine_error,
    check_closing_the_stream_cancels_it_within_about_a_token,
    check_token_count_is_exact_and_text_is_the_decoded_ids,
)

SESSION_FIXTURES = {"bf16": "bf16_engine", "spec": "spec_engine", "gptq-int4": "gptq_engine",
                    "vllm": "vllm_engine"}
CHECKED_ELSEWHERE = {
    "remote": "tests/test_remote.py, against `vllm serve`",
    "vllm-fp8kv": "tests/test_vllm.py, on the engine its FP8 KV test loads",
    "vllm-spec": "tests/test_vllm.py, on the engine its speculation tests load",
    "vllm-int4": "tests/test_vllm_int4.py, on the engine its CPUWNA16 test loads",
}
CONTRACT_ENGINES = [name for name in SPECS if name not in CHECKED_ELSEWHERE]


@pytest.fixture(scope="module", params=CONTRACT_ENGINES)
def engine(request):
    name = request.param
    reason = unavailable_reason(SPECS[name])
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    if name in SESSION_FIXTURES:
        yield request.getfixturevalue(SESSION_FIXTURES[name])
        return
    engine = create_engine(name)
    engine.load()
    yield engine
    engine.unload()


@pytest.mark.slow
def test_token_count_is_exact_and_text_is_the_decoded_ids(engine):
    check_token_count_is_exact_and_text_is_the_decoded_ids(engine)


@pytest.mark.slow
def test_closing_the_stream_cancels_it_within_about_a_token(engine):
    check_closing_the_stream_cancels_it_within_about_a_token(engine)


@pytest.mark.slow
def test_bad_parameters_raise_a_clear_engine_error(engine):
    check_bad_parameters_raise_a_clear_engine_error(engine)


def test_every_engine_is_checked_somewhere():
    assert set(CONTRACT_ENGINES) | set(CHECKED_ELSEWHERE) == set(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_an_unknown_option_is_a_clear_error(name):
    reason = unavailable_reason(SPECS[name])
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    with pytest.raises(EngineError, match="unknown option"):
        create_engine(name, no_such_option=1)
