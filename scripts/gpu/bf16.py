"""GPU verification of the `bf16` engine (issue 2): decode tok/s for 256 greedy tokens with eager and
sdpa attention, through the engine's streaming path and through a bare generate(), plus a profile of
where a decode step's time goes. Prints a markdown table and writes bf16.json under --out.

Run on a CUDA machine with the GPU bundle installed:
    python3 scripts/gpu/bf16.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines.protocol import GenerationParams  # noqa: E402
from engines.registry import create_engine  # noqa: E402
from engines.variants.transformers.attention import sdpa_backend_context  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press."


def timed_stream(engine, max_new_tokens: int) -> dict:
    text = "".join(event.text for event in engine.stream(PROMPT, GenerationParams(max_new_tokens=max_new_tokens)))
    stats = engine.stats()
    return {
        "decode_tok_s": stats.decode_tok_s,
        "ttft_s": stats.ttft_s,
        "num_tokens": stats.num_tokens,
        "text": text,
        "peak_vram_gb": stats.peak_memory_gb,
        "memory_kind": stats.memory_kind,
        "torch_peak_gb": stats.torch_peak_gb,
    }


def timed_bare_generate(engine, max_new_tokens: int) -> float:
    """tok/s of model.generate without a streamer: the library's own ceiling on this path."""
    import torch

    input_ids, attention_mask = engine.encode(PROMPT)
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode(), sdpa_backend_context(engine.options.get("sdpa_backend", "auto")):
        output = engine.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
        )
    torch.cuda.synchronize()
    return (output.shape[1] - input_ids.shape[1]) / (time.perf_counter() - started)


def profile_decode(engine, num_tokens: int = 32) -> dict:
    """Top ops by self CPU and CUDA time over a short generation, and kernel launches per token."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    input_ids, attention_mask = engine.encode(PROMPT)
    with (
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
        torch.inference_mode(),
        sdpa_backend_context(engine.options.get("sdpa_backend", "auto")),
    ):
        engine.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
        )
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    cpu_total_us = sum(e.self_cpu_time_total for e in events)
    cuda_total_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "kernel_launches_per_token": launches / num_tokens,
        "self_cpu_ms_per_token": cpu_total_us / 1000 / num_tokens,
        "self_cuda_ms_per_token": cuda_total_us / 1000 / num_tokens,
        "top_cpu_ops": [(e.key, e.count, round(e.self_cpu_time_total / 1000, 2)) for e in top_cpu],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for bf16.json")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    rows = []
    variants = [
        ("bf16", "eager", "auto"),
        ("bf16", "sdpa", "auto"),
        ("bf16", "sdpa", "efficient"),
        ("bf16", "sdpa", "flash"),
        ("bf16-compiled", "sdpa", "auto"),
    ]
    for engine_name, attn, sdpa_backend in variants:
        row = {"engine": engine_name, "attn": attn if attn == "eager" else f"sdpa/{sdpa_backend}"}
        try:
            engine = create_engine(engine_name, attn_implementation=attn, sdpa_backend=sdpa_backend)
            started = time.perf_counter()
            engine.load(progress=lambda m: print("  ", m, flush=True))
            row["load_s"] = time.perf_counter() - started
            timed_stream(engine, 32)  # warm-up (and compilation for bf16-compiled)
            runs = [timed_stream(engine, args.max_new_tokens) for _ in range(args.repeats)]
            row["stream_decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
            row["ttft_s"] = statistics.median(r["ttft_s"] for r in runs)
            row["num_tokens"] = runs[0]["num_tokens"]
            row["peak_vram_gb"] = max(r["peak_vram_gb"] for r in runs)
            row["memory_kind"] = runs[0]["memory_kind"]
            row["torch_peak_gb"] = runs[0]["torch_peak_gb"]
            row["text_head"] = runs[0]["text"][:120]
            row["bare_generate_tok_s"] = timed_bare_generate(engine, args.max_new_tokens)
            if engine_name == "bf16" and sdpa_backend == "auto":
                row["profile"] = profile_decode(engine)
            engine.unload()
            torch.cuda.empty_cache()
        except Exception as error:
            traceback.print_exception(error.__cause__ or error)
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
    print(
        f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.max_new_tokens} greedy tokens, "
        f"median of {args.repeats}\n"
    )
    print(
        "| engine | attn | stream decode tok/s | bare generate tok/s | TTFT s | peak VRAM GB"
        " | launches/token | CPU ms/token | CUDA ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['engine']} | {row['attn']} | error: {row['error'][:80]} | | | | | | |")
            continue
        prof = row.get("profile", {})
        print(
            f"| {row['engine']} | {row['attn']} | {row['stream_decode_tok_s']:.1f} | {row['bare_generate_tok_s']:.1f} "
            f"| {row['ttft_s']:.3f} | {row['peak_vram_gb']:.2f}"
            f" | {prof.get('kernel_launches_per_token', float('nan')):.0f} "
            f"| {prof.get('self_cpu_ms_per_token', float('nan')):.1f}"
            f" | {prof.get('self_cuda_ms_per_token', float('nan')):.2f} |"
        )
    Path(args.out, "bf16.json").write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
