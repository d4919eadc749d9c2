"""Plotly figures of a run: tokens/s over time, memory per engine, KV-cache blocks over time.

Each figure is built from the panes' EngineStats (their `samples` time series), so a live chart and
the exported image are the same function of the same data. Time counts from each request's submit:
in fair mode the engines run one after another, and each line still starts at 0.
"""
from __future__ import annotations

import plotly.graph_objects as go

from app.text import memory_label
from app.streaming import PaneResult

COLORS = ("#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777")
CHART_HEIGHT_PX = 300
# A token count over a window this long, so a slow engine draws a rate rather than 0/1/2 steps.
RATE_WINDOW_S = 2.0


def _base(title: str, x_title: str, y_title: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(title={"text": title, "x": 0.01}, height=CHART_HEIGHT_PX, template="plotly_white",
                         margin={"l": 55, "r": 15, "t": 45, "b": 45}, xaxis_title=x_title, yaxis_title=y_title,
                         legend={"orientation": "h", "y": -0.25}, uirevision="keep")
    return figure


def _note(figure: go.Figure, text: str) -> go.Figure:
    figure.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                          font={"color": "#6b7280", "size": 13})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


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
    figure = _base(f"Decode speed ({RATE_WINDOW_S:g} s rolling window)", "seconds since submit", "tokens/s")
    measured = _measured(panes)
    for index, pane in measured:
        samples = pane.stats.samples
        figure.add_trace(go.Scatter(x=[s.t_s for s in samples], y=rolling_rate(samples),
                                    mode="lines", name=pane.label, line={"color": COLORS[index % len(COLORS)]}))
    return figure if measured else _note(figure, "no tokens yet: press Run")


def memory_figure(panes: list[PaneResult]) -> go.Figure:
    measured = [(index, pane) for index, pane in enumerate(panes)
                if pane.stats is not None and pane.stats.memory_gb is not None]
    kinds = sorted({memory_label(pane.stats.memory_kind) for _, pane in measured})
    figure = _base("Memory per engine", "", f"GB ({', '.join(kinds)})" if kinds else "GB")
    for series, attribute in (("now", "memory_gb"), ("peak", "peak_memory_gb")):
        figure.add_trace(go.Bar(x=[pane.label for _, pane in measured],
                                y=[getattr(pane.stats, attribute) for _, pane in measured], name=series,
                                marker={"color": "#a5b4fc" if series == "now" else "#4f46e5"}))
    figure.update_layout(barmode="group")
    if not measured:
        return _note(figure, "no memory readings yet")
    if "RSS" in " ".join(kinds):
        figure.add_annotation(text="in-process engines share one process: RSS is the whole process",
                              showarrow=False, xref="paper", yref="paper", x=0, y=1.02, xanchor="left",
                              font={"color": "#6b7280", "size": 11})
    return figure


def kv_blocks_figure(panes: list[PaneResult]) -> go.Figure:
    figure = _base("KV-cache blocks used (paged engines)", "seconds since submit", "blocks used")
    paged = [(index, pane) for index, pane in _measured(panes)
             if any(sample.kv_blocks_used is not None for sample in pane.stats.samples)]
    for index, pane in paged:
        samples = [s for s in pane.stats.samples if s.kv_blocks_used is not None]
        total = pane.stats.kv_blocks_total
        figure.add_trace(go.Scatter(x=[s.t_s for s in samples], y=[s.kv_blocks_used for s in samples],
                                    mode="lines", line={"color": COLORS[index % len(COLORS)]},
                                    name=f"{pane.label} (of {total:,})" if total else pane.label))
    return figure if paged else _note(figure, "no paged (vLLM) engine in this run: nothing to chart")


def run_figures(panes: list[PaneResult]) -> dict[str, go.Figure]:
    return {"tokens_per_second": tokens_per_second_figure(panes), "memory": memory_figure(panes),
            "kv_blocks": kv_blocks_figure(panes)}
