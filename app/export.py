"""Export of a finished run: JSON (everything, with the time series), CSV (one row per engine) and
the charts as PNG images (plotly + kaleido, which drives a Chrome/Chromium).

PNGs go through engines.measure.report.write_png_images, as the bench's do. When no image can be
rendered the charts are written as standalone HTML instead, and the returned note says so.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from app.charts import run_figures
from app.streaming import RunRecord
from engines.measure.manifest import build_manifest
from engines.measure.report import write_png_images

QUALITY_FIELDS = ("greedy_agreement", "perplexity", "perplexity_ratio", "weight_footprint_gib", "is_suspect")
STATS_FIELDS = ("num_tokens", "num_prompt_tokens", "ttft_s", "decode_tok_s", "itl_ms_p50", "itl_ms_p95",
                "total_s", "memory_gib", "peak_memory_gib", "memory_kind", "kv_blocks_total", "kv_peak_used_frac",
                "acceptance_rate", "mean_accepted_len", "finish_reason")


def summary_rows(record: RunRecord) -> list[dict]:
    """One flat row per pane: its stats (None where not measured) and quality where computed."""
    rows = []
    for pane in record.panes:
        stats = pane.stats.to_dict() if pane.stats else {}
        quality = pane.quality or {}
        row = {"engine": pane.key, "label": pane.label, "status": pane.status, "error": pane.message
               if pane.status == "error" else ""}
        row.update({name: stats.get(name) for name in STATS_FIELDS})
        row["num_tokens"] = row["num_tokens"] or 0
        row["memory_kind"] = row["memory_kind"] or ""
        row.update({name: quality.get(name) for name in QUALITY_FIELDS})
        rows.append(row)
    return rows


def run_manifest(record: RunRecord, engine_options: dict[str, dict] | None = None) -> dict:
    """engines.measure.manifest.build_manifest for this run: every pane's engine with its options (by
    pane key; {} for a pane whose options are not given), the run's seed and mode."""
    engine_options = engine_options or {}
    return build_manifest(model=record.model or None, engines={pane.key: engine_options.get(pane.key, {})
                                                               for pane in record.panes},
                          seed=record.params.seed, mode=record.mode)


def run_json(record: RunRecord, engine_options: dict[str, dict] | None = None) -> dict:
    """The whole run, with a reproducibility manifest (engines.measure.manifest.MANIFEST_FIELDS)."""
    return {"model": record.model, "prompt": record.prompt, "params": asdict(record.params), "mode": record.mode,
            "started_at": record.started_at, "manifest": run_manifest(record, engine_options),
            "engines": [{"key": pane.key, "label": pane.label, "status": pane.status, "message": pane.message,
                         "text": pane.text, "quality": pane.quality,
                         "stats": pane.stats.to_dict(with_samples=True) if pane.stats else None}
                        for pane in record.panes]}


def write_images(figures: dict, out_dir: Path) -> tuple[list[Path], str]:
    """PNG per chart through kaleido; standalone HTML per chart when that fails, with the reason."""
    png_paths = [out_dir / f"chart_{name}.png" for name in figures]
    problem = write_png_images(list(figures.values()), png_paths, width=900, height=360)
    if not problem:
        return png_paths, ""
    html_paths = [out_dir / f"chart_{name}.html" for name in figures]
    for figure, path in zip(figures.values(), html_paths):
        figure.write_html(path, include_plotlyjs="cdn")
    return html_paths, f"charts saved as HTML: PNG rendering failed ({problem})"


def write_run_files(record: RunRecord, out_dir: Path,
                    engine_options: dict[str, dict] | None = None) -> tuple[list[Path], str]:
    """run.json (with the manifest; `engine_options` by pane key), run.csv and the charts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "run.json", out_dir / "run.csv"
    json_path.write_text(json.dumps(run_json(record, engine_options), indent=2, default=str))
    rows = summary_rows(record)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    image_paths, note = write_images(run_figures(record.panes), out_dir)
    return [json_path, csv_path, *image_paths], note
