"""The GPU driver: runs the project's GPU suite on the device machine and collects its results.

Everything docs/gpu/RESULTS.md quotes comes from these steps (that file names the command beside each table).
Every step is a subcommand that also runs on its own in the foreground; `start` runs a list of them in the
background under one deadline, each in a process group of its own, and `poll` collects what they wrote.

Steps (each writes under --out, default $OUT, else out/gpu):
  prepare         convert the embedded model and the dummy Llama-3-8B shape once, outside every engine's time
                  budget (on the H200 the first engine spent 3 of its minutes converting the GGUF)
  bench-embedded  `python -m engines bench --isolate` on the embedded model, every engine
  bench-dummy     the same on the Llama-3-8B shape with random weights: decode against the roofline (CUDA)
  speculation     spec against bf16 and vllm-spec against vllm, each on a repetitive and a free-form prompt
  latency         `vllm bench latency` (512 in, 256 out, batch 1) on the dummy shape: vLLM's own reference (CUDA)
  app             `python -m app` with every engine resident, driven through gradio_client as the page drives
                  it (scripts/gpu/app_server.py is the server side): loads, a parallel run, P1, P3, vLLM unload
  tests           `pytest -m gpu tests/gpu` (CUDA)
  goals           where the goals stand, from the bench-dummy and latency results under --out
Session commands:
  snapshot                here, before the device calls: the committed HEAD plus this checkout's scripts/gpu
                          as .gpu-carry/tree, so other engineers' uncommitted edits never reach a measurement
  start DEADLINE_S STEP   on the device: copy the tree to --run-dir, then in the background install the staged
                          bundle (source /tmp/stage/install.sh) and run the steps in the order given
  steps DEADLINE_S STEP   what start runs, in the foreground
  poll                    the step log, the newest step log's tail, and the results as $OUT/gpu-results.tgz

One device session (one `run` call per line; the parts come from ../shared/gpu/make_bundle.py):
    python3 scripts/gpu/driver.py snapshot                                     (here, not a run)
    run  bash .gpu-carry/pNN/stage.sh                                          (carry .gpu-carry/pNN, every part)
    run  bash .gpu-carry/p11/stage.sh && cd .gpu-carry/tree && python3 scripts/gpu/driver.py start 1300 \\
             prepare bench-dummy latency goals                                 (carry .gpu-carry/p11, .gpu-carry/tree)
    run  python3 /tmp/gpu-run/repo/scripts/gpu/driver.py poll                  (until the log says "all done")
"""

from __future__ import annotations

import argparse
import bisect
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DRIVER = Path(__file__).resolve()

DUMMY_CONFIG = "llama-3-8b"
EMBEDDED_ENGINES = (
    "bf16,bf16-compiled,spec,gptq-int4[backend=gptq_triton],nf4,int8,vllm[max_num_seqs=16],"
    "vllm-fp8kv[max_num_seqs=16],vllm-spec[max_num_seqs=16],vllm-int4[max_num_seqs=16]"
)
DUMMY_ENGINES = "vllm[max_num_seqs=16],vllm-int4[max_num_seqs=16],bf16-compiled,vllm-fp8kv[max_num_seqs=16]"
APP_ENGINES = "bf16,bf16-compiled,nf4,int8,gptq-int4,spec,vllm,vllm-fp8kv,vllm-spec,vllm-int4,gguf"
APP_MODEL = "gemma-3-270m"  # the bench's model; the app alone would start with SmolLM2 in chat mode
PROMPT = "Write a short essay about the history of the printing press."
SPECULATION_PROMPTS = {
    "repetitive code": (
        "Here is a Python module:\n\n"
        + "".join(f"def scale_{n}(values):\n    return [value * {n} for value in values]\n\n" for n in range(2, 9))
        + "# The same module, copied verbatim:\n\ndef scale_2(values):\n"
    ),
    "repetitive list": "".join(
        f"{word}: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
        for word in ("List", "Copy", "List")
    )
    + "Copy:",
    "free-form": PROMPT,
}
# (plain engine, its --option values, speculative engine, its --option values, prompts): as the H100 tables ran.
SPECULATION_PAIRS = (
    ("bf16", [], "spec", ["prompt_lookup_num_tokens=10"], ("repetitive code", "free-form")),
    ("vllm", ["max_num_seqs=16"], "vllm-spec", ["max_num_seqs=16"], ("repetitive list", "free-form")),
)
GOAL_ROOFLINE_FRACS = {"vllm": 0.75, "bf16-compiled": 0.50}
GOAL_INT4_ROOFLINE_FRAC = 0.60
INT4_ENGINES = ("vllm-int4", "gptq-int4", "nf4")
LATENCY_INPUT_TOKENS, LATENCY_OUTPUT_TOKENS = 512, 256
LATENCY_TOLERANCE_FRAC = 0.05
P1_TARGET_RATIO, P3_TARGET_P95_MS, UNLOAD_TOLERANCE_FRAC = 0.97, 150.0, 0.05
APP_START_TIMEOUT_S = 240
APP_STOP_GRACE_S = 15.0  # the app unloads its engines and ends their processes within 10 s of SIGTERM
# Step -> its time limit under `start`; a step that takes --budget-s gets the limit less STEP_MARGIN_S.
STEP_LIMITS_S = {
    "prepare": 240,
    "bench-dummy": 540,
    "latency": 180,
    "app": 600,
    "bench-embedded": 600,
    "speculation": 450,
    "tests": 300,
    "goals": 60,
}
BUDGETED_STEPS = {"bench-embedded", "bench-dummy", "speculation", "latency", "app", "tests"}
STEPS_WITHOUT_OUT = {"prepare"}
STEP_MARGIN_S, MIN_STEP_S, KILL_GRACE_S = 30, 60, 10.0
DEFAULT_BUDGET_S = 540
RUN_DIR = Path("/tmp/gpu-run")
INSTALL_SCRIPT = Path("/tmp/stage/install.sh")
# What stays behind when start copies the tree (a running step must not see the device tool resync it).
NOT_COPIED = (".git", ".venv", ".gpu-carry", "__pycache__", "*.egg-info", "out", "logs", "test-artifacts", ".*cache")
STEP_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
}


