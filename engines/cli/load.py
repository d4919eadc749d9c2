"""`python -m engines load`: load against ONE engine, per level, with optional SLOs.

Levels are concurrency levels (`--concurrency`, closed loop: N requests, at most C in flight) and/or
open-loop request rates (`--rate`, Poisson arrivals as `vllm bench serve --request-rate`, from `--seed`).
Per level: requests/s, output tok/s, TTFT/TPOT/ITL/E2EL percentiles as vllm bench serve defines them, the
engine's peak KV usage and, with `--goodput ttft_ms:500,tpot_ms:50`, goodput and SLO attainment.
`--find-max` searches for the highest concurrency (or rate, with --rate: starting from its first value)
that meets the SLO. vLLM engines batch requests continuously; transformers engines serve them one after
another, so waiting is in their TTFT; the `serving` column says which. Prompts cycle through
assets/prompts.txt. One warm-up request runs first. The measuring lives in engines/measure/load.py.
"""
from __future__ import annotations

import json

from engines.cli.common import add_chat_arguments, add_model_arguments, as_prompt, engine_options, progress_to_stderr
from engines.measure.load import (
    DEFAULT_ATTAINMENT,
    MAX_CONCURRENCY,
    MAX_SEARCH_STEPS,
    LoadLevel,
    check_rate,
    find_max,
    measure_level,
    measure_levels,
    results_json,
    sample_prompts,
    to_markdown,
    warm_up,
)
from engines.measure.metrics import parse_slos
from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine

DEFAULT_CONCURRENCY = "1,8,32,128"
# Still importable from here, as before the measuring moved to engines/measure/load.py.
__all__ = ["LoadLevel", "add_arguments", "measure_level", "measure_levels", "parse_levels", "parse_rates", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--engine", required=True, help="variant name (see `python -m engines list`)")
    parser.add_argument("--concurrency", default=None,
                        help=f"comma-separated numbers of simultaneous requests (default {DEFAULT_CONCURRENCY} "
                             "unless --rate is given)")
    parser.add_argument("--rate", default=None, metavar="R1,R2,...",
                        help="comma-separated request rates (requests/s): open-loop Poisson arrivals, as "
                             "vllm bench serve --request-rate")
    parser.add_argument("--num-requests", type=int, default=None, metavar="N",
                        help="requests per level (default: the concurrency for a concurrency level, 16 for a rate)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival intervals: 1 Poisson, <1 burstier, >1 steadier (default 1)")
    parser.add_argument("--goodput", default=None, metavar="ttft_ms:500,tpot_ms:50",
                        help="SLOs in ms (ttft_ms, tpot_ms, e2el_ms): goodput and SLO attainment per level")
    parser.add_argument("--attainment", type=float, default=DEFAULT_ATTAINMENT,
                        help=f"share of a level's requests that must meet the SLOs for the level to meet them "
                             f"(default {DEFAULT_ATTAINMENT})")
    parser.add_argument("--find-max", action="store_true",
                        help="search the highest concurrency (or, with --rate, rate) meeting the SLOs: doubling "
                             "from the first level given (default 1), then bisection")
    parser.add_argument("--max-steps", type=int, default=MAX_SEARCH_STEPS,
                        help=f"levels --find-max may run (default {MAX_SEARCH_STEPS})")
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


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EngineError(f"--rate must be numbers of requests/s separated by commas, got '{text}'") from None
    if not rates:
        raise EngineError(f"--rate names no rate: '{text}'")
    for rate in rates:
        check_rate(rate)
    return rates


def parse_goodput(text: str | None) -> dict[str, float]:
    try:
        return parse_slos(text)
    except ValueError as error:
        raise EngineError(str(error)) from None


def run(args) -> int:
    rates = parse_rates(args.rate) if args.rate is not None else []
    if args.concurrency is not None:
        levels = parse_levels(args.concurrency)
    else:
        levels = [] if rates else parse_levels(DEFAULT_CONCURRENCY)
    slos = parse_goodput(args.goodput)
    if args.find_max and not slos:
        raise EngineError("--find-max needs --goodput SLOs, e.g. --goodput ttft_ms:500,tpot_ms:50")
    if not 0 < args.attainment <= 1:
        raise EngineError(f"--attainment is a share in (0, 1], got {args.attainment}")
    if args.num_requests is not None and args.num_requests < 1:
        raise EngineError(f"--num-requests must be at least 1, got {args.num_requests}")
    params = GenerationParams(max_new_tokens=args.max_new_tokens).validate()
    prompts = [as_prompt(args, text) for text in sample_prompts()]
    options = engine_options(args)
    engine = create_engine(args.engine, model=args.model, **options)
    search = None
    try:
        engine.load(progress=progress_to_stderr)
        if args.find_max:
            warm_up(engine, prompts)
            mode = "rate" if rates else "concurrency"
            start = rates[0] if rates else (levels[0] if args.concurrency is not None else 1)
            search = find_max(engine, params, slos, mode=mode, start=start, max_steps=args.max_steps,
                              prompts=prompts, num_requests=args.num_requests, seed=args.seed,
                              burstiness=args.burstiness, target_attainment=args.attainment,
                              say=progress_to_stderr, is_warm=True)
            results = search.levels
        else:
            results = measure_levels(engine, levels, params, say=progress_to_stderr, prompts=prompts, rates=rates,
                                     num_requests=args.num_requests, slos_ms=slos, seed=args.seed,
                                     burstiness=args.burstiness, target_attainment=args.attainment)
        source = getattr(engine, "source", None)
    finally:
        engine.unload()
    if args.json:
        from engines.measure.manifest import build_manifest
        manifest = build_manifest(model=args.model, source=source, engines={args.engine: options}, seed=args.seed,
                                  mode="load find-max" if args.find_max else "load",
                                  device=getattr(engine, "device", None))
        print(json.dumps(results_json(args.engine, params, results, slos, search, args.attainment, manifest),
                         indent=2))
    else:
        print(to_markdown(args.engine, results, slos, search, args.attainment))
    return 0
