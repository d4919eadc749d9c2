"""The Load tab: engines.measure.load on one chosen engine of the playground's pool (loaded on demand,
kept loaded), at closed-loop concurrency levels and open-loop Poisson rates, with goodput under SLOs.
Charts throughput, TTFT p50/p95, goodput and peak KV use per level, and, for vLLM engines, the KV
calculator's prediction beside the blocks the engine allocated (engines/measure/kv_compare.py).
Continuous batching (vLLM) against one request at a time (transformers) is the picture this tab shows.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr
from plotly.subplots import make_subplots

from app.background import follow_job
from app.hosting import on_zero_gpu
from app.inputs import one_of, text_of, whole_number
from engines.measure import load
from engines.measure.metrics import parse_slos
from engines.protocol import MAX_NEW_TOKENS_LIMIT, EngineError, GenerationParams, describe_error

MAX_LEVELS = 8
MAX_TEXT_CHARS = 200
MAX_TAB_REQUESTS = 256          # per level, from the page (the CLI allows more)


def parse_levels(text, name: str, convert, check) -> list:
    """'1,2,4' -> [1, 2, 4] with each checked; '' -> []; EngineError naming the bad part."""
    text = text_of(text if text is not None else "", name, MAX_TEXT_CHARS)
    values = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            values.append(check(convert(part)))
        except ValueError:
            raise EngineError(f"{name}: '{part}' is not a number") from None
    if len(values) > MAX_LEVELS:
        raise EngineError(f"{name}: at most {MAX_LEVELS} levels, got {len(values)}")
    return values


def load_inputs(choices: list[str], engine_key, levels, rates, goodput, max_new_tokens, num_requests) -> dict:
    """The tab's inputs, checked (the event runs unprocessed); EngineError names the bad one."""
    concurrency = parse_levels(levels, "concurrency levels", int, load.check_concurrency)
    request_rates = parse_levels(rates, "request rates (req/s)", float, load.check_rate)
    if not concurrency and not request_rates:
        raise EngineError("give at least one concurrency level or request rate")
    try:
        slos = parse_slos(text_of(goodput or "", "goodput SLOs", MAX_TEXT_CHARS))
    except ValueError as error:
        raise EngineError(str(error).replace("--goodput", "goodput SLOs")) from None
    requests = whole_number(num_requests if num_requests not in (None, "") else 0, "requests per level", 0,
                            MAX_TAB_REQUESTS)
    return {"engine_key": one_of(engine_key, "engine", choices), "levels": concurrency, "rates": request_rates,
            "slos_ms": slos, "num_requests": requests or None,
            "params": GenerationParams(max_new_tokens=whole_number(max_new_tokens, "new tokens per request", 1,
                                                                   MAX_NEW_TOKENS_LIMIT)).validate()}


def load_figure(levels: list[load.LoadLevel], title: str = ""):
    """Four panels per level: output tok/s, TTFT p50/p95 (ms), goodput (req/s; with SLOs) and peak KV used."""
    figure = make_subplots(rows=2, cols=2, subplot_titles=("Output throughput (tok/s)", "TTFT p50 / p95 (ms)",
                                                           "Goodput (req/s, SLO met)", "Peak KV cache used (fraction)"))
    labels = [level.label for level in levels]

    def ms(value):
        return None if value is None else value * 1000

    figure.add_bar(x=labels, y=[level.aggregate_tok_s for level in levels], name="output tok/s", row=1, col=1)
    figure.add_bar(x=labels, y=[ms(level.ttft_s_p50) for level in levels], name="TTFT p50", row=1, col=2)
    figure.add_bar(x=labels, y=[ms(level.ttft_s_p95) for level in levels], name="TTFT p95", row=1, col=2)
    figure.add_bar(x=labels, y=[level.goodput_req_s for level in levels], name="goodput req/s", row=2, col=1)
    figure.add_bar(x=labels, y=[level.kv_peak_used_frac for level in levels], name="peak KV used", row=2, col=2)
    figure.update_layout(title=title, height=560, barmode="group", margin={"t": 70, "b": 40},
                         legend={"orientation": "h", "y": -0.12})
    return figure


def kv_markdown(pool, keys: list[str] | None = None) -> str:
    """KV predicted against actual (engines.measure.kv_compare) for each loaded engine that reports its
    KV allocation (vLLM); a line saying why for the others."""
    from engines.measure.kv_compare import compare, to_markdown
    keys = pool.loaded_keys() if keys is None else keys
    parts = []
    for key in keys:
        try:
            comparison = compare(pool.engine(key))
        except Exception as error:  # one engine's failure leaves the others' tables standing
            parts.append(f"**{key}**: KV comparison failed ({describe_error(error)})")
            continue
        parts.append(f"#### {key}\n\n{to_markdown(comparison)}" if comparison is not None else
                     f"**{key}**: no KV allocation to compare (only vLLM engines report blocks; transformers "
                     f"grows a cache per request)")
    return "\n\n".join(parts) or "No engine is loaded: run a load level, or load engines in the Playground."


