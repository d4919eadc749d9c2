"""A SurveyReport as markdown (`to_markdown`), plotly figures (`build_figures`), and the files
survey.md, survey.html (the markdown rendered, then the figures) and survey.json (`write_outputs`).
The survey's quoted figures sit in their own columns and traces, labelled SURVEY_LABEL."""
from __future__ import annotations

import html
import json
from pathlib import Path

from engines.measure.kv_calc import format_bytes
from engines.measure.report import PLOTLY_CDN
from engines.measure.survey_data import SURVEY_LABEL, SURVEY_PROMPT, SURVEY_SPEED_FA2_BF16, SurveyReport
from engines.registry import split_variant

SURVEY_SIZES = "N = 2048, 8192; P = 2048; K = 10"


def _n(value, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _status(row) -> str:
    return "" if row.status == "ok" else _cell(f"{row.status}: {row.reason}")


def _header(report: SurveyReport) -> list[str]:
    s, machine = report.settings, report.machine
    where = machine.get("gpu") or \
        f"CPU ({machine.get('cpu')}, {machine.get('cpu_count')} cores, {machine.get('platform')})"
    busy = machine.get("load_average") is not None and machine["load_average"] > (machine.get("cpu_count") or 1)
    tokens = ", ".join(str(n) for n in s["tokens"])
    quality = f"greedy agreement over {s['quality_prompts'] or 'all'} prompts x {s['quality_tokens']} tokens"
    return [f"# Survey: {report.model} on {report.device}", "",
            f"Machine: {where}; torch {machine.get('torch')}; load average {machine.get('load_average')} at the "
            f"end; {machine.get('date')}." + (" The machine was busier than its core count, so timings are "
                                               "contended and noisy." if busy else ""), "",
            f"Counts used: **N = {tokens}** new tokens from a {s['speed_prompt_tokens']}-token context (median of "
            f"{s['repeats']}); encode **P = {s['prompt_tokens']}** tokens; vLLM test **K = {s['runs']}** runs of up to "
            f"{s['serving_max_new_tokens']} tokens ({s['serving_mode']} mode, {s['serving_prompt_tokens']} prompt "
            f"tokens); quality: {quality}. The survey's sizes: {SURVEY_SIZES}.", "",
            f"Columns and traces labelled **{SURVEY_LABEL}** quote the survey's own figures for reference; they "
            "were not measured here. Memory is in GiB (2^30 bytes), the survey's in GB as it printed them; speed "
            "is decode tokens/s.", ""] + [f"- {note}" for note in report.notes] + ([""] if report.notes else [])


def to_markdown(report: SurveyReport) -> str:
    lines = _header(report)
    lines += ["## 1. Number formats (torch.finfo)", "",
              "| format | bits | exponent | fraction | min normal | max | eps | decimal digits (finfo) "
              "| log10 2^(f+1) |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row.name} | {row.bits} | {row.exponent_bits} | {row.fraction_bits} | {row.min_normal:.4g} "
              f"| {row.max:.4g} | {row.eps:.4g} | {row.decimal_digits} | {row.decimal_digits_exact:.2f} |"
              for row in report.formats]
    s = report.settings
    cloze = (f"Cloze: the {s['cloze_items']} items of assets/cloze.jsonl, each right continuation against its "
             f"distractors by summed log-likelihood; chance is {s['cloze_chance']:.0f} of {s['cloze_items']}. "
             if s.get("cloze_items") else "")
    lines += ["", "## 2. Quality per precision", "",
              f"{cloze}Perplexity on assets/perplexity.txt; greedy agreement: the share of greedy token ids equal "
              f"to bf16's over {s['quality_prompts'] or 'all'} prompts x {s['quality_tokens']} tokens.", "",
              "| engine | perplexity | vs bf16 | greedy agreement | cloze | weights GiB | note "
              f"| {SURVEY_LABEL} MMLU |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report.quality:
        cloze = f"{row.cloze_correct}/{row.cloze_total}" if row.cloze_correct is not None else "n/a"
        note = _status(row) or _cell("; ".join(filter(None, [row.note, row.cloze_note])))
        lines.append(f"| {row.engine} | {_n(row.perplexity)} | {_n(row.perplexity_ratio, 3, 'x')} "
                     f"| {_n(row.greedy_agreement, 3)} | {cloze} | {_n(row.weight_footprint_gib)} | {note} "
                     f"| {_n(row.survey_mmlu, 1)} |")
    lines += ["", _speed_table(report), "", _memory_table(report), "", _serving_table(report), "",
              _kv_table(report), "", _conclusions(report)]
    return "\n".join(lines)


def _speed_table(report: SurveyReport) -> str:
    tokens = report.settings["tokens"]
    lines = [f"## 3. Decode speed: N tokens from a {report.settings['speed_prompt_tokens']}-token context (tok/s)", "",
             "| engine | attention | " + " | ".join(f"N={n}" for n in tokens) + f" | note | {SURVEY_LABEL} |",
             "|---|---|" + "---|" * len(tokens) + "---|---|"]
    keys = list(dict.fromkeys((row.engine, row.attention) for row in report.speed))
    for engine, attention in keys:
        rows = {row.new_tokens: row for row in report.speed if (row.engine, row.attention) == (engine, attention)}
        cells, notes = [], []
        for n in tokens:
            row = rows.get(n)
            if row is None or row.status != "ok":
                cells.append("n/a" if row is None or row.status != "error" else "error")
                if row is not None and _status(row) not in notes:
                    notes.append(_status(row))
                continue
            short = f" ({row.num_tokens} tok, EOS)" if row.num_tokens is not None and row.num_tokens < n else ""
            if row.reason and row.reason not in notes:
                notes.append(_cell(row.reason))
            cells.append(_n(row.decode_tok_s, 1) + short)
        survey = _survey_speed() if (split_variant(engine)[0], attention) == ("bf16", "flash_attention_2") else ""
        lines.append(f"| {engine} | {attention} | " + " | ".join(cells) + f" | {'; '.join(notes)} | {survey} |")
    return "\n".join(lines)


def _survey_speed() -> str:
    return "BF16 + FlashAttention v2: " + " / ".join(f"{value} at N={n}" for n, value in SURVEY_SPEED_FA2_BF16.items())


def _memory_table(report: SurveyReport) -> str:
    tokens = [str(n) for n in report.settings["tokens"]]
    kinds = sorted({row.memory_kind for row in report.memory if row.memory_kind}) or ["not measured"]
    lines = [f"## 4. Peak memory encoding P = {report.settings['prompt_tokens']} tokens and generating N (GiB, "
             f"{', '.join(kinds)})", "",
             f"| engine | encode {report.settings['prompt_tokens']} | " + " | ".join(f"generate {n}" for n in tokens)
             + f" | weights | before load | note | {SURVEY_LABEL} (GB) |",
             "|---|---|" + "---|" * len(tokens) + "---|---|---|---|"]
    for row in report.memory:
        survey = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in row.survey_gb.items())
        lines.append(f"| {row.engine} | {_n(row.encode_peak_gib)} | "
                     + " | ".join(_n(row.generate_peak_gib.get(n)) for n in tokens)
                     + f" | {_n(row.weight_footprint_gib)} | {_n(row.baseline_gib)} | {_status(row)} | {survey} |")
    return "\n".join(lines)


def _serving_table(report: SurveyReport) -> str:
    lines = [f"## 5. The survey's vLLM test: \"{SURVEY_PROMPT}\", mean of K = {report.settings['runs']} runs", "",
             "| row | engine | mode | prompt tokens | max new tokens | tokens (mean) | tok/s (mean) | peak GiB | note "
             f"| {SURVEY_LABEL} tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.serving:
        lines.append(f"| {row.row} | {_cell(row.engine)} | {row.mode} | {row.prompt_tokens or 'n/a'} "
                     f"| {row.max_new_tokens or 'n/a'} | {_n(row.mean_tokens, 1)} | {_n(row.mean_tok_s, 1)} "
                     f"| {_n(row.peak_gib)} | {_status(row) or _cell(row.reason)} | {_n(row.survey_tok_s)} |")
    return "\n".join(lines)


def _kv_table(report: SurveyReport) -> str:
    shape = report.shape
    lines = [f"## 6. MQA / GQA / MHA on this model's layers ({shape['num_layers']} layers, "
             f"{shape['num_attention_heads']} query heads, head_dim {shape['head_dim']}; kv_calc)", "",
             f"Sequences of {report.kv_context:,} tokens that fit in {report.kv_memory_gib:g} GiB beside the BF16 "
             "weights.",
             "", "| layout | KV heads | model's own | KV per token (BF16) | per sequence | sequences, BF16 KV "
             "| sequences, FP8 KV |", "|---|---|---|---|---|---|---|"]
    for row in report.kv:
        if row.num_kv_heads is None:
            lines.append(f"| {row.layout} | n/a | | {_cell(row.reason)} | | | |")
            continue
        lines.append(f"| {row.layout} | {row.num_kv_heads} | {'yes' if row.is_model_own else ''} "
                     f"| {format_bytes(row.kv_bytes_per_token)} | {format_bytes(row.kv_bytes_per_sequence)} "
                     f"| {row.max_sequences_bf16:,} | {row.max_sequences_fp8:,} |")
    return "\n".join(lines)


def _conclusions(report: SurveyReport) -> str:
    lines = ["## The survey's conclusions, checked here", ""]
    for index, item in enumerate(report.conclusions, 1):
        lines += [f"### {index}. {item.claim[0].upper() + item.claim[1:]}: here **{item.answer}** "
                  f"(survey: {item.survey_answer})", "", f"Survey: {item.survey_numbers}. Rule: {item.rule}.", ""]
        lines += [f"- {number}" for number in item.numbers]
        if item.note:
            lines += ["", f"What limits it here: {item.note}."]
        if item.reason:
            lines += ["", f"{'Why it differs' if item.answer not in ('n/a', item.survey_answer) else 'Note'}: "
                          f"{item.reason}."]
        lines.append("")
    return "\n".join(lines)


def build_figures(report: SurveyReport) -> dict:
    """name -> plotly Figure: quality, speed, memory, the vLLM test and KV layouts."""
    import plotly.graph_objects as go
    survey_marker = {"symbol": "diamond", "size": 12, "color": "black"}
    quality_rows = [row for row in report.quality if row.status == "ok"]
    names = [row.engine for row in quality_rows]
    quality = go.Figure([go.Bar(name="cloze accuracy", x=names, y=[row.cloze_accuracy for row in quality_rows]),
                         go.Bar(name="greedy agreement", x=names, y=[row.greedy_agreement for row in quality_rows]),
                         go.Bar(name="perplexity / bf16", x=names, y=[row.perplexity_ratio for row in quality_rows]),
                         go.Scatter(name=f"{SURVEY_LABEL} MMLU / 100", x=names, mode="markers", marker=survey_marker,
                                    y=[row.survey_mmlu / 100 if row.survey_mmlu else None for row in quality_rows])])
    quality.update_layout(title="Quality per precision", barmode="group")
    speed = go.Figure()
    for n in report.settings["tokens"]:
        rows = [row for row in report.speed if row.new_tokens == n and row.status == "ok"]
        speed.add_bar(name=f"N={n}", x=[f"{row.engine} / {row.attention}" for row in rows],
                      y=[row.decode_tok_s for row in rows])
    for n, value in SURVEY_SPEED_FA2_BF16.items():
        speed.add_scatter(name=f"{SURVEY_LABEL} BF16 + FA2, N={n}", mode="markers", marker=survey_marker,
                          x=["bf16 / flash_attention_2"], y=[value])
    speed.update_layout(title="Decode speed by precision and attention", yaxis_title="tokens/s", barmode="group")
    memory_rows = [row for row in report.memory if row.status == "ok"]
    names = [row.engine for row in memory_rows]
    memory = go.Figure([go.Bar(name=f"encode {report.settings['prompt_tokens']}", x=names,
                               y=[row.encode_peak_gib for row in memory_rows])]
                       + [go.Bar(name=f"generate {n}", x=names,
                                 y=[row.generate_peak_gib.get(str(n)) for row in memory_rows])
                          for n in report.settings["tokens"]])
    for key in ("encode_2048", "generate_8192"):
        memory.add_scatter(name=f"{SURVEY_LABEL} {key.replace('_', ' ')} (GB)", x=names, mode="markers",
                           y=[row.survey_gb.get(key) for row in memory_rows], marker=survey_marker)
    memory.update_layout(title="Peak memory", yaxis_title="GiB", barmode="group")
    serving = go.Figure([go.Bar(name="measured, mean tok/s", x=[row.row for row in report.serving],
                                y=[row.mean_tok_s for row in report.serving]),
                         go.Scatter(name=SURVEY_LABEL, x=[row.row for row in report.serving], mode="markers",
                                    y=[row.survey_tok_s for row in report.serving], marker=survey_marker)])
    serving.update_layout(title="The survey's vLLM test", yaxis_title="tokens/s")
    kv_rows = [row for row in report.kv if row.num_kv_heads is not None]
    layouts = [row.layout for row in kv_rows]
    kv = go.Figure([go.Bar(name="BF16 KV", x=layouts, y=[row.max_sequences_bf16 for row in kv_rows]),
                    go.Bar(name="FP8 KV", x=layouts, y=[row.max_sequences_fp8 for row in kv_rows])])
    kv.update_layout(title=f"Sequences of {report.kv_context:,} tokens in {report.kv_memory_gib:g} GiB beside the "
                           "weights", barmode="group")
    return {"quality": quality, "speed": speed, "memory": memory, "serving": serving, "kv": kv}


def write_outputs(report: SurveyReport, out_dir: str | Path) -> dict[str, Path]:
    """survey.md, survey.html and survey.json under `out_dir`; returns name -> path."""
    from markdown_it import MarkdownIt
    from plotly.offline import get_plotlyjs_version
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "survey.md", "html": out / "survey.html", "json": out / "survey.json"}
    markdown = to_markdown(report)
    paths["md"].write_text(markdown + "\n", encoding="utf-8")
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n",
                             encoding="utf-8")
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    divs = "\n".join(figure.to_html(full_html=False, include_plotlyjs=False)
                     for figure in build_figures(report).values())
    paths["html"].write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(report.model)} survey</title>'
        f'<script src="{PLOTLY_CDN.format(version=get_plotlyjs_version())}"></script>'
        '<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}'
        'td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>\n'
        f'{body}\n<h2>Figures</h2>\n{divs}\n</body></html>\n', encoding="utf-8")
    return paths