class NeedsCuda(Exception):
    """The step measures a GPU; this machine has none."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def require_cuda(step: str, why: str) -> None:
    from engines.hardware import has_gpu

    if not has_gpu():
        raise NeedsCuda(f"{step}: needs a CUDA GPU ({why}); NVML finds none on this machine")


# Process groups ---------------------------------------------------------------------------------------
def end_group(process: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the process's group (so the engines unload), SIGKILL to what is left after grace_s."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader, which otherwise keeps the group alive as a zombie
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run_in_own_group(command: list[str], timeout_s: float, *, env: dict | None = None, stdout=None, stderr=None):
    """Run `command` in a process group of its own and end the whole group when it returns, times out or this
    process is stopped: vLLM's engine core is a grandchild, which a plain subprocess timeout leaves running (on
    the H200, 2026-12-01, two such orphans held 84 GiB into the next step). Returns the exit status, None on
    timeout."""
    log(f"$ {' '.join(command)}")
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
    )
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout_s:.0f} s; ending its process group")
        return None
    finally:
        end_group(process)


def gpu_processes() -> list[dict]:
    """Compute processes on the GPUs (nvidia-smi), with their parent pid; none without nvidia-smi."""
    found = []
    for line in nvidia_smi("--query-compute-apps=pid,used_memory").splitlines():
        pid_text, _, used_text = line.partition(",")
        if not pid_text.strip().isdigit():
            continue
        pid = int(pid_text)
        try:
            parent_pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except (OSError, IndexError, ValueError):
            parent_pid, command = None, "?"
        used = used_text.split()
        found.append({"pid": pid, "parent_pid": parent_pid, "used_mib": int(used[0]) if used else None, "cmd": command})
    return found


def nvidia_smi(query: str) -> str:
    """nvidia-smi's CSV answer to one query, without the header; empty without nvidia-smi."""
    try:
        command = ["nvidia-smi", query, "--format=csv,noheader"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


# prepare ------------------------------------------------------------------------------------------------
def prepare_step(args) -> int:
    from engines.models.sources import resolve_model

    for name in (None, f"dummy:{args.dummy_config}"):
        log(f"{name or 'the embedded model'}: {resolve_model(name, progress=log).path}")
    return 0


# bench-embedded, bench-dummy ---------------------------------------------------------------------------------
def bench_step(args, extra: list[str]) -> int:
    """`python -m engines bench --isolate` into --out/bench-<suite>; when the step's budget runs out first, the
    engines that finished are merged into the table all the same."""
    is_dummy = args.command == "bench-dummy"
    if is_dummy:
        require_cuda(args.command, "the Llama-3-8B shape's random BF16 weights take 16 GB")
    out = Path(args.out) / args.command
    command = [
        sys.executable, "-m", "engines", "bench", "--isolate", "--budget-s", str(args.engine_budget_s),
        "--engines", args.engines, "--max-new-tokens", str(args.max_new_tokens),
        "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats), "--out", str(out),
    ]
    if is_dummy:
        command += ["--dummy-weights", args.dummy_config]
    returncode = run_in_own_group(command + extra, args.budget_s)
    if returncode is not None:
        return returncode
    finished = sorted((path.parent for path in out.glob("engines/*/results.json")), key=lambda p: p.stat().st_mtime)
    if not finished:
        log("no engine finished inside the step's budget")
        return 1
    log(f"merging the {len(finished)} engine(s) that finished: {', '.join(path.name for path in finished)}")
    merge = [sys.executable, "-m", "engines", "bench", "--merge", *map(str, finished), "--out", str(out)]
    merged = run_in_own_group(merge, MIN_STEP_S)
    return 1 if merged is None else merged


# speculation ----------------------------------------------------------------------------------------------
def speculation_step(args) -> int:
    """Each engine of a pair generates --max-new-tokens greedy tokens from each prompt (`python -m engines
    generate --json`, one process per run); the table compares the speculative engine with its plain one."""
    out = Path(args.out) / "speculation"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows = []
    for plain, plain_options, speculative, speculative_options, prompt_names in SPECULATION_PAIRS:
        for prompt_name in prompt_names:
            prompt_path = out / f"{prompt_name.replace(' ', '-')}.txt"
            prompt_path.write_text(SPECULATION_PROMPTS[prompt_name])
            runs = {}
            for engine, options in ((plain, plain_options), (speculative, speculative_options)):
                result_path = out / f"{engine}-{prompt_path.stem}.json"
                command = [
                    sys.executable, "-m", "engines", "generate", "--engine", engine, "--prompt-file", str(prompt_path),
                    "--max-new-tokens", str(args.max_new_tokens), "--json",
                    *[part for option in options for part in ("--option", option)],
                ]
                runs[engine] = None
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    log(f"{engine} on the {prompt_name} prompt: skipped, the step's budget was spent")
                    continue
                with result_path.open("w") as result_file:
                    returncode = run_in_own_group(command, remaining_s, stdout=result_file)
                try:
                    runs[engine] = json.loads(result_path.read_text()) if returncode == 0 else None
                except ValueError:
                    log(f"{engine} on the {prompt_name} prompt: its output is not JSON")
            rows.append(speculation_row(plain, speculative, prompt_name, runs))
            log(f"speculation: {rows[-1]}")
    (out / "speculation.json").write_text(json.dumps(rows, indent=1))
    text = speculation_markdown(rows, args.max_new_tokens)
    (out / "speculation.md").write_text(text)
    print(text)
    return 0 if all("error" not in row for row in rows) else 1


def speculation_row(plain: str, speculative: str, prompt_name: str, runs: dict) -> dict:
    row = {"plain": plain, "speculative": speculative, "prompt": prompt_name}
    missing = [engine for engine, run in runs.items() if not run]
    if missing:
        return {**row, "error": f"no result from {', '.join(missing)} (see the step's log)"}
    base, spec = runs[plain], runs[speculative]
    return {
        **row,
        "num_tokens": spec["num_tokens"],
        "plain_decode_tok_s": base["decode_tok_s"],
        "speculative_decode_tok_s": spec["decode_tok_s"],
        "speedup": spec["decode_tok_s"] / base["decode_tok_s"] if base["decode_tok_s"] else None,
        "is_same_text": spec["text"] == base["text"],
        **{
            key: spec.get(key)
            for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "acceptance_rate", "mean_accepted_len")
        },
    }


