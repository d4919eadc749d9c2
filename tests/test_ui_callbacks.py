"""The playground's callbacks, driven as Gradio drives them, with real engines on the embedded model:
bf16 (the shared session engine) and spec (prompt lookup), streaming side by side into their panes.
The page is built (no server, no browser) so that the updates, `{component: value}` dicts, are read by
the names of the page's components.
"""
from __future__ import annotations

import csv
import json
import sys
import time
import types

import gradio as gr
import plotly.graph_objects as go
import pytest

from app import hosting
from app.callbacks import AppConfig, Playground
from app.export import summary_rows
from app.layout import build_app
from app.session import EnginePool, PaneChoice, build_choices
from app.text import unavailable_html
from engines.protocol import EngineError
from engines.registry import SPECS

PROMPT = "The capital of France is"
# A variant that cannot load on a CPU: its real load() raises, so its pane must show the reason.
BROKEN = PaneChoice("bf16-flash", "bf16", "BF16, flash attention", {"attn_implementation": "flash_attention_2"})
INTERLEAVE_TOKENS = 32


def built(playground: Playground) -> Playground:
    """The playground with its page built, as `python -m app` builds it (nothing is served)."""
    build_app(playground)
    return playground


@pytest.fixture
def playground(bf16_engine, spec_engine):
    pool = EnginePool(None, build_choices() + [BROKEN])
    pool.adopt("bf16", bf16_engine)
    pool.adopt("spec", spec_engine)
    return built(Playground(AppConfig(refresh_hz=5.0, chart_interval_s=0.5), pool))


def run_to_end(playground, keys, prompt=PROMPT, max_new_tokens=12, mode="parallel", temperature=0.0):
    """Consume the run generator as Gradio does; return every yielded update and the wall time."""
    start = time.perf_counter()
    outputs = list(playground.run(prompt, max_new_tokens, temperature, 0, mode, keys))
    return outputs, time.perf_counter() - start


def panes_of(playground, output):
    """(title, text, metrics html) of each pane in one yielded update; None where it is not updated."""
    page = playground.page
    return [(output.get(title), output.get(body), output.get(metrics))
            for title, body, metrics in zip(page.titles, page.texts, page.metrics)]


def record_of(playground, output):
    return output[playground.page.record]


def status_of(playground, output):
    return output[playground.page.status]


def test_picker_lists_every_registry_engine_and_greys_out_the_unavailable():
    choices = build_choices()
    assert {choice.key for choice in choices} >= set(SPECS)
    unavailable = [choice for choice in choices if not choice.is_available]
    listing = unavailable_html(choices)
    for choice in unavailable:
        assert f'data-engine="{choice.key}"' in listing and choice.reason
    for choice in choices:
        if choice.is_available:
            assert f'data-engine="{choice.key}"' not in listing


def test_picking_engines_shows_one_titled_pane_each_up_to_the_limit(playground):
    keys = [choice.key for choice in build_choices()][:7]
    page = playground.page
    update = playground.select(keys)
    note, columns, titles = update[page.status], [update[c] for c in page.columns], [update[t] for t in page.titles]
    assert [column["visible"] for column in columns] == [True] * 6
    assert "Only the first 6 engines" in note and "1 left out" in note
    assert all(f"`{key}`" in title for key, title in zip(keys, titles))
    update = playground.select(["spec"])
    assert update[page.status] == "" and [update[c]["visible"] for c in page.columns] == [True] + [False] * 5
    assert "Speculative" in update[page.titles[0]] and update[page.titles[1]] == ""


