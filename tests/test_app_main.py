"""Starting the page: `python -m app` and app/space.py as real processes. Bad options, a bad $PORT and a
port already in use each end in one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.__main__ import DEFAULT_PORT, build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def start(arguments: list[str], **environ) -> subprocess.CompletedProcess:
    """Run the entry point to its exit; a run that would serve the page is a test failure by timeout."""
    env = {key: value for key, value in os.environ.items() if key != "PORT"}
    env.update(HF_HUB_OFFLINE="1", **environ)
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)


@pytest.mark.parametrize("entry", [["-m", "app"], ["app/space.py"]], ids=["python -m app", "space.py"])
def test_a_bad_port_variable_is_a_message_and_help_still_works(entry):
    helped = start([*entry, "--help"], PORT="abc")
    assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr[-2000:]
    done = start(entry, PORT="abc")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == "error: PORT must be a whole number from 1 to 65535, got 'abc'"


def test_a_port_in_use_is_a_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start(["-m", "app", "--port", str(port)])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"error: port {port} is in use (set --port or PORT)" in done.stderr.splitlines()


@pytest.mark.parametrize("arguments, environ, expected", [
    ([], {}, DEFAULT_PORT), ([], {"PORT": "8123"}, 8123), (["--port", "8124"], {"PORT": "8123"}, 8124)])
def test_the_port_comes_from_the_option_then_the_variable_then_7860(arguments, environ, expected):
    assert config_from_args(build_parser().parse_args(arguments), environ).port == expected


@pytest.mark.parametrize("arguments, environ, message", [
    (["--port", "70000"], {}, "the port must be from 1 to 65535, got 70000"),
    ([], {"PORT": "-1"}, "PORT must be a whole number from 1 to 65535, got '-1'"),
    (["--max-panes", "13"], {}, "--max-panes must be 1-12")])
def test_bad_options_are_refused_with_a_message(arguments, environ, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(build_parser().parse_args(arguments), environ)
