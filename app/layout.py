"""The page: inputs and engine picker, one pane per engine, live charts, summary and export.

Components only, and the wiring of their events to app/callbacks.py. The components that events
write to are collected in a `PlaygroundPage`, handed to the Playground, whose callbacks return
`{component: value}` dicts keyed by it. Tabs beside the playground are added in `build_app`, one line
each. Engine events share one queue slot ("engines"), so a visitor's run, load or unload never overlaps
another's on the shared GPU; Stop is never queued behind them.

Every event runs with `preprocess=False`: its inputs are plain JSON values (text, numbers, lists of
names), so the callbacks receive exactly what the browser or an API client sent and check it
themselves (app/inputs.py), answering bad input with a status line rather than a Gradio error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app import bench_tab, charts, kv_tab, load_tab, survey_tab, text
from app.callbacks import (
    PROMPT_KINDS,
    RACE,
    SEED_LIMIT,
    SYSTEM_MAX_CHARS,
    TEMPERATURE_MAX,
    Playground,
    default_prompt_kind,
)
from app.hosting import on_zero_gpu
from app.session import model_choices
from app.streaming import MODES, PARALLEL
from engines.protocol import MAX_NEW_TOKENS_LIMIT

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STYLE_PATH = ASSETS / "style.css"
PANES_PER_ROW = 3
ENGINE_QUEUE = "engines"
SUMMARY_COLUMN_WIDTHS = ["10%", "8%", "6%", "7%", "8%", "8%", "10%", "8%", "8%", "10%", "8%", "9%"]


@dataclass(frozen=True)
class PlaygroundPage:
    """The playground's components that events write to, by name."""
    status: gr.Markdown
    record: gr.State
    loaded: gr.Markdown
    columns: list          # gr.Column per pane
    titles: list           # gr.Markdown per pane
    texts: list            # gr.Textbox per pane
    metrics: list          # gr.HTML per pane
    charts: dict           # gr.Plot by app/charts.run_figures name (tokens_per_second, memory, kv_blocks), and race
    race: gr.Markdown      # where each pane parts from bf16's greedy tokens, after the run
    summary: gr.Dataframe
    export_files: gr.File
    export_note: gr.Markdown
    histories: gr.State    # this browser session's chat turns: {model: {pane key: messages}}
    model_info: gr.Markdown
    prompt_kind: gr.Radio
    plan: gr.Markdown      # the memory plan of the engines about to load
    preload_timer: gr.Timer

    @property
    def run_outputs(self) -> list:
        """What run, load and after_stop may update."""
        return [self.status, self.record, self.loaded, *self.titles, *self.texts, *self.metrics,
                *self.charts.values(), self.race, self.summary, self.histories, self.plan]

    @property
    def select_outputs(self) -> list:
        return [self.status, *self.columns, *self.titles]


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
            with gr.Tab("Benchmark", id="bench"):
                bench_tab.build(config, concurrency_id=ENGINE_QUEUE)
            with gr.Tab("KV calculator", id="kv"):
                kv_tab.build(config)
            with gr.Tab("Load", id="load"):
                load_tab.build(playground, concurrency_id=ENGINE_QUEUE)
            with gr.Tab("Survey", id="survey"):
                survey_tab.build(config, concurrency_id=ENGINE_QUEUE)
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
        model_picker = gr.Dropdown(model_choices(config.model or pool.model), value=pool.model_name, label="Model",
                                   scale=0, min_width=240, elem_id="model-picker")
        model_info = gr.Markdown(text.model_summary(pool.model), elem_id="model-in-use")
        loaded = gr.Markdown(text.loaded_summary(pool.loaded_keys()), elem_id="loaded-engines")
        load_button = gr.Button("Load chosen engines", size="sm", scale=0, elem_id="load")
        unload_button = gr.Button("Unload all", size="sm", scale=0, elem_id="unload")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Type a prompt, or pick a sample below",
                                elem_id="prompt")
            gr.Examples([[p] for p in sample_prompts()], inputs=[prompt], label="Sample prompts")
            with gr.Row():
                prompt_kind = gr.Radio(list(PROMPT_KINDS), value=default_prompt_kind(pool.model_name), label="Prompt",
                                       info=text.PROMPT_KIND_HELP, min_width=200, elem_id="prompt-kind")
                system = gr.Textbox(label="System (chat mode)", lines=1, max_length=SYSTEM_MAX_CHARS,
                                    placeholder="optional system message", elem_id="system")
                clear_button = gr.Button("Clear chat", size="sm", scale=0, min_width=110, elem_id="clear-chat")
            with gr.Row():
                max_new_tokens = gr.Number(64, label="Max new tokens", precision=0, minimum=1,
                                           maximum=MAX_NEW_TOKENS_LIMIT, min_width=120, elem_id="max-new-tokens")
                temperature = gr.Slider(0.0, TEMPERATURE_MAX, value=0.0, step=0.05, label="Temperature",
                                        info=text.TEMPERATURE_HELP, min_width=200, elem_id="temperature")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=SEED_LIMIT - 1, min_width=100,
                                 elem_id="seed")
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
    with gr.Accordion("Memory plan (before loading)", open=False, elem_id="memory-plan-box"):
        plan = gr.Markdown("", elem_id="memory-plan")
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
        plots = {name: gr.Plot(figure, label=label, show_label=False, elem_id=f"chart-{element}")
                 for (name, figure), (element, label) in zip(charts.run_figures([]).items(),
                                                             (("tokens", "tokens/s"), ("memory", "memory"),
                                                              ("kv", "KV blocks")))}
    with gr.Row(elem_id="race-row"):
        plots[RACE] = gr.Plot(charts.race_figure([]), label="race", show_label=False, elem_id="chart-race")
        race = gr.Markdown("", elem_id="race-summary")
    summary = gr.Dataframe(headers=text.SUMMARY_HEADERS, label="Summary (after the run)", interactive=False,
                           wrap=True, column_widths=SUMMARY_COLUMN_WIDTHS, elem_id="summary")
    with gr.Row(elem_id="export-row"):
        export_button = gr.Button("Export run (JSON, CSV, chart images)", scale=0, min_width=260, elem_id="export")
        export_note = gr.Markdown("", elem_id="export-note")
    export_files = gr.File(label="Exported files", file_count="multiple", interactive=False, visible=False,
                           elem_id="export-files")
    page = PlaygroundPage(status=status, record=gr.State(None), loaded=loaded, columns=columns, titles=titles,
                          texts=texts, metrics=metrics, charts=plots, race=race, summary=summary,
                          export_files=export_files, export_note=export_note, histories=gr.State({}),
                          model_info=model_info, prompt_kind=prompt_kind, plan=plan, preload_timer=gr.Timer(1.0))
    playground.attach(page)

    # Unchecked inputs on every event (see the module docstring); engine events share one queue slot.
    unchecked = {"preprocess": False}
    engine_event = {**unchecked, "concurrency_id": ENGINE_QUEUE}
    picker.change(playground.select, [picker], page.select_outputs, queue=False, api_name="select", **unchecked)
    demo.load(playground.select, [picker], page.select_outputs, queue=False, api_visibility="private", **unchecked)
    load_event = load_button.click(on_zero_gpu(playground.load), [picker], page.run_outputs, api_name="load",
                                   **engine_event)
    run_event = run_button.click(on_zero_gpu(playground.run),
                                 [prompt, max_new_tokens, temperature, seed, mode, picker, prompt_kind, system,
                                  page.histories], page.run_outputs,
                                 api_name="run", **engine_event)
    run_event.then(on_zero_gpu(playground.quality), [page.record, compute_quality],
                   [page.record, page.summary, page.status], show_progress="hidden", api_name="quality",
                   **engine_event)
    stop_button.click(playground.stop, None, [page.status], cancels=[run_event, load_event], queue=False,
                      api_name="stop") \
        .then(playground.after_stop, [page.record], page.run_outputs, queue=False, api_visibility="private",
              **unchecked)
    unload_button.click(playground.unload, None, [page.status, page.loaded], api_name="unload",
                        concurrency_id=ENGINE_QUEUE)
    clear_button.click(playground.clear_chat, None, [page.histories, page.status, *page.texts], queue=False,
                       api_name="clear_chat")
    model_picker.change(playground.switch_model, [model_picker],
                        [page.status, page.model_info, page.loaded, page.prompt_kind, page.plan],
                        api_name="switch_model", **engine_event)
    page.preload_timer.tick(playground.preload_progress, None, [page.loaded, page.preload_timer], queue=False,
                            api_visibility="private", show_progress="hidden")
    export_button.click(playground.export, [page.record], [export_files, export_note], api_name="export",
                        **unchecked)
