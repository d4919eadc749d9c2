"""The `spec` engine (transformers assisted generation) on the embedded Gemma-3-270M, on CPU: lossless
under greedy decoding, acceptance counted in tokens, a draft model with the same tokenizer, and clear
errors for a draft model with another tokenizer or bad options."""
from __future__ import annotations

import json
import shutil

import pytest

from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine
from engines.variants.transformers.speculative import measure_speedup
from tests.conftest import run_stream

# Code that asks to be copied: prompt lookup finds its continuation in the prompt itself.
REPETITIVE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
              "def mul(a, b):\n    return a * b\n\n# The same functions again:\ndef add(a, b):\n")
FREE_FORM = "The capital of France is"


@pytest.mark.parametrize("prompt", [REPETITIVE, FREE_FORM])
def test_greedy_output_is_identical_to_bf16(spec_engine, bf16_engine, prompt):
    spec_text, _, spec_stats = run_stream(spec_engine, prompt, max_new_tokens=32)
    bf16_text, _, _ = run_stream(bf16_engine, prompt, max_new_tokens=32)
    assert spec_engine.last_token_ids == bf16_engine.last_token_ids
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


def test_without_speculation_no_drafts_are_reported(spec_engine):
    with spec_engine.speculation(False):
        _, _, stats = run_stream(spec_engine, REPETITIVE, max_new_tokens=8)
    assert stats.num_drafts is None and stats.acceptance_rate is None
    assert spec_engine.is_speculating


def test_speedup_is_measured_in_the_same_run(spec_engine):
    result = measure_speedup(spec_engine, REPETITIVE, GenerationParams(max_new_tokens=40), repeats=3)
    assert result.is_same_text
    assert result.baseline_decode_tok_s > 0 and result.spec_decode_tok_s > 0
    assert result.speedup == pytest.approx(result.spec_decode_tok_s / result.baseline_decode_tok_s)
    # Most of this continuation is copied from the prompt, so several tokens land per forward pass: the
    # count, not the clock, shows that speculation works.
    assert result.mean_accepted_len > 2, result
    # The clock is reported, not asserted: on a shared 2-core machine a fresh-clone CI measured 0.985x
    # against a bound of 1.0 with this same accepted length, so a speed bound here fails by chance.


def test_draft_model_with_the_same_tokenizer_is_lossless(bf16_engine):
    # The embedded model drafting for itself: the only second model with the same tokenizer offline.
    engine = create_engine("spec", draft_model="gemma-3-270m", num_assistant_tokens=4)
    engine.load()
    try:
        text, _, stats = run_stream(engine, FREE_FORM, max_new_tokens=16)
        assert engine.drafting == "draft model gemma-3-270m"
        bf16_text, _, _ = run_stream(bf16_engine, FREE_FORM, max_new_tokens=16)
        assert engine.last_token_ids == bf16_engine.last_token_ids and text == bf16_text
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