def speculation_markdown(rows: list[dict], max_new_tokens: int) -> str:
    lines = [
        f"# Speculative decoding: {max_new_tokens} greedy tokens, one run per engine and prompt",
        "",
        "| engines | prompt | tokens | plain tok/s | speculative tok/s | speed-up | identical text | drafts "
        "| draft tokens | accepted | acceptance rate | mean accepted len |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pair = f"{row['plain']} / {row['speculative']}"
        if "error" in row:
            lines.append(f"| {pair} | {row['prompt']} | {row['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {pair} | {row['prompt']} | {row['num_tokens']} | {format_value(row['plain_decode_tok_s'], 1)} "
            f"| {format_value(row['speculative_decode_tok_s'], 1)} | {format_value(row['speedup'])} "
            f"| {'yes' if row['is_same_text'] else 'no'} | {format_value(row['num_drafts'])} "
            f"| {format_value(row['num_draft_tokens'])} | {format_value(row['num_accepted_tokens'])} "
            f"| {format_value(row['acceptance_rate'], 3)} | {format_value(row['mean_accepted_len'])} |"
        )
    return "\n".join(lines) + "\n"


# latency ------------------------------------------------------------------------------------------------
def latency_step(args) -> int:
    """vLLM's own `vllm bench latency` on the dummy shape: the outside reference for the vllm engine."""
    require_cuda(args.command, "vLLM's reference runs the Llama-3-8B shape on the GPU")
    from engines.models.sources import resolve_model

    out = Path(args.out) / "latency"
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(f"dummy:{args.dummy_config}")
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "latency", "--model", str(source.path),
        "--load-format", "dummy", "--input-len", str(LATENCY_INPUT_TOKENS),
        "--output-len", str(LATENCY_OUTPUT_TOKENS), "--batch-size", "1", "--num-iters-warmup", "3",
        "--num-iters", str(args.latency_iters), "--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
        "--max-num-seqs", str(args.max_num_seqs), "--output-json", str(out / "latency.json"),
    ]
    started = time.perf_counter()
    returncode = run_in_own_group(command, args.budget_s)
    summary = {
        "command": " ".join(command),
        "rc": "timeout" if returncode is None else returncode,
        "wall_s": time.perf_counter() - started,
    }
    if (out / "latency.json").is_file():
        data = json.loads((out / "latency.json").read_text())
        summary.update(avg_latency_s=data.get("avg_latency"), percentiles=data.get("percentiles"))
        if data.get("avg_latency"):
            summary["e2e_tok_s"] = LATENCY_OUTPUT_TOKENS / data["avg_latency"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"latency: {summary}")
    return 0 if returncode == 0 else 1


