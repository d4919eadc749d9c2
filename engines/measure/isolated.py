"""Bench engines each in its own process, and merge bench results.

`run_isolated` runs `python -m engines bench` once per engine, each with its own time budget, so an
engine that crashes, runs out of memory or hangs past the budget is a row with the reason, and the next
engine starts on a clean device (vLLM's engine core and CUDA contexts die with their process). Each
child writes its own results.json; `merge_results` combines such folders into one BenchResult, in the
order given, a later folder's row replacing an earlier one of the same engine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from engines.measure.bench import BenchConfig, BenchResult, BenchRow
from engines.protocol import EngineError, ProgressCallback


def child_command(engine: str, config: BenchConfig, out: Path) -> list[str]:
    command = [sys.executable, "-m", "engines", "bench", "--engines", engine, "--out", str(out),
               "--max-new-tokens", str(config.max_new_tokens), "--prompt-tokens", str(config.prompt_tokens),
               "--repeats", str(config.num_repeats)]
    if config.dummy_config:
        command += ["--dummy-weights", config.dummy_config]
    if config.model:
        command += ["--model", config.model]
    if not config.is_quality:
        command.append("--no-quality")
    if config.is_chat:
        command.append("--chat")
    if config.system:
        command += ["--system", config.system]
    if config.is_profiled:
        command.append("--profile")
    for key, value in config.engine_options.items():
        command += ["--option", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return command


def run_isolated(config: BenchConfig, out_dir: str | Path, budget_s: float, progress: ProgressCallback) -> BenchResult:
    """One child process per engine, each ended after `budget_s` seconds."""
    out = Path(out_dir)
    folders = []
    for index, engine in enumerate(config.engines):
        folder = out / "engines" / _folder_name(engine)
        progress(f"[{index + 1}/{len(config.engines)}] {engine} in its own process (budget {budget_s:.0f} s)")
        try:
            completed = subprocess.run(child_command(engine, config, folder), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True, timeout=budget_s)
            failure = None if (folder / "results.json").is_file() else \
                f"the engine's process ended with exit code {completed.returncode}: " \
                f"{(completed.stderr.strip().splitlines() or ['no output'])[-1][:300]}"
        except subprocess.TimeoutExpired:
            failure = f"stopped after its budget of {budget_s:.0f} s"
        if failure:
            _write_failed_row(folder, config, engine, failure)
        folders.append(folder)
    return merge_results(folders)


def merge_results(folders: list[str | Path]) -> BenchResult:
    """The rows of several results.json folders as one result; machine and bandwidth from the first."""
    results = []
    for folder in folders:
        path = Path(folder) / "results.json"
        try:
            results.append(BenchResult.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise EngineError(f"cannot merge {path}: {error}") from None
    if not results:
        raise EngineError("--merge needs at least one folder holding results.json")
    rows: dict[str, BenchRow] = {}
    for result in results:
        rows.update({row.engine: row for row in result.rows})
    first = next((result for result in results if result.bandwidth), results[0])
    config = replace(first.config, engines=list(rows))
    return BenchResult(config, first.model, first.device, first.machine, first.bandwidth, list(rows.values()))


def _write_failed_row(folder: Path, config: BenchConfig, engine: str, reason: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = BenchResult(replace(config, engines=[engine]), config.model or "", "", {}, None,
                         [BenchRow(engine=engine, status="error", reason=reason)])
    (folder / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))


def _folder_name(engine: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in engine)
