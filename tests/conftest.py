"""Shared fixtures: real engines on the real embedded model, loaded once per test session.

Every test runs offline (HF_HUB_OFFLINE=1): the machine has no model hub, and a hub id must fail
with a clear message rather than hang on the network.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Apps started by tests load engines only when a test asks: a background preload of the default engines
# would load a model behind every server test's back (and spend minutes of the suite).
os.environ.setdefault("PLAYGROUND_PRELOAD", "0")

import pytest

from engines.protocol import GenerationParams
from engines.registry import create_engine

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "test-artifacts")


def pytest_sessionstart(session):
    """vLLM's engine core is a child process: if pytest itself is killed (a CI timeout's SIGTERM), a
    watchdog in its own session ends what the test session started (engines.cli.watch_parent)."""
    subprocess.Popen([sys.executable, "-c", f"from engines.cli import watch_parent; watch_parent({os.getpid()})"],
                     start_new_session=True, cwd=os.path.join(os.path.dirname(__file__), ".."))


# `make test` runs two xdist workers. Each test module is one work unit, so its module fixtures load once; the
# modules that use the session `vllm_engine` are one unit together, so that engine (about 4 GiB across its
# EngineCore and Worker, 40-60 s to start on 2 cores) loads in one worker only, never twice in 24 GB.
# (xdist's own --dist loadgroup cannot do this under pytest 9: it renames node ids through an attribute that
# pytest 9 no longer reads.)
VLLM_ENGINE_MODULES = frozenset(f"tests/{name}.py" for name in (
    "test_contract", "test_divergence", "test_kv_compare", "test_load_cli", "test_reliability", "test_shared_engine",
    "test_vllm"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "vllm_engine" if module in VLLM_ENGINE_MODULES else module

    return ModuleScheduling(config, log)


# Fixtures that load a real engine, start an app, a server or a browser: a test that uses one is `slow`, so
# `pytest -m "not slow"` is the quick inner loop whether or not the test says so itself.
HEAVY_FIXTURES = frozenset({
    "app", "app_url", "awq_engine", "bf16_engine", "bf16_perplexity", "browser", "chat_playground", "cli_bench",
    "client", "engine", "gguf_engine", "gptq_engine", "int8_engine", "nf4_engine", "page", "playground",
    "quality_reference", "remote_engine", "server", "smollm2", "spec_engine", "tiny_cache", "tiny_model",
    "vllm_engine", "vllm_fp8kv_engine", "vllm_int4_engine", "vllm_server", "vllm_spec_engine"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    strays = sorted({item.nodeid.split("::", 1)[0] for item in items if "vllm_engine" in item.fixturenames}
                    - VLLM_ENGINE_MODULES)
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} use vllm_engine: add them to VLLM_ENGINE_MODULES in "
                                "tests/conftest.py, or two workers load two copies of it")


def free_loopback_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (servers started by tests bind loopback only)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def loaded_engine(name: str, **options):
    """A loaded registry engine for the block's duration; unloaded after, even when the block fails."""
    engine = create_engine(name, **options)
    engine.load()
    try:
        yield engine
    finally:
        engine.unload()


def run_stream(engine, prompt: str, max_new_tokens: int = 16, **params):
    """Stream to the end; return (text, events, stats)."""
    events = list(engine.stream(prompt, GenerationParams(max_new_tokens=max_new_tokens, **params)))
    return "".join(event.text for event in events), events, engine.stats()


@pytest.fixture(scope="session")
def bf16_engine():
    with loaded_engine("bf16") as engine:
        yield engine


@pytest.fixture(scope="session")
def artifacts_dir():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def quality_reference(bf16_engine):
    """bf16's greedy ids and perplexity (engines.measure.quality), from the disk cache after the first run."""
    from engines.measure.quality import build_reference
    return build_reference(bf16_engine, num_tokens=32)


@pytest.fixture(scope="session")
def spec_engine():
    """Prompt-lookup speculative engine, shared by the spec and UI tests."""
    with loaded_engine("spec") as engine:
        yield engine


@pytest.fixture(scope="session")
def gptq_engine():
    """The embedded model in INT4 GPTQ: quantized once per machine (~2 min on 2 cores), then cached."""
    with loaded_engine("gptq-int4") as engine:
        yield engine


# vLLM engines in tests skip torch.compile: on 2 cores compiling costs 1-3 minutes per engine start, and
# the compiled graph is not what the tests check. KV is fixed at 1 GiB so FP8/BF16 block counts compare.
VLLM_TEST_OPTIONS = {"enforce_eager": True, "kv_cache_gib": 1.0, "max_model_len": 4096}


@pytest.fixture(scope="session")
def vllm_engine():
    """One `vllm` engine (BF16 KV) for the whole session; its EngineCore is a child process."""
    engine = create_engine("vllm", **VLLM_TEST_OPTIONS)
    engine.load()
    yield engine
    engine.unload()
