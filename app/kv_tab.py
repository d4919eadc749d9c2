"""The KV-cache calculator tab: bytes per token and per context for a model shape (MHA against its own
GQA/MQA layout, BF16 against FP8), tokens that fit in a memory, and a chart of KV size over context.
The arithmetic is engines/measure/kv_calc.py; this module is layout, one callback and one chart."""
from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go

from app.inputs import real_number, text_of, whole_number
from engines.measure.kv_calc import KV_DTYPE_BYTES, calculate, kv_bytes, to_markdown
from engines.models.catalog import default_model_name
from engines.models.shape import available_configs
from engines.models.sources import load_shape
from engines.protocol import GIB, EngineError

NUM_CHART_POINTS = 64
MAX_CONFIG_CHARS = 1_000            # a shape name, model name or path
MAX_MEMORY_GIB = 100_000.0
MAX_CONTEXT_TOKENS = 100_000_000


def calculate_kv(config_name, vram_gib, context_tokens) -> tuple[str, go.Figure | None]:
    """Markdown report and chart, or a readable error in place of the report. The inputs arrive as a
    client sent them (the events run unprocessed), so each is checked first."""
    try:
        config_name = text_of(config_name, "the model config", MAX_CONFIG_CHARS)
        vram_gib = real_number(vram_gib, "memory (GiB)", 0, MAX_MEMORY_GIB, is_low_open=True)
        context_tokens = whole_number(context_tokens, "context (tokens)", 1, MAX_CONTEXT_TOKENS)
        shape = load_shape(config_name)
        report = calculate(shape, vram_gib=vram_gib, context_tokens=context_tokens)
    except (EngineError, ValueError, TypeError, OSError) as error:
        return f"**Cannot calculate:** {error}", None
    return to_markdown(report), kv_chart(shape, context_tokens)


def kv_chart(shape, context_tokens: int) -> go.Figure:
    contexts = sorted({max(1, round(context_tokens * index / NUM_CHART_POINTS))
                       for index in range(NUM_CHART_POINTS + 1)})
    layouts = [("MHA", shape.num_attention_heads)]
    if shape.num_kv_heads != shape.num_attention_heads:
        layouts.append((shape.attention_layout, shape.num_kv_heads))
    figure = go.Figure()
    for layout, num_kv_heads in layouts:
        for dtype, dtype_bytes in KV_DTYPE_BYTES.items():
            sizes_gib = [kv_bytes(shape, tokens, dtype_bytes, num_kv_heads) / GIB for tokens in contexts]
            figure.add_scatter(x=contexts, y=sizes_gib,
                               name=f"{layout} ({num_kv_heads} KV heads), {dtype}", mode="lines")
    figure.update_layout(title=f"KV cache of one sequence: {shape.name}", xaxis_title="context (tokens)",
                         yaxis_title="GiB", height=380, margin={"t": 50, "b": 40})
    return figure


def build(config=None) -> None:
    """Create the tab's components inside the caller's Blocks/Tab context and wire the callback."""
    model_name = getattr(config, "model", None) or default_model_name()
    choices = available_configs() + [model_name]
    with gr.Row():
        config_name = gr.Dropdown(choices, value="llama-3-8b" if "llama-3-8b" in choices else choices[0],
                                  allow_custom_value=True, label="Model config",
                                  info="a shipped shape, the app's model, or a path to a config.json",
                                  elem_id="kv-config")
        vram_gib = gr.Number(80, label="Memory for KV (GiB)", minimum=0, maximum=MAX_MEMORY_GIB, elem_id="kv-vram-gib")
        context_tokens = gr.Number(8192, label="Context (tokens)", precision=0, minimum=1,
                                   maximum=MAX_CONTEXT_TOKENS, elem_id="kv-context")
        button = gr.Button("Calculate", variant="primary", scale=0, elem_id="kv-calculate")
    initial_report, initial_chart = calculate_kv(config_name.value, vram_gib.value, context_tokens.value)
    report = gr.Markdown(initial_report, elem_id="kv-report")
    chart = gr.Plot(initial_chart, label="KV size over context", elem_id="kv-chart")
    inputs, outputs = [config_name, vram_gib, context_tokens], [report, chart]
    # Unprocessed inputs: calculate_kv checks them, so an API client's bad value is a report line.
    button.click(calculate_kv, inputs, outputs, api_name="kv", preprocess=False)
    config_name.change(calculate_kv, inputs, outputs, api_visibility="private", preprocess=False)
