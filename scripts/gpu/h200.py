"""The H200 driver (issues 16 and 17): the playground as its users run it, measured from outside, plus the
8B-shape runs, each step writing JSON and markdown under --out as it finishes.

Steps (`python3 scripts/gpu/h200.py STEP --out DIR`):
- `app`: starts `python -m app` (through scripts/gpu/app_server.py, which adds per-engine options and three
  measuring endpoints) and drives it with gradio_client, the API the browser uses:
  1. loads every available engine of --engines (in-process ones first, then the vLLM ones, each with its
     gpu_memory_utilization share), reading whole-device memory (NVML) before and after;
  2. one parallel run with every engine resident: each pane's text, status, VRAM and KV blocks as the page
     shows them, and the run's export (run.json);
  3. P3: engine stamp -> client latency over that run: the server records the engine's own stamp of each
     streamed event (perf_counter, CLOCK_MONOTONIC), the client the moment the pane's text reached that
     length; p50/p95 per token at the combined rate of all panes;
  4. P1: per engine, fair-mode decode tok/s in the app against the same loaded engine's stream() called
     directly in the same server process (/standalone_decode), alternating, medians of --repeats;
  5. vLLM unload: every vLLM engine unloaded through the API, device memory against its level before they
     loaded (goal: within 5%), then Unload all.
- `latency`: `vllm bench latency` (input 512, output 256, batch 1) on a dummy shape, vLLM's own reference.
- `goals`: reads the bench folders and latency JSON and writes goals.md (where each goal stands).
The benches themselves run through scripts/gpu/bench.py (one process per engine); run_h200.sh chains it all.

CPU smoke test of the app step (few engines):
    .venv/bin/python scripts/gpu/h200.py app --engines bf16,spec --max-new-tokens 16 --repeats 1 --out /tmp/h200-app
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
ROOT = _HERE.parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL_ENGINES = "bf16,bf16-compiled,nf4,int8,gptq-int4,spec,vllm,vllm-fp8kv,vllm-spec,vllm-int4,gguf"
PROMPT = "Write a short essay about the history of the printing press."
P1_TARGET, P3_TARGET_MS, UNLOAD_TOLERANCE = 0.97, 150.0, 0.05
GB = 1024**3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def device_used_gb() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / GB
    except Exception:
        return None


def gpu_processes() -> list[dict]:
    try:
        import psutil
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        rows = []
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            try:
                name = " ".join(psutil.Process(process.pid).cmdline())[:80]
            except Exception:
                name = "?"
            rows.append({"pid": process.pid, "used_gb": (process.usedGpuMemory or 0) / GB, "cmd": name})
        return rows
    except Exception:
        return []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The page's outputs, found by component and content so that a reordering of the callbacks' outputs
# (tuples or dicts) does not move what is read --------------------------------------------------------
class Page:
    def __init__(self, api: dict, endpoint: str = "/run"):
        returns = api["named_endpoints"][endpoint]["returns"]
        self.text_slots = [i for i, r in enumerate(returns) if r["component"] == "Textbox" and r["label"] == "Output"]
        self.metric_slots = [i for i, r in enumerate(returns) if r["component"].lower() == "html"]
        self.markdown_slots = [i for i, r in enumerate(returns) if r["component"] == "Markdown"]
        self.summary_slot = next((i for i, r in enumerate(returns) if r["component"] == "Dataframe"), None)
        self.values: list = [None] * len(returns)

    def update(self, output) -> None:
        output = output if isinstance(output, (list, tuple)) else [output]
        for index, value in enumerate(output[: len(self.values)]):
            if value is not None:
                self.values[index] = value

    def texts(self) -> list[str]:
        return [self.values[i] or "" for i in self.text_slots]

    def status(self) -> str:
        return next(
            (
                str(self.values[i])
                for i in self.markdown_slots
                if self.values[i] and str(self.values[i]).startswith(("Run", "Loading", "⚠️", "Stopp"))
            ),
            "",
        )

    def pane_states(self) -> list[tuple[str, str]]:
        found = []
        for i in self.markdown_slots:
            match = re.search(r"`([^`]+)` · ([\w ]+)", str(self.values[i] or ""))
            if match:
                found.append((match.group(1), match.group(2).strip()))
        return found

    def metrics(self) -> list[dict]:
        panes = []
        for i in self.metric_slots:
            html = str(self.values[i] or "")
            values = dict(re.findall(r'data-metric="([^"]+)">([^<]*)<', html))
            error = re.search(r'class="pane-error">([^<]*)<', html)
            note = re.search(r'class="pane-note">([^<]*)<', html)
            values["error"] = error.group(1) if error else ""
            values["note"] = note.group(1) if note else ""
            panes.append(values)
        return panes


def number_of(text: str | None) -> float | None:
    match = re.search(r"-?[\d,]+(?:\.\d+)?", text or "")
    return float(match.group(0).replace(",", "")) if match else None


def call(client, page: Page, endpoint: str, *args, on_update=None, **kwargs):
    """Submit, feed every streamed update to `page` (and `on_update(t, page)`), return the last output."""
    job = client.submit(*args, api_name=endpoint, **kwargs)
    last = None
    for output in job:
        now = time.perf_counter()
        page.update(output)
        last = output
        if on_update:
            on_update(now, page)
    return last


class AppSession:
    def __init__(self, args, keys: list[str], options: dict, out: Path):
        self.args, self.keys, self.options, self.out = args, keys, options, out
        self.port = free_port()
        self.process = None

    def __enter__(self):
        command = [
            sys.executable,
            str(ROOT / "scripts" / "gpu" / "app_server.py"),
            "--engine-options",
            json.dumps(self.options),
            "--",
            "--port",
            str(self.port),
            "--max-panes",
            str(max(len(self.keys), 1)),
            "--max-queue",
            "64",
        ]
        log(f"$ {' '.join(command)}")
        self.log_file = open(self.out / "app_server.log", "w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"python -m app exited with {self.process.returncode}; see app_server.log")
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise RuntimeError("python -m app did not answer within 240 s")
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=str(self.out / "downloads"))
        self.api = self.client.view_api(print_info=False, return_format="dict")
        return self

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            import psutil

            try:
                children = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            for child in children:  # started by the app (vLLM's engine cores); killed by their own ids
                try:
                    child.kill()
                except psutil.Error:
                    pass
        self.log_file.close()


def run_kwargs(session: AppSession, prompt: str, max_new_tokens: int, mode: str, keys: list[str]) -> dict:
    names = [p["parameter_name"] for p in session.api["named_endpoints"]["/run"]["parameters"]]
    values = {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "seed": 0,
        "mode": mode,
        "keys": keys,
    }
    if set(values) <= set(names):
        return {name: values[name] for name in names if name in values}
    raise RuntimeError(f"/run takes {names}; this driver knows {list(values)}")


def load_engines(session: AppSession, keys: list[str]) -> dict:
    page = Page(session.api, "/load")
    started = time.perf_counter()
    call(session.client, page, "/load", keys=keys)
    return {
        "keys": keys,
        "s": time.perf_counter() - started,
        "status": page.status(),
        "panes": [{"key": key, **metric} for key, metric in zip(keys, page.metrics())],
        "states": page.pane_states(),
    }


def parallel_run(session: AppSession, keys: list[str], max_new_tokens: int) -> tuple[dict, dict]:
    """One run with every pane; returns (per-pane results, P3 latency)."""
    session.client.predict(api_name="/token_stamps")  # drop the stamps of earlier calls
    page = Page(session.api)
    arrivals: list[tuple[float, list[int]]] = []
    started = time.perf_counter()
    call(
        session.client,
        page,
        "/run",
        **run_kwargs(session, PROMPT, max_new_tokens, "parallel", keys),
        on_update=lambda now, p: arrivals.append((now, [len(text) for text in p.texts()])),
    )
    wall_s = time.perf_counter() - started
    stamps = json.loads(session.client.predict(api_name="/token_stamps"))
    states = dict(page.pane_states())
    panes = []
    for index, (key, metric) in enumerate(zip(keys, page.metrics())):
        text = page.texts()[index] if index < len(page.texts()) else ""
        panes.append({"key": key, "state": states.get(key, ""), "text": text, "text_chars": len(text), **metric})
    export = {}
    try:
        exported_after = time.time()
        files, note = session.client.predict(api_name="/export")
        # gradio_client downloads the files into its download folder; the newest run.json there is this one.
        found = sorted(
            (
                path
                for path in (session.out / "downloads").rglob("run.json")
                if path.stat().st_mtime >= exported_after - 5
            ),
            key=lambda path: path.stat().st_mtime,
        )
        run_json = found[-1] if found else None
        if run_json:
            export = json.loads(Path(run_json).read_text())
            (session.out / "run.json").write_text(json.dumps(export, indent=1))
        export_note = note
    except Exception as error:
        export_note = f"export failed: {error}"
    by_key = {engine["key"]: engine for engine in export.get("engines", [])}
    for pane in panes:
        stats = (by_key.get(pane["key"]) or {}).get("stats") or {}
        for field in (
            "num_tokens",
            "ttft_s",
            "decode_tok_s",
            "peak_memory_gb",
            "memory_kind",
            "kv_blocks_total",
            "kv_peak_used_frac",
            "acceptance_rate",
            "finish_reason",
        ):
            pane[f"stats_{field}"] = stats.get(field)
    latency = p3_latency(keys, stamps, arrivals, wall_s)
    return {"status": page.status(), "wall_s": wall_s, "panes": panes, "export_note": export_note}, latency


def p3_latency(keys: list[str], stamps: list, arrivals: list, wall_s: float) -> dict:
    """For each streamed event: the first client update whose pane text reached the event's length,
    minus the engine's stamp. Per token (an event of k tokens counts k times)."""
    times = [t for t, _ in arrivals]
    lengths = {key: [lens[i] if i < len(lens) else 0 for _, lens in arrivals] for i, key in enumerate(keys)}
    per_token, missing = [], 0
    for key, stamp, chars, num_tokens in stamps:
        if key not in lengths:
            continue
        seen = lengths[key]
        index = next((i for i in range(bisect.bisect_left(times, stamp), len(seen)) if seen[i] >= chars), None)
        if index is None:
            missing += 1
            continue
        per_token.extend([(times[index] - stamp) * 1000.0] * int(num_tokens))
    tokens = sum(int(s[3]) for s in stamps)
    result = {
        "num_events": len(stamps),
        "num_tokens": tokens,
        "num_updates": len(arrivals),
        "unmatched_events": missing,
        "combined_tok_s": tokens / wall_s if wall_s else None,
        "target_p95_ms": P3_TARGET_MS,
    }
    if per_token:
        ordered = sorted(per_token)
        result.update(
            p50_ms=ordered[len(ordered) // 2],
            p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            max_ms=ordered[-1],
            meets_goal=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] < P3_TARGET_MS,
        )
    return result


