"""`python -m engines load`: N requests at once against ONE engine, per concurrency level.

For each level it reports aggregate tok/s (all generated tokens / wall time of the level), p50/p95
TTFT counted from the moment the whole level was submitted, and the engine's peak KV usage. vLLM
engines take every request at once (continuous batching: they declare the Batching protocol). Engines without
a batched path (the transformers ones serve one request at a time) get the same requests one after
another, so their TTFT includes the wait behind earlier requests; the `serving` column says which.
Prompts cycle through assets/prompts.txt, so requests differ. One warm-up request runs first.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from engines.cli.common import add_chat_arguments, add_model_arguments, as_prompt, engine_options, progress_to_stderr
from engines.models.catalog import ASSETS
from engines.protocol import Batching, EngineError, GenerationParams
from engines.registry import create_engine
from engines.telemetry import percentile

MAX_CONCURRENCY = 1024


@dataclass
class LoadLevel:
    concurrency: int
    serving: str                    # "batched" or "sequential"
    num_tokens: int
    wall_s: float
    aggregate_tok_s: float
    ttft_s_p50: float | None
    ttft_s_p95: float | None
    kv_peak_used_frac: float | None


def add_arguments(parser) -> None:
    parser.add_argument("--engine", required=True, help="variant name (see `python -m engines list`)")
    parser.add_argument("--concurrency", default="1,8,32,128",
                        help="comma-separated numbers of simultaneous requests (default 1,8,32,128)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--json", action="store_true", help="print the levels as JSON instead of markdown")
    add_model_arguments(parser)
    add_chat_arguments(parser)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EngineError(f"--concurrency must be whole numbers separated by commas, got '{text}'") from None
    if not levels or any(not 1 <= level <= MAX_CONCURRENCY for level in levels):
        raise EngineError(f"--concurrency levels must be between 1 and {MAX_CONCURRENCY}, got '{text}'")
    return levels


def sample_prompts() -> list[str]:
    lines = (ASSETS / "prompts.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def measure_level(engine, concurrency: int, params: GenerationParams, prompts: list | None = None) -> LoadLevel:
    prompts = prompts or sample_prompts()
    batch = [prompts[index % len(prompts)] for index in range(concurrency)]
    started = time.perf_counter()
    if isinstance(engine, Batching):
        serving, timings = "batched", engine.run_concurrent(batch, params)
        ttfts = [timing.ttft_s for timing in timings if timing.ttft_s is not None]
        num_tokens = sum(timing.num_tokens for timing in timings)
        kv_peak = engine.kv_stats().get("kv_peak_used_frac")
    else:
        serving, ttfts, num_tokens = "sequential", [], 0
        for prompt in batch:
            first = None
            for event in engine.stream(prompt, params):
                first = first or time.perf_counter() - started
                num_tokens += event.num_tokens
            if first is not None:
                ttfts.append(first)
        kv_peak = engine.stats().kv_peak_used_frac
    wall_s = time.perf_counter() - started
    return LoadLevel(concurrency, serving, num_tokens, wall_s, num_tokens / wall_s,
                     percentile(ttfts, 0.5), percentile(ttfts, 0.95), kv_peak)


def measure_levels(engine, levels: list[int], params: GenerationParams, say=None,
                   prompts: list | None = None) -> list[LoadLevel]:
    """Warm up once, then one LoadLevel per concurrency level, in the order given. `prompts` (texts or
    chat prompts) default to assets/prompts.txt."""
    prompts = prompts or sample_prompts()
    for _ in engine.stream(prompts[0], GenerationParams(max_new_tokens=4)):
        pass
    results = []
    for level in levels:
        if say:
            say(f"{engine.name}: {level} concurrent request(s) of {params.max_new_tokens} tokens")
        results.append(measure_level(engine, level, params, prompts))
    return results


def to_markdown(engine_name: str, levels: list[LoadLevel]) -> str:
    def fmt(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"
    rows = [f"| {level.concurrency} | {level.serving} | {level.num_tokens} | {fmt(level.wall_s, 2)} "
            f"| {fmt(level.aggregate_tok_s, 1)} | {fmt(level.ttft_s_p50)} | {fmt(level.ttft_s_p95)} "
            f"| {fmt(level.kv_peak_used_frac, 4)} |" for level in levels]
    return "\n".join([f"### load: {engine_name}", "",
                      "| concurrency | serving | tokens | wall s | aggregate tok/s | TTFT p50 s | TTFT p95 s "
                      "| peak KV used frac |", "|---|---|---|---|---|---|---|---|", *rows])


def run(args) -> int:
    levels = parse_levels(args.concurrency)
    params = GenerationParams(max_new_tokens=args.max_new_tokens).validate()
    prompts = [as_prompt(args, text) for text in sample_prompts()]
    engine = create_engine(args.engine, model=args.model, **engine_options(args))
    try:
        engine.load(progress=progress_to_stderr)
        results = measure_levels(engine, levels, params, say=progress_to_stderr, prompts=prompts)
    finally:
        engine.unload()
    if args.json:
        print(json.dumps({"engine": args.engine, "max_new_tokens": params.max_new_tokens,
                          "levels": [asdict(level) for level in results]}, indent=2))
    else:
        print(to_markdown(args.engine, results))
    return 0
