"""The benchmark tab: run engines.measure.bench on the chosen engines and show its table, plots and files.

The bench creates, measures and unloads its own engines one at a time in this process; the run streams
its progress lines, then the markdown table, the four plotly charts and the written files. On a small
GPU, unload the playground's engines first: their memory is not the bench's to free.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from app.background import follow_job
from app.hosting import on_zero_gpu
from app.inputs import flag, names, one_of, whole_number
from engines.measure.bench import BenchConfig, run_bench
from engines.measure.report import build_figures, to_markdown, write_outputs
from engines.models.shape import available_configs
from engines.protocol import MAX_NEW_TOKENS_LIMIT, EngineError
from engines.registry import SPECS, list_engines

REAL_WEIGHTS = "the app's model (real weights)"
MIN_PROMPT_TOKENS = 2          # run_bench's own floor
MAX_PROMPT_TOKENS = 32_768     # the embedded model's context
MAX_REPEATS = 20


def run_bench_events(engines, max_new_tokens, prompt_tokens, repeats, dummy_choice, is_quality,
                     model: str | None = None, out_root: str | None = None):
    """Generator for Gradio: yields (status, table, speed, memory, roofline, quality, files) as the run goes.
    Every input is checked first (the tab's event passes what a client sends, unprocessed)."""
    empty = (None, None, None, None, None)
    try:
        config = bench_config(engines, max_new_tokens, prompt_tokens, repeats, dummy_choice, is_quality, model)
    except EngineError as error:
        yield (f"**Cannot run:** {error}", "", *empty)
        return
    def work(say):
        result = run_bench(config, progress=say)
        return result, write_outputs(result, Path(tempfile.mkdtemp(prefix="bench-", dir=out_root)))

    outcome = yield from follow_job(work, "bench-tab", lambda status: (status, "", *empty))
    if outcome.error is not None:
        yield (f"**Bench failed:** {outcome.error}", "", *empty)
        return
    result, paths = outcome.value
    figures = build_figures(result)
    num_ok = sum(row.status == "ok" for row in result.rows)
    files = [str(paths[key]) for key in ("md", "csv", "json", "html")]
    yield (f"Done: {num_ok} of {len(result.rows)} engines measured.", to_markdown(result),
           figures["speed"], figures["memory"], figures["roofline"], figures["quality"], files)


def bench_config(engines, max_new_tokens, prompt_tokens, repeats, dummy_choice, is_quality,
                 model: str | None = None) -> BenchConfig:
    """The tab's inputs as a BenchConfig, or EngineError naming the bad one. Engines must be registry
    names (unavailable ones are allowed: the bench reports them as such); an empty list is the bench's own
    message. The numbers are the widgets' ranges."""
    engine_names = names(engines, "engines")
    unknown = [name for name in engine_names if name not in SPECS]
    if unknown:
        raise EngineError(f"unknown engine '{unknown[0]}'. Known engines: {', '.join(SPECS)}")
    dummy = None if dummy_choice in (None, "", REAL_WEIGHTS) else one_of(
        dummy_choice, "weights", [REAL_WEIGHTS] + available_configs())
    return BenchConfig(engines=engine_names,
                       max_new_tokens=whole_number(max_new_tokens, "new tokens N", 1, MAX_NEW_TOKENS_LIMIT),
                       prompt_tokens=whole_number(prompt_tokens, "prompt tokens P", MIN_PROMPT_TOKENS,
                                                  MAX_PROMPT_TOKENS),
                       num_repeats=whole_number(repeats, "repeats", 1, MAX_REPEATS), model=model,
                       dummy_config=dummy, is_quality=flag(is_quality, "quality against bf16"))


def build(config=None, concurrency_id: str = "engines") -> None:
    """Create the tab's components inside the caller's Blocks/Tab context and wire the run. The run shares
    the playground's engine queue slot, so it never overlaps a visitor's engines on the GPU."""
    model = getattr(config, "model", None)
    out_root = getattr(config, "export_dir", None)
    rows = list_engines()
    available = [row["name"] for row in rows if row["is_available"]]
    with gr.Row():
        engines = gr.CheckboxGroup([(row["name"] if row["is_available"] else f"{row['name']} (unavailable)",
                                     row["name"]) for row in rows],
                                   value=available[:1], label="Engines (run one after another)",
                                   elem_id="bench-engines")
    with gr.Row():
        max_new_tokens = gr.Number(64, label="New tokens N", precision=0, minimum=1, maximum=MAX_NEW_TOKENS_LIMIT,
                                   elem_id="bench-max-new-tokens")
        prompt_tokens = gr.Number(256, label="Prompt tokens P (encode memory)", precision=0,
                                  minimum=MIN_PROMPT_TOKENS, maximum=MAX_PROMPT_TOKENS, elem_id="bench-prompt-tokens")
        repeats = gr.Number(1, label="Repeats (median)", precision=0, minimum=1, maximum=MAX_REPEATS,
                            elem_id="bench-repeats")
        dummy = gr.Dropdown([REAL_WEIGHTS] + available_configs(), value=REAL_WEIGHTS, label="Weights",
                            info="or random weights of a real architecture shape", elem_id="bench-weights")
        is_quality = gr.Checkbox(True, label="Quality against bf16", elem_id="bench-quality")
    button = gr.Button("Run benchmark", variant="primary", elem_id="bench-run")
    status = gr.Markdown(elem_id="bench-status")
    table = gr.Markdown(elem_id="bench-table")
    with gr.Row():
        speed, memory = gr.Plot(label="Speed", elem_id="bench-speed"), gr.Plot(label="Memory", elem_id="bench-memory")
    with gr.Row():
        roofline = gr.Plot(label="Roofline", elem_id="bench-roofline")
        quality = gr.Plot(label="Quality", elem_id="bench-quality-plot")
    files = gr.File(label="Results", file_count="multiple", elem_id="bench-files")

    def run(engine_names, new_tokens, prompt_length, num_repeats, weights, with_quality):
        yield from run_bench_events(engine_names, new_tokens, prompt_length, num_repeats, weights, with_quality,
                                    model=model, out_root=out_root)

    button.click(on_zero_gpu(run), [engines, max_new_tokens, prompt_tokens, repeats, dummy, is_quality],
                 [status, table, speed, memory, roofline, quality, files], concurrency_id=concurrency_id,
                 api_name="bench", preprocess=False)  # inputs checked in bench_config
