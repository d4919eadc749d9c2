"""Writes a BenchResult as results.json, results.csv, results.md and plotly charts (PNG through kaleido and
headless Chromium, plus one HTML page). The markdown table is the one the CLI prints last.
`write_png_images` is also the app's chart export (app/export.py).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from engines.measure.bench import BenchResult, BenchRow
from engines.protocol import describe_error

PLOT_NAMES = ("speed", "memory", "roofline", "quality")
DEBIAN_CHROMIUM = "/usr/bin/chromium"
PLOTLY_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"


def _number(value, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{suffix}"




def to_markdown(result: BenchResult) -> str:
    config = result.config
    bandwidth = result.bandwidth or {}
    header = (f"Model **{result.model}** on {result.machine.get('gpu') or result.device} "
              f"({result.machine.get('date')}); {config.max_new_tokens} new tokens, median of {config.num_repeats} "
              f"after a warm-up; encode peak at {config.prompt_tokens} prompt tokens. Memory bandwidth "
              f"{_number(bandwidth.get('bandwidth_gb_s'), 1)} GB/s "
              f"(10^9 bytes; {bandwidth.get('method', 'not measured')}); "
              "memory in GiB (2^30 bytes).")
    lines = [header, "",
             "| engine | status | load s | TTFT s | decode tok/s | tokens | prefill s (P) | encode peak GiB "
             "| generate peak GiB | weights GiB | roofline tok/s | % of roofline | greedy agreement | perplexity "
             "| ppl ratio | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result.rows:
        if row.status != "ok":
            lines.append(f"| {row.engine} | {row.status}: {row.reason.replace('|', '/')} |" + " |" * 14)
            continue
        lines.append(
            f"| {row.engine} | ok | {_number(row.load_s, 1)} | {_number(row.ttft_s, 3)} "
            f"| {_number(row.decode_tok_s, 1)} "
            f"| {row.num_tokens} | {_number(row.prefill_s, 3)} ({row.prefill_tokens}) | {_number(row.encode_peak_gib)} "
            f"| {_number(row.generate_peak_gib)} | {_number(row.weight_footprint_gib, 3)} "
            f"| {_number(row.roofline_tok_s, 1)} "
            f"| {_number(row.roofline_frac, 1, 100, '%')} | {_number(row.greedy_agreement, 3)} "
            f"| {_number(row.perplexity, 2)} | {_number(row.perplexity_ratio, 3)} | {row.quality_note} |")
    memory_kinds = sorted({row.memory_kind for row in result.rows if row.memory_kind})
    lines += ["", f"Memory is {', '.join(memory_kinds) or 'not measured'} (GiB) of the engine's process tree. "
              "Weights are the engine's own footprint of its weights (for GGUF, the file it maps)."]
    if result.config.is_profiled:
        lines += ["", "Profile (one more run under torch.profiler, per generated token):", "",
                  "| engine | launches | CPU ms | device ms | counted |", "|---|---|---|---|---|"]
        lines += [f"| {row.engine} | {_number(row.kernel_launches_per_token, 1)} | {_number(row.cpu_ms_per_token, 2)} "
                  f"| {_number(row.device_ms_per_token, 3)} | {row.profile_note} |"
                  for row in result.rows if row.status == "ok"]
    return "\n".join(lines)


def write_outputs(result: BenchResult, out_dir: str | Path) -> dict[str, Path]:
    """Write every file; returns name -> path. A plot that cannot be rendered to PNG is reported, not fatal."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    data = {**result.to_dict(), "manifest": bench_manifest(result)}
    paths["json"].write_text(json.dumps(data, indent=2, default=str))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[item.name for item in fields(BenchRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in result.rows)
    paths["md"].write_text(to_markdown(result) + "\n")
    from plotly.offline import get_plotlyjs_version
    figures = build_figures(result)
    html_path = out / "plots.html"
    # plotly.js from its CDN keeps the page small enough to commit; the PNGs need no network.
    divs = "\n".join(figure.to_html(full_html=False, include_plotlyjs=False) for figure in figures.values())
    html_path.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{result.model} bench</title>'
                         f'<script src="{PLOTLY_CDN.format(version=get_plotlyjs_version())}"></script></head>'
                         f'<body>\n{divs}\n</body></html>\n')
    paths["html"] = html_path
    png_paths = [out / f"{name}.png" for name in figures]
    problem = write_png_images(list(figures.values()), png_paths, width=900, height=450)
    if problem:
        # A GPU box may have no kaleido or Chrome. The tables and the HTML plots are the results; say
        # why the images are missing instead of losing the whole run.
        (out / "plots_png_missing.txt").write_text(f"PNG plots not written: {problem}\n")
        return paths
    paths.update({f"{name}_png": path for name, path in zip(figures, png_paths)})
    return paths


def bench_manifest(result: BenchResult) -> dict:
    """The reproducibility manifest of a bench run (engines/measure/manifest.py); every engine label with
    the options the run gave it. Bench runs are greedy, so the seed is GenerationParams' default."""
    from engines.measure.manifest import build_manifest
    config = result.config
    return build_manifest(model=result.model, engines={label: dict(config.engine_options) for label in config.engines},
                          seed=0, mode="bench", device=result.device)


def write_png_images(figures: list, paths: list[Path], width: int, height: int) -> str:
    """PNG files through kaleido, which drives a Chrome/Chromium found through BROWSER_PATH (Debian's
    chromium is offered when it is not on PATH). "" on success, else why no image was written."""
    if not os.environ.get("BROWSER_PATH") and shutil.which("chromium") is None and os.path.exists(DEBIAN_CHROMIUM):
        os.environ["BROWSER_PATH"] = DEBIAN_CHROMIUM
    import plotly.io as pio
    try:
        pio.write_images(figures, paths, width=width, height=height, scale=1)
    except Exception as error:
        return describe_error(error)
    return ""


def build_figures(result: BenchResult) -> dict:
    """Plotly figures for the rows that ran: speed against roofline, memory, roofline fraction, quality."""
    import plotly.graph_objects as go
    rows = [row for row in result.rows if row.status == "ok"]
    names = [row.engine for row in rows]
    speed = go.Figure([go.Bar(name="decode tok/s", x=names, y=[row.decode_tok_s for row in rows]),
                       go.Scatter(name="roofline tok/s", x=names, y=[row.roofline_tok_s for row in rows],
                                  mode="markers", marker={"symbol": "line-ew-open", "size": 30})])
    speed.update_layout(title=f"Decode speed at {result.config.max_new_tokens} tokens", yaxis_title="tokens/s")
    memory = go.Figure([
        go.Bar(name=f"encode {result.config.prompt_tokens} tokens", x=names, y=[row.encode_peak_gib for row in rows]),
        go.Bar(name=f"generate {result.config.max_new_tokens} tokens", x=names,
               y=[row.generate_peak_gib for row in rows])])
    memory.update_layout(title="Peak memory", yaxis_title="GiB", barmode="group")
    roofline = go.Figure(go.Bar(x=names, y=[100 * (row.roofline_frac or 0) for row in rows]))
    roofline.update_layout(title="Decode speed as % of each engine's own roofline", yaxis_title="%")
    quality = go.Figure([
        go.Bar(name="greedy agreement", x=names, y=[row.greedy_agreement for row in rows]),
        go.Bar(name="perplexity ratio", x=names, y=[row.perplexity_ratio for row in rows])])
    quality.update_layout(title="Quality against bf16" + (f": {rows[0].quality_note}" if rows and rows[0].quality_note
                                                         else ""), barmode="group")
    return dict(zip(PLOT_NAMES, (speed, memory, roofline, quality)))
