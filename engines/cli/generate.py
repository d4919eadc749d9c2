"""`python -m engines generate`: stream one prompt through one engine, then print its stats."""
from __future__ import annotations

import json
import sys

from engines.cli.common import (
    add_chat_arguments,
    add_generation_arguments,
    add_model_arguments,
    as_prompt,
    engine_options,
    generation_params,
    progress_to_stderr,
)
from engines.protocol import EngineError, validate_prompt
from engines.registry import create_engine


def add_arguments(parser) -> None:
    parser.add_argument("--engine", required=True, help="variant name (see `python -m engines list`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 text file, or from stdin with '-' (long prompts)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, tokens, ttft_s, decode_tok_s, itl_ms, memory)")
    parser.add_argument("--quality", action="store_true",
                        help="also measure greedy agreement with bf16, perplexity and weight footprint "
                             "(builds the bf16 reference once per model, cached on disk)")
    parser.add_argument("--quality-tokens", type=int, default=32,
                        help="greedy tokens per quality prompt compared with bf16 (default 32)")
    add_model_arguments(parser)
    add_chat_arguments(parser)
    add_generation_arguments(parser)


def read_prompt(args):
    """The prompt, checked before any model loads. A file is read as bytes, so that invalid UTF-8 is
    reported as such and not replaced on the way in."""
    if args.prompt_file is None:
        return validate_prompt(args.prompt)
    if args.prompt_file == "-":
        return validate_prompt(sys.stdin.buffer.read())
    try:
        with open(args.prompt_file, "rb") as handle:
            return validate_prompt(handle.read())
    except OSError as error:
        raise EngineError(f"cannot read the prompt file: {error.strerror}: {args.prompt_file}") from None


def run(args) -> int:
    params = generation_params(args)
    prompt = as_prompt(args, read_prompt(args))
    engine = create_engine(args.engine, model=args.model, **engine_options(args))
    try:
        result = _generate_and_score(engine, args, prompt, params)
    finally:
        engine.unload()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(_format_stats(result), file=sys.stderr)
        if "quality" in result:
            print(_format_quality(result["quality"]), file=sys.stderr)
    return 0


def _generate_and_score(engine, args, prompt, params) -> dict:
    """Load, stream the text to stdout (unless --json) and return the result with its stats."""
    engine.load(progress=progress_to_stderr)
    pieces = []
    for event in engine.stream(prompt, params):
        pieces.append(event.text)
        if not args.json:
            print(event.text, end="", flush=True)
    stats = engine.stats()
    result = {"engine": args.engine, "model": engine.source.name if getattr(engine, "source", None) else args.model,
              "text": "".join(pieces), **stats.to_dict()}
    if getattr(engine, "kernel_name", None):
        result["kernel_name"] = engine.kernel_name
    if args.quality:
        from engines.measure.quality import evaluate_quality, reference_for
        reference = reference_for(args.model, args.quality_tokens, progress_to_stderr)
        progress_to_stderr(f"quality: comparing {args.engine} with bf16 on {len(reference.prompts)} prompts")
        result["quality"] = evaluate_quality(engine, reference).to_dict()
    return result


def _format_stats(result: dict) -> str:
    def fmt(value, unit=""):
        return "n/a" if value is None else f"{value:.3f}{unit}" if isinstance(value, float) else f"{value}{unit}"
    return (f"--- {result['engine']}: {result['num_tokens']} tokens ({result['finish_reason']}), "
            f"TTFT {fmt(result['ttft_s'], ' s')}, decode {fmt(result['decode_tok_s'], ' tok/s')}, "
            f"ITL p50/p95 {fmt(result['itl_ms_p50'])}/{fmt(result['itl_ms_p95'])} ms, "
            f"peak memory {fmt(result['peak_memory_gib'], ' GiB')} ({result['memory_kind']})")


def _format_quality(quality: dict) -> str:
    def fmt(value, pattern):
        return "n/a" if value is None else format(value, pattern)
    return (f"--- quality vs bf16: greedy agreement {fmt(quality['greedy_agreement'], '.2f')}, perplexity "
            f"{fmt(quality['perplexity'], '.2f')} ({fmt(quality['perplexity_ratio'], '.2f')}x bf16's), weight "
            f"footprint {fmt(quality['weight_footprint_gib'], '.3f')} GiB; "
            f"{'SUSPECT: ' if quality['is_suspect'] else ''}{quality['reason']}")
