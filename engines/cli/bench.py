"""`python -m engines bench`: speed, memory, roofline and quality per engine; writes results.{json,csv,md}
and plots to --out, prints progress to stderr and the markdown table last."""
from __future__ import annotations

import sys

from engines.cli.common import add_chat_arguments, add_model_arguments, engine_options, progress_to_stderr
from engines.protocol import EngineError


def add_arguments(parser) -> None:
    parser.add_argument("--engines", required=True,
                        help="comma-separated variant names, e.g. bf16,gptq-int4,vllm (see `python -m engines list`)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per speed run, N (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prompt length of the encode-memory run, P (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; median (default 3)")
    parser.add_argument("--out", default="out/bench", help="folder for results.* and plots (default out/bench)")
    parser.add_argument("--dummy-weights", metavar="CONFIG", default=None,
                        help="random weights of a real architecture shape: a name from assets/configs "
                             "(llama-3-8b, qwen2.5-7b, llama-2-7b) or a config.json path; quality is then n/a")
    parser.add_argument("--no-quality", action="store_true", help="skip perplexity and greedy agreement")
    add_model_arguments(parser)
    add_chat_arguments(parser)


def run(args) -> int:
    from engines.measure.bench import BenchConfig, run_bench
    from engines.measure.report import to_markdown, write_outputs
    names = [name.strip() for name in args.engines.split(",") if name.strip()]
    if args.dummy_weights and args.model:
        raise EngineError("--dummy-weights and --model exclude each other: the shape comes from the config")
    config = BenchConfig(engines=names, max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens,
                         num_repeats=args.repeats, model=args.model, dummy_config=args.dummy_weights,
                         engine_options=engine_options(args), is_quality=not args.no_quality,
                         is_chat=args.chat, system=args.system)
    result = run_bench(config, progress=progress_to_stderr)
    paths = write_outputs(result, args.out)
    progress_to_stderr("wrote " + ", ".join(str(path) for path in paths.values()))
    print(to_markdown(result))
    sys.stdout.flush()
    return 0 if any(row.status == "ok" for row in result.rows) else 1
