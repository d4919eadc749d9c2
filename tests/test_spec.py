"""The `spec` engine (transformers assisted generation) on the embedded Gemma-3-270M, on CPU: lossless
under greedy decoding, acceptance counted in tokens, as many drafted tokens as verifying them pays for on
this CPU, a draft model with the same tokenizer, and clear errors for a draft model with another
tokenizer or bad options."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest

from engines.hardware import cpu_flags
from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine
from engines.variants.transformers.speculative import measure_speedup, plan_drafting
from tests.conftest import run_stream

# Code that asks to be copied: prompt lookup finds its continuation in the prompt itself.
REPETITIVE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
              "def mul(a, b):\n    return a * b\n\n# The same functions again:\ndef add(a, b):\n")
FREE_FORM = "The capital of France is"


def assert_greedy_match(ids: list[int], plain_ids: list[int], plain_engine, prompt: str) -> None:
    """`ids` are `plain_ids` (plain greedy decoding on plain_engine's weights), or they part only where
    plain decoding's bf16 logits tie. bf16 resolves a logit near 16-32 to 0.125, so two tokens can share
    the top value exactly ("The capital of France is": ' capital' and ' largest', both 16.875, at token
    11), and a verification step, which computes several positions in one batched matmul, may round
    either way there (the AMX kernels differ by batch size). Until then the ids are the same, and the
    token taken there is one of the tied ones."""
    if ids == plain_ids:
        return
    import torch
    at = next((i for i, (a, b) in enumerate(zip(ids, plain_ids)) if a != b), min(len(ids), len(plain_ids)))
    assert at < min(len(ids), len(plain_ids)), f"one output stops early at token {at}: {ids} vs {plain_ids}"
    input_ids, attention_mask = plain_engine.encode(prompt)
    with torch.inference_mode():
        out = plain_engine.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=at + 1,
                                          do_sample=False, temperature=None, top_p=None, top_k=None,
                                          output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=plain_engine.tokenizer.pad_token_id)
    assert out.sequences[0, input_ids.shape[1]:].tolist() == plain_ids[:at + 1]
    logits = out.logits[at][0].float()
    top = logits.max()
    bf16_step = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(top.abs()))
    tied = set((logits >= top - bf16_step).nonzero().flatten().tolist())
    assert len(tied) >= 2 and {ids[at], plain_ids[at]} <= tied, (
        f"token {at}: {ids[at]} instead of {plain_ids[at]}, and plain decoding's logits do not tie there "
        f"(top {top.item()}, within one bf16 step: {sorted(tied)})")


@pytest.mark.parametrize("prompt", [REPETITIVE, FREE_FORM])
def test_greedy_output_is_identical_to_bf16(spec_engine, bf16_engine, prompt):
    spec_text, _, spec_stats = run_stream(spec_engine, prompt, max_new_tokens=24)
    bf16_text, _, _ = run_stream(bf16_engine, prompt, max_new_tokens=24)
    assert_greedy_match(spec_engine.last_token_ids, bf16_engine.last_token_ids, bf16_engine, prompt)
    if spec_engine.last_token_ids == bf16_engine.last_token_ids:
        assert spec_text == bf16_text
    assert spec_stats.num_drafts is not None


def test_repetitive_prompt_accepts_drafts_and_counts_tokens(spec_engine):
    text, events, stats = run_stream(spec_engine, REPETITIVE, max_new_tokens=40)
    counts = spec_engine.last_counts
    assert "return a - b" in text, text
    assert stats.num_accepted_tokens > 0 and 0 < stats.acceptance_rate <= 1
    assert stats.acceptance_rate == pytest.approx(stats.num_accepted_tokens / stats.num_draft_tokens)
    assert stats.mean_accepted_len == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    # Each verification step streams its accepted drafts plus one token of the target's own.
    assert stats.num_accepted_tokens == stats.num_tokens - counts.num_steps
    assert counts.num_steps < stats.num_tokens
    assert max(event.num_tokens for event in events) > 1
    assert stats.num_tokens == len(spec_engine.last_token_ids) == sum(event.num_tokens for event in events)
    assert spec_engine.tokenizer.decode(spec_engine.last_token_ids, skip_special_tokens=True) == text
    assert sum(counts.step_tokens) == stats.num_tokens and len(counts.step_drafts) == counts.num_steps
    # No step drafts more than this CPU's plan, nor past the token budget (a step drafting d streams <= d + 1).
    emitted = 0
    for drafted, streamed in zip(counts.step_drafts, counts.step_tokens):
        assert drafted <= spec_engine.draft_plan.num_tokens and emitted + drafted + 1 <= 40, counts
        emitted += streamed


@pytest.mark.parametrize("device, dtype, flags, num_tokens, expects_gain", [
    ("cpu", "bfloat16", {"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, 10, True),  # Sapphire Rapids
    ("cpu", "bfloat16", {"avx2", "avx512f", "avx512_bf16"}, 10, True),
    ("cpu", "bfloat16", {"avx2", "avx512f"}, 4, False),    # AVX-512 without BF16: emulated bf16
    ("cpu", "bfloat16", {"avx2"}, 4, False),               # the CI machine of issue 13
    ("cpu", "float32", {"avx2"}, 4, False),
    ("cpu", "float32", {"avx2", "avx512f", "amx_bf16"}, 4, False),
    ("cpu", "float16", {"avx2"}, 4, False),
    ("cuda", "bfloat16", set(), 10, True)])
def test_drafting_follows_what_verification_costs_on_the_machine(device, dtype, flags, num_tokens, expects_gain):
    plan = plan_drafting(device, dtype, frozenset(flags))
    assert (plan.num_tokens, plan.expects_gain) == (num_tokens, expects_gain)
    assert f"up to {num_tokens} drafted tokens" in plan.reason
    requested = plan_drafting(device, dtype, frozenset(flags), requested=7)
    assert requested.num_tokens == 7 and "(option)" in requested.reason


def test_the_engine_drafts_as_this_cpu_pays_for_and_says_why(spec_engine):
    assert spec_engine.draft_plan == plan_drafting("cpu", spec_engine.options.dtype, cpu_flags())
    assert spec_engine.drafting_note == f"prompt lookup, {spec_engine.draft_plan.reason}"


def test_without_speculation_no_drafts_are_reported(spec_engine):
    with spec_engine.speculation(False):
        _, _, stats = run_stream(spec_engine, REPETITIVE, max_new_tokens=8)
    assert stats.num_drafts is None and stats.acceptance_rate is None
    assert spec_engine.is_speculating


def test_speedup_is_measured_in_the_same_run(spec_engine):
    result = measure_speedup(spec_engine, REPETITIVE, GenerationParams(max_new_tokens=40), repeats=3)
    print(result.describe())
    if not result.is_same_text:
        assert_greedy_match(result.spec_token_ids, result.token_ids, spec_engine, REPETITIVE)
    assert len(result.pair_speedups) == 3 and result.speedup == statistics.median(result.pair_speedups)
    assert result.baseline_decode_tok_s > 0 and result.spec_decode_tok_s > 0 and result.verify_cost > 0
    # Counts, which no clock moves: most of this continuation is copied from the prompt, so several tokens
    # land per target forward pass (5.0 with 10 drafted tokens, 3.6 with 4).
    assert result.tokens_per_step > 2.5 and result.mean_accepted_len > 2, result.describe()
    plan = spec_engine.draft_plan
    if plan.expects_gain:
        # bf16 on AMX (this CPU kind) or a GPU: a step verifying 11 positions costs about 1.2 decode steps, so
        # the gain is several-fold. Measured on 2 AMX cores: median 3.5x (pairs 2.9x-6.5x) with other suites
        # holding the load average at 12-16, 3.0x and 3.1x (worst pair 1.95x) with this test running twice
        # at once beside them. 1.3x is issue 13's goal, with more than a 2x margin on the median.
        assert result.speedup >= 1.3, result.describe()
    else:
        # No native bf16 matmul (AVX2), or float32: the matmuls are compute-bound, a verified position costs
        # a third to a half of a decode step, and the gain (1.2x-1.7x) is too close to 1 to assert on a
        # shared machine. What holds with margin: one step over k + 1 positions costs well under k + 1
        # plain steps (measured, emulated AVX2 with 4 drafts: 2.2 in bf16, 2.1 in float32, bound 5).
        assert result.verify_cost < plan.num_tokens + 1, result.describe()


def test_draft_model_with_the_same_tokenizer_is_lossless(bf16_engine):
    # The embedded model drafting for itself: the only second model with the same tokenizer offline.
    engine = create_engine("spec", draft_model="gemma-3-270m", num_assistant_tokens=4)
    engine.load()
    try:
        text, _, stats = run_stream(engine, FREE_FORM, max_new_tokens=16)
        assert engine.drafting == "draft model gemma-3-270m"
        bf16_text, _, _ = run_stream(bf16_engine, FREE_FORM, max_new_tokens=16)
        assert_greedy_match(engine.last_token_ids, bf16_engine.last_token_ids, bf16_engine, FREE_FORM)
        if engine.last_token_ids == bf16_engine.last_token_ids:
            assert text == bf16_text
        assert stats.num_draft_tokens > 0 and stats.acceptance_rate > 0.5
    finally:
        engine.unload()


def test_draft_model_with_another_tokenizer_is_refused(tmp_path, spec_engine):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(tmp_path)
    shutil.copy(spec_engine.source.path / "config.json", tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] > 5
    engine = create_engine("spec", draft_model=str(tmp_path))
    with pytest.raises(EngineError, match=r"cannot draft .*tokenizer has 5 tokens.*same tokenizer"):
        engine.load()


@pytest.mark.parametrize("options, message", [
    ({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens must be a whole number"),
    ({"max_matching_ngram_size": "two"}, "max_matching_ngram_size must be a whole number"),
    ({"compile": True}, "needs a dynamic KV cache")])
def test_bad_options_fail_with_a_message(options, message):
    with pytest.raises(EngineError, match=message):
        create_engine("spec", **options)
