"""Model provisioning and the registry: the same code path for the embedded model, a local folder and
a hub id; availability decided without heavy imports."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engines.models.sources import resolve_model
from engines.protocol import EngineError
from engines.registry import create_engine, list_engines
from tests.conftest import run_stream


def test_embedded_model_is_a_plain_checkpoint_with_bos():
    source = resolve_model()
    assert source.origin == "embedded" and source.hub_id == "google/gemma-3-270m"
    config = (source.path / "config.json").read_text()
    assert "quantization_config" not in config
    assert (source.path / "model.safetensors").stat().st_size > 400e6


def test_local_folder_goes_through_the_same_path(bf16_engine):
    local = create_engine("bf16", model=str(resolve_model().path))
    local.load()
    try:
        assert local.source.origin == "local"
        run_stream(local, "The capital of France is", max_new_tokens=6)
        run_stream(bf16_engine, "The capital of France is", max_new_tokens=6)
        assert local.last_token_ids == bf16_engine.last_token_ids
    finally:
        local.unload()


def test_hub_id_offline_names_the_model():
    with pytest.raises(EngineError, match="model 'acme/llama-9000' not found"):
        resolve_model("acme/llama-9000")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_importing_engines_and_listing_imports_no_heavy_package():
    code = ("import sys, engines, engines.registry as r; r.list_engines(); "
            "print(sorted(m for m in ('torch', 'vllm', 'bitsandbytes', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unavailable_variants_carry_a_reason():
    rows = list_engines()
    assert all(row["reason"] == "" for row in rows if row["is_available"])
    assert all(row["reason"] for row in rows if not row["is_available"])


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(EngineError, match="Known engines: bf16"):
        create_engine("turbo")
