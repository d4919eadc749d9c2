"""GPU verification of issue 8's reliability items, through the same engine code as the app:

1. Unloading returns memory: per engine, device memory used (NVML, whole device, so vLLM's EngineCore
   child counts) before load, while loaded (after a warm-up and timed greedy runs) and after unload.
   Passes when the level after unload is within 5% of the level before load. The CUDA context is
   created before the first reading, since it stays for the life of the process whatever is unloaded.
2. A real out-of-memory: bf16 is loaded, a filler tensor takes nearly all free memory, and a long
   prompt must fail with the engine's readable "out of memory" message; after the filler is freed the
   same engine generates again (no reload needed).
3. Stop on vLLM: a stream closed after a few tokens leaves no unfinished request in vLLM.
One failing engine or check is a row with its error. Prints a markdown table, writes reliability.json.

    python3 scripts/gpu/reliability.py --out $OUT
On CPU, to check the script itself (RSS instead of device memory, no OOM check):
    python scripts/gpu/reliability.py --device cpu --engines bf16 --max-new-tokens 8 --repeats 1 --out /tmp/rel
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

from engines.protocol import EngineError, GenerationParams  # noqa: E402
from engines.registry import create_engine  # noqa: E402
from engines.telemetry import GB, nvml_device_used_gb, release_freed_memory  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press."
# gptq-int4 quantizes on first use (minutes without a cache): name it with --engines when its cache is there.
DEFAULT_ENGINES = ["bf16", "bf16-compiled", "nf4", "int8", "spec", "vllm", "vllm-fp8kv"]
ENGINE_OPTIONS = {
    "gptq-int4": {"backend": "gptq_triton"},
    "vllm": {"gpu_memory_utilization": 0.3},
    "vllm-fp8kv": {"gpu_memory_utilization": 0.3},
}
MEMORY_TOLERANCE = 0.05
SETTLE_S = 3.0


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def memory_gb(device: str) -> float:
    """Device memory in use (NVML; torch's reserved bytes when NVML is missing), or the RSS on CPU."""
    release_freed_memory()
    if device == "cpu":
        import psutil

        return psutil.Process().memory_info().rss / GB
    used = nvml_device_used_gb()
    if used is not None:
        return used
    import torch

    return torch.cuda.memory_reserved() / GB


def timed_tok_s(engine, device: str, max_new_tokens: int) -> float:
    synchronize(device)
    started = time.perf_counter()
    params = GenerationParams(max_new_tokens=max_new_tokens)
    num_tokens = sum(event.num_tokens for event in engine.stream(PROMPT, params))
    synchronize(device)
    return num_tokens / (time.perf_counter() - started)


def unload_check(name: str, device: str, max_new_tokens: int, repeats: int) -> dict:
    row = {"check": "unload returns memory", "engine": name}
    before = memory_gb(device)
    row["before_gb"] = round(before, 3)
    engine = None
    try:
        # vLLM picks its own device; the in-process engines are told which one.
        options = (
            ENGINE_OPTIONS.get(name, {})
            if name.startswith("vllm")
            else {**ENGINE_OPTIONS.get(name, {}), "device": device}
        )
        engine = create_engine(name, **options)
        engine.load()
        timed_tok_s(engine, device, 8)  # warm-up
        row["tok_s_median"] = round(
            statistics.median(timed_tok_s(engine, device, max_new_tokens) for _ in range(repeats)), 2
        )
        row["loaded_gb"] = round(memory_gb(device), 3)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    finally:
        if engine is not None:
            engine.unload()
    time.sleep(SETTLE_S)  # a vLLM EngineCore child process takes a moment to exit and release its memory
    after = memory_gb(device)
    row["after_gb"] = round(after, 3)
    row["after_over_before"] = round(after / before, 4) if before else None
    if "loaded_gb" in row and row["loaded_gb"] > before:
        row["retained_frac_of_engine"] = round(max(0.0, after - before) / (row["loaded_gb"] - before), 4)
    row["ok"] = "error" not in row and after <= before * (1 + MEMORY_TOLERANCE)
    return row


def oom_check(device: str) -> dict:
    """A real CUDA OOM inside generate(): readable message, and the engine works once memory is back."""
    import torch

    row = {"check": "real OOM mid-generation", "engine": "bf16"}
    engine = create_engine("bf16", device=device)
    filler = None
    try:
        engine.load()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        filler = torch.empty(max(0, free - 16 * 1024**2), dtype=torch.uint8, device=device)
        long_prompt = " ".join(["history"] * 6000)
        try:
            list(engine.stream(long_prompt, GenerationParams(max_new_tokens=64)))
            row["message"] = "no OOM happened (filler too small?)"
        except EngineError as error:
            row["message"] = str(error)[:200]
        del filler
        filler = None
        torch.cuda.empty_cache()
        text = "".join(event.text for event in engine.stream(PROMPT, GenerationParams(max_new_tokens=16)))
        row["after_text"] = text[:60]
        row["ok"] = "out of memory" in row["message"] and bool(text.strip())
    except Exception as error:
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
    finally:
        del filler
        engine.unload()
    return row


def vllm_stop_check() -> dict:
    row = {"check": "stop leaves no vLLM request", "engine": "vllm"}
    engine = create_engine("vllm", **ENGINE_OPTIONS["vllm"])
    try:
        engine.load()
        stream = engine.stream(PROMPT, GenerationParams(max_new_tokens=2000))
        for index, _ in enumerate(stream):
            if index >= 5:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while engine.num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        row["unfinished_requests"] = engine.num_unfinished_requests()
        row["num_tokens"] = engine.stats().num_tokens
        row["ok"] = row["unfinished_requests"] == 0 and engine.stats().finish_reason == "cancelled"
    except Exception as error:
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
    finally:
        engine.unload()
    return row


def to_markdown(rows: list[dict]) -> str:
    columns = [
        "check",
        "engine",
        "ok",
        "before_gb",
        "loaded_gb",
        "after_gb",
        "after_over_before",
        "retained_frac_of_engine",
        "tok_s_median",
        "message",
        "error",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")).replace("|", "/") for column in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for reliability.json (default $OUT)")
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--engines", nargs="+", default=DEFAULT_ENGINES, help="engines whose unload is checked")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per timed run (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine, median quoted (default 3)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.ones(1, device=device)  # the CUDA context, which no unload can return, exists before any reading
    # One unjudged bf16 cycle first: the first load in a process pays one-off library memory (imported
    # model code, cuBLAS workspaces, kernel caches) that belongs to the process, not to any engine.
    warm_up = unload_check("bf16", device, 8, 1)
    warm_up.update(check="warm-up cycle (not judged)", ok=None)
    rows = [warm_up] + [unload_check(name, device, args.max_new_tokens, args.repeats) for name in args.engines]
    if device.startswith("cuda"):
        rows.append(oom_check(device))
        if any(name.startswith("vllm") for name in args.engines):
            rows.append(vllm_stop_check())
    table = to_markdown(rows)
    print(
        f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}; pass = memory after "
        f"unload within {MEMORY_TOLERANCE:.0%} of before load\n"
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
