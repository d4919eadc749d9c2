"""GPU benchmark runs of issue 7: the bench on the embedded model for every engine, and the dummy-weights
bench on a real 8B shape with roofline fractions. Prints the markdown tables and writes everything under
--out (one folder per suite: results.json/csv/md, PNG and HTML plots; summary.json with the goals).

Each engine runs in its own `python -m engines bench` process, so an engine that crashes, runs out of
memory or hangs past --engine-timeout-s is a row with the reason and the next engine starts on a clean
GPU. Every engine warms up first; speed is the median of --repeats; token times are stamped when the ids
reach the host, which synchronizes with the GPU. Bandwidth is a 2 GiB device-to-device copy timed with
CUDA events (engines/measure/roofline.py), measured in each engine's process.

On an H100 with the bundle installed (PYTHONPATH=/tmp/site); engines left over when --total-budget-s
runs out are rows saying so, to be run in a further call with --engines:
    python3 scripts/gpu/bench.py --suite embedded --engines bf16,bf16-compiled,spec,gptq-int4,nf4,int8 --out $OUT
    python3 scripts/gpu/bench.py --suite embedded --engines vllm,vllm-fp8kv,vllm-spec --out $OUT
    python3 scripts/gpu/bench.py --suite dummy --engines bf16,vllm,vllm-fp8kv --out $OUT
    python3 scripts/gpu/bench.py --suite dummy --engines nf4,bf16-compiled --out $OUT
    python3 scripts/gpu/bench.py --suite dummy --engines gptq-int4 --out $OUT   # quantizes 8B random weights
Afterwards, on any machine, merge the calls' folders into one table for docs/gpu/:
    python3 scripts/gpu/bench.py --merge OUT1/embedded OUT2/embedded --out docs/gpu/bench-embedded
CPU smoke test:
    python3 scripts/gpu/bench.py --engines bf16 --max-new-tokens 8 --prompt-tokens 64 --repeats 1 --out /tmp/b
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engines.measure.bench import BenchResult, BenchRow  # noqa: E402
from engines.measure.report import to_markdown, write_outputs  # noqa: E402

EMBEDDED_ENGINES = "bf16,bf16-compiled,spec,gptq-int4,nf4,int8,vllm,vllm-fp8kv,vllm-spec"
DUMMY_ENGINES = "bf16,bf16-compiled,vllm,vllm-fp8kv,nf4,gptq-int4"
BF16_WEIGHT_ENGINES = ("bf16", "bf16-compiled", "vllm", "vllm-fp8kv")
INT4_ENGINES = ("gptq-int4", "nf4")
GOALS = {"best_bf16_roofline_frac": 0.75, "best_int4_roofline_frac": 0.60}


def run_engine(name: str, args, out: Path, timeout_s: float) -> dict:
    """One engine in its own process; returns its results.json (or a row saying why there is none)."""
    engine_out = out / "engines" / name
    command = [sys.executable, "-m", "engines", "bench", "--engines", name, "--out", str(engine_out),
               "--max-new-tokens", str(args.max_new_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--repeats", str(args.repeats)]
    if args.suite == "dummy":
        command += ["--dummy-weights", args.dummy_config]
    for option in args.option:
        command += ["--option", option]
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        log = done.stdout + done.stderr
        reason = f"exit status {done.returncode}: {_last_line(done.stderr)}"
    except subprocess.TimeoutExpired as error:
        log = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        reason = f"timed out after {timeout_s:.0f} s"
    (out / f"{name}.log").write_text(log)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    results = engine_out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    return {"rows": [BenchRow(engine=name, status="error", reason=reason).__dict__]}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summarize(result: BenchResult) -> dict:
    def best(names):
        rows = [row for row in result.rows if row.engine in names and row.roofline_frac]
        top = max(rows, key=lambda row: row.roofline_frac, default=None)
        return None if top is None else {"engine": top.engine, "roofline_frac": top.roofline_frac,
                                         "decode_tok_s": top.decode_tok_s, "roofline_tok_s": top.roofline_tok_s}
    summary = {"best_bf16": best(BF16_WEIGHT_ENGINES), "best_int4": best(INT4_ENGINES), "goals": GOALS}
    for key, goal in (("best_bf16", GOALS["best_bf16_roofline_frac"]), ("best_int4", GOALS["best_int4_roofline_frac"])):
        if summary[key]:
            summary[key]["meets_goal"] = summary[key]["roofline_frac"] >= goal
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT)")
    parser.add_argument("--suite", choices=["embedded", "dummy"], default="embedded")
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated (embedded default {EMBEDDED_ENGINES}; dummy default {DUMMY_ENGINES})")
    parser.add_argument("--dummy-config", default="llama-3-8b", help="shape for --suite dummy (default llama-3-8b)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-timeout-s", type=int, default=420, help="per engine process (default 420)")
    parser.add_argument("--total-budget-s", type=int, default=540,
                        help="stop starting engines after this long, so the tables are written inside a "
                             "10-minute call (default 540)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="engine option passed to every engine, repeatable")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="run nothing: merge the results.json of earlier calls' folders into --out")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads((Path(folder) / "results.json").read_text()) for folder in args.merge]
        return report(parts, [row["engine"] for part in parts for row in part["rows"]], Path(args.out), "merged")
    engines = [name for name in (args.engines or (DUMMY_ENGINES if args.suite == "dummy" else EMBEDDED_ENGINES))
               .split(",") if name]
    out = Path(args.out) / (f"dummy-{Path(args.dummy_config).name.removesuffix('.json')}" if args.suite == "dummy" else "embedded")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.total_budget_s
    parts = []
    for name in engines:
        remaining_s = deadline - time.monotonic()
        if remaining_s < 30:
            reason = f"skipped: the run's --total-budget-s of {args.total_budget_s} s was spent; run it on its own"
            parts.append({"rows": [BenchRow(engine=name, status="error", reason=reason).__dict__]})
            continue
        parts.append(run_engine(name, args, out, min(args.engine_timeout_s, remaining_s)))
    return report(parts, engines, out, args.suite)


def report(parts: list[dict], engines: list[str], out: Path, title: str) -> int:
    """Merge per-engine results, write the files and summary.json, print the tables."""
    template = next((part for part in parts if "config" in part), None)
    if template is None:
        print("no engine produced results; see the .log files", file=sys.stderr)
        for part in parts:
            print(part["rows"][0], file=sys.stderr)
        return 1
    models = sorted({part["model"] for part in parts if "model" in part})
    if len(models) > 1:
        print(f"cannot merge results of different models into one table: {', '.join(models)}", file=sys.stderr)
        return 2
    merged = BenchResult.from_dict({**template, "rows": [row for part in parts for row in part["rows"]]})
    merged.config.engines = engines
    write_outputs(merged, out)
    summary = summarize(merged)
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n## {title}: {merged.model}\n")
    print(to_markdown(merged))
    print("\nroofline goals:", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
