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
import signal
import subprocess
import sys
import time
from pathlib import Path

# scripts/gpu/ holds a vllm.py: this folder must leave sys.path, or `import vllm` (in --one) would import it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
ROOT = _HERE.parents[1]
sys.path.insert(0, str(ROOT))

from engines.measure.bench import BenchResult, BenchRow  # noqa: E402
from engines.measure.report import to_markdown, write_outputs  # noqa: E402

EMBEDDED_ENGINES = "bf16,bf16-compiled,spec,gptq-int4,nf4,int8,vllm,vllm-fp8kv,vllm-spec,vllm-int4"
DUMMY_ENGINES = "bf16,bf16-compiled,vllm,vllm-fp8kv,vllm-int4,nf4,gptq-int4"
BF16_WEIGHT_ENGINES = ("bf16", "bf16-compiled", "vllm", "vllm-fp8kv")
INT4_ENGINES = ("gptq-int4", "nf4", "vllm-int4")
# Engines the committed bench (engines/measure/bench.py at the time) cannot give random weights or roofline bytes:
# they run through run_one() below, the same run_bench with those two pieces supplied by the engine itself.
OWN_RUNNER = ("vllm-int4",)
GOALS = {"best_bf16_roofline_frac": 0.75, "best_int4_roofline_frac": 0.60}


def run_engine(name: str, args, out: Path, timeout_s: float) -> dict:
    """One engine in its own process; returns its results.json (or a row saying why there is none)."""
    engine_out = out / "engines" / name
    own = name.split("[")[0] in OWN_RUNNER
    runner = [str(Path(__file__).resolve()), "--one", name] if own else ["-m", "engines", "bench", "--engines", name]
    command = [
        sys.executable,
        *runner,
        "--out",
        str(engine_out),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--repeats",
        str(args.repeats),
    ]
    if args.suite == "dummy":
        command += ["--dummy-weights", args.dummy_config]
    for option in args.option:
        command += ["--option", option]
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    returncode, stdout, stderr = run_in_own_group(command, timeout_s)
    log = stdout + stderr
    reason = (
        f"timed out after {timeout_s:.0f} s"
        if returncode is None
        else f"exit status {returncode}: {_last_line(stderr)}"
    )
    (out / f"{name}.log").write_text(log)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    results = engine_out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    return {"rows": [BenchRow(engine=name, status="error", reason=reason).__dict__]}


