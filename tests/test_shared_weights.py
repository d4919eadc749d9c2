"""Shared weights (engines/variants/transformers/shared_weights.py): engines that run the same weights at
the same precision hold one copy. The real check loads the embedded Gemma-3-270M as bf16 (sdpa),
bf16[attn_implementation=eager] and spec side by side: each gives the greedy text it gives alone, they
hold the very same parameter tensors, and the two extra engines cost far less resident memory than one
more copy of the weights. The cache's reference counting and its garbage-collection safety net are
checked on a tiny random Llama."""
from __future__ import annotations

import gc

import psutil
import pytest

from engines.registry import create_engine
from engines.variants.transformers import shared_weights
from engines.variants.transformers.shared_weights import WeightsKey
from tests.conftest import run_stream

PROMPT = "The capital of France is"
NUM_TOKENS = 8
MIB = 1024 ** 2


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_what_each_engine_declares():
    bf16, eager, compiled, spec = (create_engine("bf16"), create_engine("bf16", attn_implementation="eager"),
                                   create_engine("bf16-compiled"), create_engine("spec"))
    assert bf16.weights_key() is not None
    assert bf16.weights_key() == eager.weights_key() == compiled.weights_key() == spec.weights_key()
    assert create_engine("bf16", dtype="float32").weights_key() != bf16.weights_key()
    assert create_engine("bf16", dummy_weights=True).weights_key().is_random
    for name in ("nf4", "int8", "gptq-int4"):  # packed quantized weights are each engine's own
        try:
            engine = create_engine(name)
        except Exception as error:  # not installed here: nothing to declare
            pytest.skip(f"{name}: {error}")
        assert engine.weights_key() is None, name


def test_sharing_keeps_each_engines_text_and_costs_far_less_than_a_copy():
    """Side by side: bf16, then eager with a copy of its own (the reference 'alone', and the cost of an
    unshared engine), then eager and spec sharing bf16's weights. Each engine's RSS growth includes its
    tokenizer (about 250 MiB for Gemma's 262k vocabulary), which is not shared; the weights are."""
    bf16, eager_own, eager, spec = (create_engine("bf16"), create_engine("bf16", attn_implementation="eager"),
                                    create_engine("bf16", attn_implementation="eager"), create_engine("spec"))
    eager_own.weights_key = lambda: None  # hidden from the cache: loads a copy of its own
    engines = []

    def add(engine) -> tuple[str, int]:
        """Load, generate (touching every weight page: the tied head reads the whole table), RSS growth."""
        before = _rss()
        engine.load()
        engines.append(engine)
        return run_stream(engine, PROMPT, max_new_tokens=NUM_TOKENS)[0], _rss() - before

    try:
        bf16_text, _ = add(bf16)
        key, path = bf16.weights_key(), bf16.source.path
        users_before = shared_weights.num_users(key, path) - 1   # a session fixture may hold them too
        copy_bytes = bf16.weight_footprint_gib() * 1024 ** 3
        eager_alone, own_growth = add(eager_own)
        eager_text, shared_growth = add(eager)
        spec_text, spec_growth = add(spec)
        print(f"\nshared weights: one copy is {copy_bytes / MIB:.0f} MiB; RSS growth of eager with its own copy "
              f"{own_growth / MIB:.0f} MiB, of eager sharing {shared_growth / MIB:.0f} MiB, of spec sharing "
              f"{spec_growth / MIB:.0f} MiB")
        assert eager_text == eager_alone
        assert spec_text == bf16_text  # prompt lookup is lossless under greedy decoding
        assert eager.model.config._attn_implementation == "eager" != bf16.model.config._attn_implementation
        own_parameters = dict(eager_own.model.named_parameters())
        for name, parameter in bf16.model.named_parameters():
            assert dict(eager.model.named_parameters())[name] is parameter
            assert dict(spec.model.named_parameters())[name] is parameter
            assert own_parameters[name] is not parameter
        assert shared_weights.num_users(key, path) == users_before + 3
        for growth in (shared_growth, spec_growth):
            assert growth < own_growth - 0.6 * copy_bytes, "a sharing engine should save most of a copy"

        bf16.unload()  # the others keep the weights and their text
        assert shared_weights.num_users(key, path) == users_before + 2
        assert run_stream(eager, PROMPT, max_new_tokens=NUM_TOKENS)[0] == eager_alone
        eager.unload()
        spec.unload()
        assert shared_weights.num_users(key, path) == users_before
        if users_before == 0:
            assert key not in shared_weights.resident_keys()
    finally:
        for engine in engines:
            engine.unload()


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def test_reference_counting_and_the_garbage_collection_safety_net(tmp_path):
    import torch
    key = WeightsKey("tiny", "float32", "cpu")
    builds = []

    def build():
        builds.append(1)
        return _tiny_llama()

    first = shared_weights.load_model(key, tmp_path, "sdpa", build)
    second = shared_weights.load_model(key, tmp_path, "eager", build)
    assert len(builds) == 1 and shared_weights.num_users(key, tmp_path) == 2
    assert second.lm_head.weight is second.model.embed_tokens.weight is first.model.embed_tokens.weight
    assert second.model.rotary_emb.inv_freq is not first.model.rotary_emb.inv_freq  # buffers are cloned
    assert second.config._attn_implementation == "eager" and first.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        assert torch.equal(first(ids).logits.argmax(-1), second(ids).logits.argmax(-1))
    assert shared_weights.load_model(None, tmp_path, "sdpa", build) is not None and len(builds) == 2  # no key: own copy

    shared_weights.release(first)
    shared_weights.release(first)  # a second release of the same model is a no-op
    assert shared_weights.num_users(key, tmp_path) == 1
    del second  # dropped without release(): the finalizer releases
    gc.collect()
    assert shared_weights.num_users(key, tmp_path) == 0 and key not in shared_weights.resident_keys()
    third = shared_weights.load_model(key, tmp_path, "sdpa", build)
    assert len(builds) == 3  # the last user left, so the next one builds afresh
    shared_weights.release(third)