def test_parallel_run_streams_both_engines_into_their_own_panes(playground, bf16_engine):
    # Interleaving is seen in the page updates, so this run gives them room: at 20 Hz (the app's highest
    # rate) and 32 tokens, both engines stream for many updates even when a loaded machine runs them fast
    # or unevenly; 5 Hz and 12 tokens could fit the whole run into two or three updates.
    playground.config = AppConfig(refresh_hz=20.0, chart_interval_s=0.5)
    outputs, _ = run_to_end(playground, ["bf16", "spec"], max_new_tokens=INTERLEAVE_TOKENS)
    final = outputs[-1]
    record = record_of(playground, final)
    assert record.is_finished and [pane.status for pane in record.panes] == ["done", "done"]
    bf16_pane, spec_pane = record.panes
    # Speculative decoding is lossless under greedy decoding: the two panes carry the same text.
    assert bf16_pane.text.strip() and bf16_pane.text == spec_pane.text
    assert bf16_pane.stats.num_tokens == len(bf16_engine.last_token_ids) <= INTERLEAVE_TOKENS
    for pane in record.panes:
        assert pane.stats.decode_tok_s > 0 and pane.stats.ttft_s > 0
    assert spec_pane.stats.acceptance_rate is not None
    (_, bf16_text, bf16_metrics), (_, spec_text, spec_metrics) = panes_of(playground, final)[:2]
    assert bf16_text == bf16_pane.text and spec_text == spec_pane.text
    assert 'data-metric="decode_tok_s">n/a' not in bf16_metrics and 'data-metric="acceptance_rate"' in spec_metrics
    assert 'data-metric="acceptance_rate"' not in bf16_metrics
    # Parallel: at some update both engines were streaming at once, and text grew over several updates.
    assert any(all("streaming" in title for title, _, _ in panes_of(playground, output)[:2]) for output in outputs)
    assert len({panes_of(playground, output)[0][1] for output in outputs}) > 2
    charts = playground.page.charts
    tokens_chart, memory_chart, kv_chart = (final[charts[name]]
                                            for name in ("tokens_per_second", "memory", "kv_blocks"))
    assert isinstance(tokens_chart, go.Figure) and len(tokens_chart.data) == 2
    assert {trace.name for trace in memory_chart.data} == {"now", "peak"} and len(memory_chart.data[0].x) == 2
    assert not kv_chart.data  # no paged engine in this run; the chart says so instead of drawing zeros
    summary = final[playground.page.summary]
    assert [row[0] for row in summary] == ["bf16", "spec"] and summary[0][-1] == "n/a"
    # The race view: both panes on one clock; lossless speculation never parts from bf16's greedy tokens.
    assert bf16_pane.token_ids == spec_pane.token_ids and len(bf16_pane.token_ids) == bf16_pane.stats.num_tokens
    race = final[charts["race"]]
    assert [trace.name for trace in race.data if trace.mode == "lines" and trace.yaxis != "y2"] == \
        ["BF16 (transformers)", spec_pane.label]
    assert not [trace for trace in race.data if trace.mode == "markers"]
    assert final[playground.page.race] == f"- **{spec_pane.label}**: same tokens as bf16 so far (agreement 100%)"


def test_fair_mode_runs_one_engine_at_a_time(playground):
    outputs, _ = run_to_end(playground, ["bf16", "spec"], mode="fair", max_new_tokens=8)
    assert [pane.status for pane in record_of(playground, outputs[-1]).panes] == ["done", "done"]
    for output in outputs:
        titles = [title for title, _, _ in panes_of(playground, output)[:2]]
        assert sum("streaming" in title for title in titles) <= 1, titles
    bf16_stats, spec_stats = (pane.stats for pane in record_of(playground, outputs[-1]).panes)
    assert bf16_stats.decode_tok_s > 0 and spec_stats.decode_tok_s > 0


def test_updates_are_throttled_to_the_refresh_rate(playground):
    outputs, wall_s = run_to_end(playground, ["bf16"], max_new_tokens=16)
    pane = record_of(playground, outputs[-1]).panes[0]
    assert len(outputs) <= wall_s * playground.config.refresh_hz + 3, (len(outputs), wall_s)
    assert pane.stats.num_tokens == 16 or pane.stats.finish_reason == "eos"


