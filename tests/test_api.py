"""Issue 13, item 4: the page's event API, driven through gradio_client against the live app
(`python -m app` on a loopback port, a real process), with values no widget would send: out of range,
of the wrong type, not among the choices, seeds beyond int64. Each one gets a clear status line, not a
Gradio error, and the server stays up. Every bad value is refused before anything loads: after all of
them, Unload reports that no engine was ever loaded, so this file loads no model at all.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.conftest import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180
PROMPT = "The capital of France is"
REAL = "the app's model (real weights)"  # app/bench_tab.py REAL_WEIGHTS


def start_app(port: int, *arguments: str, log_name: str = "api_server.log", new_session: bool = False,
              **environ) -> subprocess.Popen:
    """`python -m app` on 127.0.0.1:port (or as `arguments` say), answering once its page loads; with
    new_session, as a terminal starts it: the leader of its own process group."""
    log_path = ROOT / "test-artifacts" / log_name
    log_path.parent.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PORT", "PLAYGROUND_HOSTED", "SPACE_ID")}
    env.update(HF_HUB_OFFLINE="1", **environ)
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), *arguments], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            server.wait()
            pytest.fail(f"the app did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.5)


def stop_app(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def app():
    port = free_loopback_port()
    server = start_app(port)
    yield server, f"http://127.0.0.1:{port}/"
    stop_app(server)


@pytest.fixture(scope="module")
def client(app):
    return Client(app[1], verbose=False, download_files=False)


def run_args(prompt=PROMPT, max_new_tokens=8, temperature=0.0, seed=0, mode="parallel", keys=("bf16",),
             prompt_kind="Completion", system=""):
    return [prompt, max_new_tokens, temperature, seed, mode, list(keys) if isinstance(keys, tuple) else keys,
            prompt_kind, system]


def bench_args(engines=("bf16",), new_tokens=4, prompt_tokens=32, repeats=1, weights=REAL, quality=False):
    return [list(engines) if isinstance(engines, tuple) else engines, new_tokens, prompt_tokens, repeats, weights,
            quality]


# (endpoint, arguments, index of the status line in the API's answer, what it must say). The API's answer
# leaves out gr.State outputs: /run and /load answer (status, loaded engines, panes..., charts, summary),
# /quality (summary, status), /bench (status, table, plots..., files), /kv (report, chart).
BAD_CALLS = [
    ("/run", run_args(seed=2 ** 70), 0, "seed must be from 0 to 2**63 - 1, got 1180591620717411303424"),
    ("/run", run_args(seed=-1), 0, "seed must be from 0 to 2**63 - 1, got -1"),
    ("/run", run_args(seed=1.5), 0, "seed must be a whole number, got 1.5"),
    ("/run", run_args(seed="7"), 0, "seed must be a number, got '7' (str)"),
    ("/run", run_args(max_new_tokens=None), 0, "max new tokens is empty"),
    ("/run", run_args(max_new_tokens="many"), 0, "max new tokens must be a number, got 'many' (str)"),
    ("/run", run_args(max_new_tokens=10 ** 9), 0, "max_new_tokens must be between 1 and 8192, got 1000000000"),
    ("/run", run_args(max_new_tokens=0), 0, "max_new_tokens must be between 1 and 8192, got 0"),
    ("/run", run_args(max_new_tokens=True), 0, "max new tokens must be a number, got True"),
    ("/run", run_args(temperature=3.0), 0, "temperature must be between 0 (greedy) and 2, got 3.0"),
    ("/run", run_args(temperature=-0.5), 0, "temperature must be between 0 (greedy) and 2, got -0.5"),
    ("/run", run_args(temperature="hot"), 0, "temperature must be a number, got 'hot' (str)"),
    ("/run", run_args(temperature=None), 0, "temperature is empty"),
    ("/run", run_args(mode="turbo"), 0, "mode must be one of parallel, fair; got 'turbo' (str)"),
    ("/run", run_args(mode=None), 0, "mode must be one of parallel, fair; got None"),
    ("/run", run_args(keys=["no-such-engine"]), 0, "unknown engine 'no-such-engine'. Known engines: bf16"),
    ("/run", run_args(keys="bf16"), 0, "engines must be a list of names, got 'bf16' (str)"),
    ("/run", run_args(keys=["bf16", "bf16"]), 0, "engines: 'bf16' is picked twice"),
    ("/run", run_args(keys=[42]), 0, "engines must be names (text), got 42"),
    ("/run", run_args(keys=[]), 0, "pick at least one engine"),
    ("/run", run_args(prompt=123), 0, "the prompt must be text, got int"),
    ("/run", run_args(prompt="   "), 0, "the prompt is empty"),
    ("/run", run_args(prompt="bell\x07"), 0, "control character (U+0007"),
    ("/load", [["no-such-engine"]], 0, "unknown engine 'no-such-engine'"),
    ("/load", [None], 0, "pick at least one engine"),
    ("/load", [{"bf16": True}], 0, "engines must be a list of names"),
    ("/select", [["no-such-engine"]], 0, "unknown engine 'no-such-engine'"),
    ("/select", ["spec"], 0, "engines must be a list of names, got 'spec' (str)"),
    ("/quality", ["yes"], 1, "compute quality must be true or false, got 'yes' (str)"),
    ("/bench", bench_args(engines=["no-such-engine"]), 0, "**Cannot run:** unknown engine 'no-such-engine'"),
    ("/bench", bench_args(engines="bf16"), 0, "**Cannot run:** engines must be a list of names"),
    ("/bench", bench_args(new_tokens=2 ** 70), 0, "**Cannot run:** new tokens N must be from 1 to 8,192"),
    ("/bench", bench_args(new_tokens="4"), 0, "**Cannot run:** new tokens N must be a number, got '4' (str)"),
    ("/bench", bench_args(prompt_tokens=10 ** 9), 0, "**Cannot run:** prompt tokens P must be from 2 to 32,768"),
    ("/bench", bench_args(repeats=0), 0, "**Cannot run:** repeats must be from 1 to 20, got 0"),
    ("/bench", bench_args(repeats=None), 0, "**Cannot run:** repeats is empty"),
    ("/bench", bench_args(weights="no-such-shape"), 0, "**Cannot run:** weights must be one of"),
    ("/bench", bench_args(quality="no"), 0, "**Cannot run:** quality against bf16 must be true or false"),
    ("/kv", ["llama-3-8b", -1, 8192], 0, "**Cannot calculate:** memory (GiB) must be more than 0 and at most"),
    ("/kv", ["llama-3-8b", "80", 8192], 0, "**Cannot calculate:** memory (GiB) must be a number, got '80' (str)"),
    ("/kv", ["llama-3-8b", 80, 2 ** 70], 0, "**Cannot calculate:** context (tokens) must be from 1 to 100,000,000"),
    ("/kv", ["llama-3-8b", 80, 0.5], 0, "**Cannot calculate:** context (tokens) must be a whole number"),
    ("/kv", [None, 80, 8192], 0, "**Cannot calculate:** the model config must be text, got None"),
    ("/kv", [["llama-3-8b"], 80, 8192], 0, "**Cannot calculate:** the model config must be text"),
    ("/kv", ["x" * 5000, 80, 8192], 0, "**Cannot calculate:** the model config is 5,000 characters"),
    ("/kv", ["no-such-config", 80, 8192], 0, "**Cannot calculate:** config 'no-such-config' not found"),
]


@pytest.mark.parametrize("endpoint, arguments, status_index, expected", BAD_CALLS,
                         ids=[f"{call[0]}-{index}" for index, call in enumerate(BAD_CALLS)])
def test_a_bad_value_gets_a_clear_status_line(client, endpoint, arguments, status_index, expected):
    result = client.predict(*arguments, api_name=endpoint)
    status = result[status_index] if isinstance(result, (list, tuple)) else result
    assert isinstance(status, str) and expected in status, status
    assert "Traceback" not in status


def test_the_server_is_up_and_loaded_nothing_after_the_bad_values(app, client):
    server, url = app
    assert server.poll() is None and httpx.get(url, timeout=30).status_code == 200
    # Good values still work; none of these loads a model.
    report, _ = client.predict("llama-3-8b", 80, 8192, api_name="/kv")
    assert "llama-3-8b" in report and "Cannot calculate" not in report
    assert client.predict(["bf16"], api_name="/select")[0] == ""
    assert client.predict(api_name="/export")[1] == "Nothing to export yet: run a prompt first."
    assert client.predict(api_name="/stop") == "Nothing is running."
    # Every bad call was refused before any engine loaded.
    assert client.predict(api_name="/unload")[0] == "No engine was loaded."
