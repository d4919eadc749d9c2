"""Issue 8, item 4, security defaults: no checkpoint code runs unless the operator allows it, a hosted
playground loads only allow-listed models and folders, no path from the browser reaches the filesystem
unchecked, and the page binds to loopback unless told otherwise. Real transformers loads and a real
Gradio server on 127.0.0.1; the models here fail before any weights load, so the file is quick.
"""
from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from app.__main__ import apply_exposure_policy, build_parser, config_from_args, create
from app.callbacks import AppConfig
from app.kv_tab import calculate_kv
from engines.models.sources import resolve_model
from engines.protocol import EngineError
from engines.registry import create_engine
from tests.conftest import free_loopback_port

CUSTOM_CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig


class ShadyConfig(PretrainedConfig):
    model_type = "shady"
'''


def custom_code_checkpoint(folder: Path, embedded: Path, marker: str) -> Path:
    """A checkpoint whose config names its own Python module, which leaves a marker file when it runs."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "shady", "auto_map": {"AutoConfig": '
                                        '"configuration_shady.ShadyConfig"}}')
    # transformers copies the module into its own cache before running it, so the marker path is absolute.
    (folder / "configuration_shady.py").write_text(CUSTOM_CODE.format(marker=str(folder / marker)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(embedded / name)
    return folder


def test_checkpoint_code_runs_only_when_the_operator_turns_it_on(tmp_path, monkeypatch):
    # Issue 8, item 4: "trust_remote_code stays off unless the operator turns it on".
    embedded = resolve_model(None).path
    monkeypatch.delenv("PLAYGROUND_TRUST_REMOTE_CODE", raising=False)
    folder = custom_code_checkpoint(tmp_path / "off", embedded, "RAN")
    with pytest.raises(EngineError, match="custom code.*PLAYGROUND_TRUST_REMOTE_CODE=1"):
        create_engine("bf16", model=str(folder)).load()
    assert not (folder / "RAN").exists()
    # Turned on, the same kind of checkpoint's code does run (it then lacks a model class, a load error).
    monkeypatch.setenv("PLAYGROUND_TRUST_REMOTE_CODE", "1")
    folder = custom_code_checkpoint(tmp_path / "on", embedded, "RAN")
    with pytest.raises(EngineError, match="could not load"):
        create_engine("bf16", model=str(folder)).load()
    assert (folder / "RAN").read_text() == "ran"


@pytest.mark.parametrize("hosting_variable", [("PLAYGROUND_HOSTED", "1"), ("SPACE_ID", "someone/playground")])
def test_hosted_models_come_from_the_allow_list_and_allowed_folders(tmp_path, monkeypatch, hosting_variable):
    # Issue 8, items 1 and 4: "an unknown model, or a path outside the allowed folders when hosted".
    for name in ("PLAYGROUND_HOSTED", "SPACE_ID", "PLAYGROUND_ALLOWED_MODELS", "PLAYGROUND_ALLOWED_MODEL_DIRS"):
        monkeypatch.delenv(name, raising=False)
    embedded = resolve_model(None)
    local_copy = tmp_path / "models" / "local-copy"
    local_copy.parent.mkdir()
    local_copy.symlink_to(embedded.path, target_is_directory=True)
    assert resolve_model(str(local_copy)).origin == "local"  # not hosted: any local folder
    monkeypatch.setenv(*hosting_variable)
    assert resolve_model(None).path == embedded.path  # the default model is allowed without a list
    for name in ("google/gemma-3-1b-pt", "/etc", str(tmp_path / "models" / ".." / "models" / "local-copy")):
        with pytest.raises(EngineError, match="not allowed on this hosted playground.*PLAYGROUND_ALLOWED_MODELS"):
            resolve_model(name)
    with pytest.raises(EngineError, match="not allowed"):
        create_engine("bf16", model="/etc").load()
    monkeypatch.setenv("PLAYGROUND_ALLOWED_MODEL_DIRS", str(tmp_path / "models"))
    # A folder under an allowed one is resolved through its symlink: the embedded cache lies elsewhere.
    with pytest.raises(EngineError, match="not allowed"):
        resolve_model(str(local_copy))
    monkeypatch.setenv("PLAYGROUND_ALLOWED_MODEL_DIRS", str(embedded.path.parent))
    assert resolve_model(str(local_copy)).path == embedded.path.resolve()
    monkeypatch.setenv("PLAYGROUND_ALLOWED_MODELS", "gemma-3-270m, google/gemma-3-1b-pt")
    with pytest.raises(EngineError, match="hub could not provide"):  # allowed; offline, the hub fails cleanly
        resolve_model("google/gemma-3-1b-pt")


@pytest.mark.parametrize("typed", ["/etc/passwd", "../../../../etc/hostname", "/proc/self/environ"])
def test_a_path_typed_in_the_browser_is_checked_before_it_is_read(monkeypatch, typed):
    # Issue 8, item 4: "no file path from the browser reaches the filesystem unchecked". The KV tab's model
    # field takes a config path; hosted, only shipped shapes and allowed folders are read.
    monkeypatch.setenv("PLAYGROUND_HOSTED", "1")
    monkeypatch.delenv("PLAYGROUND_ALLOWED_MODEL_DIRS", raising=False)
    report, chart = calculate_kv(typed, 80, 8192)
    assert "outside the folders this hosted playground may read" in report and chart is None
    report, chart = calculate_kv("llama-3-8b", 80, 8192)
    assert "Cannot calculate" not in report and chart is not None


@pytest.mark.parametrize("arguments, host", [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")])
def test_the_page_binds_to_loopback_unless_told_otherwise(arguments, host):
    # Issue 8, item 4: "the app binds to localhost unless told otherwise". The options go the way
    # `python -m app` takes them, to the keyword arguments its demo.launch() receives.
    _, options = create(config_from_args(build_parser().parse_args(arguments), environ={}))
    assert options["server_name"] == host and options["show_error"] is False


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the outgoing address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_served_page_is_on_loopback_only_and_serves_no_arbitrary_file():
    # Issue 8, item 4, against the real server: bound to 127.0.0.1, and Gradio's file route refuses paths
    # outside the app's own temporary files (the repository, /etc).
    port = free_loopback_port()
    demo, options = create(AppConfig(port=port))
    demo.launch(prevent_thread_lock=True, quiet=True, **options)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base, timeout=30).status_code == 200
        readme = Path(__file__).resolve().parent.parent / "README.md"
        for path in ("/etc/passwd", str(readme), "../../../../etc/passwd"):
            response = httpx.get(f"{base}/gradio_api/file={path}", timeout=30)
            assert response.status_code in (403, 404), (path, response.status_code)
            assert "root:" not in response.text
        address = _non_loopback_address()
        if address is not None:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{address}:{port}", timeout=5)
    finally:
        demo.close()


# Issue 13, item 6: a page that listens beyond loopback applies the hosted allow-lists unless the operator
# turns them off explicitly, and its refusal of a path does not tell whether the file exists.
@pytest.mark.parametrize("host, preset, hosted, note", [
    ("127.0.0.1", None, None, ""), ("localhost", None, None, ""), ("::1", None, None, ""),
    ("127.0.0.2", None, None, ""),
    ("0.0.0.0", None, "1", "hosted mode is on"), ("192.168.1.20", None, "1", "hosted mode is on"),
    ("::", None, "1", "hosted mode is on"), ("my-host.example", None, "1", "hosted mode is on"),
    ("0.0.0.0", "0", "0", "hosted mode off (PLAYGROUND_HOSTED=0)"),   # the operator's explicit opt-out
    ("0.0.0.0", "1", "1", "hosted mode is on"),
])
def test_listening_beyond_loopback_turns_hosted_mode_on(host, preset, hosted, note):
    environ = {} if preset is None else {"PLAYGROUND_HOSTED": preset}
    assert apply_exposure_policy(host, environ).startswith(f"listening on {host}") == bool(note)
    assert note in apply_exposure_policy(host, environ) and environ.get("PLAYGROUND_HOSTED") == hosted


def _kv_report(url: str, config: str) -> str:
    from gradio_client import Client
    return Client(url, verbose=False, download_files=False).predict(config, 80, 8192, api_name="/kv")[0]


def test_an_app_on_all_interfaces_reads_no_path_and_does_not_tell_which_exist(tmp_path):
    # The real `python -m app --host 0.0.0.0`, reached through loopback. Hosted mode is on by itself: the KV
    # field's paths are refused before anything is read, in the same words whether the file exists or not.
    from tests.test_api import start_app, stop_app
    port = free_loopback_port()
    server = start_app(port, "--host", "0.0.0.0", log_name="exposed_server.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        missing = tmp_path / "no-such-config.json"
        reports = {path: _kv_report(url, path) for path in ("/etc/passwd", str(missing), "/etc")}
        for path, report in reports.items():
            assert report.startswith("**Cannot calculate:**") and "outside the folders this hosted playground" \
                in report, report
            assert "JSON" not in report and "not found" not in report and "does not exist" not in report
        assert len({report.replace(path, "PATH") for path, report in reports.items()}) == 1, reports
        assert "llama-3-8b" in _kv_report(url, "llama-3-8b")   # the shipped shapes still work
    finally:
        stop_app(server)
    log = (Path(__file__).resolve().parent.parent / "test-artifacts" / "exposed_server.log").read_text()
    assert "listening on 0.0.0.0, beyond this machine: hosted mode is on" in log
    # PLAYGROUND_HOSTED=0 is the operator's explicit opt-out: the same page then reads what it is given.
    server = start_app(port, "--host", "0.0.0.0", log_name="exposed_server_opt_out.log", PLAYGROUND_HOSTED="0")
    try:
        assert "could not be read as JSON" in _kv_report(f"http://127.0.0.1:{port}/", "/etc/passwd")
    finally:
        stop_app(server)