@pytest.mark.parametrize("prompt, max_new_tokens, temperature, keys, expected", [
    ("   ", 8, 0.0, ["bf16"], "prompt is empty"),
    (PROMPT, 0, 0.0, ["bf16"], "max_new_tokens must be between 1"),
    (PROMPT, 2.5, 0.0, ["bf16"], "max new tokens must be a whole number"),
    (PROMPT, None, 0.0, ["bf16"], "max new tokens is empty"),
    (PROMPT, 8, float("nan"), ["bf16"], "temperature must be between 0"),
    (PROMPT, 8, -1.0, ["bf16"], "temperature must be between 0"),
    (PROMPT, 8, 0.0, [], "pick at least one engine"),
    (PROMPT, 8, 0.0, ["no-such-engine"], "unknown engine 'no-such-engine'"),
])
def test_bad_input_is_one_status_line_and_runs_nothing(playground, bf16_engine, prompt, max_new_tokens,
                                                       temperature, keys, expected):
    tokens_before = list(bf16_engine.last_token_ids)
    outputs = list(playground.run(prompt, max_new_tokens, temperature, 0, "parallel", keys))
    assert len(outputs) == 1 and expected in status_of(playground, outputs[0])
    assert list(outputs[0]) == [playground.page.status]  # nothing else on the page changes
    assert bf16_engine.last_token_ids == tokens_before


def test_an_engine_that_cannot_load_fails_in_its_own_pane_only(playground):
    outputs, _ = run_to_end(playground, ["bf16", BROKEN.key], max_new_tokens=6)
    good, broken = record_of(playground, outputs[-1]).panes
    assert good.status == "done" and good.text.strip()
    assert broken.status == "error" and "flash_attention_2" in broken.message and not broken.text
    assert "pane-error" in panes_of(playground, outputs[-1])[1][2]
    assert "Traceback" not in broken.message


def test_stop_cancels_every_engine_promptly(playground, bf16_engine, spec_engine):
    run = playground.run(PROMPT, 400, 0.0, 0, "parallel", ["bf16", "spec"])
    for output in run:
        if all(pane.text for pane in record_of(playground, output).panes):
            break
    stop_pressed = time.perf_counter()
    assert status_of(playground, playground.stop()) == "Stopping every engine…"
    final = list(run)[-1]
    stop_s = time.perf_counter() - stop_pressed
    for pane in record_of(playground, final).panes:
        assert pane.status == "stopped" and 0 < pane.stats.num_tokens < 400
    assert stop_s < 10, stop_s
    # The engines are free again: a new request is not refused as "busy".
    outputs, _ = run_to_end(playground, ["bf16", "spec"], max_new_tokens=4)
    assert [pane.status for pane in record_of(playground, outputs[-1]).panes] == ["done", "done"]


def test_closing_the_run_like_gradio_cancels_stops_the_engines(playground):
    run = playground.run(PROMPT, 400, 0.0, 0, "parallel", ["bf16"])
    record = None
    for output in run:
        record = record_of(playground, output)
        if record.panes[0].text:
            break
    run.close()  # what Gradio does to the event's iterator when Stop's `cancels=` fires
    after = playground.after_stop(record)
    pane = record_of(playground, after).panes[0]
    assert pane.status == "stopped" and pane.stats.num_tokens < 400
    assert "stopped" in status_of(playground, after)
    outputs, _ = run_to_end(playground, ["bf16"], max_new_tokens=3)
    assert record_of(playground, outputs[-1]).panes[0].status == "done"