# goals --------------------------------------------------------------------------------------------------
def goals_step(args) -> int:
    """Where the goals stand, from --out/bench-dummy/results.json and --out/latency/summary.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dummy = out / "bench-dummy" / "results.json"
    rows = (
        {row["engine"].split("[")[0]: row for row in json.loads(dummy.read_text())["rows"]} if dummy.is_file() else {}
    )
    lines = [f"# Goals on the {args.dummy_config} shape (batch 1)", ""]
    for name, goal in GOAL_ROOFLINE_FRACS.items():
        row = rows.get(name)
        if row and row.get("roofline_frac"):
            lines.append(
                f"- {name}: {row['decode_tok_s']:.1f} tok/s = {100 * row['roofline_frac']:.1f}% of its roofline "
                f"({row['roofline_tok_s']:.1f} tok/s); goal {100 * goal:.0f}%: "
                f"{'met' if row['roofline_frac'] >= goal else 'not met'}"
            )
        else:
            lines.append(f"- {name}: not measured ({(row or {}).get('reason') or 'no row'})")
    int4 = [rows[name] for name in INT4_ENGINES if rows.get(name, {}).get("roofline_frac")]
    if int4:
        best = max(int4, key=lambda row: row["decode_tok_s"])
        vllm_tok_s = rows.get("vllm", {}).get("decode_tok_s")
        versus = (
            f"{best['decode_tok_s'] / vllm_tok_s:.2f}x vllm BF16 ({vllm_tok_s:.1f} tok/s)"
            if vllm_tok_s
            else "vllm BF16 not measured"
        )
        lines.append(
            f"- best INT4: {best['engine']} {best['decode_tok_s']:.1f} tok/s = {100 * best['roofline_frac']:.1f}% "
            f"of its roofline ({best['roofline_tok_s']:.1f} tok/s); goal {100 * GOAL_INT4_ROOFLINE_FRAC:.0f}%: "
            f"{'met' if best['roofline_frac'] >= GOAL_INT4_ROOFLINE_FRAC else 'not met'}; {versus}"
        )
    else:
        lines.append("- best INT4: not measured")
    latency = out / "latency" / "summary.json"
    reference_s = json.loads(latency.read_text()).get("avg_latency_s") if latency.is_file() else None
    vllm = rows.get("vllm", {})
    if reference_s and vllm.get("prefill_s") and vllm.get("decode_tok_s"):
        ours_s = vllm["prefill_s"] + (LATENCY_OUTPUT_TOKENS - 1) / vllm["decode_tok_s"]
        difference_frac = ours_s / reference_s - 1
        lines.append(
            f"- `vllm bench latency` ({LATENCY_INPUT_TOKENS} in, {LATENCY_OUTPUT_TOKENS} out, batch 1): "
            f"{reference_s:.3f} s; the playground's vllm engine, prefill of {LATENCY_INPUT_TOKENS} + "
            f"{LATENCY_OUTPUT_TOKENS - 1} decode steps at its bench rate: {ours_s:.3f} s "
            f"({100 * difference_frac:+.1f}%; goal within {100 * LATENCY_TOLERANCE_FRAC:.0f}%: "
            f"{'met' if abs(difference_frac) <= LATENCY_TOLERANCE_FRAC else 'not met'})"
        )
    else:
        lines.append("- vllm against `vllm bench latency`: not measured")
    text = "\n".join(lines) + "\n"
    (out / "goals.md").write_text(text)
    print(text)
    return 0


# tests --------------------------------------------------------------------------------------------------
def tests_step(args) -> int:
    require_cuda(args.command, "tests/gpu run the engines on the GPU; elsewhere pytest skips them all")
    out = Path(args.out) / "tests"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-rA", "--junitxml", str(out / "junit.xml")]
    returncode = run_in_own_group(command, args.budget_s)
    return 1 if returncode is None else returncode


# app: the page's outputs, found by component and content, so that a reordering of the callbacks' outputs does
# not move what is read ---------------------------------------------------------------------------------------
class Page:
    def __init__(self, api: dict, endpoint: str = "/run"):
        returns = api["named_endpoints"][endpoint]["returns"]
        self.text_slots = [i for i, r in enumerate(returns) if r["component"] == "Textbox" and r["label"] == "Output"]
        self.metric_slots = [i for i, r in enumerate(returns) if r["component"].lower() == "html"]
        self.markdown_slots = [i for i, r in enumerate(returns) if r["component"] == "Markdown"]
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
            # "### label <span class='pane-key'>`key` · model · state</span>": the key and the last part
            match = re.search(r"`([^`]+)`[^<]* · ([^·<]+)</span>", str(self.values[i] or ""))
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
    """Submit, feed every streamed update to `page` (and `on_update(time_s, page)`), return the last output."""
    job = client.submit(*args, api_name=endpoint, **kwargs)
    last = None
    for output in job:
        now_s = time.perf_counter()
        page.update(output)
        last = output
        if on_update:
            on_update(now_s, page)
    return last


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class AppSession:
    """`python -m app` through scripts/gpu/app_server.py, in a process group of its own, with a gradio_client."""

    def __init__(self, args, keys: list[str], options: dict, out: Path):
        self.args, self.keys, self.options, self.out = args, keys, options, out
        self.port = free_port()
        self.process = None

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self):
        command = [
            sys.executable, str(DRIVER.parent / "app_server.py"), "--engine-options", json.dumps(self.options), "--",
            "--model", self.args.model, "--port", str(self.port), "--max-panes", str(max(len(self.keys), 1)),
            "--max-queue", "64",
        ]
        log(f"$ {' '.join(command)}")
        self.log_file = open(self.out / "app_server.log", "w")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + APP_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"python -m app exited with {self.process.returncode}; see app_server.log")
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"python -m app did not answer within {APP_START_TIMEOUT_S} s")
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=str(self.out / "downloads"))
        self.api = self.client.view_api(print_info=False, return_format="dict")
        return self

    def __exit__(self, *exc):
        import psutil

        if self.process is None:
            return
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        end_group(self.process, APP_STOP_GRACE_S)
        for child in children:  # started by the app in groups of their own, if any: ended by their own ids
            try:
                child.kill()
            except psutil.Error:
                pass
        self.log_file.close()


def run_kwargs(session: AppSession, prompt: str, max_new_tokens: int, mode: str, keys: list[str]) -> dict:
    """/run's arguments by the names the API gives them: a completion (no chat template), greedy."""
    parameters = session.api["named_endpoints"]["/run"]["parameters"]
    values = dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0, seed=0, mode=mode, keys=keys)
    values.update(prompt_kind="Completion", system="")
    names = [parameter["parameter_name"] for parameter in parameters]
    required = [parameter["parameter_name"] for parameter in parameters if not parameter["parameter_has_default"]]
    unknown = [name for name in required if name not in values]
    if unknown:
        raise RuntimeError(f"/run needs {unknown}, which this driver does not know; it knows {list(values)}")
    return {name: values[name] for name in names if name in values}


