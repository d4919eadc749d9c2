"""The Survey tab: engines.measure.survey.run_survey for the app's model on this machine, with small
CPU defaults, shown as the report's markdown and its plotly figures (engines/measure/survey_report.py)."""
from __future__ import annotations

import gradio as gr

from app.background import follow_job
from app.hosting import on_zero_gpu
from app.inputs import names, whole_number
from engines.measure.survey import PRECISIONS, SurveyConfig, run_survey
from engines.measure.survey_report import build_figures, to_markdown
from engines.protocol import EngineError
from engines.registry import SPECS

MAX_TOKENS = 8192
FIGURES = ("quality", "speed", "memory", "serving", "kv")


def survey_config(engines, tokens, with_vllm, model: str | None = None) -> SurveyConfig:
    """The tab's inputs as a small SurveyConfig (CPU-sized counts), or EngineError naming the bad one."""
    engine_names = names(engines, "precisions")
    unknown = [name for name in engine_names if name not in SPECS]
    if unknown or not engine_names:
        raise EngineError(f"pick precisions from {', '.join(PRECISIONS)}" + (f"; unknown '{unknown[0]}'" if unknown
                                                                           else ""))
    try:
        counts = [int(part) for part in str(tokens or "").replace(" ", ",").split(",") if part]
    except ValueError:
        raise EngineError(f"new tokens must be whole numbers separated by commas, got '{tokens}'") from None
    counts = [whole_number(count, "new tokens", 1, MAX_TOKENS) for count in counts]
    if not counts:
        raise EngineError("give at least one count of new tokens")
    return SurveyConfig(model=model, engines=engine_names, tokens=counts, attention=["sdpa"], prompt_tokens=16,
                        runs=1, quality_tokens=4, quality_prompts=1, is_cloze=False, serving_max_new_tokens=8,
                        vllm_engines=None if with_vllm else [])


def run_survey_events(engines, tokens, with_vllm, model: str | None = None, config: SurveyConfig | None = None):
    """Generator for Gradio: yields (status, markdown, figures...) as the survey goes."""
    empty = (None,) * len(FIGURES)
    try:
        config = config or survey_config(engines, tokens, bool(with_vllm), model)
    except EngineError as error:
        yield (f"**Cannot run:** {error}", "", *empty)
        return
    outcome = yield from follow_job(lambda say: run_survey(config, say), "survey-tab",
                                    lambda status: (status, "", *empty))
    if outcome.error is not None:
        yield (f"**Survey failed:** {outcome.error}", "", *empty)
        return
    figures = build_figures(outcome.value)
    yield ("Done.", to_markdown(outcome.value), *(figures.get(name) for name in FIGURES))


def build(config=None, concurrency_id: str = "engines") -> None:
    model = getattr(config, "model", None)
    available = [name for name in PRECISIONS if name in SPECS]
    with gr.Row():
        engines = gr.CheckboxGroup(available, value=available[:1], label="Precisions", elem_id="survey-engines")
        tokens = gr.Textbox("16", label="New tokens per speed run", info="comma-separated; small on CPU",
                            elem_id="survey-tokens")
        with_vllm = gr.Checkbox(False, label="The survey's vLLM test (loads vLLM)", elem_id="survey-vllm")
        button = gr.Button("Run survey", variant="primary", scale=0, elem_id="survey-run")
    status = gr.Markdown(elem_id="survey-status")
    report = gr.Markdown(elem_id="survey-report")
    plots = [gr.Plot(label=name, elem_id=f"survey-{name}") for name in FIGURES]

    def run(engine_names, token_text, vllm):
        yield from run_survey_events(engine_names, token_text, vllm, model=model)

    button.click(on_zero_gpu(run), [engines, tokens, with_vllm], [status, report, *plots],
                 concurrency_id=concurrency_id, api_name="survey", preprocess=False)
