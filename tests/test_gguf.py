"""The `gguf` engine: llama.cpp (a real CPU build of llama-cpp-python) on the embedded model's own GGUF
file, with exact token streaming, its telemetry (TTFT, KV cells, llama.cpp's own eval timing), quality
against bf16, Stop, clear load errors and the Q8_0 ladder rung written once."""
from __future__ import annotations

import threading
import time

import pytest

from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine
from engines.variants.llamacpp.ladder import ladder_path
from tests.conftest import loaded_engine

SMOLLM2 = "smollm2-135m-instruct"

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_engine():
    with loaded_engine("gguf") as engine:
        yield engine


def test_greedy_text_is_english_about_the_prompt_with_an_exact_count(gguf_engine):
    events = list(gguf_engine.stream(PROMPT, GenerationParams(max_new_tokens=16)))
    stats = gguf_engine.stats()
    text = "".join(event.text for event in events)
    assert "France" in text or "Paris" in text, text
    assert all(event.num_tokens == 1 for event in events if event.text)
    assert sum(event.num_tokens for event in events) == stats.num_tokens == 16
    assert stats.ttft_s < stats.total_s
    assert gguf_engine.decode(gguf_engine.last_token_ids) == text


def test_kv_cells_rise_during_a_run_and_return_after_it(gguf_engine):
    list(gguf_engine.stream(PROMPT, GenerationParams(max_new_tokens=24)))
    samples = gguf_engine.stats().samples
    assert max(sample.kv_blocks_used or 0 for sample in samples) > 0
    assert samples[-1].kv_blocks_used == 0          # the cache is cleared when the request ends
    assert gguf_engine.stats().kv_blocks_total == gguf_engine.max_context_tokens


def test_seeded_sampling_repeats_and_decode_speed_is_llama_cpps(gguf_engine):
    params = GenerationParams(max_new_tokens=12, temperature=0.8, seed=7)
    first = [list(gguf_engine.stream(PROMPT, params)) for _ in range(2)]
    assert [event.text for event in first[0]] == [event.text for event in first[1]]
    perf = gguf_engine.llama_perf()
    assert perf["n_eval"] >= 10
    # Counts, not a speed ratio: llama.cpp evaluated every generated token but the first (the prompt's).
    assert perf["n_eval"] == gguf_engine.stats().num_tokens - 1


def test_perplexity_is_within_1_5x_of_bf16(gguf_engine, quality_reference):
    from engines.measure.quality import perplexity_text
    ratio = gguf_engine.perplexity(perplexity_text()) / quality_reference.perplexity
    assert 0.67 < ratio < 1.5, ratio


def test_stop_ends_the_stream_within_a_token(gguf_engine):
    cancel = threading.Event()
    stream = gguf_engine.stream(PROMPT, GenerationParams(max_new_tokens=200), cancel=cancel)
    next(stream)
    cancel.set()
    started = time.perf_counter()
    rest = list(stream)
    assert time.perf_counter() - started < 5
    stats = gguf_engine.stats()
    assert stats.finish_reason == "cancelled" and stats.num_tokens < 200 and len(rest) <= 2


def test_a_corrupt_gguf_fails_to_load_with_a_message_and_the_next_load_works(tmp_path, gguf_engine):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="llama.cpp could not load .*broken.gguf"):
        create_engine("gguf", path=str(broken)).load()
    with loaded_engine("gguf", path=str(gguf_engine.gguf_path), n_threads=1) as again:
        assert list(again.stream(PROMPT, GenerationParams(max_new_tokens=2)))


def test_an_over_long_prompt_names_the_context_limit(gguf_engine):
    with pytest.raises(EngineError, match="accepts 4096 tokens in all"):
        list(gguf_engine.stream("word " * 5000, GenerationParams(max_new_tokens=8)))


@pytest.mark.slow
def test_the_ladder_writes_q8_0_once_and_reuses_it():
    # On the smaller embedded model (SmolLM2-135M: the gguf package's Python Q8_0 writer took 69 s on
    # Gemma-3-270M's 262k-token embeddings); the ladder code is the same for both.
    from engines.models.sources import resolve_model
    shipped = resolve_model(SMOLLM2).gguf_path
    with loaded_engine("gguf", model=SMOLLM2, type="q8_0") as q8:
        path = ladder_path(shipped, "q8_0")
        assert q8.gguf_path == path and path.is_file()
        written = path.stat().st_mtime_ns
        text = "".join(event.text for event in q8.stream(PROMPT, GenerationParams(max_new_tokens=8)))
        assert "France" in text or "Paris" in text or "capital" in text, text
        assert 0.9 < q8.precision().linear_bytes_per_weight < 1.2      # Q8_0: 34 bytes per 32 weights
    with loaded_engine("gguf", model=SMOLLM2, type="q8_0"):
        assert path.stat().st_mtime_ns == written                      # reused, not written again