def test_export_writes_json_csv_and_chart_images(playground, tmp_path):
    outputs, _ = run_to_end(playground, ["bf16", "spec"], max_new_tokens=6)
    record = record_of(playground, outputs[-1])
    playground.config = AppConfig(export_dir=str(tmp_path))
    exported = playground.export(record)
    files, note = exported[playground.page.export_files], exported[playground.page.export_note]
    assert files["visible"]
    by_name = {path.rsplit("/", 1)[-1]: path for path in files["value"]}
    data = json.loads(open(by_name["run.json"]).read())
    assert [engine["text"] for engine in data["engines"]] == [pane.text for pane in record.panes]
    assert data["engines"][0]["stats"]["samples"] and data["params"]["max_new_tokens"] == 6
    rows = list(csv.DictReader(open(by_name["run.csv"])))
    assert [row["engine"] for row in rows] == ["bf16", "spec"] and float(rows[0]["decode_tok_s"]) > 0
    images = [name for name in by_name if name.startswith("chart_")]
    assert len(images) == 3
    if any(name.endswith(".html") for name in images):  # kaleido found no browser: the page says so
        assert "PNG rendering failed" in note
    else:
        for name in images:
            assert open(by_name[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_quality_is_shown_against_bf16(playground):
    playground.config = AppConfig(quality_num_tokens=8, quality_max_prompts=2)
    outputs, _ = run_to_end(playground, ["bf16", "spec"], max_new_tokens=4)
    page = playground.page
    assert list(playground.quality(record_of(playground, outputs[-1]), False)) == [gr.skip()]
    final = list(playground.quality(record_of(playground, outputs[-1]), True))[-1]
    record, summary, note = final[page.record], final[page.summary], final[page.status]
    rows = summary_rows(record)
    # bf16 judged against its own reference agrees with itself on every token, and so does lossless spec.
    for row in rows:
        assert row["greedy_agreement"] == pytest.approx(1.0), row
    assert rows[0]["perplexity"] > 1 and rows[0]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert summary[0][-3] == "100.0" and "looks broken" not in note


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory: CUDA out of memory"),
    (ValueError("shapes (4,) and (5,) differ"), "ValueError: shapes (4,) and (5,) differ")])
def test_a_quality_failure_of_any_kind_replaces_the_computing_note(playground, spec_engine, monkeypatch, error, shown):
    # Running out of memory cannot be provoked on this CPU, so the real spec engine's perplexity raises what
    # torch would; everything else is the real quality pass.
    playground.config = AppConfig(quality_num_tokens=4, quality_max_prompts=1)
    outputs, _ = run_to_end(playground, ["bf16", "spec"], max_new_tokens=4)

    def failing_perplexity(text):
        raise error
    monkeypatch.setattr(spec_engine, "perplexity", failing_perplexity)
    steps = list(playground.quality(record_of(playground, outputs[-1]), True))
    assert status_of(playground, steps[0]).startswith("Computing quality")
    record, note = record_of(playground, steps[-1]), status_of(playground, steps[-1])
    assert note.startswith("Quality computed against bf16.") and f"not computed for spec: {shown}" in note, note
    assert record.panes[0].quality["greedy_agreement"] == pytest.approx(1.0) and record.panes[1].quality is None


def test_zero_gpu_wraps_the_generation_events_only_on_zero_gpu(monkeypatch):
    def event(prompt):
        yield prompt
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert hosting.on_zero_gpu(event) is event
    # ZeroGPU infrastructure cannot exist here, so `spaces` is a stand-in that records the wrapping.
    wrapped = []
    fake_spaces = types.ModuleType("spaces")
    fake_spaces.__spec__ = types.SimpleNamespace(name="spaces")
    fake_spaces.GPU = lambda duration: (lambda function: wrapped.append((function, duration)) or function)
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert hosting.on_zero_gpu(event) is event and wrapped == [(event, hosting.ZERO_GPU_DURATION_S)]