def run_load_events(pool, engine_key, levels, rates, goodput, max_new_tokens, num_requests,
                    out_root: str | None = None):
    """Generator for Gradio: yields (status, report markdown, figure, KV markdown, files) as the run goes."""
    choices = [key for key, choice in pool.choices.items() if choice.is_available]
    try:
        checked = load_inputs(choices, engine_key, levels, rates, goodput, max_new_tokens, num_requests)
    except EngineError as error:
        yield f"**Cannot run:** {error}", "", None, "", None
        return
    key, params, slos = checked["engine_key"], checked["params"], checked["slos_ms"]

    def work(say):
        engine = pool.load(key, progress=lambda message: say(f"{key}: {message}"))
        levels = load.measure_levels(engine, checked["levels"], params, say=say, rates=checked["rates"],
                                     num_requests=checked["num_requests"], slos_ms=slos or None)
        from engines.measure.manifest import build_manifest, engine_options_of
        manifest = build_manifest(model=pool.model, engines={key: engine_options_of(engine)}, mode="load")
        data = load.results_json(key, params, levels, slos or None, manifest=manifest)
        path = Path(tempfile.mkdtemp(prefix="load-", dir=out_root)) / "load.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        return levels, path

    outcome = yield from follow_job(work, "load-tab", lambda status: (status, "", None, "", None))
    if outcome.error is not None:
        yield f"**Load run failed:** {outcome.error}", "", None, "", None
        return
    results, path = outcome.value
    yield (f"Done: {len(results)} level(s) on {key}.", load.to_markdown(key, results, slos or None),
           load_figure(results, f"load: {key}"), kv_markdown(pool, [key]), [str(path)])


def build(playground, concurrency_id: str = "engines") -> None:
    """Create the tab inside the caller's Blocks/Tab context; it loads engines into the playground's pool."""
    pool = playground.pool
    out_root = getattr(playground.config, "export_dir", None)
    available = [key for key, choice in pool.choices.items() if choice.is_available]
    with gr.Row():
        engine = gr.Dropdown(available, value="bf16" if "bf16" in available else (available or [None])[0],
                             label="Engine (loaded on demand, kept loaded)", elem_id="load-engine")
        levels = gr.Textbox("1,2,4", label="Concurrency levels", info="closed loop, comma-separated",
                            elem_id="load-levels")
        rates = gr.Textbox("", label="Request rates (req/s)", info="open loop, Poisson; optional",
                           elem_id="load-rates")
        goodput = gr.Textbox("", label="Goodput SLOs", info="e.g. ttft_ms:500,tpot_ms:50; optional",
                             elem_id="load-goodput")
    with gr.Row():
        max_new_tokens = gr.Number(32, label="New tokens per request", precision=0, minimum=1,
                                   maximum=MAX_NEW_TOKENS_LIMIT, elem_id="load-max-new-tokens")
        num_requests = gr.Number(0, label="Requests per level (0: the level's default)", precision=0, minimum=0,
                                 maximum=MAX_TAB_REQUESTS, elem_id="load-num-requests")
        button = gr.Button("Run load", variant="primary", scale=0, elem_id="load-run")
        kv_button = gr.Button("KV: predicted vs actual (loaded engines)", scale=0, elem_id="load-kv-button")
    status = gr.Markdown(elem_id="load-status")
    report = gr.Markdown(elem_id="load-report")
    chart = gr.Plot(label="Per level", elem_id="load-chart")
    kv = gr.Markdown(elem_id="load-kv")
    files = gr.File(label="Results (JSON with manifest)", file_count="multiple", elem_id="load-files")

    def run(engine_key, level_text, rate_text, goodput_text, new_tokens, requests):
        yield from run_load_events(pool, engine_key, level_text, rate_text, goodput_text, new_tokens, requests,
                                   out_root=out_root)

    button.click(on_zero_gpu(run), [engine, levels, rates, goodput, max_new_tokens, num_requests],
                 [status, report, chart, kv, files], concurrency_id=concurrency_id, api_name="load_levels",
                 preprocess=False)  # inputs checked in load_inputs
    kv_button.click(lambda: kv_markdown(pool), None, [kv], api_name="kv_compare", concurrency_id=concurrency_id)
