"""What the 4-bit GPTQModel variants (gptq-int4, awq-int4) share: the quantization cache, the calibration
text, the checkpoint check, the kernel choice, and `Int4Engine`, their common base.

A model whose config carries a quantization_config of the variant's method, or `checkpoint=PATH`, loads
directly. Any other model is quantized on first use from assets/calibration.txt and cached under
cache_dir()/<method>/, keyed by a hash of the model, the settings, the GPTQModel version and the
calibration text. The cache is written to a staging folder, given a manifest of file sizes and sha256
sums, and renamed into place; a cache whose files do not match its manifest (corrupt, truncated,
half-deleted) is rebuilt, never loaded.

Kernels are named, not left to GPTQModel's automatic choice: offline on a GPU that choice tries to
download CUTLASS and fails. Each method lists its backends per device, tried in order until one loads;
`kernel_name` says which kernel ran.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from engines.models.catalog import ASSETS, ModelSource, cache_dir, trust_remote_code
from engines.protocol import EngineError, Precision, ProgressCallback, describe_error, say
from engines.variants.transformers.engine import TransformersEngine

CALIBRATION_PATH = ASSETS / "calibration.txt"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Int4Method:
    """One 4-bit method as GPTQModel runs it."""
    name: str                               # quant_method in a checkpoint's config.json; the cache folder
    backends: dict[str, tuple[str, ...]]    # GPTQModel BACKEND values per device ("cpu", "cuda"), tried in order
    # quantize(source, settings, device, out_dir) writes a quantized checkpoint into out_dir
    quantize: Callable[[ModelSource, Any, str, Path], None]
    cpu_estimate: str = ""                  # how long quantizing the embedded model takes on 2 CPU cores

    @property
    def engine(self) -> str:
        return f"{self.name}-int4"


def calibration_samples(num_samples: int) -> list[str]:
    paragraphs = [part.strip() for part in CALIBRATION_PATH.read_text().split("\n\n") if part.strip()]
    if not 1 <= num_samples <= len(paragraphs):
        raise EngineError(f"num_calibration_samples must be between 1 and {len(paragraphs)} "
                          f"(the paragraphs of {CALIBRATION_PATH.name}), got {num_samples}")
    return paragraphs[:num_samples]


def cache_key(source: ModelSource, settings) -> str:
    """A hash of everything the quantized weights depend on; `settings` is the method's frozen dataclass."""
    with library_output_to_stderr():
        import gptqmodel
    identity = {"model": str(source.path), "config_sha256": _sha256(source.path / "config.json"),
                "settings": asdict(settings), "gptqmodel": gptqmodel.__version__,
                "calibration_sha256": hashlib.sha256(
                    "\n\n".join(calibration_samples(settings.num_calibration_samples)).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(method: Int4Method, source: ModelSource, settings) -> Path:
    return cache_dir() / method.name / (f"{source.path.name}-{settings.bits}bit-g{settings.group_size}-"
                                        f"{cache_key(source, settings)}")


def cache_problem(folder: Path) -> str | None:
    """None when the folder holds a complete quantized checkpoint matching its manifest, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (an interrupted or foreign write)"
    except (ValueError, KeyError, TypeError):
        return "the manifest is unreadable"
    if not any(name.endswith(".safetensors") for name in files) or "config.json" not in files:
        return "the manifest lists no weights"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size_bytes"]:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {expected['size_bytes']} (partial write)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def quantize_once(method: Int4Method, source: ModelSource, settings, device: str,
                  progress: ProgressCallback | None = None) -> Path:
    """Return a verified quantized checkpoint for `source`, quantizing it first when none is cached."""
    from filelock import FileLock
    target = cache_path(method, source, settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        problem = cache_problem(target) if target.exists() else "not quantized yet"
        if problem is None:
            say(progress, f"{method.engine}: loading the cached quantization {target}")
            return target
        if target.exists():
            say(progress, f"{method.engine}: the cache at {target} is unusable ({problem}); rebuilding it")
            shutil.rmtree(target)
        staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        started = time.perf_counter()
        estimate = f"; {method.cpu_estimate} on 2 CPU cores" if device == "cpu" and method.cpu_estimate else ""
        say(progress, f"{method.engine}: quantizing {source.name} to {settings.bits}-bit {method.name.upper()}, group "
                      f"size {settings.group_size}, {settings.num_calibration_samples} calibration samples on {device} "
                      f"(first use only{estimate})")
        try:
            method.quantize(source, settings, device, staging)
            copy_tokenizer(source.path, staging)
            _write_manifest(staging, settings, time.perf_counter() - started)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        say(progress, f"{method.engine}: quantized in {time.perf_counter() - started:.0f} s, cached at {target}")
    return target


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """GPTQModel saves the tokenizer it normalised; ours (BOS on, as Gemma needs) is the one to keep."""
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, out_dir / path.name)


def _write_manifest(folder: Path, settings, quantize_s: float) -> None:
    files = {path.name: {"size_bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(folder.iterdir()) if path.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"settings": asdict(settings), "quantize_s": quantize_s,
                                               "files": files}, indent=2))


@contextlib.contextmanager
def library_output_to_stderr():
    """GPTQModel prints its banner, logs and progress bars to stdout, where `generate --json` writes its
    JSON; they belong on stderr. Its worker count is set before its first import: the default is half
    the cores, and a single worker crashes quantization on a 2-core machine."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2))))
    with contextlib.redirect_stdout(sys.stderr):
        yield


def is_checkpoint_of(folder: Path, method: Int4Method) -> bool:
    """True for a checkpoint quantized with `method`, False for a plain one; EngineError for another method."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    found = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    if found and found != method.name:
        raise EngineError(f"{folder} is already quantized with '{found}'; {method.engine} takes a plain or a "
                          f"{method.name.upper()} checkpoint")
    return found == method.name


class Int4Engine(TransformersEngine):
    """A TransformersEngine whose linear layers are 4-bit GPTQModel kernels. Subclasses set `int4` and build
    `self.settings` (a frozen dataclass with bits, group_size, num_calibration_samples) from their options."""

    int4: Int4Method

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        super().__init__(name, model, options)
        self.model_name = self.options.checkpoint or model
        self.kernel_name: str | None = None
        self.backend: str | None = None
        self.checkpoint_path: Path | None = None

    def precision(self) -> Precision:
        """4-bit weights with an fp16 scale and a 4-bit zero point per group of group_size; the output
        head, embeddings and KV cache stay in the compute dtype."""
        compute = super().precision()
        group = self.settings.group_size
        return Precision(0.5 + 2 / group + 0.5 / group, compute.other_bytes_per_weight, compute.kv_bytes_per_element,
                         f"{self.int4.name.upper()} INT4 g{group} linear, {compute.label} elsewhere")

    def _load_model(self, source: ModelSource, progress: ProgressCallback | None):
        device = "cuda" if self.device.startswith("cuda") else "cpu"
        if is_checkpoint_of(source.path, self.int4):
            self.checkpoint_path = source.path
        else:
            self.checkpoint_path = quantize_once(self.int4, source, self.settings, self.device, progress)
        with library_output_to_stderr():
            from gptqmodel import GPTQModel
            from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        requested = self.options.backend
        failures = []
        for backend in ([requested] if requested else self.int4.backends[device]):
            try:
                with library_output_to_stderr():
                    wrapper = GPTQModel.load(str(self.checkpoint_path), device=self.device, backend=backend,
                                             dtype=self._torch_dtype(), trust_remote_code=trust_remote_code())
            except Exception as error:
                failures.append(f"{backend}: {describe_error(error)[:200]}")
                continue
            kernels = sorted({type(module).__name__ for module in wrapper.model.modules()
                              if isinstance(module, BaseQuantLinear)})
            self.backend, self.kernel_name = backend, ", ".join(kernels)
            say(progress, f"{self.name}: kernel {self.kernel_name} (backend {backend})")
            return wrapper.model
        raise EngineError(f"{self.name}: no {self.int4.name.upper()} kernel loaded on {self.device}: "
                          + "; ".join(failures))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
