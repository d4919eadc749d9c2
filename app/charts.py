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
    measured = [pane for pane in panes if pane.stats is not None and pane.stats.memory_gib is not None]
    kinds = sorted({memory_label(pane.stats.memory_kind) for pane in measured})
    traces = [{"type": "bar", "name": series, "marker": {"color": color}, "x": [pane.label for pane in measured],
               "y": [getattr(pane.stats, attribute) for pane in measured]}
              for series, attribute, color in (("now", "memory_gib", "#a5b4fc"), ("peak", "peak_memory_gib", "#4f46e5"))
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


# Race view ---------------------------------------------------------------------------------------
# Every pane's token arrivals on one clock, with the point where each pane's greedy tokens first part
# from the reference's (engines/measure/divergence.py) and its running agreement.
DIVERGENCE_MARK = "⟦≠⟧"


def race_offsets_s(panes: list[PaneResult], mode: str) -> dict[str, float]:
    """Seconds from Run to each pane's submit. The samples count from each request's own submit: in
    parallel mode every pane is submitted together (the workers wait at one barrier), so 0 each; in
    fair mode the engines run one after another, so each starts after the previous panes' total_s."""
    offsets, elapsed = {}, 0.0
    for pane in panes:
        offsets[pane.key] = elapsed if mode == "fair" else 0.0
        if pane.stats is not None:
            elapsed += (pane.stats.total_s or 0.0) + (pane.stats.wait_s or 0.0)
    return offsets


def divergences(panes: list[PaneResult], token_ids: dict[str, list[int]], reference_key: str = "bf16",
                decode=None, is_complete: bool = True) -> dict:
    """engines.measure.divergence.divergence_report of every pane with token ids against the reference
    pane's ids (`decode`: pane key -> decode(ids) -> text, for the text offset); {} without a reference."""
    from engines.measure.divergence import divergence_report
    reference = token_ids.get(reference_key)
    if reference is None:
        return {}
    decode = decode or {}
    return {pane.key: divergence_report(reference, token_ids[pane.key], decode.get(pane.key), is_complete)
            for pane in panes if pane.key != reference_key and pane.key in token_ids}


def _arrival_s(samples, offset_s: float, token_index: int) -> float | None:
    """When token `token_index` (0-based) had arrived: the first sample counting more tokens than it."""
    for sample in samples:
        if sample.num_tokens > token_index:
            return offset_s + sample.t_s
    return None


def race_figure(panes: list[PaneResult], reports: dict | None = None, mode: str = "parallel",
                reference_key: str = "bf16", margins: dict | None = None) -> go.Figure:
    """Token index against seconds since Run for every pane; with `reports` (greedy runs, from
    `divergences`), an ✕ where each pane parts from the reference and its running agreement (right
    axis, dotted). `margins`: pane key -> engines.measure.divergence.TopTwo at the divergence."""
    reports, margins = reports or {}, margins or {}
    offsets = race_offsets_s(panes, mode)
    traces = []
    for index, pane in _measured(panes):
        samples, offset = pane.stats.samples, offsets[pane.key]
        traces.append({"type": "scatter", "mode": "lines", "line": {**_color(index), "shape": "hv"},
                       "name": pane.label, "x": [offset + sample.t_s for sample in samples],
                       "y": [sample.num_tokens for sample in samples]})
        report = reports.get(pane.key)
        if report is None:
            continue
        points = [(_arrival_s(samples, offset, position), value)
                  for position, value in enumerate(report.running_agreement)]
        points = [(t_s, value) for t_s, value in points if t_s is not None]
        if points:
            traces.append({"type": "scatter", "mode": "lines", "yaxis": "y2", "showlegend": False,
                           "line": {**_color(index), "dash": "dot", "width": 1},
                           "name": f"{pane.label}: agreement with {reference_key}",
                           "x": [t_s for t_s, _ in points], "y": [value for _, value in points]})
        position = report.divergence_index
        t_s = _arrival_s(samples, offset, position) if position is not None else None
        if t_s is not None:
            margin = margins.get(pane.key)
            hover = f"{pane.label} parts from {reference_key} at token {position}" + (
                f"; top-2 margin {margin.margin:.2f} ({margin.best_text!r} over {margin.second_text!r})"
                if margin is not None else "")
            traces.append({"type": "scatter", "mode": "markers", "name": f"{pane.label} ≠ {reference_key} @ {position}",
                           "marker": {**_color(index), "symbol": "x", "size": 12}, "x": [t_s], "y": [position + 1],
                           "hovertext": [hover], "hoverinfo": "text", "customdata": [position]})
    layout = {"yaxis2": {"title": {"text": f"agreement with {reference_key}"}, "overlaying": "y", "side": "right",
                         "range": [0, 1.05], "showgrid": False, "visible": bool(reports and traces)}} if reports else {}
    return _figure("Race: tokens on one clock" + (f", divergence from {reference_key} (✕)" if reports else ""),
                   "seconds since Run", "tokens", traces, note="no tokens yet: press Run", **layout)


def mark_divergence(text: str, report) -> str:
    """The pane's text with DIVERGENCE_MARK where its first differing token starts."""
    if report is None or report.text_offset is None:
        return text
    return text[:report.text_offset] + DIVERGENCE_MARK + text[report.text_offset:]


def race_summary(panes: list[PaneResult], reports: dict, reference_key: str = "bf16",
                 margins: dict | None = None, is_greedy: bool = True) -> str:
    """Markdown, one line per compared pane: where it parts from the reference, and its agreement."""
    if not is_greedy:
        return f"Divergence from {reference_key}: greedy runs only (temperature 0)."
    margins, lines = margins or {}, []
    for pane in panes:
        report = reports.get(pane.key)
        if report is None:
            continue
        agreement = f"{report.agreement:.0%}" if report.agreement is not None else "n/a"
        if report.divergence_index is None:
            lines.append(f"- **{pane.label}**: same tokens as {reference_key} so far (agreement {agreement})")
            continue
        margin = margins.get(pane.key)
        tie = (f"; top-2 margin there {margin.margin:.2f} logits ({margin.best_text!r} over {margin.second_text!r})"
               if margin is not None else "")
        lines.append(f"- **{pane.label}**: {DIVERGENCE_MARK} parts from {reference_key} at token "
                     f"{report.divergence_index} (agreement {agreement}){tie}")
    return "\n".join(lines) or f"No pane to compare with {reference_key}."