def load_engines(session: AppSession, keys: list[str]) -> dict:
    page = Page(session.api, "/load")
    started = time.perf_counter()
    call(session.client, page, "/load", keys=keys)
    return {
        "keys": keys,
        "wall_s": time.perf_counter() - started,
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
        on_update=lambda now_s, p: arrivals.append((now_s, [len(text) for text in p.texts()])),
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
        _, export_note = session.client.predict(api_name="/export")
        # gradio_client downloads the files into its download folder; the newest run.json there is this one.
        found = sorted(
            (
                path
                for path in (session.out / "downloads").rglob("run.json")
                if path.stat().st_mtime >= exported_after - 5
            ),
            key=lambda path: path.stat().st_mtime,
        )
        if found:
            export = json.loads(found[-1].read_text())
            (session.out / "run.json").write_text(json.dumps(export, indent=1))
    except Exception as error:
        export_note = f"export failed: {error}"
    by_key = {engine["key"]: engine for engine in export.get("engines", [])}
    for pane in panes:
        stats = (by_key.get(pane["key"]) or {}).get("stats") or {}
        for field in (
            "num_tokens",
            "ttft_s",
            "decode_tok_s",
            "peak_memory_gib",
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
    """For each streamed event: the first client update whose pane text reached the event's length, minus the
    engine's stamp. Per token (an event of k tokens counts k times)."""
    times_s = [time_s for time_s, _ in arrivals]
    lengths = {key: [lens[i] if i < len(lens) else 0 for _, lens in arrivals] for i, key in enumerate(keys)}
    per_token_ms, num_unmatched = [], 0
    for key, stamp_s, chars, num_tokens in stamps:
        if key not in lengths:
            continue
        seen = lengths[key]
        index = next((i for i in range(bisect.bisect_left(times_s, stamp_s), len(seen)) if seen[i] >= chars), None)
        if index is None:
            num_unmatched += 1
            continue
        per_token_ms.extend([(times_s[index] - stamp_s) * 1000.0] * int(num_tokens))
    num_tokens_total = sum(int(stamp[3]) for stamp in stamps)
    result = {
        "num_events": len(stamps),
        "num_tokens": num_tokens_total,
        "num_updates": len(arrivals),
        "num_unmatched_events": num_unmatched,
        "combined_tok_s": num_tokens_total / wall_s if wall_s else None,
        "target_p95_ms": P3_TARGET_P95_MS,
    }
    if per_token_ms:
        ordered = sorted(per_token_ms)
        p95_ms = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        result.update(p50_ms=ordered[len(ordered) // 2], p95_ms=p95_ms, max_ms=ordered[-1])
        result["meets_goal"] = p95_ms < P3_TARGET_P95_MS
    return result


def p1_overhead(session: AppSession, keys: list[str], max_new_tokens: int, repeats: int, deadline: float) -> list:
    """Per engine: fair-mode decode tok/s in the app against the same loaded engine's stream() called directly in
    the server process, alternating which goes first, medians of `repeats`."""
    rows = []
    for key in keys:
        if time.monotonic() > deadline:
            rows.append({"engine": key, "error": "skipped: the step's time budget was spent"})
            continue

        def in_app(num_tokens: int) -> float | None:
            page = Page(session.api)
            call(session.client, page, "/run", **run_kwargs(session, PROMPT, num_tokens, "fair", [key]))
            metric = page.metrics()[0]
            if metric.get("error"):
                raise RuntimeError(metric["error"])
            return number_of(metric.get("decode_tok_s"))

        def standalone(num_tokens: int) -> float:
            answer = session.client.predict(key, PROMPT, num_tokens, api_name="/standalone_decode")
            return json.loads(answer)["decode_tok_s"]

        try:
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
                    "meets_goal": bool(alone_median) and app_median / alone_median >= P1_TARGET_RATIO,
                }
            )
        except Exception as error:
            rows.append({"engine": key, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        log(f"P1 {key}: {rows[-1]}")
    return rows


def vllm_unload(session: AppSession, vllm_keys: list[str], before_vllm_gib: float | None) -> dict:
    from engines.telemetry import nvml_device_used_gib

    loaded_gib = nvml_device_used_gib()
    steps = []
    for key in vllm_keys:
        before_gib = nvml_device_used_gib()
        answer = json.loads(session.client.predict(key, api_name="/unload_engine"))
        time.sleep(3)
        steps.append({"key": key, "before_gib": before_gib, "after_gib": nvml_device_used_gib(), **answer})
    after_gib = nvml_device_used_gib()
    ratio = after_gib / before_vllm_gib if after_gib and before_vllm_gib else None
    return {
        "before_vllm_load_gib": before_vllm_gib,
        "with_vllm_gib": loaded_gib,
        "after_vllm_unload_gib": after_gib,
        "ratio": ratio,
        "meets_goal": ratio is not None and abs(ratio - 1) <= UNLOAD_TOLERANCE_FRAC,
        "steps": steps,
    }


def app_step(args) -> int:
    """The app with every engine of --engines resident: in-process engines loaded first, then the vLLM ones (each
    with its --vllm-share of the GPU); one parallel run (texts, VRAM and KV per pane, the export); P3, the engine's
    stamp to the client, p50/p95 per token; P1 per engine; every vLLM engine unloaded against the device memory
    before they loaded (goal: within 5%); then Unload all. Device memory is NVML's, the whole GPU, in GiB."""
    from engines.registry import list_engines
    from engines.telemetry import nvml_device_used_gib

    out = Path(args.out) / "app"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    registry = {row["name"]: row for row in list_engines()}
    wanted = [name for name in args.engines.split(",") if name]
    keys = [name for name in wanted if name in registry and registry[name]["is_available"]]
    skipped = {
        name: (registry[name]["reason"] if name in registry else "not in the registry")
        for name in wanted
        if name not in keys
    }
    vllm_keys = [key for key in keys if key.startswith("vllm")]
    options = {key: {"gpu_memory_utilization": args.vllm_share, "max_num_seqs": args.max_num_seqs} for key in vllm_keys}
    if "gptq-int4" in keys:
        options["gptq-int4"] = {"backend": args.gptq_backend}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": args.model,
        "engines": keys,
        "skipped": skipped,
        "options": options,
        "device_before_gib": nvml_device_used_gib(),
    }

    def save():
        (out / "app.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "app.md").write_text(app_markdown(result))

    try:
        with AppSession(args, keys, options, out) as session:
            result["startup_device_gib"] = nvml_device_used_gib()
            in_process = [key for key in keys if key not in vllm_keys]
            log(f"loading in-process engines {in_process}")
            result["load_in_process"] = load_engines(session, in_process) if in_process else None
            result["device_in_process_gib"] = nvml_device_used_gib()
            save()
            log(f"loading vLLM engines {vllm_keys}")
            result["load_all"] = load_engines(session, keys)
            result["device_all_gib"] = nvml_device_used_gib()
            result["gpu_processes"] = gpu_processes()
            save()
            log("parallel run, every engine resident")
            result["parallel"], result["p3"] = parallel_run(session, keys, args.max_new_tokens)
            log(f"P3 {result['p3']}")
            save()
            result["p1"] = p1_overhead(session, keys, args.p1_tokens, args.repeats, deadline - MIN_STEP_S)
            save()
            if vllm_keys:
                result["vllm_unload"] = vllm_unload(session, vllm_keys, result["device_in_process_gib"])
                log(f"vLLM unload {result['vllm_unload']}")
            session.client.predict(api_name="/unload")
            time.sleep(2)
            result["device_after_unload_all_gib"] = nvml_device_used_gib()
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        log(f"app step failed: {result['error']}")
    result["device_end_gib"] = nvml_device_used_gib()
    save()
    print(app_markdown(result))
    return 0 if "error" not in result else 1


def format_value(value, digits: int = 2) -> str:
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
        f"Model {result.get('model')}; engines: {', '.join(result.get('engines', []))}.",
    ]
    if result.get("skipped"):
        lines.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + ".")
    lines.append(
        f"Device memory (NVML, whole GPU, GiB): before the app {format_value(result.get('device_before_gib'))}, "
        f"in-process engines loaded {format_value(result.get('device_in_process_gib'))}, all loaded "
        f"{format_value(result.get('device_all_gib'))}, after Unload all "
        f"{format_value(result.get('device_after_unload_all_gib'))}."
    )
    for name in ("load_in_process", "load_all"):
        load = result.get(name)
        if load:
            lines.append(f"{name}: {format_value(load['wall_s'], 0)} s, {load['status']}")
    parallel = result.get("parallel")
    if parallel:
        lines += [
            "",
            f"## Parallel run, every engine resident: {parallel['status']} ({format_value(parallel['wall_s'], 1)} s)",
            "",
            "| pane | state | tokens | TTFT s | decode tok/s | memory shown | KV blocks shown "
            "| peak memory GiB (export) | KV blocks total | text (start) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for pane in parallel["panes"]:
            text = (pane.get("error") or pane["text"][:70]).replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {pane['key']} | {pane['state']} | {pane.get('num_tokens', '')} | {pane.get('ttft_s', '')} | "
                f"{pane.get('decode_tok_s', '')} | {pane.get('memory_gib', '')} | {pane.get('kv_blocks', '')} | "
                f"{format_value(pane.get('stats_peak_memory_gib'))} | "
                f"{format_value(pane.get('stats_kv_blocks_total'))} | {text} |"
            )
    p3 = result.get("p3")
    if p3:
        lines += [
            "",
            f"P3, engine stamp -> client: p50 {format_value(p3.get('p50_ms'), 1)} ms, p95 "
            f"{format_value(p3.get('p95_ms'), 1)} ms, max {format_value(p3.get('max_ms'), 1)} ms over "
            f"{p3['num_tokens']} tokens ({p3['num_events']} events, {p3['num_updates']} page updates) at "
            f"{format_value(p3.get('combined_tok_s'), 0)} tok/s combined; goal p95 < {P3_TARGET_P95_MS:.0f} ms: "
            f"{'met' if p3.get('meets_goal') else 'not met'}.",
        ]
    if result.get("p1"):
        lines += [
            "",
            "## P1: fair-mode decode tok/s in the app against the same engine standalone, same process",
            "",
            f"| engine | app tok/s (median) | standalone tok/s (median) | ratio | >= {P1_TARGET_RATIO} |",
            "|---|---|---|---|---|",
        ]
        for row in result["p1"]:
            if "error" in row:
                lines.append(f"| {row['engine']} | {row['error']} | | | |")
            else:
                lines.append(
                    f"| {row['engine']} | {format_value(row['app_median_tok_s'], 1)} "
                    f"| {format_value(row['standalone_median_tok_s'], 1)} | {format_value(row['ratio'], 3)} "
                    f"| {'yes' if row['meets_goal'] else 'no'} |"
                )
    unload = result.get("vllm_unload")
    if unload:
        lines += [
            "",
            f"vLLM unload: device {format_value(unload['before_vllm_load_gib'])} GiB before the vLLM engines loaded, "
            f"{format_value(unload['with_vllm_gib'])} with them, {format_value(unload['after_vllm_unload_gib'])} "
            f"after unloading them; ratio {format_value(unload['ratio'], 3)} (goal within "
            f"{100 * UNLOAD_TOLERANCE_FRAC:.0f}%: {'met' if unload['meets_goal'] else 'not met'}).",
        ]
    if result.get("error"):
        lines += ["", f"**Error:** {result['error']}"]
    return "\n".join(lines) + "\n"


# Session commands ---------------------------------------------------------------------------------------
def snapshot_command(args) -> int:
    """.gpu-carry/tree: `git archive HEAD` with this checkout's scripts/gpu over it; SNAPSHOT names the commit."""
    tree = ROOT / ".gpu-carry" / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(tree)], input=archive, check=True)
    shutil.rmtree(tree / "scripts" / "gpu", ignore_errors=True)
    shutil.copytree(DRIVER.parent, tree / "scripts" / "gpu", ignore=shutil.ignore_patterns("__pycache__"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (tree / "SNAPSHOT").write_text(f"{commit} + scripts/gpu as in the checkout\n")
    size_mib = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file()) / 2**20
    print(f"snapshot of {commit[:12]} + scripts/gpu: {tree.relative_to(ROOT)} ({size_mib:.1f} MiB)")
    return 0


def start_command(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    if ROOT == run_dir or run_dir in ROOT.parents:
        print(f"start copies this tree into {run_dir}; run it from the tree that travelled, not from the copy")
        return 2
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(ROOT, run_dir / "repo", ignore=shutil.ignore_patterns(*NOT_COPIED))
    (run_dir / "results").mkdir()
    command = [
        sys.executable, str(run_dir / "repo" / "scripts" / "gpu" / "driver.py"), "steps", str(args.deadline_s),
        *args.step_names, "--run-dir", str(run_dir), "--install", str(args.install),
    ]
    with open(run_dir / "runner.log", "w") as runner_log:
        runner = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=runner_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (run_dir / "runner.pid").write_text(str(runner.pid))
    print(f"started (pid {runner.pid}, deadline {args.deadline_s} s); step log: {run_dir / 'results' / 'steps.log'}")
    return 0


def steps_command(args) -> int:
    """The steps in the order given, each a `driver.py STEP` process in a group of its own, under one deadline."""
    started = time.monotonic()
    results = Path(args.run_dir) / "results"
    results.mkdir(parents=True, exist_ok=True)

    def note(message: str) -> None:
        with open(results / "steps.log", "a") as steps_log:
            steps_log.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def left_s() -> float:
        return args.deadline_s - (time.monotonic() - started)

    environment = install_bundle(Path(args.install), results, note)
    if environment is None:
        return 1
    environment.update(STEP_ENVIRONMENT)
    note(f"environment ready in {time.monotonic() - started:.0f} s: {package_versions(environment)}")
    note(f"GPU: {nvidia_smi('--query-gpu=name,memory.total,memory.used,driver_version') or 'no nvidia-smi'}")
    for step in args.step_names:
        if left_s() < MIN_STEP_S:
            note(f"skip {step} (deadline: {left_s():.0f} s left)")
            continue
        limit_s = min(STEP_LIMITS_S[step], left_s())
        command = [sys.executable, str(DRIVER), step]
        if step not in STEPS_WITHOUT_OUT:
            command += ["--out", str(results)]
        if step in BUDGETED_STEPS:
            command += ["--budget-s", str(int(limit_s - STEP_MARGIN_S))]
        note(f"start {step} (limit {limit_s:.0f} s)")
        gpu_pids_before = {process["pid"] for process in gpu_processes()}
        step_started = time.monotonic()
        with open(results / f"{step}.log", "w") as step_log:
            returncode = run_in_own_group(command, limit_s, env=environment, stdout=step_log, stderr=subprocess.STDOUT)
        outcome = "timed out, its process group ended" if returncode is None else f"rc={returncode}"
        if returncode:
            outcome += f": {last_line(results / f'{step}.log')}"
        note(f"end {step} {outcome} ({time.monotonic() - step_started:.0f} s, {left_s():.0f} s left)")
        # GPU processes that appeared during the step and lost their parent are the step's leftovers.
        for process in gpu_processes():
            if process["pid"] not in gpu_pids_before and process["parent_pid"] == 1:
                try:
                    os.kill(process["pid"], signal.SIGKILL)
                    note(f"killed orphaned GPU process {process['pid']} ({process['cmd']})")
                except ProcessLookupError:
                    pass
    note("all done")
    return 0


def install_bundle(install_script: Path, results: Path, note) -> dict | None:
    """The environment after `source install_script` (the staged bundle: PYTHONPATH=/tmp/site); this process's
    own environment where nothing is staged; None when the install failed."""
    if not install_script.is_file():
        note(f"no staged bundle at {install_script}: the steps use this machine's packages")
        return dict(os.environ)
    done = subprocess.run(
        ["bash", "-c", 'source "$0" > "$1" 2>&1 && env -0', str(install_script), str(results / "install.log")],
        capture_output=True,
    )
    if done.returncode != 0:
        note(f"install failed (rc={done.returncode}); see install.log")
        return None
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def package_versions(environment: dict) -> str:
    """The measured packages' versions as the steps will import them (the bundle's PYTHONPATH first)."""
    paths = [entry for entry in environment.get("PYTHONPATH", "").split(os.pathsep) if entry] + sys.path
    found = []
    for name in ("torch", "vllm", "transformers", "gradio"):
        distribution = next(iter(importlib.metadata.distributions(name=name, path=paths)), None)
        found.append(f"{name} {distribution.version if distribution else 'not installed'}")
    return ", ".join(found)


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def poll_command(args) -> int:
    run_dir = Path(args.run_dir)
    results = run_dir / "results"
    steps_log = results / "steps.log"
    print(steps_log.read_text() if steps_log.is_file() else f"no step log at {steps_log} yet", end="")
    runner_pid_path = run_dir / "runner.pid"
    if runner_pid_path.is_file():
        runner_pid = int(runner_pid_path.read_text())
        try:
            os.kill(runner_pid, 0)
            print(f"--- runner {runner_pid}: running")
        except ProcessLookupError:
            print(f"--- runner {runner_pid}: ended")
    step_logs = sorted((path for path in results.glob("*.log") if path != steps_log), key=lambda p: p.stat().st_mtime)
    if step_logs:
        print(f"--- tail of {step_logs[-1]}")
        print(step_logs[-1].read_text(errors="replace")[-1500:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if results.is_dir():
        with tarfile.open(out / "gpu-results.tgz", "w:gz") as archive:
            archive.add(results, arcname=".")
        print(f"--- results: {out / 'gpu-results.tgz'}")
    print(f"--- GPU: {nvidia_smi('--query-gpu=memory.used,utilization.gpu') or 'no nvidia-smi'}")
    return 0


# Command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu/driver.py",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, is_budgeted: bool = False, takes_out: bool = True):
        command = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if takes_out:
            command.add_argument(
                "--out", default=os.environ.get("OUT", "out/gpu"), help="results folder (default $OUT, else out/gpu)"
            )
        if is_budgeted:
            budget_help = f"seconds the step may take (default {DEFAULT_BUDGET_S})"
            command.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S, help=budget_help)
        return command

    def add_dummy_config(command) -> None:
        command.add_argument(
            "--dummy-config", default=DUMMY_CONFIG, help=f"shape from assets/configs (default {DUMMY_CONFIG})"
        )

    add_dummy_config(add("prepare", "convert the embedded model and the dummy shape once", takes_out=False))
    for name, engines, suite, new_tokens, repeats, engine_budget_s in (
        ("bench-embedded", EMBEDDED_ENGINES, "the embedded model", 128, 2, 150),
        ("bench-dummy", DUMMY_ENGINES, "the dummy shape's random weights (CUDA)", 256, 3, 200),
    ):
        bench = add(
            name,
            f"`python -m engines bench --isolate` on {suite}; any option not listed here goes to engines bench "
            "as it is (e.g. --no-quality, --profile, --option KEY=VALUE)",
            is_budgeted=True,
        )
        bench.add_argument("--engines", default=engines, help=f"engines bench's --engines (default {engines})")
        bench.add_argument("--max-new-tokens", type=int, default=new_tokens, help=f"default {new_tokens}")
        bench.add_argument("--prompt-tokens", type=int, default=512, help="default 512")
        bench.add_argument("--repeats", type=int, default=repeats, help=f"default {repeats}")
        bench.add_argument(
            "--engine-budget-s", type=int, default=engine_budget_s, help=f"per engine (default {engine_budget_s})"
        )
        if name == "bench-dummy":
            add_dummy_config(bench)
    speculation = add("speculation", "spec against bf16, vllm-spec against vllm, on their prompts", is_budgeted=True)
    speculation.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    latency = add("latency", "`vllm bench latency` on the dummy shape (CUDA)", is_budgeted=True)
    add_dummy_config(latency)
    latency.add_argument("--latency-iters", type=int, default=10, help="timed iterations (default 10)")
    latency.add_argument("--max-num-seqs", type=int, default=16, help="vLLM max_num_seqs (default 16)")
    app = add("app", "the app with every engine resident, driven through gradio_client", is_budgeted=True)
    app.add_argument("--engines", default=APP_ENGINES, help=f"pane keys (default {APP_ENGINES})")
    app.add_argument("--model", default=APP_MODEL, help=f"the app's --model (default {APP_MODEL})")
    app.add_argument("--max-new-tokens", type=int, default=128, help="tokens of the parallel run (default 128)")
    app.add_argument("--p1-tokens", type=int, default=128, help="tokens per P1 run (default 128)")
    app.add_argument("--repeats", type=int, default=3, help="P1 pairs per engine (default 3)")
    app.add_argument("--vllm-share", type=float, default=0.12, help="each vLLM engine's gpu_memory_utilization (0.12)")
    app.add_argument("--max-num-seqs", type=int, default=16, help="vLLM max_num_seqs, fewer CUDA graphs (default 16)")
    app.add_argument("--gptq-backend", default="gptq_triton", help="GPTQModel backend for gptq-int4 (gptq_triton)")
    add("tests", "`pytest -m gpu tests/gpu` (CUDA)", is_budgeted=True)
    add_dummy_config(add("goals", "where the goals stand, from bench-dummy and latency under --out"))
    add("snapshot", "the tree that travels to the device, as .gpu-carry/tree", takes_out=False)
    for name, help_text in (
        ("start", "copy the tree to --run-dir and run the steps there in the background"),
        ("steps", "install the staged bundle and run the steps in the foreground (what start runs)"),
    ):
        session = add(name, help_text, takes_out=False)
        session.add_argument("deadline_s", type=int, help="seconds for the install and every step together")
        session.add_argument(
            "step_names",
            nargs="+",
            metavar="STEP",
            choices=list(STEP_LIMITS_S),
            help=f"steps in the order to run ({', '.join(STEP_LIMITS_S)})",
        )
        session.add_argument("--run-dir", default=str(RUN_DIR), help=f"the copy and its results (default {RUN_DIR})")
        session.add_argument("--install", default=str(INSTALL_SCRIPT), help=f"sourced first (default {INSTALL_SCRIPT})")
    poll = add("poll", "the step log so far, and the results as --out/gpu-results.tgz")
    poll.add_argument("--run-dir", default=str(RUN_DIR), help=f"what start wrote (default {RUN_DIR})")
    return parser


COMMANDS = {
    "prepare": prepare_step,
    "speculation": speculation_step,
    "latency": latency_step,
    "app": app_step,
    "tests": tests_step,
    "goals": goals_step,
    "snapshot": snapshot_command,
    "start": start_command,
    "steps": steps_command,
    "poll": poll_command,
}


def main() -> int:
    # A step ended by `start`'s deadline gets SIGTERM: exiting through SystemExit runs the finally blocks and
    # context managers, so the process groups it started (the app server, engines bench) end with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = build_parser()
    args, extra = parser.parse_known_args()
    is_bench = args.command in ("bench-embedded", "bench-dummy")
    if extra and not is_bench:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return bench_step(args, extra) if is_bench else COMMANDS[args.command](args)
    except NeedsCuda as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
