"""GPU verification of the quantized engines (issue 3): decode tok/s for 256 greedy tokens, peak VRAM,
perplexity, greedy agreement with bf16 and weight footprint for bf16, nf4, int8 and gptq-int4 (plus
gptq-int4 with marlin, which GPTQModel JIT-compiles when nvcc is there). Names the GPTQ kernel. The
suspect column comes from engines.measure.quality alone. One failing engine is a row with its error.
Prints a markdown table and writes quantized.json under --out.

Run on a CUDA machine with the GPU bundle (gptqmodel added with --nodeps):
    python3 scripts/gpu/quantized.py --out $OUT
On CPU, for a quick check of the script itself:
    python scripts/gpu/quantized.py --device cpu --max-new-tokens 8 --repeats 1 --quality-tokens 4 \
        --engines bf16 gptq-int4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engines.protocol import GenerationParams  # noqa: E402
from engines.registry import create_engine  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press."
VARIANTS = {
    "bf16": ("bf16", {}),
    "nf4": ("nf4", {}),
    "int8": ("int8", {}),
    "gptq-int4": ("gptq-int4", {}),
    "gptq-int4-marlin": ("gptq-int4", {"backend": "gptq_marlin"}),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3


def timed_run(engine, device: str, max_new_tokens: int) -> dict:
    """One greedy generation through the engine's stream; wall time bracketed by device syncs."""
    synchronize(device)
    started = time.perf_counter()
    text = "".join(event.text for event in engine.stream(PROMPT, GenerationParams(max_new_tokens=max_new_tokens)))
    synchronize(device)
    wall_s = time.perf_counter() - started
    stats = engine.stats()
    return {
        "decode_tok_s": stats.decode_tok_s,
        "ttft_s": stats.ttft_s,
        "num_tokens": stats.num_tokens,
        "end_to_end_tok_s": stats.num_tokens / wall_s,
        "text": text,
    }


def measure(key: str, args, reference) -> dict:
    name, options = VARIANTS[key]
    row: dict = {"variant": key, "engine": name}
    engine = None
    try:
        reset_peak(args.device)
        engine = create_engine(name, model=args.model, device=args.device, **options)
        started = time.perf_counter()
        engine.load(progress=lambda message: print("  ", message, flush=True))
        row["load_s"] = time.perf_counter() - started
        row["kernel_name"] = getattr(engine, "kernel_name", None)
        row["backend"] = getattr(engine, "backend", None)
        timed_run(engine, args.device, 16)  # warm-up: kernels, autotuning, allocator
        runs = [timed_run(engine, args.device, args.max_new_tokens) for _ in range(args.repeats)]
        row["decode_tok_s"] = statistics.median(run["decode_tok_s"] for run in runs)
        row["end_to_end_tok_s"] = statistics.median(run["end_to_end_tok_s"] for run in runs)
        row["ttft_s"] = statistics.median(run["ttft_s"] for run in runs)
        row["num_tokens"] = runs[0]["num_tokens"]
        row["text_head"] = runs[0]["text"][:160]
        row["peak_vram_gb"] = peak_gb(args.device)
        row["process_peak_gb"] = engine.stats().peak_memory_gb
        row["memory_kind"] = engine.stats().memory_kind
        if reference is not None:
            from engines.measure.quality import evaluate_quality

            row.update({f"quality_{k}": v for k, v in evaluate_quality(engine, reference).to_dict().items()})
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    finally:
        if engine is not None:
            engine.unload()
    print(json.dumps(row, indent=1, default=str), flush=True)
    return row


def build_quality_reference(args):
    from engines.measure.quality import build_reference

    engine = create_engine("bf16", model=args.model, device=args.device)
    engine.load()
    try:
        return build_reference(engine, num_tokens=args.quality_tokens, use_cache=False)
    finally:
        engine.unload()


def fmt(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print(
        "| variant | kernel | decode tok/s | end-to-end tok/s | TTFT s | peak VRAM GB | weights GB | perplexity "
        "| ppl / bf16 | greedy agreement | suspect |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | error: {row['error'][:120]} | | | | | | | | | |")
            continue
        suspect = "yes: " + row["quality_reason"] if row.get("quality_is_suspect") else "no"
        print(
            f"| {row['variant']} | {row.get('kernel_name') or 'torch'} | {fmt(row['decode_tok_s'], '.1f')} "
            f"| {fmt(row['end_to_end_tok_s'], '.1f')} | {fmt(row['ttft_s'], '.3f')}"
            f" | {fmt(row['peak_vram_gb'], '.3f')} "
            f"| {fmt(row.get('quality_weight_footprint_gb'), '.3f')} | {fmt(row.get('quality_perplexity'), '.2f')} "
            f"| {fmt(row.get('quality_perplexity_ratio'), '.2f')} | {fmt(row.get('quality_greedy_agreement'), '.2f')} "
            f"| {suspect} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for quantized.json (default $OUT)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a check of the script")
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded Gemma-3-270M)")
    parser.add_argument("--engines", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; medians are quoted")
    parser.add_argument("--quality-tokens", type=int, default=32, help="greedy tokens per prompt compared with bf16")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device is visible; use --device cpu for a check of the script", file=sys.stderr)
        return 2
    try:
        reference = build_quality_reference(args)
        reference_error = None
    except Exception as error:
        reference, reference_error = None, f"{type(error).__name__}: {error}"
        print(f"quality reference failed, quality columns are n/a: {reference_error}", flush=True)
    rows = [measure(key, args, reference) for key in args.engines]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    import transformers

    header = (
        f"{device_name} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"{args.max_new_tokens} greedy tokens, median of {args.repeats} after a warm-up | quality: "
        f"{args.quality_tokens} tokens x {len(reference.prompts) if reference else 0} prompts vs bf16"
    )
    print_table(rows, header)
    Path(args.out, "quantized.json").write_text(
        json.dumps(
            {
                "header": header,
                "reference_perplexity": reference.perplexity if reference else None,
                "reference_error": reference_error,
                "rows": rows,
            },
            indent=2,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
