"""The quantized variants on the embedded Gemma-3-270M, on CPU: gptq-int4 (GPTQModel), nf4 and int8
(bitsandbytes). Coherent text, perplexity within 1.5x of bf16's, a smaller footprint, and the GPTQ
cache: reused on a second load, rebuilt (never loaded) when corrupt or partial.

The cache-damage tests quantize a small random-weight Gemma3 built from the real config (2 layers,
hidden 128, the real tokenizer): real GPTQModel quantization in seconds, so that CI quantizes the
embedded model only once per run (the gptq_engine session fixture).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engines.measure.quality import perplexity_text
from engines.protocol import EngineError
from engines.registry import create_engine
from engines.variants.transformers.gptq import BACKENDS, MANIFEST, cache_problem
from tests.conftest import loaded_engine, run_stream

STORY = "Once upon a time, in a small village by the sea,"
COMMON_WORDS = {"the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "he", "she", "they"}


@pytest.fixture(scope="module")
def nf4_engine():
    with loaded_engine("nf4") as engine:
        yield engine


@pytest.fixture(scope="module")
def int8_engine():
    with loaded_engine("int8") as engine:
        yield engine


@pytest.fixture(scope="module")
def bf16_perplexity(bf16_engine):
    return bf16_engine.perplexity(perplexity_text())


def assert_coherent_english(text: str) -> None:
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 6, text
    assert sum(ch.isascii() for ch in text) / len(text) > 0.95, text
    assert COMMON_WORDS & set(words), text
    # Garbage from a broken kernel repeats one token or emits fragments; prose has varied words.
    assert len(set(words)) >= len(words) / 3, text
    assert sum(word.isalpha() for word in words) / len(words) > 0.7, text


@pytest.mark.parametrize("fixture, max_new_tokens", [("gptq_engine", 24), ("nf4_engine", 20), ("int8_engine", 14)])
def test_variant_writes_coherent_english(request, fixture, max_new_tokens):
    engine = request.getfixturevalue(fixture)
    text, events, stats = run_stream(engine, STORY, max_new_tokens=max_new_tokens)
    assert_coherent_english(text)
    assert stats.num_tokens == sum(event.num_tokens for event in events) == len(engine.last_token_ids)


@pytest.mark.parametrize("fixture", ["gptq_engine", "nf4_engine", "int8_engine"])
def test_perplexity_within_1_5x_of_bf16_and_footprint_below(request, fixture, bf16_engine, bf16_perplexity):
    engine = request.getfixturevalue(fixture)
    perplexity = engine.perplexity(perplexity_text())
    assert bf16_perplexity < perplexity * 1.1, "quantization rarely beats bf16 by much; a lower value hides a bug"
    assert perplexity <= 1.5 * bf16_perplexity, (perplexity, bf16_perplexity)
    assert engine.weight_footprint_gib() < 0.9 * bf16_engine.weight_footprint_gib()


def test_gptq_runs_a_named_cpu_kernel(gptq_engine):
    assert gptq_engine.backend in BACKENDS["cpu"]
    assert gptq_engine.kernel_name and "Linear" in gptq_engine.kernel_name
    config = json.loads((gptq_engine.checkpoint_path / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["group_size"] == 128


def test_gptq_cache_is_reused_on_the_second_load(gptq_engine):
    manifest = gptq_engine.checkpoint_path / MANIFEST
    before = manifest.stat()
    messages = []
    second = create_engine("gptq-int4")
    second.load(progress=messages.append)
    try:
        assert second.checkpoint_path == gptq_engine.checkpoint_path
        assert any("loading the cached quantization" in message for message in messages), messages
        assert not any("quantizing" in message for message in messages), messages
        after = manifest.stat()
        assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
        run_stream(second, STORY, max_new_tokens=8)
        run_stream(gptq_engine, STORY, max_new_tokens=8)
        assert second.last_token_ids == gptq_engine.last_token_ids
    finally:
        second.unload()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, bf16_engine):
    """A real Gemma3 checkpoint with random weights, small enough to quantize in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    source = bf16_engine.source.path
    config = AutoConfig.from_pretrained(source)
    config.update({"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "head_dim": 64, "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-gemma3"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for path in source.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def tiny_cache(tiny_model):
    """The tiny model's GPTQ cache, quantized once for this module and removed afterwards (its key
    holds the temporary folder's path, so nothing else would ever read it)."""
    engine, messages = load_tiny(tiny_model)
    engine.unload()
    assert quantized(messages), messages
    yield engine.checkpoint_path
    shutil.rmtree(engine.checkpoint_path, ignore_errors=True)
    Path(f"{engine.checkpoint_path}.lock").unlink(missing_ok=True)


def load_tiny(folder, **options) -> tuple[object, list[str]]:
    messages = []
    engine = create_engine("gptq-int4", model=str(folder), num_calibration_samples=4, **options)
    engine.load(progress=messages.append)
    return engine, messages


def quantized(messages: list[str]) -> bool:
    return any("quantizing" in message for message in messages)


def test_cache_problems_are_named(tiny_cache, tmp_path):
    assert cache_problem(tiny_cache) is None
    damages = {
        "no manifest": lambda folder: (folder / MANIFEST).unlink(),
        "unreadable": lambda folder: (folder / MANIFEST).write_text("{not json"),
        "config.json is missing": lambda folder: (folder / "config.json").unlink(),
        "lists no weights": lambda folder: (folder / MANIFEST).write_text(json.dumps({"files": {}})),
    }
    for index, (expected, damage) in enumerate(damages.items()):
        copy = tmp_path / f"copy-{index}"
        shutil.copytree(tiny_cache, copy)
        damage(copy)
        assert expected in cache_problem(copy)


def test_a_gptq_checkpoint_loads_directly_with_the_named_backend(tiny_model, tiny_cache):
    direct, messages = load_tiny(tiny_model, checkpoint=str(tiny_cache), backend="gptq_torch")
    try:
        assert direct.checkpoint_path == tiny_cache and not quantized(messages), messages
        assert direct.backend == "gptq_torch" and direct.kernel_name
        _, _, stats = run_stream(direct, STORY, max_new_tokens=4)
        assert stats.num_tokens == 4 and len(direct.last_token_ids) == 4
    finally:
        direct.unload()


def test_bad_options_fail_with_a_message(tiny_model, tiny_cache):
    with pytest.raises(EngineError, match="no GPTQ kernel loaded.*no_such_kernel"):
        load_tiny(tiny_model, backend="no_such_kernel")
    with pytest.raises(EngineError, match="num_calibration_samples must be between 1 and 16"):
        create_engine("gptq-int4", model=str(tiny_model), num_calibration_samples=99).load()
    with pytest.raises(EngineError, match="group_size must be a whole number, got 'big'"):
        create_engine("gptq-int4", model=str(tiny_model), group_size="big")
    with pytest.raises(EngineError, match="bits must be one of 4, 8, got 3"):
        create_engine("nf4", model=str(tiny_model), bits=3).load()


def test_corrupt_and_partial_caches_are_rebuilt_not_loaded(tiny_model, tiny_cache):
    """Runs last in this module: it damages the shared tiny cache. One damaged cache is rebuilt (a
    quantization); the partial one is only diagnosed, since both go down the same rebuild path
    (int4_cache.quantize_once: any cache_problem -> rebuild)."""
    first, messages = load_tiny(tiny_model)
    assert first.checkpoint_path == tiny_cache and not quantized(messages), messages
    reference_text, _, _ = run_stream(first, STORY, max_new_tokens=6)
    first.unload()
    weights = tiny_cache / "model.safetensors"

    # Corrupt: same size, one flipped byte in the middle of the packed weights.
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in cache_problem(tiny_cache)
    rebuilt, messages = load_tiny(tiny_model)
    assert any("unusable" in m and "corrupt" in m for m in messages) and quantized(messages), messages
    assert cache_problem(rebuilt.checkpoint_path) is None
    text, _, _ = run_stream(rebuilt, STORY, max_new_tokens=6)
    assert text == reference_text, "GPTQ on the same weights and calibration is deterministic"
    rebuilt.unload()

    # Partial: the weights file cut short, as by a crash or a full disk mid-copy.
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 3)
    assert "partial" in cache_problem(tiny_cache)
