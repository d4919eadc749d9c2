"""`python -m engines survey` (issue 19): number formats from torch.finfo, a row per engine in every
table, deciding numbers in every conclusion, the cloze score, and one small real run (bf16 + nf4)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from engines.measure.survey import SurveyConfig, run_survey
from engines.measure.survey_attention import sdpa_kernel_reason
from engines.measure.survey_cloze import cloze_items, score_cloze, score_continuations
from engines.measure.survey_conclusions import conclude
from engines.measure.survey_data import (
    SURVEY_LABEL,
    MemoryRow,
    QualityRow,
    ServingRow,
    SpeedRow,
    SurveyReport,
    kv_layouts,
    number_formats,
)
from engines.measure.survey_report import build_figures, to_markdown, write_outputs
from engines.models.sources import load_shape
from engines.protocol import EngineError

TABLES = ("quality", "speed", "memory")


def test_formats_match_torch_finfo():
    import torch
    rows = {row.name: row for row in number_formats()}
    assert list(rows) == ["FP32", "FP16", "BF16"]
    for row in rows.values():
        info = torch.finfo(getattr(torch, row.dtype))
        assert row.bits == info.bits
        assert row.eps == info.eps == 2.0 ** -row.fraction_bits
        assert row.max == info.max and row.min_normal == info.smallest_normal
        assert 1 + row.exponent_bits + row.fraction_bits == info.bits
        assert 10.0 ** -row.decimal_digits == pytest.approx(info.resolution)
        # The largest finite value follows from the exponent and fraction widths alone.
        assert row.max == (2 - 2.0 ** -row.fraction_bits) * 2.0 ** (2 ** (row.exponent_bits - 1) - 1)
    assert [(rows[name].exponent_bits, rows[name].fraction_bits) for name in rows] == [(8, 23), (5, 10), (8, 7)]


def test_kv_layouts_price_the_models_own_layout_and_the_other_two():
    gemma = {row.layout: row for row in kv_layouts(load_shape("gemma-3-270m"), 4096, 80)}
    assert {layout: row.num_kv_heads for layout, row in gemma.items()} == {"MHA": 4, "GQA": 2, "MQA": 1}
    assert [layout for layout, row in gemma.items() if row.is_model_own] == ["MQA"]
    llama = {row.layout: row for row in kv_layouts(load_shape("llama-3-8b"), 8192, 80)}
    assert llama["GQA"].is_model_own and llama["GQA"].num_kv_heads == 8
    assert llama["GQA"].kv_bytes_per_token == 2 * 8 * 128 * 2 * 32                   # 128 KiB
    assert llama["MHA"].kv_bytes_per_token == 4 * llama["GQA"].kv_bytes_per_token
    assert llama["MQA"].max_sequences_bf16 > llama["GQA"].max_sequences_bf16 > llama["MHA"].max_sequences_bf16
    weights = load_shape("llama-3-8b").num_params * 2
    assert llama["GQA"].kv_bytes_per_sequence == 8192 * 128 * 1024 == 1024 ** 3
    assert llama["GQA"].max_sequences_bf16 == int((80 * 1024 ** 3 - weights) // 1024 ** 3)


def test_cloze_items_are_bundled_four_way_items():
    items = cloze_items()
    assert len(items) == 20
    assert all(len(item.distractors) == 3 and item.answer.startswith(" ") for item in items)
    assert len({item.context for item in items}) == 20


def test_sdpa_kernel_check_names_gpu_only_kernels_on_cpu():
    for backend in ("efficient", "cudnn"):
        assert "GPU-only" in sdpa_kernel_reason(backend, "cpu", "bfloat16", 256)
    assert sdpa_kernel_reason("math", "cpu", "bfloat16", 256) is None
    assert sdpa_kernel_reason("auto", "cpu", "bfloat16", 256) is None


def test_config_checks_counts_and_names():
    with pytest.raises(EngineError, match="unknown attention"):
        SurveyConfig(attention=["sdpa-fast"]).resolved("cpu")
    with pytest.raises(EngineError, match="tokens"):
        SurveyConfig(tokens=[0]).resolved("cpu")
    with pytest.raises(EngineError, match="quality-tokens"):
        SurveyConfig(quality_tokens=64).resolved("cpu")
    cpu = SurveyConfig().resolved("cpu")
    assert cpu.tokens == [32, 64] and cpu.runs == 2 and cpu.attention[0] == "sdpa"
    assert cpu.kv_context == 2048 + 8192
    gpu = SurveyConfig().resolved("cuda")
    assert gpu.tokens == [2048, 8192] and gpu.runs == 10 and gpu.prompt_tokens == 2048
    with pytest.raises(EngineError, match="unknown engine"):
        SurveyConfig(engines=["bf16", "bf17"]).resolved("cpu")
    from engines.cli.survey import parse_counts
    assert parse_counts("2048, 8192", "--tokens") == [2048, 8192]
    for bad in ("", "0", "a,b"):
        with pytest.raises(EngineError):
            parse_counts(bad, "--tokens")


def test_cli_refuses_bad_arguments_before_loading_anything():
    from tests.test_cli import cli
    for args, words in ((["--tokens", "0"], "--tokens wants positive counts"),
                        (["--attention", "sdpa,fast"], "unknown attention fast"),
                        (["--engines", "bf16,nf5"], "unknown engine 'nf5'")):
        result = cli("survey", *args, timeout=120)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def synthetic_report(nf4_ppl_ratio: float = 1.04, nf4_speed: float = 5.0, nf4_peak: float = 1.1) -> SurveyReport:
    """A report as run_survey returns it, with made-up measurements for bf16 and nf4 and gptq-int4 unavailable."""
    shape = load_shape("gemma-3-270m")
    tokens = [32, 64]
    quality = [QualityRow("bf16", perplexity=8.7, perplexity_ratio=1.0, greedy_agreement=1.0, cloze_correct=17,
                          cloze_total=20, weight_footprint_gib=0.5, survey_mmlu=55.8),
               QualityRow("nf4", perplexity=8.7 * nf4_ppl_ratio, perplexity_ratio=nf4_ppl_ratio, greedy_agreement=0.4,
                          cloze_correct=16, cloze_total=20, weight_footprint_gib=0.3),
               QualityRow("gptq-int4", status="unavailable", reason="package not installed: gptqmodel",
                          survey_mmlu=55.1)]
    speed = []
    for engine, tok_s in (("bf16", 10.0), ("nf4", nf4_speed)):
        for attention in ("sdpa", "eager", "sdpa-efficient"):
            for n in tokens:
                ok = attention != "sdpa-efficient"
                speed.append(SpeedRow(engine, attention, n, status="ok" if ok else "unavailable",
                                      reason="" if ok else "SDPA efficient: a GPU-only kernel",
                                      decode_tok_s=tok_s if ok else None, num_tokens=n if ok else None,
                                      prompt_tokens=1))
    speed += [SpeedRow("gptq-int4", "sdpa", n, status="unavailable", reason="package not installed") for n in tokens]
    memory = [MemoryRow("bf16", encode_tokens=64, encode_peak_gib=1.3, generate_peak_gib={"32": 1.3, "64": 1.31},
                        weight_footprint_gib=0.5, memory_kind="rss", survey_gb={"encode_2048": 16.99}),
              MemoryRow("nf4", encode_tokens=64, encode_peak_gib=1.1,
                        generate_peak_gib={"32": nf4_peak, "64": nf4_peak},
                        weight_footprint_gib=0.3, memory_kind="rss"),
              MemoryRow("gptq-int4", status="unavailable", reason="package not installed")]
    serving = [ServingRow("baseline", "bf16", mode="completion", prompt_tokens=9, max_new_tokens=32, mean_tokens=32,
                          mean_tok_s=10.0, num_runs=2, survey_tok_s=40.12),
               ServingRow("nf4", "nf4", mode="completion", prompt_tokens=9, max_new_tokens=32, mean_tokens=32,
                          mean_tok_s=5.0, num_runs=2, survey_tok_s=27.51),
               ServingRow("vllm", "", status="skipped", reason="not among --vllm-engines", survey_tok_s=88.16),
               ServingRow("vllm-fp8_e5m2", "", status="skipped", reason="not among --vllm-engines", survey_tok_s=91.07)]
    bf16 = {"linear_bytes_per_weight": 2, "other_bytes_per_weight": 2, "kv_bytes_per_element": 2, "label": "bf16"}
    nf4 = {**bf16, "linear_bytes_per_weight": 0.5625, "label": "nf4"}
    settings = {"tokens": tokens, "prompt_tokens": 64, "runs": 2, "repeats": 1, "speed_prompt_tokens": 1,
                "serving_max_new_tokens": 32, "serving_mode": "completion", "serving_prompt_tokens": 9,
                "quality_tokens": 8, "quality_prompts": 4, "cloze_items": 20, "cloze_chance": 5.0}
    report = SurveyReport(
        model="gemma-3-270m", device="cpu", machine={"cpu": "x86_64", "platform": "Linux", "torch": "2", "date": "now"},
        settings=settings, notes=["gemma-3-270m has no chat template"], formats=number_formats(), quality=quality,
        speed=speed, memory=memory, serving=serving, kv=kv_layouts(shape, 128, 80), kv_context=128, kv_memory_gib=80,
        precisions={"bf16": bf16, "nf4": nf4}, bandwidth_gb_s=100.0, shape=asdict(shape))
    report.conclusions = conclude(report, load_shape("llama-3-8b"))
    return report


def assert_row_per_engine(report: SurveyReport, engines: list[str]) -> None:
    for table in TABLES:
        assert {row.engine for row in getattr(report, table)} == set(engines), table
    for engine in engines:
        assert {row.attention for row in report.speed if row.engine == engine} >= {"sdpa"} or \
            {row.attention for row in report.speed if row.engine == engine} == {"engine's own"}
    assert [row.row for row in report.serving][:4] == ["baseline", "nf4", "vllm", "vllm-fp8_e5m2"]
    markdown = to_markdown(report)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
        if heading in ("## 2.", "## 3.", "## 4."):
            assert all(f"| {engine} |" in section for engine in engines), heading
    assert SURVEY_LABEL in markdown


def assert_conclusions_have_numbers(report: SurveyReport) -> None:
    assert [item.claim for item in report.conclusions] == [
        "quantization barely moves quality", "quantized speed does not rise much", "quantized memory drops a lot"]
    for item in report.conclusions:
        assert item.survey_answer == "yes" and item.survey_numbers and item.rule
        assert item.answer in ("yes", "no"), (item.claim, item.reason)
        assert item.numbers and all(any(ch.isdigit() for ch in number) for number in item.numbers)
        if item.answer != item.survey_answer:
            assert item.reason


def test_every_table_has_a_row_per_engine_and_every_conclusion_its_numbers(tmp_path):
    report = synthetic_report()
    assert_row_per_engine(report, ["bf16", "nf4", "gptq-int4"])
    assert_conclusions_have_numbers(report)
    quality, speed, memory = report.conclusions
    assert quality.answer == "yes" and any("1.040x" in number for number in quality.numbers)
    # bf16 at 10 tok/s is far below the roofline of 100 GB/s over ~0.5 GB: launch-bound, and quantization is slower.
    assert speed.answer == "yes" and "launch-bound" in speed.note
    assert any("llama-3-8b" in number and "nf4" in number for number in speed.numbers)
    assert memory.answer == "no" and "0.84x" in " ".join(memory.numbers) and "bf16" in memory.reason
    paths = write_outputs(report, tmp_path)
    assert set(paths) == {"md", "html", "json"} and all(path.stat().st_size for path in paths.values())
    assert "<table>" in paths["html"].read_text() and "plotly" in paths["html"].read_text()
    again = SurveyReport.from_dict(json.loads(paths["json"].read_text()))
    assert to_markdown(again) == to_markdown(report)
    assert set(build_figures(report)) == {"quality", "speed", "memory", "serving", "kv"}


def test_conclusions_turn_on_their_rules():
    quality, speed, memory = synthetic_report(nf4_ppl_ratio=1.5, nf4_speed=20.0, nf4_peak=0.5).conclusions
    assert quality.answer == "no" and "nf4" in quality.reason
    assert speed.answer == "no" and "2.00x" in speed.reason
    assert memory.answer == "yes" and not memory.reason
    # A model whose perplexity is n/a (no BOS) is decided on the cloze score alone.
    report = synthetic_report()
    for row in report.quality:
        row.perplexity = row.perplexity_ratio = None
    report.quality[1].cloze_correct = 12
    quality = conclude(report, load_shape("llama-3-8b"))[0]
    assert quality.answer == "no" and any("cloze score alone" in number for number in quality.numbers)
    assert any("12/20 (-25 points)" in number for number in quality.numbers)


def test_a_precision_without_a_cloze_score_is_decided_on_its_perplexity():
    # gguf's row: perplexity from llama.cpp, no cloze score (score_cloze gives correct=None, total=20). The
    # default survey includes gguf, and this row once raised TypeError in the quality conclusion.
    report = synthetic_report()
    report.quality.append(QualityRow("gguf", perplexity=8.8, perplexity_ratio=8.8 / 8.7, greedy_agreement=0.7,
                                     cloze_correct=None, cloze_total=20, cloze_note="n/a: gguf has no in-process "
                                     "transformers model to score continuations with"))
    assert report.quality[-1].cloze_accuracy is None
    quality = conclude(report, load_shape("llama-3-8b"))[0]
    assert quality.answer == "yes"
    assert any(number.startswith("gguf: perplexity 8.80 (1.011x bf16)") and "cloze n/a" in number
               for number in quality.numbers), quality.numbers


@pytest.mark.slow
def test_cloze_scores_through_the_loaded_model(bf16_engine):
    options = [" Paris", " Berlin", " Madrid", " Rome"]
    scores = score_continuations(bf16_engine, "The capital of France is", options)
    assert len(scores) == 4 and all(math.isfinite(score) and score < 0 for score in scores)
    assert max(range(4), key=scores.__getitem__) == 0
    score = score_cloze(bf16_engine, cloze_items()[:4])
    assert score.total == 4 and score.correct >= 3


@pytest.mark.slow
def test_survey_runs_bf16_and_nf4(tmp_path):
    """The whole survey at a handful of tokens: a row per engine everywhere, the vLLM test's baseline and
    nf4 rows measured, kernels that cannot run here named, conclusions decided by numbers."""
    config = SurveyConfig(engines=["bf16", "nf4"], attention=["sdpa", "sdpa-efficient", "sdpa-math"], tokens=[4],
                          prompt_tokens=16, runs=1, vllm_engines=[], serving_max_new_tokens=4, quality_tokens=4,
                          quality_prompts=2, engine_options={"device": "cpu"})
    messages = []
    report = run_survey(config, progress=messages.append)
    assert_row_per_engine(report, ["bf16", "nf4"])
    assert all(row.status == "ok" for table in ("quality", "memory") for row in getattr(report, table))
    speed = {(row.engine, row.attention): row for row in report.speed}
    assert all(speed[engine, key].status == "ok" and speed[engine, key].decode_tok_s
               for engine in ("bf16", "nf4") for key in ("sdpa", "sdpa-math"))
    efficient = speed["bf16", "sdpa-efficient"]
    assert efficient.status == "unavailable" and "GPU-only" in efficient.reason
    assert all(row.status == "ok" and row.mean_tok_s for row in report.serving[:2])
    assert report.serving[0].mode == "completion"      # the embedded Gemma has no chat template
    assert {row.engine for row in report.quality if row.cloze_correct is not None} == {"bf16", "nf4"}
    assert report.quality[0].perplexity_ratio == pytest.approx(1.0)
    assert report.settings["tokens"] == [4] and "N = 4" in to_markdown(report)
    assert_conclusions_have_numbers(report)
    assert any("nf4" in message for message in messages)
    write_outputs(report, tmp_path)
    assert (tmp_path / "survey.md").read_text().startswith("# Survey: gemma-3-270m")