def test_load_shows_progress_per_engine_then_unload_forgets_it():
    # Its own pool and engine: unloading the shared session engines would starve other test files.
    pool = EnginePool(None, build_choices())
    playground = built(Playground(AppConfig(), pool))
    outputs = list(playground.load(["bf16-eager"]))
    titles = [panes_of(playground, output)[0][0] for output in outputs]
    notes = [panes_of(playground, output)[0][2] for output in outputs]
    assert any("loading" in title for title in titles) and "loaded" in titles[-1]
    assert any("bf16: loading" in note for note in notes), notes
    assert record_of(playground, outputs[-1]).panes[0].status == "ready" and pool.loaded_keys() == ["bf16-eager"]
    engine = pool.engine("bf16-eager")
    assert engine.options.attn_implementation == "eager" and engine.is_loaded
    unloaded = playground.unload()
    status, loaded = unloaded[playground.page.status], unloaded[playground.page.loaded]
    assert "bf16-eager" in status and "none" in loaded and pool.loaded_keys() == []
    assert not engine.is_loaded
    assert status_of(playground, playground.unload()) == "No engine was loaded."
    with pytest.raises(EngineError, match="unknown engine"):
        pool.choice("nope")


def test_the_app_does_not_slow_down_the_engine_it_measures(bf16_engine):
    """scripts/ui_overhead.py's measurement, short. The target is 0.97; two noisy shared cores need a
    looser bound here, and the script reports the real ratio."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "ui_overhead.py"
    spec = importlib.util.spec_from_file_location("ui_overhead", path)
    ui_overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui_overhead)
    result = ui_overhead.measure(bf16_engine, "bf16", "Once upon a time, in a small village by the sea,",
                                 max_new_tokens=24, repeats=3)
    print(result)
    assert min(result["app_tok_s"]) > 0 and min(result["standalone_tok_s"]) > 0
    # Medians 1.03 alone, 0.77-0.79 with this test running twice at once beside other suites (the app's
    # thread competes for the 2 cores): 0.75 had no margin there; 0.5 catches an app that halves the speed.
    assert result["ratio"] >= 0.5, result


# Chat mode, the model switcher and the memory plan -------------------------------------------------------
CHAT_MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_playground():
    """bf16 and bf16-eager on SmolLM2-135M-Instruct (its own pool: the session engines are on Gemma)."""
    from tests.conftest import loaded_engine
    with loaded_engine("bf16", model=CHAT_MODEL) as engine:
        pool = EnginePool(CHAT_MODEL, build_choices())
        pool.adopt("bf16", engine)
        yield built(Playground(AppConfig(refresh_hz=2.0, chart_interval_s=5.0), pool))


def chat_turn(playground, keys, message, histories, max_new_tokens=8, system=""):
    outputs = list(playground.run(message, max_new_tokens, 0.0, 0, "parallel", keys, "Chat", system, histories))
    return outputs[-1]


def test_chat_on_smollm2_answers_the_question_and_each_pane_keeps_its_own_history(chat_playground):
    page = chat_playground.page
    final = chat_turn(chat_playground, ["bf16"], QUESTION, {})
    pane = record_of(chat_playground, final).panes[0]
    assert pane.status == "done" and "Paris" in pane.text, pane.text
    assert CHAT_MODEL in final[page.titles[0]]           # the pane says which model it ran
    histories = final[page.histories]
    assert histories[CHAT_MODEL]["bf16"] == [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": pane.text}]
    # Turn two: a second pane joins with no history of its own; bf16's prompt carries its own first turn.
    # (bf16-eager is loaded by the run; 3 tokens keep it short.)
    second = chat_turn(chat_playground, ["bf16", "bf16-eager"], "And of Italy?", histories, max_new_tokens=3)
    bf16_pane, eager_pane = record_of(chat_playground, second).panes
    assert bf16_pane.status == eager_pane.status == "done"
    assert [m["content"] for m in bf16_pane.prompt.messages] == [QUESTION, pane.text, "And of Italy?"]
    assert [m["content"] for m in eager_pane.prompt.messages] == ["And of Italy?"]
    after = second[page.histories][CHAT_MODEL]
    assert len(after["bf16"]) == 4 and len(after["bf16-eager"]) == 2
    assert after["bf16"][3]["content"] == bf16_pane.text and after["bf16-eager"][1]["content"] == eager_pane.text
    cleared = chat_playground.clear_chat()
    assert cleared[page.histories] == {} and all(cleared[body] == "" for body in page.texts)


def test_a_model_without_a_chat_template_in_chat_mode_gets_a_message(playground, bf16_engine):
    tokens_before = list(bf16_engine.last_token_ids)
    outputs = list(playground.run(QUESTION, 4, 0.0, 0, "parallel", ["bf16"], "Chat", "", {}))
    assert len(outputs) == 1 and list(outputs[0]) == [playground.page.status]
    assert "chat template" in status_of(playground, outputs[0]), outputs[0]
    assert bf16_engine.last_token_ids == tokens_before   # no silent fallback to completion


def test_the_memory_plan_refuses_a_set_that_cannot_fit_before_loading():
    from engines.measure.memory_plan import plan
    created = []
    pool = EnginePool(None, build_choices(), engine_factory=lambda *args, **kwargs: created.append(args))
    # A simulated device: 4 GiB with 1.5 GiB free, 1 GiB of it kept as headroom.
    playground = built(Playground(AppConfig(), pool,
                                  planner=lambda labels, model: plan(labels, model, 4.0, 1.5, device="cpu")))
    outputs = list(playground.run(PROMPT, 4, 0.0, 0, "parallel", ["bf16", "bf16-eager"]))
    page = playground.page
    assert len(outputs) == 1 and "not loading" in outputs[0][page.status] and "GiB" in outputs[0][page.status]
    assert "Does not fit" in outputs[0][page.plan] and "bf16" in outputs[0][page.plan]
    assert created == [] and pool.loaded_keys() == []      # nothing was created, let alone loaded


def test_the_model_switcher_checks_the_name_and_unloads_the_old_model():
    unloaded = []

    class Stub:
        def unload(self):
            unloaded.append(True)
    pool = EnginePool(None, build_choices())
    pool.adopt("bf16", Stub())
    playground = built(Playground(AppConfig(), pool))
    page = playground.page
    bad = list(playground.switch_model("../etc"))
    assert len(bad) == 1 and "model must be one of" in bad[0][page.status]
    steps = list(playground.switch_model(CHAT_MODEL))
    assert "unloading" in steps[0][page.status] and unloaded == [True]
    assert pool.model == CHAT_MODEL and pool.loaded_keys() == [] and steps[-1][page.prompt_kind] == "Chat"
    assert CHAT_MODEL in steps[-1][page.model_info]


def test_a_pane_that_parts_from_bf16_is_marked_in_its_text_with_the_top2_margin(playground, bf16_engine):
    """A finished greedy record whose second pane's ids part from bf16's at token 3 (ids made from the real
    tokenizer, so the text offset is the engine's own decode): its text shows the mark there, and the
    race summary gives the position and the top-2 margin that the loaded engine computes at it (the chart's
    marker is tests/test_ui_tabs.py's, on panes with token timings)."""
    from app.charts import DIVERGENCE_MARK
    from app.streaming import PaneResult, RunRecord
    from engines.protocol import GenerationParams
    reference = bf16_engine.tokenizer(" Paris, the capital of France", add_special_tokens=False).input_ids
    other = reference[:3] + bf16_engine.tokenizer(" Lyon", add_special_tokens=False).input_ids
    panes = [PaneResult("bf16", "BF16 (transformers)", "done", bf16_engine.decode(reference), token_ids=reference),
             PaneResult("spec", "spec", "done", bf16_engine.decode(other), token_ids=other)]
    record = RunRecord("gemma-3-270m", PROMPT, GenerationParams(max_new_tokens=len(reference)), "parallel", panes,
                       is_finished=True)
    updates = playground.render(record, with_charts=True)
    page = playground.page
    shown = updates[page.texts[1]]
    assert shown == bf16_engine.decode(other[:3]) + DIVERGENCE_MARK + shown[len(bf16_engine.decode(other[:3])) + 3:]
    assert DIVERGENCE_MARK not in updates[page.texts[0]]
    summary = updates[page.race]
    assert "parts from bf16 at token 3" in summary and "top-2 margin there" in summary, summary
    assert record.margins["spec"].position == 3 and record.margins["spec"].margin >= 0


def test_accepted_drafts_are_shaded_token_by_token_and_match_the_counters(playground):
    """The spec pane, after a greedy run on a repetitive prompt, shows its text again with every accepted
    draft shaded: as many shaded tokens as its acceptance counter, one piece per generated token."""
    from tests.test_spec import REPETITIVE
    outputs = list(playground.run(REPETITIVE, 24, 0.0, 0, "parallel", ["spec"]))
    pane = record_of(playground, outputs[-1]).panes[0]
    assert pane.status == "done", pane.message
    assert len(pane.drafted) == pane.stats.num_tokens == len(pane.token_ids)
    assert sum(is_draft for _, is_draft in pane.drafted) == pane.stats.num_accepted_tokens > 0
    assert "".join(piece for piece, _ in pane.drafted) == pane.text
    metrics = outputs[-1][playground.page.metrics[0]]
    assert metrics.count('<span class="drafted">') == pane.stats.num_accepted_tokens
    assert f"{pane.stats.num_accepted_tokens} of {pane.stats.num_tokens} tokens were accepted drafts" in metrics


def test_each_pane_shows_its_live_roofline_fraction_from_the_engines_own_bytes(playground, bf16_engine):
    """Loading measures the device bandwidth once; a bf16 pane then shows decode tok/s over the batch-1
    ceiling for the bytes bf16 declares (2 per weight, 2 per KV element), a fraction in (0, 1]."""
    import re

    from engines.measure.roofline import decode_roofline
    from engines.models.sources import load_shape
    playground.pool.load("bf16")   # adopted engines are loaded already; this measures the bandwidth
    outputs, _ = run_to_end(playground, ["bf16"], max_new_tokens=8)
    pane = record_of(playground, outputs[-1]).panes[0]
    frac = playground.pool.roofline_frac("bf16", pane.stats)
    assert 0 < frac <= 1, frac
    precision = bf16_engine.precision()
    assert precision.linear_bytes_per_weight == 2 and precision.kv_bytes_per_element == 2
    bandwidth_gb_s = playground.pool.bandwidth_gb_s["cpu"]
    ceiling = decode_roofline(load_shape("gemma-3-270m"), precision, bandwidth_gb_s,
                              pane.stats.num_prompt_tokens + pane.stats.num_tokens // 2).roofline_tok_s
    assert frac == pytest.approx(pane.stats.decode_tok_s / ceiling)
    shown = re.search(r'data-metric="roofline_frac">(\d+) %', outputs[-1][playground.page.metrics[0]])
    assert shown and int(shown.group(1)) == round(100 * frac)


def test_a_fault_in_the_memory_planner_costs_the_run_nothing(bf16_engine):
    """A planner that raises (as the GGUF plan once did with an AttributeError) leaves a line in the plan
    box; the run itself goes on, with no traceback anywhere. bf16-eager is not loaded yet, so it is planned
    (its weights are the session bf16 engine's, shared)."""
    def broken_planner(labels, model):
        raise AttributeError("'GgufOptions' object has no attribute 'device'")
    pool = EnginePool(None, build_choices())
    playground = built(Playground(AppConfig(), pool, planner=broken_planner))
    try:
        outputs = list(playground.run(PROMPT, 4, 0.0, 0, "parallel", ["bf16-eager"]))
        assert record_of(playground, outputs[-1]).panes[0].status == "done"
        plans = [output[playground.page.plan] for output in outputs if playground.page.plan in output]
        assert plans and plans[0].startswith("The memory plan could not be made (AttributeError: 'GgufOptions'")
    finally:
        pool.unload_all()
