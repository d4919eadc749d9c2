"""GPU measurement of the vLLM engines (issues 4 and 5), in one call: `vllm` against `vllm-fp8kv`
(load time, batch-1 decode tok/s over 256 tokens, aggregate tok/s at concurrency 1/32/128, KV blocks
total, peak KV usage, greedy agreement and perplexity against bf16), then `vllm-spec` (n-gram)
against `vllm` on a repetitive and a free-form prompt, with acceptance rates.

Timing: vLLM runs its model in a child process, so CUDA events cannot bracket it from here; every
time is wall clock (perf_counter) in the engine's own event-loop thread, after a warm-up request,
and quoted as the median of --repeats runs. One engine that fails becomes a row with its error.

Run on a CUDA machine with the GPU bundle installed (about 5 minutes):
    python3 scripts/gpu/vllm.py --out $OUT
On CPU, a small smoke run of the same code:
    python scripts/gpu/vllm.py --device cpu --max-new-tokens 16 --levels 1,4 --repeats 1 --out /tmp/vllm-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

# This file is named vllm.py: its own folder must leave sys.path, or `import vllm` would import it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parents[1]))

from engines.measure.load import measure_level  # noqa: E402
from engines.measure.quality import perplexity_text, quality_prompts, token_agreement  # noqa: E402
from engines.protocol import GenerationParams, describe_error  # noqa: E402
from engines.registry import create_engine  # noqa: E402

FREE_FORM_PROMPT = "Write a short essay about the history of the printing press."
REPETITIVE_PROMPT = (
    "List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
    "Copy: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
    "List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
    "Copy:"
)
AGREEMENT_TOKENS = 32
NUM_AGREEMENT_PROMPTS = 4


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def greedy_ids(engine, prompt: str, num_tokens: int) -> list[int]:
    for _ in engine.stream(prompt, GenerationParams(max_new_tokens=num_tokens)):
        pass
    return list(engine.last_token_ids)


def timed_stream(engine, prompt: str, num_tokens: int) -> dict:
    for _ in engine.stream(prompt, GenerationParams(max_new_tokens=num_tokens)):
        pass
    return engine.stats().to_dict()


def bf16_reference(device: str) -> dict:
    engine = create_engine("bf16", device=device)
    engine.load(progress=say)
    try:
        prompts = quality_prompts()[:NUM_AGREEMENT_PROMPTS]
        return {"prompts": prompts, "ids": [greedy_ids(engine, prompt, AGREEMENT_TOKENS) for prompt in prompts]}
    finally:
        engine.unload()


def measure_engine(engine, args, reference: dict | None) -> dict:
    row: dict = {"engine": engine.name, "kv_cache_dtype": engine.options.kv_cache_dtype, "load_s": engine.load_s}
    timed_stream(engine, FREE_FORM_PROMPT, 16)
    runs = [timed_stream(engine, FREE_FORM_PROMPT, args.max_new_tokens) for _ in range(args.repeats)]
    row["batch1_decode_tok_s"] = statistics.median(run["decode_tok_s"] for run in runs)
    row["batch1_ttft_s"] = statistics.median(run["ttft_s"] for run in runs)
    row["batch1_num_tokens"] = runs[0]["num_tokens"]
    row["peak_memory_gb"] = max(run["peak_memory_gb"] or 0.0 for run in runs)
    row["memory_kind"] = runs[0]["memory_kind"]
    kv = engine.kv_stats()
    row["kv_blocks_total"], row["kv_block_size"] = kv["kv_blocks_total"], kv["kv_block_size"]
    params = GenerationParams(max_new_tokens=args.load_tokens)
    row["levels"] = [asdict(measure_level(engine, level, params)) for level in args.levels]
    row["kv_peak_used_frac"] = max((level["kv_peak_used_frac"] or 0.0) for level in row["levels"])
    if reference:
        agreements = [
            token_agreement(expected, greedy_ids(engine, prompt, AGREEMENT_TOKENS))
            for prompt, expected in zip(reference["prompts"], reference["ids"])
        ]
        row["greedy_agreement_vs_bf16"] = sum(agreements) / len(agreements)
    row["perplexity"] = engine.perplexity(perplexity_text())
    return row


def measure_speculation(spec_engine, base_engine, args) -> list[dict]:
    rows = []
    for label, prompt in (("repetitive", REPETITIVE_PROMPT), ("free-form", FREE_FORM_PROMPT)):
        timed_stream(spec_engine, prompt, 16)
        timed_stream(base_engine, prompt, 16)
        spec_runs = [timed_stream(spec_engine, prompt, args.max_new_tokens) for _ in range(args.repeats)]
        spec_ids = list(spec_engine.last_token_ids)
        base_runs = [timed_stream(base_engine, prompt, args.max_new_tokens) for _ in range(args.repeats)]
        spec_tok_s = statistics.median(run["decode_tok_s"] for run in spec_runs)
        base_tok_s = statistics.median(run["decode_tok_s"] for run in base_runs)
        last = spec_runs[-1]
        rows.append(
            {
                "prompt": label,
                "vllm_tok_s": base_tok_s,
                "vllm_spec_tok_s": spec_tok_s,
                "speedup": spec_tok_s / base_tok_s,
                "is_identical": spec_ids == list(base_engine.last_token_ids),
                **{
                    key: last[key]
                    for key in (
                        "num_drafts",
                        "num_draft_tokens",
                        "num_accepted_tokens",
                        "acceptance_rate",
                        "mean_accepted_len",
                    )
                },
            }
        )
    return rows


def engine_options(args) -> dict:
    if args.device == "cpu":
        return {"device": "cpu", "enforce_eager": True, "kv_cache_gb": 1.0}
    return {"gpu_memory_utilization": args.gpu_memory_utilization}


def load(name: str, args):
    engine = create_engine(name, **engine_options(args))
    engine.load(progress=say)
    return engine


def error_text(error: BaseException) -> str:
    traceback.print_exception(error)
    return describe_error(error)


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_tables(rows: list[dict], spec_rows: list[dict], args, header: str) -> None:
    print(f"\n{header}\n")
    level_heads = " | ".join(f"agg tok/s @{level}" for level in args.levels)
    print(
        f"| engine | KV dtype | load s | batch-1 tok/s ({args.max_new_tokens} tok) | {level_heads} | KV blocks total "
        "| block size | peak KV used | greedy agreement vs bf16 | perplexity |"
    )
    print("|" + "---|" * (9 + len(args.levels)))
    for row in rows:
        if "error" in row:
            print(f"| {row['engine']} | error: {row['error'][:100]} |" + " |" * (8 + len(args.levels)))
            continue
        levels = " | ".join(fmt(level["aggregate_tok_s"]) for level in row["levels"])
        print(
            f"| {row['engine']} | {row['kv_cache_dtype']} | {fmt(row['load_s'])} | {fmt(row['batch1_decode_tok_s'])} "
            f"| {levels} | {row['kv_blocks_total']} | {row['kv_block_size']} | {fmt(row['kv_peak_used_frac'], 4)} "
            f"| {fmt(row.get('greedy_agreement_vs_bf16'), 3)} | {fmt(row['perplexity'], 2)} |"
        )
    print(
        "\n| prompt | vllm tok/s | vllm-spec tok/s | speed-up | identical | drafts | draft tokens | accepted "
        "| acceptance rate | mean accepted len |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in spec_rows:
        if "error" in row:
            print(f"| {row['prompt']} | error: {row['error'][:100]} | | | | | | | | |")
            continue
        print(
            f"| {row['prompt']} | {fmt(row['vllm_tok_s'])} | {fmt(row['vllm_spec_tok_s'])} | {fmt(row['speedup'], 2)} "
            f"| {row['is_identical']} | {row['num_drafts']} | {row['num_draft_tokens']} | {row['num_accepted_tokens']} "
            f"| {fmt(row['acceptance_rate'], 3)} | {fmt(row['mean_accepted_len'], 2)} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for vllm.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--max-new-tokens", type=int, default=256, help="batch-1 and speculation tokens")
    parser.add_argument("--load-tokens", type=int, default=128, help="tokens per request at each level")
    parser.add_argument("--levels", default="1,32,128", help="concurrency levels (default 1,32,128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="each engine's GPU share")
    parser.add_argument("--no-reference", action="store_true", help="skip the bf16 greedy reference")
    args = parser.parse_args()
    args.levels = [int(level) for level in args.levels.split(",")]
    os.makedirs(args.out, exist_ok=True)
    reference = None
    if not args.no_reference:
        try:
            reference = bf16_reference(args.device)
        except Exception as error:
            print(f"bf16 reference failed: {error_text(error)}")
    rows, spec_rows = [], []
    for name in ("vllm", "vllm-fp8kv"):
        engine = None
        try:
            engine = load(name, args)
            rows.append(measure_engine(engine, args, reference))
        except Exception as error:
            rows.append({"engine": name, "error": error_text(error)})
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
        if name == "vllm" and engine is not None and engine.is_loaded:
            spec = None
            try:
                spec = load("vllm-spec", args)
                spec_rows = measure_speculation(spec, engine, args)
            except Exception as error:
                spec_rows = [{"prompt": "both", "error": error_text(error)}]
            finally:
                if spec is not None:
                    spec.unload()
            print(json.dumps(spec_rows, indent=1, default=str), flush=True)
        if engine is not None:
            engine.unload()
    header = platform_header(args)
    print_tables(rows, spec_rows, args, header)
    Path(args.out, "vllm.json").write_text(
        json.dumps(
            {"header": header, "engines": rows, "speculation": spec_rows, "args": vars(args)}, indent=2, default=str
        )
    )
    return 0


def platform_header(args) -> str:
    import torch
    import vllm

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    return (
        f"{device} | vLLM {vllm.__version__} | torch {torch.__version__} | median of {args.repeats}, "
        f"wall clock after warm-up | {time.strftime('%Y-%m-%d')}"
    )


if __name__ == "__main__":
    sys.exit(main())