def p1_overhead(session: AppSession, keys: list[str], max_new_tokens: int, repeats: int, deadline: float) -> list[dict]:
    rows = []
    for key in keys:
        if time.monotonic() > deadline:
            rows.append({"engine": key, "error": "skipped: the step's time budget was spent"})
            continue
        try:

            def in_app(n):
                page = Page(session.api)
                call(session.client, page, "/run", **run_kwargs(session, PROMPT, n, "fair", [key]))
                metric = page.metrics()[0]
                if metric.get("error"):
                    raise RuntimeError(metric["error"])
                return number_of(metric.get("decode_tok_s"))

            def standalone(n):
                return json.loads(session.client.predict(key, PROMPT, n, api_name="/standalone_decode"))["decode_tok_s"]

            in_app(8), standalone(8)
            app_runs, alone_runs = [], []
            for index in range(repeats):
                pair = [(app_runs, in_app), (alone_runs, standalone)]
                for target, measure in pair if index % 2 == 0 else pair[::-1]:
                    target.append(measure(max_new_tokens))
            app_median, alone_median = statistics.median(app_runs), statistics.median(alone_runs)
            rows.append(
                {
                    "engine": key,
                    "app_tok_s": app_runs,
                    "standalone_tok_s": alone_runs,
                    "app_median_tok_s": app_median,
                    "standalone_median_tok_s": alone_median,
                    "ratio": app_median / alone_median if alone_median else None,
                    "meets_goal": bool(alone_median) and app_median / alone_median >= P1_TARGET,
                }
            )
        except Exception as error:
            rows.append({"engine": key, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        log(f"P1 {key}: {rows[-1]}")
    return rows


def vllm_unload(session: AppSession, vllm_keys: list[str], before_vllm_gb: float | None) -> dict:
    loaded_gb = device_used_gb()
    steps = []
    for key in vllm_keys:
        before = device_used_gb()
        answer = json.loads(session.client.predict(key, api_name="/unload_engine"))
        time.sleep(3)
        steps.append({"key": key, "before_gb": before, "after_gb": device_used_gb(), **answer})
    after_gb = device_used_gb()
    ratio = after_gb / before_vllm_gb if after_gb and before_vllm_gb else None
    return {
        "before_vllm_load_gb": before_vllm_gb,
        "with_vllm_gb": loaded_gb,
        "after_vllm_unload_gb": after_gb,
        "ratio": ratio,
        "meets_goal": ratio is not None and abs(ratio - 1) <= UNLOAD_TOLERANCE,
        "steps": steps,
    }


def app_step(args) -> int:
    from engines.registry import list_engines

    out = Path(args.out) / "app"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows = {row["name"]: row for row in list_engines()}
    wanted = [name for name in args.engines.split(",") if name]
    keys = [name for name in wanted if name in rows and rows[name]["is_available"]]
    skipped = {
        name: (rows[name]["reason"] if name in rows else "not in the registry") for name in wanted if name not in keys
    }
    vllm_keys = [key for key in keys if key.startswith("vllm")]
    share = args.vllm_share
    options = {key: {"gpu_memory_utilization": share, "max_num_seqs": args.max_num_seqs} for key in vllm_keys}
    if "gptq-int4" in keys:
        options["gptq-int4"] = {"backend": args.gptq_backend}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "engines": keys,
        "skipped": skipped,
        "options": options,
        "device_before_gb": device_used_gb(),
    }

    def save():
        (out / "app.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "app.md").write_text(app_markdown(result))

    try:
        with AppSession(args, keys, options, out) as session:
            result["startup_device_gb"] = device_used_gb()
            in_process = [key for key in keys if key not in vllm_keys]
            log(f"loading in-process engines {in_process}")
            result["load_in_process"] = load_engines(session, in_process) if in_process else None
            result["device_in_process_gb"] = device_used_gb()
            save()
            log(f"loading vLLM engines {vllm_keys}")
            result["load_all"] = load_engines(session, keys)
            result["device_all_gb"] = device_used_gb()
            result["gpu_processes"] = gpu_processes()
            save()
            log("parallel run, every engine resident")
            result["parallel"], result["p3"] = parallel_run(session, keys, args.max_new_tokens)
            log(f"P3 {result['p3']}")
            save()
            result["p1"] = p1_overhead(session, keys, args.p1_tokens, args.repeats, deadline - 60)
            save()
            if vllm_keys:
                result["vllm_unload"] = vllm_unload(session, vllm_keys, result["device_in_process_gb"])
                log(f"vLLM unload {result['vllm_unload']}")
            session.client.predict(api_name="/unload")
            time.sleep(2)
            result["device_after_unload_all_gb"] = device_used_gb()
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        log(f"app step failed: {result['error']}")
    result["device_end_gb"] = device_used_gb()
    save()
    print(app_markdown(result))
    return 0 if "error" not in result else 1


def fmt(value, digits=2):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def app_markdown(result: dict) -> str:
    lines = [
        f"# App on the GPU, driven through gradio_client ({result.get('date', '')})",
        "",
        f"`{result.get('command', '')}`",
        "",
        f"Engines: {', '.join(result.get('engines', []))}.",
    ]
    if result.get("skipped"):
        lines.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + ".")
    lines.append(
        f"Device memory (NVML, whole GPU, GiB): before the app {fmt(result.get('device_before_gb'))}, "
        f"in-process engines loaded {fmt(result.get('device_in_process_gb'))}, all loaded "
        f"{fmt(result.get('device_all_gb'))}, after Unload all {fmt(result.get('device_after_unload_all_gb'))}."
    )
    for name in ("load_in_process", "load_all"):
        load = result.get(name)
        if load:
            lines.append(f"{name}: {fmt(load['s'], 0)} s, {load['status']}")
    parallel = result.get("parallel")
    if parallel:
        lines += [
            "",
            f"## Parallel run, every engine resident: {parallel['status']} ({fmt(parallel['wall_s'], 1)} s)",
            "",
            "| pane | state | tokens | TTFT s | decode tok/s | memory shown | KV blocks shown "
            "| peak memory GiB (export) | KV blocks total | text (start) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for pane in parallel["panes"]:
            text = (pane.get("error") or pane["text"][:70]).replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {pane['key']} | {pane['state']} | {pane.get('num_tokens', '')} | {pane.get('ttft_s', '')} | "
                f"{pane.get('decode_tok_s', '')} | {pane.get('memory_gb', '')} | {pane.get('kv_blocks', '')} | "
                f"{fmt(pane.get('stats_peak_memory_gb'))} | {fmt(pane.get('stats_kv_blocks_total'))} | {text} |"
            )
    p3 = result.get("p3")
    if p3:
        lines += [
            "",
            f"P3, engine stamp -> client: p50 {fmt(p3.get('p50_ms'), 1)} ms, p95 {fmt(p3.get('p95_ms'), 1)} ms, "
            f"max {fmt(p3.get('max_ms'), 1)} ms over {p3['num_tokens']} tokens ({p3['num_events']} events, "
            f"{p3['num_updates']} page updates) at {fmt(p3.get('combined_tok_s'), 0)} tok/s combined; "
            f"goal p95 < {P3_TARGET_MS:.0f} ms: {'met' if p3.get('meets_goal') else 'not met'}.",
        ]
    if result.get("p1"):
        lines += [
            "",
            "## P1: fair-mode decode tok/s in the app against the same engine standalone, same process",
            "",
            "| engine | app tok/s (median) | standalone tok/s (median) | ratio | >= 0.97 |",
            "|---|---|---|---|---|",
        ]
        for row in result["p1"]:
            if "error" in row:
                lines.append(f"| {row['engine']} | {row['error']} | | | |")
            else:
                lines.append(
                    f"| {row['engine']} | {fmt(row['app_median_tok_s'], 1)} | {fmt(row['standalone_median_tok_s'], 1)} "
                    f"| {fmt(row['ratio'], 3)} | {'yes' if row['meets_goal'] else 'no'} |"
                )
    unload = result.get("vllm_unload")
    if unload:
        lines += [
            "",
            f"vLLM unload: device {fmt(unload['before_vllm_load_gb'])} GiB before the vLLM engines loaded, "
            f"{fmt(unload['with_vllm_gb'])} with them, {fmt(unload['after_vllm_unload_gb'])} after unloading them; "
            f"ratio {fmt(unload['ratio'], 3)} (goal within 5%: {'met' if unload['meets_goal'] else 'not met'}).",
        ]
    if result.get("error"):
        lines += ["", f"**Error:** {result['error']}"]
    return "\n".join(lines) + "\n"


def run_group(command: list[str], timeout_s: float, env: dict):
    """subprocess.run in a process group of its own, killed whole on timeout (vLLM's engine core with it);
    returncode is None when it timed out."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("gpu_bench", _HERE / "bench.py")  # scripts/gpu/bench.py
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    returncode, stdout, stderr = gpu_bench.run_in_own_group(command, timeout_s, cwd="/tmp", env=env)
    if returncode is None:
        stderr += f"\ntimed out after {timeout_s:.0f} s; the process group was killed"
    return types.SimpleNamespace(returncode=returncode, stdout=stdout, stderr=stderr)


def latency_step(args) -> int:
    """vLLM's own `vllm bench latency` on the dummy shape: the outside reference for the vllm engine."""
    from engines.models.sources import resolve_model

    out = Path(args.out) / "latency"
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(f"dummy:{args.dummy_config}")
    rows = []
    for label, extra in (("vllm (BF16)", []),):
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.cli.main",
            "bench",
            "latency",
            "--model",
            str(source.path),
            "--load-format",
            "dummy",
            "--input-len",
            "512",
            "--output-len",
            "256",
            "--batch-size",
            "1",
            "--num-iters-warmup",
            "3",
            "--num-iters",
            str(args.latency_iters),
            "--max-model-len",
            "4096",
            "--gpu-memory-utilization",
            "0.3",
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--output-json",
            str(out / "latency.json"),
            *extra,
        ]
        log(f"$ {' '.join(command)}")
        started = time.perf_counter()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # CPU only
        done = run_group(command, args.budget_s, env)
        if done.returncode != 0 and "PackageNotFoundError" in done.stderr:
            # vllm-cpu installs as the distribution vllm_cpu, so its CLI stops at a version lookup; the same
            # benchmark module (what `vllm bench latency` calls) runs directly.
            command = [sys.executable, str(Path(__file__).resolve()), "vllm-latency-main", *command[5:]]
            log(f"$ {' '.join(command)}")
            done = run_group(command, args.budget_s, env)
        (out / "latency.log").write_text(done.stdout + done.stderr)
        row = {
            "engine": label,
            "command": " ".join(command),
            "rc": done.returncode if done.returncode is not None else "timeout",
            "wall_s": time.perf_counter() - started,
        }
        if (out / "latency.json").is_file():
            data = json.loads((out / "latency.json").read_text())
            row.update(avg_latency_s=data.get("avg_latency"), percentiles=data.get("percentiles"))
            row["e2e_tok_s"] = 256 / data["avg_latency"] if data.get("avg_latency") else None
        rows.append(row)
        log(f"latency: {row}")
    (out / "latency_summary.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(row["rc"] == 0 for row in rows) else 1


def goals_step(args) -> int:
    """Where the goals stand, from the bench folders and the latency JSON under --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Goals on the 8B shape (batch 1)", ""]
    dummy = out / "bench-dummy" / f"dummy-{args.dummy_config}" / "results.json"
    rows = (
        {row["engine"].split("[")[0]: row for row in json.loads(dummy.read_text())["rows"]} if dummy.is_file() else {}
    )
    goals = {"vllm": 0.75, "bf16-compiled": 0.50}
    for name, goal in goals.items():
        row = rows.get(name)
        if row and row.get("roofline_frac"):
            lines.append(
                f"- {name}: {row['decode_tok_s']:.1f} tok/s = {100 * row['roofline_frac']:.1f}% of its roofline "
                f"({row['roofline_tok_s']:.1f} tok/s); goal {100 * goal:.0f}%: "
                f"{'met' if row['roofline_frac'] >= goal else 'not met'}"
            )
        else:
            lines.append(f"- {name}: not measured ({(row or {}).get('reason', 'no row')})")
    int4 = [rows[name] for name in ("vllm-int4", "gptq-int4", "nf4") if rows.get(name, {}).get("roofline_frac")]
    if int4:
        best = max(int4, key=lambda row: row["decode_tok_s"])
        vllm = rows.get("vllm", {}).get("decode_tok_s")
        versus = (
            f"{best['decode_tok_s'] / vllm:.2f}x vllm BF16 ({vllm:.1f} tok/s)" if vllm else "vllm BF16 not measured"
        )
        lines.append(
            f"- best INT4: {best['engine']} {best['decode_tok_s']:.1f} tok/s = "
            f"{100 * best['roofline_frac']:.1f}% of its roofline ({best['roofline_tok_s']:.1f} tok/s); goal 60%: "
            f"{'met' if best['roofline_frac'] >= 0.6 else 'not met'}; "
            f"{versus}"
        )
    else:
        lines.append("- best INT4: not measured")
    latency = out / "latency" / "latency_summary.json"
    if latency.is_file() and rows.get("vllm", {}).get("decode_tok_s"):
        reference = json.loads(latency.read_text())[0]
        vllm = rows["vllm"]
        if reference.get("avg_latency_s") and vllm.get("prefill_s"):
            ours = vllm["prefill_s"] + 255 / vllm["decode_tok_s"]
            lines.append(
                f"- `vllm bench latency` (512 in, 256 out, batch 1): {reference['avg_latency_s']:.3f} s; the "
                f"playground's vllm engine, prefill of 512 + 255 decode steps at its bench rate: {ours:.3f} s "
                f"({100 * (ours / reference['avg_latency_s'] - 1):+.1f}%; goal within 5%: "
                f"{'met' if abs(ours / reference['avg_latency_s'] - 1) <= 0.05 else 'not met'})"
            )
    text = "\n".join(lines) + "\n"
    (out / "goals.md").write_text(text)
    print(text)
    return 0


def vllm_latency_main(argv: list[str]) -> int:
    """`vllm bench latency` without the CLI's version lookup: its own parser and main()."""
    from vllm.benchmarks.latency import add_cli_args
    from vllm.benchmarks.latency import main as latency_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    latency_main(parser.parse_args(argv))
    return 0


def main() -> int:
    # A step killed by run_h200.sh's timeout gets SIGTERM: exiting through SystemExit runs the context managers,
    # so the app server (its own process group, vLLM engine cores included) is killed instead of orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.argv[1:2] == ["vllm-latency-main"]:
        return vllm_latency_main(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("step", choices=["app", "latency", "goals"])
    parser.add_argument("--out", default=os.environ.get("OUT", "out/h200"))
    parser.add_argument("--engines", default=ALL_ENGINES)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens of the parallel run (default 128)")
    parser.add_argument("--p1-tokens", type=int, default=128, help="tokens per P1 run (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="P1 pairs per engine (default 3)")
    parser.add_argument("--vllm-share", type=float, default=0.12, help="gpu_memory_utilization per vLLM engine")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="vLLM max_num_seqs (fewer CUDA graphs to capture)")
    parser.add_argument("--gptq-backend", default="gptq_triton", help="GPTQModel backend for gptq-int4")
    parser.add_argument("--dummy-config", default="llama-3-8b")
    parser.add_argument("--latency-iters", type=int, default=10)
    parser.add_argument("--budget-s", type=int, default=540, help="the step's time budget")
    args = parser.parse_args()
    return {"app": app_step, "latency": latency_step, "goals": goals_step}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
