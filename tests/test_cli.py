"""`python -m engines` as a user runs it: real subprocesses, real exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engines", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_works_everywhere():
    from engines.cli import COMMANDS
    for command in [[], *([name] for name in COMMANDS)]:
        result = cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_list_json_names_every_variant_and_why():
    result = cli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"bf16", "bf16-compiled", "gptq-int4", "nf4", "int8", "vllm", "vllm-fp8kv", "spec", "vllm-spec",
            "remote"} <= set(rows)
    assert rows["bf16"]["is_available"]
    assert all(row["reason"] for row in rows.values() if not row["is_available"])


def test_generate_json_carries_text_and_stats():
    result = cli("generate", "--engine", "bf16", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["num_tokens"] == 8 and data["text"].strip()
    for key in ("ttft_s", "decode_tok_s", "itl_ms_p50", "itl_ms_p95", "peak_memory_gib"):
        assert data[key] > 0, key


def test_unknown_engine_fails_clearly():
    result = cli("generate", "--engine", "warp-drive", "--prompt", "hi")
    assert result.returncode != 0
    assert "unknown engine 'warp-drive'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("model", ["nobody/no-such-model", "/no/such/folder"])
def test_unknown_model_fails_clearly(model):
    result = cli("generate", "--engine", "bf16", "--model", model, "--prompt", "hi")
    assert result.returncode != 0
    assert f"model '{model}' not found" in result.stderr and "Traceback" not in result.stderr


def test_an_option_without_a_value_is_refused_before_anything_loads():
    result = cli("generate", "--engine", "bf16", "--option", "compile", "--prompt", "hi", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--option wants KEY=VALUE, got 'compile'" in result.stderr and "Traceback" not in result.stderr
    assert "loading" not in result.stderr
