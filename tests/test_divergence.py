"""Issue 18, item 1: where a pane's greedy tokens part from bf16's, the running agreement, and the top-2
margin there. Constructed lists first; then a real greedy run of bf16 against vllm on the embedded model."""
from __future__ import annotations

import math

import pytest

from engines.measure.divergence import divergence_report, first_divergence, running_agreement, top2_margin
from engines.measure.quality import token_agreement
from engines.protocol import EngineError, GenerationParams

PROMPT = "The capital of France is"


@pytest.mark.parametrize("reference, ids, complete, expected", [
    ([1, 2, 3, 4], [1, 2, 3, 4], True, None),
    ([1, 2, 3, 4], [9, 2, 3, 4], True, 0),
    ([1, 2, 3, 4], [1, 2, 7, 4], True, 2),
    ([1, 2, 3, 4], [1, 2, 3], True, 3),          # stopped early (EOS): diverges where it stopped
    ([1, 2, 3], [1, 2, 3, 4], True, 3),          # went on past the reference's end
    ([1, 2, 3, 4], [1, 2], False, None),         # still streaming: behind, not diverged
    ([1, 2, 3, 4], [1, 5], False, 1),
    ([], [], True, None),
    ([], [1], True, 0),
])
def test_first_divergence_on_constructed_lists(reference, ids, complete, expected):
    assert first_divergence(reference, ids, is_complete=complete) == expected


def test_running_agreement_counts_each_position_and_ends_at_token_agreement():
    reference, ids = [1, 2, 3, 4, 5], [1, 2, 9, 4, 8]
    assert running_agreement(reference, ids) == [1.0, 1.0, 2 / 3, 3 / 4, 3 / 5]
    assert running_agreement(reference, ids)[-1] == token_agreement(reference, ids)
    # Past the reference's end a position counts as different.
    assert running_agreement([1, 2], [1, 2, 3, 4]) == [1.0, 1.0, 2 / 3, 2 / 4]
    assert running_agreement([1], []) == []


def test_divergence_report_marks_the_text_where_the_pane_parts():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)
    report = divergence_report([0, 1, 2, 3], [0, 1, 5, 3], decode)
    assert (report.divergence_index, report.agreement, report.text_offset) == (2, 0.75, 2)
    assert divergence_report([0, 1], [0, 1], decode).text_offset is None
    assert divergence_report([0, 1], [], decode, is_complete=False).agreement is None


def test_top2_margin_is_none_for_an_engine_without_logits_and_checks_the_position():
    class Opaque:
        name = "opaque"
    assert top2_margin(Opaque(), PROMPT, [1, 2], 1) is None
    with pytest.raises(EngineError, match="outside the 2 generated tokens"):
        top2_margin(Opaque(), PROMPT, [1, 2], 3)


@pytest.mark.slow
def test_bf16_against_vllm_divergence_and_margin(bf16_engine, vllm_engine):
    """Greedy 16 tokens on both; the divergence index is the first position where last_token_ids differ
    (or None when they agree), and both engines give a top-2 margin there from their own logits."""
    params = GenerationParams(max_new_tokens=16)
    for engine in (bf16_engine, vllm_engine):
        for _ in engine.stream(PROMPT, params):
            pass
    reference, ids = list(bf16_engine.last_token_ids), list(vllm_engine.last_token_ids)
    assert len(reference) == len(ids) == 16
    expected = next((index for index, (a, b) in enumerate(zip(reference, ids)) if a != b), None)
    index = first_divergence(reference, ids)
    assert index == expected
    position = index if index is not None else len(ids) - 1
    bf16_margin = top2_margin(bf16_engine, PROMPT, reference, position)
    vllm_margin = top2_margin(vllm_engine, PROMPT, ids, position)
    for margin in (bf16_margin, vllm_margin):
        assert margin.position == position and margin.best_id != margin.second_id
        assert math.isfinite(margin.margin) and margin.margin >= 0
    assert bf16_margin.source == "logits" and vllm_margin.source == "logprobs"
    # Up to the divergence both engines picked the same tokens, so at position 0 each engine's own best
    # token is the one it generated (a full forward over the prompt is generate's first step).
    first_bf16 = top2_margin(bf16_engine, PROMPT, reference, 0)
    first_vllm = top2_margin(vllm_engine, PROMPT, ids, 0)
    assert first_bf16.best_id == reference[0] and first_vllm.best_id == ids[0]
    print(f"\nbf16 vs vllm, 16 greedy tokens: divergence at {index}; margin there bf16 {bf16_margin.margin:.3f} "
          f"({bf16_margin.best_text!r} over {bf16_margin.second_text!r}), vllm {vllm_margin.margin:.3f}")
