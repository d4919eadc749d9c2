"""Random-weight models of real architecture shapes, for speed and memory at scale without a hub.

`resolve_model("dummy:llama-3-8b")` (a name from assets/configs/, or a path to a config.json) gives a
checkpoint folder holding that config and a tokenizer but no weights. Engines then initialise it:
- the transformers engine builds the model from the config, in the target dtype, on the device
  (`random_model`): no fp32 copy, no weight file;
- vLLM takes `load_format="dummy"`;
- loaders that can only read weight files (bitsandbytes, GPTQ) get a folder with random weights saved
  once (`materialize_weights`).

Tokenizer: the embedded Gemma tokenizer is reused (DUMMY_TOKENIZER_MODEL, whatever the default model
is). Its 262k vocabulary is larger than the shapes', so prompts are built only from words whose ids are
all below the shape's vocab_size (`is_token_id_in_vocab` guards that), and its EOS is moved to an id at
or above vocab_size, which a model of that vocabulary can never emit: every run then generates exactly
the tokens asked for.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from engines.models.catalog import DUMMY_PREFIX, ModelSource, cache_dir
from engines.models.shape import read_config, shape_from_config
from engines.protocol import EngineError, ProgressCallback, describe_error

RANDOM_WEIGHTS_NOTE = "n/a (random weights)"
# Its 262k vocabulary exceeds every shipped shape's, so an unreachable EOS id exists in it.
DUMMY_TOKENIZER_MODEL = "gemma-3-270m"


def provision_dummy(config_name: str, embedded: ModelSource, progress: ProgressCallback | None = None) -> ModelSource:
    """A weightless checkpoint folder for a shipped shape name or a config.json path, with the embedded
    model's tokenizer."""
    name, config = read_config(config_name)
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    shape = shape_from_config(config, name)
    stem = Path(name).stem if name.endswith(".json") else Path(name).name
    target = cache_dir() / "dummy" / stem
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(embedded.path)
    unreachable_id = len(tokenizer) - 1
    if unreachable_id >= shape.vocab_size:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(unreachable_id)
    # The model config must keep ids inside its vocabulary; generation reads EOS from generation_config.
    import transformers
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                  transformers_version=transformers.__version__)
    config.setdefault("torch_dtype", "bfloat16")
    content = json.dumps(config, indent=2)
    from filelock import FileLock
    target.parent.mkdir(parents=True, exist_ok=True)
    # Another process (a second command, a parallel test worker) may be reading this folder: it is written
    # once, whole, under a lock, and rewritten only when the shape's config changed.
    with FileLock(str(target) + ".lock"):
        if not ((target / "config.json").is_file() and (target / "config.json").read_text() == content):
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            (staging / "config.json").write_text(content)
            (staging / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": config["bos_token_id"], "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": config["pad_token_id"]}, indent=2))
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return ModelSource(f"{DUMMY_PREFIX}{stem}", target, None, "dummy")


def random_model(path: Path, dtype, device: str, attn_implementation: str = "sdpa"):
    """The architecture of `path`'s config with randomly initialised weights, built in `dtype` on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def materialize_weights(source: ModelSource, device: str, progress: ProgressCallback | None = None) -> Path:
    """A sibling folder of `source` with random BF16 weights saved once, for loaders that read files only."""
    # Keyed by the config's content, so an edited shape under the same name never reuses stale weights.
    digest = hashlib.sha256((source.path / "config.json").read_bytes()).hexdigest()[:12]
    target = source.path.with_name(f"{source.path.name}-random-weights-{digest}")
    from filelock import FileLock
    with FileLock(str(target) + ".lock"):
        return _write_random_weights(source, target, device, progress)


def _write_random_weights(source: ModelSource, target: Path, device: str, progress: ProgressCallback | None) -> Path:
    import torch
    if (target / "model.safetensors.index.json").is_file() or (target / "model.safetensors").is_file():
        return target
    if progress:
        progress(f"writing random weights for {source.name} to {target} (once)")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = random_model(source.path, torch.bfloat16, device)
        model.save_pretrained(staging, max_shard_size="4GB")
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineError(f"could not write random weights for {source.name}: {describe_error(error)}") from None
    finally:
        model = None
        if device != "cpu":
            torch.cuda.empty_cache()
    for item in source.path.iterdir():
        if item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json", "generation_config.json",
                                                                "config.json"):
            shutil.copy2(item, staging / item.name)
    staging.rename(target)
    return target


def is_token_id_in_vocab(token_ids: list[int], vocab_size: int) -> bool:
    return all(0 <= token_id < vocab_size for token_id in token_ids)
