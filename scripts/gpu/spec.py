"""GPU measurement of the `spec` engine (issue 5, transformers side): decode tok/s with and without
speculation on the same loaded engine, on a repetitive and a free-form prompt, with acceptance rates.
Drafting by prompt lookup, and by a draft model when --draft-model is given. Prints a markdown table
and writes spec.json under --out. The vLLM side (vllm-spec) is measured by the vLLM engine's script.

Run on a CUDA machine with the GPU bundle installed:
    python3 scripts/gpu/spec.py --out $OUT
Try it on CPU with:
    python3 scripts/gpu/spec.py --device cpu --max-new-tokens 32 --repeats 1 --out /tmp/spec
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines.protocol import GenerationParams  # noqa: E402
from engines.registry import create_engine  # noqa: E402
from engines.variants.transformers.speculative import measure_speedup  # noqa: E402

PROMPTS = {
    "repetitive": (
        "Here is a Python module:\n\n"
        + "".join(f"def scale_{n}(values):\n    return [value * {n} for value in values]\n\n" for n in range(2, 9))
        + "# The same module, copied verbatim:\n\ndef scale_2(values):\n"
    ),
    "free-form": "Write a short essay about the history of the printing press.",
}


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_engine(options: dict, args) -> list[dict]:
    """One row per prompt; a failure of the engine becomes rows that carry the error."""
    drafting = f"draft model {options['draft_model']}" if options.get("draft_model") else "prompt lookup"
    try:
        engine = create_engine("spec", model=args.model, device=args.device, **options)
        engine.load(progress=lambda message: print("  ", message, flush=True))
    except Exception as error:
        return [{"drafting": drafting, "prompt": name, "error": f"{type(error).__name__}: {error}"} for name in PROMPTS]
    rows = []
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    for name, prompt in PROMPTS.items():
        row = {"drafting": drafting, "prompt": name}
        try:
            # Warm-up: CUDA kernels, allocator and the candidate path, with and without speculation.
            measure_speedup(engine, prompt, GenerationParams(max_new_tokens=16), repeats=1)
            synchronize(args.device)
            result = measure_speedup(engine, prompt, params, repeats=args.repeats)
            synchronize(args.device)
            row.update(asdict(result))
            row["num_drafts"] = engine.last_counts.num_drafts
            row["num_draft_tokens"] = engine.last_counts.num_draft_tokens
            row["num_accepted_tokens"] = engine.last_counts.num_accepted_tokens
            row["num_steps"] = engine.last_counts.num_steps
            row["peak_memory_gb"] = engine.stats().peak_memory_gb
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    engine.unload()
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| drafting | prompt | tokens | tok/s without spec | tok/s with spec | speed-up | "
        "acceptance rate | mean accepted len | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['drafting']} | {row['prompt']} | error: {row['error'][:100]} | | | | | | |")
            continue
        rate = "n/a" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        length = "n/a" if row["mean_accepted_len"] is None else f"{row['mean_accepted_len']:.2f}"
        lines.append(
            f"| {row['drafting']} | {row['prompt']} | {row['num_tokens']} | {row['baseline_decode_tok_s']:.1f} "
            f"| {row['spec_decode_tok_s']:.1f} | {row['speedup']:.2f}x | {rate} | {length} "
            f"| {'yes' if row['is_same_text'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for spec.json (default $OUT)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the engine runs")
    parser.add_argument("--model", default=None, help="target model (default: the embedded Gemma-3-270M)")
    parser.add_argument("--draft-model", default=None, help="also measure drafting with this model (same tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per mode; medians are quoted")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    configurations = [{"prompt_lookup_num_tokens": args.prompt_lookup_num_tokens}]
    if args.draft_model:
        configurations.append({"draft_model": args.draft_model})
    rows = [row for options in configurations for row in measure_engine(options, args)]
    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    header = (
        f"{device_name} | torch {torch.__version__} | bf16 | {args.max_new_tokens} greedy tokens, "
        f"median decode tok/s of {args.repeats} alternating runs per mode"
    )
    print("\n" + markdown(rows, header))
    Path(args.out, "spec.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
