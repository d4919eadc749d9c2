"""The page: inputs and engine picker, one pane per engine, live charts, summary and export.

Components only, and the wiring of their events to app/callbacks.py. Tabs beside the playground are
added in `build_app`, one line each. Engine events share one queue slot ("engines"), so a visitor's
run, load or unload never overlaps another's on the shared GPU; Stop is never queued behind them.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import bench_tab, charts, kv_tab, text
from app.callbacks import Playground
from app.hosting import on_zero_gpu
from app.streaming import MODES, PARALLEL

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STYLE_PATH = ASSETS / "style.css"
PANES_PER_ROW = 3
ENGINE_QUEUE = "engines"
SUMMARY_COLUMN_WIDTHS = ["10%", "8%", "6%", "7%", "8%", "8%", "10%", "8%", "8%", "10%", "8%", "9%"]


def sample_prompts() -> list[str]:
    lines = (ASSETS / "prompts.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_app(playground: Playground) -> gr.Blocks:
    config = playground.config
    with gr.Blocks(title=text.TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {text.TITLE}\n{text.INTRO}", elem_id="intro")
        with gr.Tabs():
            with gr.Tab("Playground", id="playground"):
                _build_playground(demo, playground)
            with gr.Tab("Benchmark", id="bench"): bench_tab.build(config, concurrency_id=ENGINE_QUEUE)
            with gr.Tab("KV calculator", id="kv"): kv_tab.build(config)
        demo.unload(playground.on_tab_closed)
    demo.queue(default_concurrency_limit=1, max_size=config.max_queue)
    return demo


def launch_options(playground: Playground) -> dict:
    config = playground.config
    return {"server_name": config.host, "server_port": config.port, "css_paths": [STYLE_PATH],
            "show_error": False, "allowed_paths": [config.export_dir] if config.export_dir else None}


def _build_playground(demo: gr.Blocks, playground: Playground) -> None:
    config, pool = playground.config, playground.pool
    available = [choice for choice in pool.choices.values() if choice.is_available]
    with gr.Row(elem_id="model-row"):
        gr.Markdown(text.model_summary(pool.model), elem_id="model-in-use")
        loaded = gr.Markdown(text.loaded_summary(pool.loaded_keys()), elem_id="loaded-engines")
        load_button = gr.Button("Load chosen engines", size="sm", scale=0, elem_id="load")
        unload_button = gr.Button("Unload all", size="sm", scale=0, elem_id="unload")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Type a prompt, or pick a sample below",
                                elem_id="prompt")
            gr.Examples([[p] for p in sample_prompts()], inputs=[prompt], label="Sample prompts")
            with gr.Row():
                max_new_tokens = gr.Number(64, label="Max new tokens", precision=0, min_width=120,
                                           elem_id="max-new-tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                        info=text.TEMPERATURE_HELP, min_width=200, elem_id="temperature")
                seed = gr.Number(0, label="Seed", precision=0, min_width=100, elem_id="seed")
            with gr.Row():
                mode = gr.Radio(list(MODES), value=PARALLEL, label="Mode", info=text.MODE_HELP, elem_id="mode")
                compute_quality = gr.Checkbox(False, label="Compute quality after the run (greedy agreement and "
                                                           "perplexity against bf16; loads bf16)",
                                              elem_id="compute-quality")
        with gr.Column(scale=2):
            picker = gr.CheckboxGroup([(f"{choice.label} · {choice.key}", choice.key) for choice in available],
                                      value=[available[0].key] if available else [], label="Engines (one pane each)",
                                      elem_id="engine-picker")
            gr.HTML(text.unavailable_html(pool.choices.values()), elem_id="unavailable-engines")
    with gr.Row(elem_id="actions"):
        run_button = gr.Button("Run", variant="primary", scale=0, min_width=140, elem_id="run")
        stop_button = gr.Button("Stop", variant="stop", scale=0, min_width=140, elem_id="stop")
        status = gr.Markdown("", elem_id="run-status")
    columns, titles, texts, metrics = [], [], [], []
    for row_start in range(0, config.max_panes, PANES_PER_ROW):
        with gr.Row(equal_height=True, elem_classes="pane-row"):
            for index in range(row_start, min(row_start + PANES_PER_ROW, config.max_panes)):
                with gr.Column(visible=False, min_width=300, elem_classes="pane", elem_id=f"pane-{index}") as column:
                    titles.append(gr.Markdown("", elem_id=f"pane-{index}-title"))
                    texts.append(gr.Textbox(label="Output", lines=8, max_lines=14, interactive=False,
                                            autoscroll=True, elem_id=f"pane-{index}-text"))
                    metrics.append(gr.HTML(text.pane_metrics_html(None), elem_id=f"pane-{index}-metrics"))
                columns.append(column)
    with gr.Row(elem_id="charts"):
        plots = [gr.Plot(figure, label=label, show_label=False, elem_id=f"chart-{name}")
                 for figure, (name, label) in zip(charts.run_figures([]).values(),
                                                  (("tokens", "tokens/s"), ("memory", "memory"), ("kv", "KV blocks")))]
    summary = gr.Dataframe(headers=text.SUMMARY_HEADERS, label="Summary (after the run)", interactive=False,
                           wrap=True, column_widths=SUMMARY_COLUMN_WIDTHS, elem_id="summary")
    with gr.Row(elem_id="export-row"):
        export_button = gr.Button("Export run (JSON, CSV, chart images)", scale=0, min_width=260, elem_id="export")
        export_note = gr.Markdown("", elem_id="export-note")
    export_files = gr.File(label="Exported files", file_count="multiple", interactive=False, visible=False,
                           elem_id="export-files")
    record = gr.State(None)

    run_outputs = [status, record, loaded, *titles, *texts, *metrics, *plots, summary]
    picker.change(playground.select, [picker], [status, *columns, *titles], queue=False)
    demo.load(playground.select, [picker], [status, *columns, *titles], queue=False)
    load_event = load_button.click(on_zero_gpu(playground.load), [picker], run_outputs,
                                   concurrency_id=ENGINE_QUEUE)
    run_event = run_button.click(on_zero_gpu(playground.run),
                                 [prompt, max_new_tokens, temperature, seed, mode, picker], run_outputs,
                                 concurrency_id=ENGINE_QUEUE)
    run_event.then(on_zero_gpu(playground.quality), [record, compute_quality], [record, summary, status],
                   concurrency_id=ENGINE_QUEUE, show_progress="hidden")
    stop_button.click(playground.stop, None, [status], cancels=[run_event, load_event], queue=False) \
        .then(playground.after_stop, [record], run_outputs, queue=False)
    unload_button.click(playground.unload, None, [status, loaded], concurrency_id=ENGINE_QUEUE)
    export_button.click(playground.export, [record], [export_files, export_note])
