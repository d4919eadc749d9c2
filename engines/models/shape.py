"""A decoder-only model's shape read from its config.json: what the KV calculator and the roofline need.

Configs are found by name in assets/configs/ (real architecture shapes such as llama-3-8b), as a path
to a config.json or a checkpoint folder, or as a model name that engines.models.sources.resolve_model knows
(the embedded Gemma-3-270M and SmolLM2-135M-Instruct). Pure Python: no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.models.catalog import CONFIGS_DIR, catalog_entries, check_path_allowed
from engines.protocol import EngineError


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_sliding_layers: int         # layers whose KV holds at most `sliding_window` tokens
    sliding_window: int | None
    is_tied_embeddings: bool

    @property
    def num_full_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    @property
    def attention_layout(self) -> str:
        if self.num_kv_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def num_linear_params(self) -> int:
        """Weights of every layer's attention and gated MLP projections: what quantization shrinks."""
        query_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (2 * query_width + 2 * kv_width)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def num_lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Linear weights, the output head and (when untied) the embedding table; norms are negligible."""
        embedding = 0 if self.is_tied_embeddings else self.vocab_size * self.hidden_size
        return self.num_linear_params + self.num_lm_head_params + embedding


def available_configs() -> list[str]:
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))


def read_config(name_or_path: str) -> tuple[str, dict]:
    """(display name, config dict) for a shipped config name or a config/checkpoint path; model names
    go through engines.models.sources.load_config, which provisions them first."""
    name_or_path = (name_or_path or "").strip()
    if not name_or_path:
        raise EngineError(f"name a model config: one of {', '.join(available_configs())}, or a path")
    # Only a listed name maps into assets/configs/, so "../" in a name cannot reach another file there.
    is_shipped = name_or_path.removesuffix(".json") in available_configs()
    path = Path(name_or_path).expanduser()
    if not is_shipped and name_or_path not in catalog_entries():
        check_path_allowed(path, "config path")
    if is_shipped:
        path = CONFIGS_DIR / f"{name_or_path.removesuffix('.json')}.json"
    elif path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        raise EngineError(f"config '{name_or_path}' not found: not one of {', '.join(available_configs())}, "
                          "not a config.json or checkpoint folder, not a known model name")
    if not path.is_file():
        raise EngineError(f"config '{name_or_path}': {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise EngineError(f"config '{name_or_path}' could not be read as JSON: {error}") from None
    return name_or_path, config


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """Read the shape; raises EngineError naming the missing field for a config that is not a decoder LM."""
    config = config.get("text_config", config)
    try:
        hidden_size = int(config["hidden_size"])
        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        vocab_size = int(config["vocab_size"])
        intermediate_size = int(config["intermediate_size"])
    except KeyError as error:
        raise EngineError(f"config '{name}' lacks {error.args[0]}: not a decoder-only language model config") from None
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    head_dim = int(config.get("head_dim") or hidden_size // num_heads)
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types:
        num_sliding = sum(1 for kind in layer_types if kind == "sliding_attention")
    elif window and config.get("use_sliding_window", True):
        # Mistral-style configs apply the window to every layer; Qwen2 only above max_window_layers.
        num_sliding = num_layers - int(config.get("max_window_layers", 0) or 0) if "max_window_layers" in config \
            else num_layers
    else:
        num_sliding = 0
    return ModelShape(
        name=name, model_type=str(config.get("model_type", "")), hidden_size=hidden_size, num_layers=num_layers,
        num_attention_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, vocab_size=vocab_size, num_sliding_layers=num_sliding,
        sliding_window=int(window) if window and num_sliding else None,
        is_tied_embeddings=bool(config.get("tie_word_embeddings", True)))  # transformers' default
