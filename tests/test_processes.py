"""Issue 13, item 5: no engine process outlives the app or a command that started it.

Real processes throughout: `python -m app` (loaded through its API with gradio_client) and
`python -m engines generate`, each with vLLM's EngineCore and Worker beneath it, ended by SIGTERM, by a
terminal's Ctrl-C (SIGINT to the whole process group) or by SIGKILL, which runs no cleanup at all: then
the watchdog that engines.cli.ProcessOwner starts ends them. Every descendant is collected with psutil
before the signal; within 10 s none may remain. The app loads vLLM with its own default options, as an
operator's would (eager on CPU, under a minute on 2 shared cores), so those cases are marked slow.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_loopback_port
from tests.test_api import start_app

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 10.0
LOAD_TIMEOUT_S = 600


def living(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def end_and_time(server: subprocess.Popen, send) -> tuple[float, list[str], int | None]:
    """Collect the process's descendants, `send` the signal, and wait until they and it are gone (at most
    DEADLINE_S + 5): (seconds until the last one went, what was left, the exit status)."""
    tree = psutil.Process(server.pid).children(recursive=True)
    assert tree, "the process started no child, not even its watchdog"
    started = time.monotonic()
    send()
    while time.monotonic() - started < DEADLINE_S + 5:
        if not living(tree) and server.poll() is not None:
            break
        time.sleep(0.1)
    seconds = time.monotonic() - started
    left = [f"{process.pid} {process.name()}" for process in living(tree)]
    for process in living(tree):  # never leave them to the next test
        process.kill()
    if server.poll() is None:
        server.kill()
    return seconds, left, server.wait(timeout=30)


def names(server: subprocess.Popen) -> list[str]:
    return [process.name() for process in psutil.Process(server.pid).children(recursive=True)]


def load_vllm(port: int) -> None:
    from gradio_client import Client
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    status = client.predict(["vllm"], api_name="/load")[0]
    assert "1 loaded" in status, status


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_an_idle_app_ends_with_its_watchdog(how):
    server = start_app(free_loopback_port(), log_name=f"processes_idle_{how}.log", new_session=True)
    send = (lambda: server.send_signal(signal.SIGTERM)) if how == "SIGTERM" else \
        (lambda: os.killpg(server.pid, signal.SIGINT))
    seconds, left, status = end_and_time(server, send)
    assert not left and seconds < DEADLINE_S, (seconds, left)
    assert status == 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)


@pytest.mark.slow
def test_the_app_with_vllm_loaded_leaves_no_process_behind():
    """SIGTERM to the app with vLLM loaded (SIGKILL's path, the watchdog, is the command test's below)."""
    port = free_loopback_port()
    server = start_app(port, log_name="processes_vllm_SIGTERM.log")
    try:
        load_vllm(port)
        assert {"VLLM::EngineCore", "VLLM::Worker"} <= set(names(server)), names(server)
    except BaseException:
        end_and_time(server, server.kill)
        raise
    seconds, left, status = end_and_time(server, lambda: server.send_signal(signal.SIGTERM))
    assert not left and seconds < DEADLINE_S, (seconds, left)
    assert status == 128 + signal.SIGTERM
    print(f"\napp with vllm, SIGTERM: every process gone in {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_command_ended_while_vllm_loads_leaves_no_process_behind(how):
    """Mid-load is the hard moment: the engine object does not exist yet, its processes do. SIGKILL runs no
    cleanup in the command at all: the watchdog (the same ProcessOwner the app uses) ends the rest."""
    log_path = ROOT / "test-artifacts" / f"processes_cli_{how}.log"
    with open(log_path, "w") as log:
        command = subprocess.Popen([sys.executable, "-m", "engines", "generate", "--engine", "vllm", "--prompt",
                                    "The capital of France is", "--max-new-tokens", "8"], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while "VLLM::Worker" not in names(command):
        assert command.poll() is None, log_path.read_text()[-2000:]
        if time.monotonic() > deadline:
            end_and_time(command, command.kill)
            pytest.fail(f"no vLLM worker after {LOAD_TIMEOUT_S} s")
        time.sleep(0.5)
    seconds, left, status = end_and_time(command, lambda: command.send_signal(getattr(signal, how)))
    assert not left and seconds < DEADLINE_S, (seconds, left)
    expected = -signal.SIGKILL if how == "SIGKILL" else 128 + signal.SIGTERM
    assert status == expected, log_path.read_text()[-2000:]
    print(f"\npython -m engines generate --engine vllm, {how} while loading: every process gone in {seconds:.1f} s")
