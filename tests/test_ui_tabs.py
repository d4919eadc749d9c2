"""The UI pieces built on engines/measure: the run export's manifest, the race view, the Load tab and
the Survey tab. Callbacks are called as Gradio calls them (no server, no browser), with the real bf16
engine on the embedded model and few tokens."""
from __future__ import annotations

import json

import pytest

from app.callbacks import AppConfig, Playground
from app.layout import build_app
from app.session import EnginePool, build_choices
from engines.measure.manifest import MANIFEST_FIELDS, PACKAGES

PROMPT = "The capital of France is"


@pytest.fixture
def playground(bf16_engine, tmp_path):
    pool = EnginePool(None, build_choices())
    pool.adopt("bf16", bf16_engine)
    playground = Playground(AppConfig(refresh_hz=5.0, chart_interval_s=0.5, export_dir=str(tmp_path)), pool)
    build_app(playground)
    return playground


def finished_record(playground, keys=("bf16",), max_new_tokens=3):
    outputs = list(playground.run(PROMPT, max_new_tokens, 0.0, 7, "fair", list(keys)))
    return outputs[-1][playground.page.record]


def test_exported_run_json_holds_a_manifest_with_every_field(playground, bf16_engine):
    record = finished_record(playground)
    exported = playground.export(record)
    paths = exported[playground.page.export_files]["value"]
    data = json.loads(open(next(path for path in paths if path.endswith("run.json"))).read())
    manifest = data["manifest"]
    assert set(MANIFEST_FIELDS) <= set(manifest)
    assert set(PACKAGES) <= set(manifest["versions"])
    assert manifest["seed"] == 7 and manifest["mode"] == "fair" and manifest["model"]
    assert manifest["git_commit"] and manifest["device"] in ("cpu", "cuda")
    assert list(manifest["engines"]) == ["bf16"] and manifest["engines"]["bf16"]  # the engine's resolved options