def run_in_own_group(command: list[str], timeout_s: float, **popen) -> tuple[int | None, str, str]:
    """Run `command` in a process group of its own; on timeout kill the whole group, so that vLLM's engine
    core (a grandchild) dies with it. A plain subprocess timeout kills only the child: on the H200
    (2026-12-01) two orphaned engine cores kept 84 GiB of the GPU into the next step. None: timed out."""
    process = subprocess.Popen(
        command,
        cwd=popen.pop("cwd", ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = process.communicate()
        return None, stdout or "", stderr or ""


def run_one(name: str, args) -> int:
    """`python -m engines bench --engines NAME` for an engine that brings its own random-weight layout and
    roofline bytes (vllm-int4): the dummy shape goes to it as a folder with load_format=dummy (it writes the
    INT4 layout itself), and the roofline reads its `roofline_bytes()` instead of a table keyed by name."""
    import engines.measure.bench as bench
    from engines.cli.common import progress_to_stderr

    label, name = name, name.split("[")[0]
    from engines.measure.roofline import Roofline

    created = {}
    original_model_and_options, original_roofline, original_create = (
        bench._model_and_options,
        bench.decode_roofline,
        bench.create_engine,
    )

    def model_and_options(engine, config, source, device, say):
        if engine == name and source.origin == "dummy":
            return str(source.path), {**config.engine_options, "load_format": "dummy"}
        return original_model_and_options(engine, config, source, device, say)

    def create_engine(engine, **kwargs):
        created[engine] = original_create(engine, **kwargs)
        return created[engine]

    def decode_roofline(shape, engine_or_precision, bandwidth_gb_s, context_tokens, *rest):
        engine = created.get(engine_or_precision) if isinstance(engine_or_precision, str) else None
        if engine is None or not hasattr(engine, "roofline_bytes"):
            return original_roofline(shape, engine_or_precision, bandwidth_gb_s, context_tokens, *rest)
        read = engine.roofline_bytes(shape, context_tokens)
        return Roofline(
            read["bytes_per_token"],
            read["weight_bytes"],
            read["kv_bytes"],
            context_tokens,
            bandwidth_gb_s * 1e9 / read["bytes_per_token"],
        )

    bench._model_and_options, bench.decode_roofline = model_and_options, decode_roofline
    bench.create_engine = create_engine
    try:
        from engines.registry import parse_option_value as _parse_value
    except ImportError:  # before the typed options
        from engines.cli.common import _parse_value
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key.strip()] = _parse_value(value.strip())
    config = bench.BenchConfig(
        engines=[label],
        max_new_tokens=args.max_new_tokens,
        prompt_tokens=args.prompt_tokens,
        num_repeats=args.repeats,
        dummy_config=args.dummy_weights,
        engine_options=options,
        is_quality=not args.no_quality,
    )
    result = bench.run_bench(config, progress=progress_to_stderr)
    write_outputs(result, args.out)
    engine = created.get(name)
    details = {
        key: getattr(engine, key, None)
        for key in ("kernel_name", "quantization", "kernel", "method", "linear_bytes_per_weight")
    }
    details["checkpoint_path"] = str(getattr(engine, "checkpoint_path", None))
    (Path(args.out) / "engine.json").write_text(json.dumps(details, indent=1))
    print(to_markdown(result))
    print("engine:", json.dumps(details))
    return 0 if any(row.status == "ok" for row in result.rows) else 1


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summarize(result: BenchResult) -> dict:
    def best(names):
        rows = [row for row in result.rows if row.engine.split("[")[0] in names and row.roofline_frac]
        top = max(rows, key=lambda row: row.roofline_frac, default=None)
        return (
            None
            if top is None
            else {
                "engine": top.engine,
                "roofline_frac": top.roofline_frac,
                "decode_tok_s": top.decode_tok_s,
                "roofline_tok_s": top.roofline_tok_s,
            }
        )

    summary = {
        "best_bf16": best(BF16_WEIGHT_ENGINES),
        "best_int4": best(INT4_ENGINES),
        "goals": GOALS,
        "vllm": best(("vllm",)),
        "bf16_compiled": best(("bf16-compiled",)),
    }
    for key, goal in (("best_bf16", GOALS["best_bf16_roofline_frac"]), ("best_int4", GOALS["best_int4_roofline_frac"])):
        if summary[key]:
            summary[key]["meets_goal"] = summary[key]["roofline_frac"] >= goal
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT)")
    parser.add_argument("--suite", choices=["embedded", "dummy"], default="embedded")
    parser.add_argument(
        "--engines",
        default=None,
        help=f"comma-separated (embedded default {EMBEDDED_ENGINES}; dummy default {DUMMY_ENGINES})",
    )
    parser.add_argument("--dummy-config", default="llama-3-8b", help="shape for --suite dummy (default llama-3-8b)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-timeout-s", type=int, default=420, help="per engine process (default 420)")
    parser.add_argument(
        "--total-budget-s",
        type=int,
        default=540,
        help="stop starting engines after this long, so the tables are written inside a 10-minute call (default 540)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option passed to every engine, repeatable",
    )
    parser.add_argument("--one", metavar="ENGINE", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dummy-weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-quality", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="run nothing: merge the results.json of earlier calls' folders into --out",
    )
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args)
    if args.merge:
        parts = [json.loads((Path(folder) / "results.json").read_text()) for folder in args.merge]
        return report(parts, [row["engine"] for part in parts for row in part["rows"]], Path(args.out), "merged")
    engines = [
        name
        for name in (args.engines or (DUMMY_ENGINES if args.suite == "dummy" else EMBEDDED_ENGINES)).split(",")
        if name
    ]
    shape_name = Path(args.dummy_config).name.removesuffix(".json")
    out = Path(args.out) / (f"dummy-{shape_name}" if args.suite == "dummy" else "embedded")
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
    summary["engine_details"] = {
        path.parent.name: json.loads(path.read_text()) for path in sorted((out / "engines").glob("*/engine.json"))
    }
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n## {title}: {merged.model}\n")
    print(to_markdown(merged))
    print("\nroofline goals:", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
