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


def constructed_pane(key: str, counts: list[int], step_s: float = 0.1):
    from app.streaming import PaneResult
    from engines.protocol import EngineStats, StatSample
    samples = [StatSample(t_s=step_s * (index + 1), num_tokens=count, decode_tok_s=0.0, memory_gib=None)
               for index, count in enumerate(counts)]
    stats = EngineStats(engine=key, num_tokens=counts[-1], total_s=samples[-1].t_s, samples=samples)
    return PaneResult(key, key.upper(), status="done", text="", stats=stats)


def test_race_view_marks_the_divergence_on_constructed_tokens():
    from app import charts
    reference, other = [5, 6, 7, 8, 9, 10], [5, 6, 7, 1, 9, 10]
    panes = [constructed_pane("bf16", [1, 2, 3, 4, 5, 6]), constructed_pane("fp8", [2, 4, 6])]
    decode = {"fp8": lambda ids: "".join(f"<{token}>" for token in ids)}
    reports = charts.divergences(panes, {"bf16": reference, "fp8": other}, decode=decode)
    assert list(reports) == ["fp8"]
    report = reports["fp8"]
    assert report.divergence_index == 3 and report.text_offset == len("<5><6><7>")
    assert report.running_agreement == [1.0, 1.0, 1.0, 0.75, 0.8, 5 / 6]
    figure = charts.race_figure(panes, reports)
    markers = [trace for trace in figure.data if trace.mode == "markers"]
    assert len(markers) == 1 and list(markers[0].customdata) == [3]
    # token 3 (the 4th) of fp8 arrived with its 2nd sample (4 tokens), at 0.2 s
    assert list(markers[0].x) == [pytest.approx(0.2)] and list(markers[0].y) == [4]
    agreement = [trace for trace in figure.data if trace.yaxis == "y2"]
    assert len(agreement) == 1 and list(agreement[0].y)[-1] == pytest.approx(5 / 6)
    text = "<5><6><7><1><9><10>"
    assert charts.mark_divergence(text, report) == "<5><6><7>" + charts.DIVERGENCE_MARK + "<1><9><10>"
    summary = charts.race_summary(panes, reports)
    assert "token 3" in summary and charts.DIVERGENCE_MARK in summary and "83%" in summary
    # fair mode: the second pane starts after the first one's total time, on the same clock
    fair = charts.race_figure(panes, reports, mode="fair")
    assert list([trace for trace in fair.data if trace.mode == "markers"][0].x) == [pytest.approx(0.8)]
    assert "greedy runs only" in charts.race_summary(panes, reports, is_greedy=False)


def test_load_tab_runs_levels_on_bf16_and_charts_them(bf16_engine, tmp_path):
    from app import load_tab
    pool = EnginePool(None, build_choices())
    pool.adopt("bf16", bf16_engine)
    outputs = list(load_tab.run_load_events(pool, "bf16", "1,2", "", "ttft_ms:60000", 2, 0, out_root=str(tmp_path)))
    status, report, figure, kv, files = outputs[-1]
    assert status.startswith("Done: 2 level(s)"), status
    assert "concurrency 1" in report and "concurrency 2" in report and "goodput" in report
    names = [trace.name for trace in figure.data]
    assert names == ["output tok/s", "TTFT p50", "TTFT p95", "goodput req/s", "peak KV used"]
    assert list(figure.data[0].x) == ["concurrency 1", "concurrency 2"] and all(y > 0 for y in figure.data[0].y)
    assert "no KV allocation" in kv  # transformers reports no blocks; vLLM engines get kv_compare's table
    data = json.loads(open(files[0]).read())
    assert len(data["levels"]) == 2 and set(MANIFEST_FIELDS) <= set(data["manifest"])


@pytest.mark.parametrize("field, value, shown", [
    ("levels", "1,x", "not a number"), ("levels", "0", "between 1 and"), ("rates", "-1", "positive"),
    ("goodput", "ttft:abc", "not a number"), ("goodput", "speed:5", "NAME:MILLISECONDS"),
    ("max_new_tokens", 0, "new tokens"), ("engine_key", "nope", "engine"), ("num_requests", -1, "requests"),
    ("levels", "", "at least one")])
def test_load_tab_answers_bad_input_with_a_status_line(field, value, shown):
    from app import load_tab

    class NoPool:
        choices = {key: choice for key, choice in ((c.key, c) for c in build_choices())}

        def load(self, *args, **kwargs):
            raise AssertionError("nothing may load on bad input")

    inputs = {"engine_key": "bf16", "levels": "1", "rates": "", "goodput": "", "max_new_tokens": 2,
              "num_requests": 0, field: value}
    outputs = list(load_tab.run_load_events(NoPool(), **inputs))
    assert len(outputs) == 1 and outputs[0][0].startswith("**Cannot run:**") and shown in outputs[0][0], outputs


@pytest.mark.slow
def test_survey_tab_runs_the_cheapest_survey_and_shows_its_report():
    from app import survey_tab
    outputs = list(survey_tab.run_survey_events(["bf16"], "2", False))
    status, markdown, *figures = outputs[-1]
    assert status == "Done.", status
    assert "Number formats" in markdown and "bf16" in markdown
    assert len(figures) == len(survey_tab.FIGURES) and figures[0] is not None


def test_survey_tab_answers_bad_input_with_a_status_line():
    from app import survey_tab
    for engines, tokens in ((["nope"], "2"), ([], "2"), (["bf16"], "x"), (["bf16"], "0")):
        outputs = list(survey_tab.run_survey_events(engines, tokens, False))
        assert len(outputs) == 1 and outputs[0][0].startswith("**Cannot run:**"), outputs
