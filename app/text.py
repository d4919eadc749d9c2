"""Words and number formatting of the playground page: headings, help, pane metrics, status lines.

Every number shown names its unit; a number that was not measured reads "n/a", never 0.
"""
from __future__ import annotations

import html

from engines.models.catalog import default_model_name, model_config
from engines.protocol import EngineStats

TITLE = "Inference playground"
INTRO = ("One prompt, streamed through several engine variants of the same model side by side. "
         "Each pane shows time to first token (TTFT), decode speed, tokens, memory, KV-cache blocks "
         "and the speculative acceptance rate where the engine has them.")
MODE_HELP = "parallel: all engines at once · fair: one after another, for clean timings"
PROMPT_KIND_HELP = "Chat: the model's chat template, multi-turn per pane · Completion: raw text continued"
TEMPERATURE_HELP = "0 means greedy (deterministic)"
NOT_MEASURED = "n/a"
STATUS_TEXT = {"waiting": "waiting", "loading": "loading", "ready": "loaded", "running": "streaming",
               "done": "done", "stopped": "stopped", "error": "error"}
MEMORY_LABELS = {"rss": "RSS", "nvml-process": "VRAM", "torch-reserved": "VRAM (torch reserved)",
                 "nvml-device-delta": "VRAM (device delta)", "unavailable": "memory"}


def memory_label(kind: str) -> str:
    return MEMORY_LABELS.get(kind, kind or "memory")


def number(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None or value != value:
        return NOT_MEASURED
    return f"{value:,.{digits}f}{unit}"


def model_summary(model: str | None) -> str:
    name = model or default_model_name()
    entry = model_config().get("models", {}).get(name)
    if entry is None:
        return f"**Model:** `{name}`"
    origin = " (embedded GGUF, converted to a BF16 checkpoint)" if entry.get("embedded_package") else ""
    return f"**Model:** `{name}` · hub id `{entry.get('hub_id', 'n/a')}`{origin}"


def loaded_summary(loaded_keys: list[str]) -> str:
    return "**Loaded engines:** " + (", ".join(f"`{key}`" for key in loaded_keys) if loaded_keys
                                     else "none (they load on the first run, or with Load)")


def unavailable_html(choices) -> str:
    """The variants that cannot run here, greyed out, each with the reason a user would need."""
    rows = [f'<li class="unavailable" data-engine="{html.escape(choice.key)}"><b>{html.escape(choice.key)}</b> '
            f'{html.escape(choice.label)}: <i>{html.escape(choice.reason)}</i></li>'
            for choice in choices if not choice.is_available]
    if not rows:
        return ""
    return f'<div class="unavailable-list"><span>Unavailable on this machine</span><ul>{"".join(rows)}</ul></div>'


def pane_title(label: str, key: str, status: str, model: str | None = None) -> str:
    on_model = f" · {html.escape(model)}" if model else ""
    return f"### {label} <span class='pane-key'>`{key}`{on_model} · {STATUS_TEXT.get(status, status)}</span>"


def _metric(name: str, caption: str, value: str) -> str:
    return (f'<div class="metric"><span class="metric-caption">{caption}</span>'
            f'<span class="metric-value" data-metric="{name}">{html.escape(value)}</span></div>')


def draft_map_html(drafted: list[tuple[str, bool]] | None, note: str = "") -> str:
    """A speculative pane's text again, accepted drafts shaded (token by token), or the note saying why not."""
    if drafted:
        num_drafted = sum(is_draft for _, is_draft in drafted)
        spans = "".join(f'<span class="drafted">{html.escape(piece)}</span>' if is_draft else html.escape(piece)
                        for piece, is_draft in drafted)
        caption = (f"{num_drafted} of {len(drafted)} tokens were accepted drafts (shaded); the rest are the "
                   f"target model's own")
        return f'<div class="draft-map"><span class="draft-caption">{caption}</span>{spans}</div>'
    return f'<div class="pane-note">{html.escape(note)}</div>' if note else ""


def pane_metrics_html(stats: EngineStats | None, message: str = "", status: str = "waiting",
                      draft_map: str = "", roofline_frac: float | None = None) -> str:
    """The pane's live numbers; KV blocks and acceptance appear only for engines that have them;
    `roofline_frac` (an estimate at batch 1) where the engine declares its bytes; `draft_map`
    (draft_map_html) below them for a finished speculative pane."""
    stats = stats or EngineStats(engine="")
    metrics = [
        _metric("ttft_s", "TTFT", number(stats.ttft_s, 3, " s")),
        _metric("decode_tok_s", "decode", number(stats.decode_tok_s, 1, " tok/s")),
        _metric("num_tokens", "tokens", str(stats.num_tokens)),
        _metric("memory_gib", memory_label(stats.memory_kind), number(stats.memory_gib, 2, " GiB")),
    ]
    if stats.kv_blocks_total is not None:
        metrics.append(_metric("kv_blocks", "KV blocks",
                               f"{stats.kv_blocks_used or 0:,} / {stats.kv_blocks_total:,}"))
    if roofline_frac is not None:
        metrics.append(_metric("roofline_frac", "roofline, est. batch 1", number(100 * roofline_frac, 0, " %")))
    if stats.acceptance_rate is not None:
        metrics.append(_metric("acceptance_rate", "accepted", number(100 * stats.acceptance_rate, 0, " %")))
    note = ""
    if message:
        note_class = "pane-error" if status == "error" else "pane-note"
        note = f'<div class="{note_class}">{html.escape(message)}</div>'
    return f'<div class="metrics">{"".join(metrics)}</div>{note}{draft_map}'


def run_status(record, is_stopped: bool = False) -> str:
    if record is None:
        return ""
    counts = {}
    for pane in record.panes:
        counts[pane.status] = counts.get(pane.status, 0) + 1
    parts = ", ".join(f"{count} {STATUS_TEXT.get(status, status)}" for status, count in counts.items())
    if record.is_load_only:
        return f"Loading {len(record.panes)} engine(s): {parts}"
    state = "stopped" if is_stopped else "finished" if record.is_finished else "running"
    return f"Run {state} ({record.mode} mode, {len(record.panes)} engine(s)): {parts}"


SUMMARY_HEADERS = ["engine", "status", "tokens", "TTFT (s)", "decode (tok/s)", "ITL p50 (ms)",
                   "peak memory (GiB)", "KV peak used (%)", "acceptance (%)", "greedy agreement (%)",
                   "perplexity", "perplexity / bf16"]


def summary_table(rows: list[dict]) -> list[list[str]]:
    """Rows of export.summary_rows formatted for the page; quality reads n/a until computed."""
    def percent(value):
        return number(None if value is None else 100 * value, 1)
    return [[row["engine"], row["status"], str(row["num_tokens"]), number(row["ttft_s"], 3),
             number(row["decode_tok_s"], 1), number(row["itl_ms_p50"], 1),
             _memory_cell(row["peak_memory_gib"], row["memory_kind"]),
             percent(row["kv_peak_used_frac"]), percent(row["acceptance_rate"]),
             percent(row["greedy_agreement"]), number(row["perplexity"], 2), number(row["perplexity_ratio"], 3)]
            for row in rows]


def _memory_cell(value: float | None, kind: str) -> str:
    return NOT_MEASURED if value is None else f"{number(value, 2)} {memory_label(kind)}"
