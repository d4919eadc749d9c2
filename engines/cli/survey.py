"""`python -m engines survey`: the survey's tables (number formats, quality, speed per precision and
attention, peak memory, its vLLM test, MQA/GQA/MHA) for one model on this machine, beside the survey's
quoted figures, and its three conclusions checked; writes survey.md, survey.html and survey.json to
--out, progress on stderr, the markdown last on stdout."""
from __future__ import annotations

import sys

from engines.cli.bench import split_engines
from engines.cli.common import add_model_argument, engine_options, progress_to_stderr
from engines.protocol import EngineError


def add_arguments(parser) -> None:
    from engines.measure.survey_attention import ATTENTION_CHOICES
    add_model_argument(parser, default="the embedded Gemma-3-270M")
    parser.add_argument("--dummy-weights", metavar="CONFIG", default=None,
                        help="random weights of a shape (e.g. llama-3-8b): speed and memory only, quality n/a")
    parser.add_argument("--engines", default=None,
                        help="precisions, comma-separated, each optionally with options in brackets (default: bf16, "
                             "int8, nf4, gptq-int4, and awq-int4/gguf where the registry has them)")
    parser.add_argument("--attention", default=None,
                        help=f"speed-table attention choices, comma-separated from {', '.join(ATTENTION_CHOICES)} "
                             "(default: all; sdpa always runs)")
    parser.add_argument("--tokens", default=None,
                        help="new tokens per speed run, comma-separated N (default 2048,8192 on a GPU, 32,64 on CPU)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="P, the encode-memory prompt (default 2048 on a GPU, 64 on CPU)")
    parser.add_argument("--runs", type=int, default=None, help="K, runs of the vLLM test (default 10 GPU, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per speed cell, median (default 1)")
    parser.add_argument("--vllm-engines", default=None,
                        help="the vLLM test's vLLM rows, or 'none' (default vllm,vllm[kv_cache_dtype=fp8_e5m2]; on "
                             "CPU with enforce_eager=true)")
    parser.add_argument("--vllm-max-new-tokens", type=int, default=None,
                        help="max new tokens in the vLLM test (default 256 GPU, 32 CPU)")
    parser.add_argument("--quality-tokens", type=int, default=None,
                        help="greedy tokens compared with bf16's per prompt (default 32 GPU, 8 CPU; at most 32)")
    parser.add_argument("--quality-prompts", type=int, default=None,
                        help="prompts compared with bf16 (default all on a GPU, 4 on CPU)")
    parser.add_argument("--no-cloze", action="store_true", help="skip the cloze score")
    parser.add_argument("--kv-memory-gib", type=float, default=80.0,
                        help="memory for the MQA/GQA/MHA concurrency table, GiB (default 80)")
    parser.add_argument("--kv-context", type=int, default=10240,
                        help="tokens per sequence in that table (default 10240: the survey's 2048 + 8192)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="transformers compute dtype (default bfloat16)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for every engine, repeatable (e.g. device=cpu)")
    parser.add_argument("--out", default="out/survey", help="folder for survey.md/.html/.json (default out/survey)")


def parse_counts(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EngineError(f"{flag} wants comma-separated whole numbers, got '{text}'") from None
    if not counts or any(count < 1 for count in counts):
        raise EngineError(f"{flag} wants positive counts, got '{text}'")
    return counts


def config_from_args(args):
    from engines.measure.survey import SurveyConfig
    if args.dummy_weights and args.model:
        raise EngineError("--dummy-weights and --model exclude each other: the shape comes from the config")
    vllm = None if args.vllm_engines is None else \
        ([] if args.vllm_engines.strip().lower() == "none" else split_engines(args.vllm_engines))
    return SurveyConfig(
        model=args.model, dummy_config=args.dummy_weights,
        engines=split_engines(args.engines) if args.engines else None,
        attention=[part.strip() for part in args.attention.split(",") if part.strip()] if args.attention else None,
        tokens=parse_counts(args.tokens, "--tokens"), prompt_tokens=args.prompt_tokens, runs=args.runs,
        repeats=args.repeats, vllm_engines=vllm, serving_max_new_tokens=args.vllm_max_new_tokens,
        quality_tokens=args.quality_tokens, quality_prompts=args.quality_prompts, is_cloze=not args.no_cloze,
        kv_memory_gib=args.kv_memory_gib, kv_context=args.kv_context, engine_options=engine_options(args))


def run(args) -> int:
    from engines.measure.survey import run_survey
    from engines.measure.survey_report import to_markdown, write_outputs
    report = run_survey(config_from_args(args), progress=progress_to_stderr)
    paths = write_outputs(report, args.out)
    progress_to_stderr("wrote " + ", ".join(str(path) for path in paths.values()))
    print(to_markdown(report))
    sys.stdout.flush()
    return 0 if any(row.status == "ok" for row in report.quality) else 1
