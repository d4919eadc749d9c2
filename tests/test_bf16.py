"""The transformers BF16 baseline on the embedded Gemma-3-270M, on CPU."""
from __future__ import annotations

import itertools
import time

import pytest

from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine
from tests.conftest import run_stream

FRANCE = "The capital of France is"


def test_greedy_france_is_english_about_france(bf16_engine):
    text, events, stats = run_stream(bf16_engine, FRANCE, max_new_tokens=24)
    words = text.lower().split()
    assert len(words) >= 5, text
    assert "france" in text.lower() or "paris" in text.lower(), text
    assert sum(ch.isascii() for ch in text) / len(text) > 0.95, text
    assert {"the", "of", "is"} & set(words), text


def test_first_prompt_token_is_bos(bf16_engine):
    input_ids, _ = bf16_engine.encode(FRANCE)
    assert input_ids[0, 0].item() == bf16_engine.tokenizer.bos_token_id
    assert (input_ids[0] == bf16_engine.tokenizer.bos_token_id).sum().item() == 1


@pytest.mark.parametrize("max_new_tokens", [1, 7, 20])
def test_token_count_is_exact(bf16_engine, max_new_tokens):
    text, events, stats = run_stream(bf16_engine, "Once upon a time", max_new_tokens=max_new_tokens)
    eos_ids = bf16_engine.model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    ids = bf16_engine.last_token_ids
    assert stats.num_tokens == len(ids) == sum(event.num_tokens for event in events)
    if ids and ids[-1] in eos_ids:
        assert stats.num_tokens <= max_new_tokens and stats.finish_reason == "eos"
    else:
        assert stats.num_tokens == max_new_tokens and stats.finish_reason == "length"
    assert bf16_engine.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_stats_are_positive_and_consistent(bf16_engine):
    _, _, stats = run_stream(bf16_engine, FRANCE, max_new_tokens=12)
    assert stats.is_finished
    assert 0 < stats.ttft_s < stats.total_s
    assert 0 < stats.decode_s <= stats.total_s
    assert stats.decode_tok_s == pytest.approx((stats.num_tokens - 1) / stats.decode_s)
    assert 0 < stats.itl_ms_p50 <= stats.itl_ms_p95
    assert stats.peak_memory_gib > 0.3 and stats.memory_kind == "rss"
    assert stats.num_prompt_tokens == len(bf16_engine.tokenizer(FRANCE).input_ids)  # BOS included
    assert stats.samples and stats.samples[-1].num_tokens == stats.num_tokens


def test_eager_and_sdpa_agree_under_greedy(bf16_engine):
    eager = create_engine("bf16", attn_implementation="eager")
    eager.load()
    try:
        run_stream(eager, FRANCE, max_new_tokens=12)
        run_stream(bf16_engine, FRANCE, max_new_tokens=12)
        assert eager.last_token_ids[:8] == bf16_engine.last_token_ids[:8]
    finally:
        eager.unload()


def test_flash_attention_2_says_why_it_cannot_run():
    engine = create_engine("bf16", attn_implementation="flash_attention_2")
    with pytest.raises(EngineError, match="flash_attention_2 needs a CUDA GPU"):
        engine.load()


def test_closing_the_stream_cancels_generation(bf16_engine):
    stream = bf16_engine.stream("Write a long story about a dragon.", GenerationParams(max_new_tokens=2000))
    first_events = list(itertools.islice(stream, 3))
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 5
    stats = bf16_engine.stats()
    assert first_events and stats.finish_reason == "cancelled" and stats.num_tokens < 100
    text, _, _ = run_stream(bf16_engine, FRANCE, max_new_tokens=4)
    assert text


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("   \n", "empty"), ("x" * 300_000, "limit")])
def test_bad_prompts_fail_with_a_message(bf16_engine, prompt, message):
    with pytest.raises(EngineError, match=message):
        run_stream(bf16_engine, prompt)


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature")])
def test_absurd_parameters_fail_with_a_message(bf16_engine, params, message):
    with pytest.raises(EngineError, match=message):
        run_stream(bf16_engine, FRANCE, **{"max_new_tokens": 4, **params})


def test_prompt_longer_than_context_names_the_limit(bf16_engine):
    limit = bf16_engine.max_context_tokens
    with pytest.raises(EngineError, match=f"accepts {limit} tokens"):
        run_stream(bf16_engine, "word " * (limit + 1000), max_new_tokens=4)
