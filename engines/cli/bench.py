"""`python -m engines bench`: speed, memory, roofline and quality per engine; writes results.{json,csv,md}
and plots to --out, prints progress to stderr and the markdown table last."""
from __future__ import annotations

import sys

from engines.cli.common import add_chat_arguments, add_model_arguments, engine_options, progress_to_stderr
from engines.protocol import EngineError


def add_arguments(parser) -> None:
    parser.add_argument("--engines", default=None,
                        help="comma-separated variant names, each optionally with its own options in brackets, e.g. "
                             "bf16,gptq-int4[backend=torch],vllm (see `python -m engines list`)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per speed run, N (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prompt length of the encode-memory run, P (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; median (default 3)")
    parser.add_argument("--out", default="out/bench", help="folder for results.* and plots (default out/bench)")
    parser.add_argument("--dummy-weights", metavar="CONFIG", default=None,
                        help="random weights of a real architecture shape: a name from assets/configs "
                             "(llama-3-8b, qwen2.5-7b, llama-2-7b) or a config.json path; quality is then n/a")
    parser.add_argument("--no-quality", action="store_true", help="skip perplexity and greedy agreement")
    parser.add_argument("--isolate", action="store_true",
                        help="run each engine in its own process (a crash, OOM or hang is that engine's row)")
    parser.add_argument("--budget-s", type=float, default=900.0,
                        help="with --isolate: seconds each engine's process may take (default 900)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="merge the results.json of these folders into --out instead of running anything")
    parser.add_argument("--profile", action="store_true",
                        help="one more run under torch.profiler: kernel launches, CPU and device ms per token")
    add_model_arguments(parser)
    add_chat_arguments(parser)


def split_engines(text: str) -> list[str]:
    """Split on commas outside brackets: 'a,b[x=1,y=2]' -> ['a', 'b[x=1,y=2]']."""
    names, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += ch
    return [name.strip() for name in names + [current] if name.strip()]


def run(args) -> int:
    from engines.measure.bench import BenchConfig, run_bench
    from engines.measure.isolated import merge_results, run_isolated
    from engines.measure.report import to_markdown, write_outputs
    if args.merge:
        return _write(merge_results(args.merge), args.out, to_markdown, write_outputs)
    if not args.engines:
        raise EngineError("name the engines with --engines (or merge earlier results with --merge DIR ...)")
    if args.budget_s <= 0:
        raise EngineError("--budget-s must be a positive number of seconds")
    names = split_engines(args.engines)
    if args.dummy_weights and args.model:
        raise EngineError("--dummy-weights and --model exclude each other: the shape comes from the config")
    config = BenchConfig(engines=names, max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens,
                         num_repeats=args.repeats, model=args.model, dummy_config=args.dummy_weights,
                         engine_options=engine_options(args), is_quality=not args.no_quality,
                         is_chat=args.chat, system=args.system, is_profiled=args.profile)
    if args.isolate:
        result = run_isolated(config, args.out, args.budget_s, progress_to_stderr)
    else:
        result = run_bench(config, progress=progress_to_stderr)
    return _write(result, args.out, to_markdown, write_outputs)


def _write(result, out: str, to_markdown, write_outputs) -> int:
    paths = write_outputs(result, out)
    progress_to_stderr("wrote " + ", ".join(str(path) for path in paths.values()))
    print(to_markdown(result))
    sys.stdout.flush()
    return 0 if any(row.status == "ok" for row in result.rows) else 1
