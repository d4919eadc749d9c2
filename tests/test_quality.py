"""engines.measure.quality on the real embedded model: the bf16 reference (cached on disk), the report of each
quantized variant, the CLI's --quality, and the suspect flag raised on its own by real garbage (a bf16
engine whose weights were scrambled after loading)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engines.measure.quality import (
    MAX_PERPLEXITY,
    QualityReference,
    build_reference,
    evaluate_quality,
    judge,
    perplexity_text,
    quality_prompts,
    reference_path,
    token_agreement,
)
from engines.models.catalog import default_model_name
from engines.protocol import EngineError
from engines.registry import create_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_holds_greedy_ids_and_a_sane_perplexity(bf16_engine, quality_reference):
    assert quality_reference.prompts == quality_prompts() and len(quality_reference.prompts) >= 6
    assert all(1 <= len(ids) <= 32 for ids in quality_reference.token_ids)
    assert 1.0 < quality_reference.perplexity < 40, "Gemma-3-270M scores plain prose well below 40 with BOS"
    path = reference_path(bf16_engine.model_name or default_model_name(), bf16_engine.device, 32)
    assert QualityReference.load(path) == quality_reference
    before = path.stat().st_mtime_ns
    assert build_reference(bf16_engine, num_tokens=32) == quality_reference
    assert path.stat().st_mtime_ns == before, "the second build must come from the disk cache"


def test_bf16_agrees_with_itself(bf16_engine, quality_reference):
    report = evaluate_quality(bf16_engine, quality_reference, max_prompts=3)
    assert report.greedy_agreement == 1.0
    assert report.perplexity_ratio == pytest.approx(1.0, abs=1e-6)
    assert not report.is_suspect and report.reason == "close to bf16"


def test_gptq_report_is_close_to_bf16_and_smaller(gptq_engine, bf16_engine, quality_reference):
    report = evaluate_quality(gptq_engine, quality_reference)
    assert report.num_prompts == len(quality_reference.prompts) and report.num_tokens == 32
    assert 0.05 <= report.greedy_agreement < 1.0, report
    assert 1.0 <= report.perplexity_ratio <= 1.5, report
    assert report.weight_footprint_gib < bf16_engine.weight_footprint_gib()
    assert not report.is_suspect, report.reason


def test_scrambled_weights_are_flagged_on_their_own(quality_reference):
    import torch
    broken = create_engine("bf16", share_weights=False)  # scrambled in place below: it needs weights of its own
    broken.load()
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, parameter in broken.model.named_parameters():
                if "proj" in name:
                    parameter.copy_(parameter[torch.randperm(parameter.shape[0])])
        report = evaluate_quality(broken, quality_reference, num_tokens=8, max_prompts=4)
        assert report.is_suspect, report
        assert report.greedy_agreement < 0.05 and report.perplexity_ratio > 1.5, report
        assert "agreement" in report.reason and "perplexity" in report.reason

        broken.tokenizer.add_bos_token = False
        with pytest.raises(EngineError, match="did not add BOS"):
            broken.perplexity(perplexity_text())
    finally:
        broken.unload()


@pytest.mark.parametrize("agreement, perplexity, ratio, is_suspect, words", [
    (0.6, 17.0, 1.05, False, "close to bf16"),
    (0.01, 17.0, 1.05, True, "agreement"),
    (0.6, 40.0, 2.4, True, "2.40x"),
    (0.6, MAX_PERPLEXITY * 1.5, 1.0, True, "plain English"),
    (None, None, None, False, "n/a"),
])
def test_judge(agreement, perplexity, ratio, is_suspect, words):
    flagged, reason = judge(agreement, perplexity, ratio)
    assert flagged is is_suspect and words in reason


def test_token_agreement_counts_positions():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5
    assert token_agreement([], []) == 1.0


def test_generate_quality_json_adds_agreement_perplexity_and_footprint(gptq_engine):
    completed = subprocess.run(
        [sys.executable, "-m", "engines", "generate", "--engine", "gptq-int4", "--prompt", "The sun rises in the east",
         "--max-new-tokens", "6", "--quality", "--quality-tokens", "4", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    quality = result["quality"]
    assert result["kernel_name"] == gptq_engine.kernel_name
    assert 0.0 <= quality["greedy_agreement"] <= 1.0 and quality["num_tokens"] == 4
    assert quality["perplexity"] == pytest.approx(gptq_engine.perplexity(perplexity_text()), rel=1e-3)
    assert 0 < quality["weight_footprint_gib"] < 0.5 and quality["is_suspect"] is False


def test_bench_row_without_the_bf16_reference_says_so_instead_of_scoring_itself(spec_engine):
    from engines.measure.bench import BenchRow
    from engines.measure.bench_quality import QualityColumns
    columns = QualityColumns(["bf16", "spec"], None, is_quality=True, is_random=False, say=lambda message: None)
    columns.prepare()  # bf16 is in the run, so its own row would build the reference; here that row failed
    row = BenchRow(engine="spec")
    columns.evaluate(spec_engine, row)
    assert row.quality_note == "n/a (bf16, the reference, did not run)"
    assert row.greedy_agreement is None and row.perplexity is None and columns.reference is None
