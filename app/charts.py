"""Plotly figures of a run: tokens/s over time, memory per engine, KV-cache blocks over time.

Each figure is built from the panes' EngineStats (their `samples` time series), so a live chart and
the exported image are the same function of the same data. Time counts from each request's submit:
in fair mode the engines run one after another, and each line still starts at 0. Figures are built
as plain dicts and wrapped without plotly's property validation, which costs ~100 ms per figure of
the process's GIL, time the engines' own threads need while they generate.
"""
from __future__ import annotations

import plotly.graph_objects as go

from app.streaming import PaneResult
from app.text import memory_label

COLORS = ("#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777")
CHART_HEIGHT_PX = 300
GRID = {"gridcolor": "#e5e7eb", "zerolinecolor": "#d1d5db", "linecolor": "#9ca3af"}
# A token count over a window this long, so a slow engine draws a rate rather than 0/1/2 steps.
RATE_WINDOW_S = 2.0


def _figure(title: str, x_title: str, y_title: str, traces: list[dict], note: str = "", **layout) -> go.Figure:
    annotations = [{"text": note, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
                    "font": {"color": "#6b7280", "size": 13}}] if note and not traces else []
    figure = {"data": traces, "layout": {
        "title": {"text": title, "x": 0.01}, "height": CHART_HEIGHT_PX, "paper_bgcolor": "white",
        "plot_bgcolor": "white", "font": {"color": "#1f2937"}, "margin": {"l": 55, "r": 15, "t": 45, "b": 45},
        "xaxis": {"title": {"text": x_title}, "visible": bool(traces), **GRID},
        "yaxis": {"title": {"text": y_title}, "visible": bool(traces), "rangemode": "tozero", **GRID},
        "legend": {"orientation": "h", "y": -0.25}, "uirevision": "keep", "annotations": annotations, **layout}}
    return go.Figure(figure, _validate=False)


def _color(index: int) -> dict:
    return {"color": COLORS[index % len(COLORS)]}


def _measured(panes: list[PaneResult]) -> list[tuple[int, PaneResult]]:
    return [(index, pane) for index, pane in enumerate(panes) if pane.stats is not None and pane.stats.samples]


def rolling_rate(samples) -> list[float]:
    """Tokens per second over the RATE_WINDOW_S before each sample, from the cumulative token counts."""
    rates, start = [], 0
    for sample in samples:
        while samples[start].t_s < sample.t_s - RATE_WINDOW_S:
            start += 1
        tokens_before = samples[start - 1].num_tokens if start else 0
        rates.append((sample.num_tokens - tokens_before) / RATE_WINDOW_S)
    return rates


def tokens_per_second_figure(panes: list[PaneResult]) -> go.Figure:
    traces = [{"type": "scatter", "mode": "lines", "name": pane.label, "line": _color(index),
               "x": [sample.t_s for sample in pane.stats.samples], "y": rolling_rate(pane.stats.samples)}
              for index, pane in _measured(panes)]
    return _figure(f"Decode speed ({RATE_WINDOW_S:g} s rolling window)", "seconds since submit", "tokens/s",
                   traces, note="no tokens yet: press Run")


def memory_figure(panes: list[PaneResult]) -> go.Figure:
    measured = [pane for pane in panes if pane.stats is not None and pane.stats.memory_gb is not None]
    kinds = sorted({memory_label(pane.stats.memory_kind) for pane in measured})
    traces = [{"type": "bar", "name": series, "marker": {"color": color}, "x": [pane.label for pane in measured],
               "y": [getattr(pane.stats, attribute) for pane in measured]}
              for series, attribute, color in (("now", "memory_gb", "#a5b4fc"), ("peak", "peak_memory_gb", "#4f46e5"))
              ] if measured else []
    figure = _figure("Memory per engine", "", f"GiB ({', '.join(kinds)})" if kinds else "GiB", traces,
                     note="no memory readings yet", barmode="group")
    if "RSS" in kinds:
        figure.add_annotation(text="in-process engines share one process: RSS is the whole process",
                              showarrow=False, xref="paper", yref="paper", x=0, y=1.02, xanchor="left",
                              font={"color": "#6b7280", "size": 11})
    return figure


def kv_blocks_figure(panes: list[PaneResult]) -> go.Figure:
    traces = []
    for index, pane in _measured(panes):
        samples = [sample for sample in pane.stats.samples if sample.kv_blocks_used is not None]
        if samples:
            total = pane.stats.kv_blocks_total
            traces.append({"type": "scatter", "mode": "lines", "line": _color(index),
                           "name": f"{pane.label} (of {total:,})" if total else pane.label,
                           "x": [sample.t_s for sample in samples], "y": [sample.kv_blocks_used for sample in samples]})
    return _figure("KV-cache blocks used (paged engines)", "seconds since submit", "blocks used", traces,
                   note="no paged (vLLM) engine in this run: nothing to chart")


def run_figures(panes: list[PaneResult]) -> dict[str, go.Figure]:
    return {"tokens_per_second": tokens_per_second_figure(panes), "memory": memory_figure(panes),
            "kv_blocks": kv_blocks_figure(panes)}
