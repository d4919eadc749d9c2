"""What the playground knows about models before touching any weights: the catalogue in
assets/models.toml, the cache folder, `ModelSource` (what provisioning returns), and the operator's
policy (trust_remote_code, and the hosted allow-lists).

Operator settings (README, "Operating it safely"): a checkpoint's own Python code runs only with
PLAYGROUND_TRUST_REMOTE_CODE=1; when hosted a model must be named in PLAYGROUND_ALLOWED_MODELS or lie
under PLAYGROUND_ALLOWED_MODEL_DIRS.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engines.protocol import EngineError

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# "dummy:llama-3-8b": random weights of a shipped architecture shape (engines/models/dummy.py).
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
