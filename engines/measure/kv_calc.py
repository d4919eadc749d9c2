"""KV-cache calculator: bytes per token and per context for a model shape, MHA against its real head layout,
BF16 against FP8, and how many tokens fit in a given memory.

Each layer stores one key and one value vector per KV head per token:
    bytes per token per layer = 2 * num_kv_heads * head_dim * bytes_per_element
Sliding-window layers (Gemma 3 has 5 of every 6) keep at most `sliding_window` tokens, as transformers'
sliding cache layers and vLLM's hybrid KV allocator do, so at context C they hold min(C, window) tokens.
`kv_bytes_per_token` counts every layer (the cost of a token while the context is within the window);
beyond the window each new token costs only the full-attention layers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engines.models.shape import ModelShape
from engines.protocol import GIB, EngineError

KV_DTYPE_BYTES = {"BF16": 2, "FP8": 1}
WEIGHT_BYTES_BF16 = 2


@dataclass
class KvRow:
    layout: str                 # "MHA" or the model's own ("GQA", "MQA", "MHA")
    num_kv_heads: int
    kv_dtype: str
    kv_bytes_per_token: int     # every layer, within the sliding window
    kv_bytes_per_1k: int        # a 1024-token context, sliding layers capped
    kv_bytes_at_context: int
    max_tokens_in_vram: int | None           # the whole --vram-gib as KV; None: unbounded (all layers slide)
    max_tokens_beside_weights: int | None    # --vram-gib minus the BF16 weights of this shape


@dataclass
class KvReport:
    config: str
    attention_layout: str
    num_layers: int
    num_sliding_layers: int
    sliding_window: int | None
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    context_tokens: int
    vram_gib: float
    weights_bf16_gib: float
    rows: list[KvRow]

    def to_dict(self) -> dict:
        return asdict(self)


def kv_bytes(shape: ModelShape, context_tokens: int, dtype_bytes: float, num_kv_heads: int | None = None) -> float:
    """Bytes of one sequence's KV cache at `context_tokens`, sliding layers capped at their window."""
    per_layer_token = 2 * (num_kv_heads or shape.num_kv_heads) * shape.head_dim * dtype_bytes
    sliding_tokens = min(context_tokens, shape.sliding_window) if shape.sliding_window else context_tokens
    return per_layer_token * (shape.num_full_layers * context_tokens + shape.num_sliding_layers * sliding_tokens)


def max_tokens(shape: ModelShape, budget_bytes: float, dtype_bytes: float,
               num_kv_heads: int | None = None) -> int | None:
    """Longest single-sequence context whose KV fits in `budget_bytes`; None when it never runs out."""
    if budget_bytes <= 0:
        return 0
    per_layer_token = 2 * (num_kv_heads or shape.num_kv_heads) * shape.head_dim * dtype_bytes
    window = shape.sliding_window
    if not window or kv_bytes(shape, window, dtype_bytes, num_kv_heads) >= budget_bytes:
        return int(budget_bytes // (per_layer_token * shape.num_layers))
    if shape.num_full_layers == 0:
        return None
    held_by_windows = per_layer_token * shape.num_sliding_layers * window
    return int((budget_bytes - held_by_windows) // (per_layer_token * shape.num_full_layers))


def calculate(shape: ModelShape, vram_gib: float = 80.0, context_tokens: int = 8192) -> KvReport:
    if not (math.isfinite(vram_gib) and vram_gib > 0):
        raise EngineError(f"the memory to fill must be a positive number of GiB, got {vram_gib}")
    if context_tokens <= 0:
        raise EngineError(f"the context must be a positive number of tokens, got {context_tokens}")
    weights_bytes = shape.num_params * WEIGHT_BYTES_BF16
    layouts = [("MHA", shape.num_attention_heads)]
    if shape.num_kv_heads != shape.num_attention_heads:
        layouts.append((shape.attention_layout, shape.num_kv_heads))
    rows = []
    for layout, num_kv_heads in layouts:
        for dtype, dtype_bytes in KV_DTYPE_BYTES.items():
            rows.append(KvRow(
                layout=layout, num_kv_heads=num_kv_heads, kv_dtype=dtype,
                kv_bytes_per_token=2 * num_kv_heads * shape.head_dim * dtype_bytes * shape.num_layers,
                kv_bytes_per_1k=int(kv_bytes(shape, 1024, dtype_bytes, num_kv_heads)),
                kv_bytes_at_context=int(kv_bytes(shape, context_tokens, dtype_bytes, num_kv_heads)),
                max_tokens_in_vram=max_tokens(shape, vram_gib * GIB, dtype_bytes, num_kv_heads),
                max_tokens_beside_weights=max_tokens(shape, vram_gib * GIB - weights_bytes, dtype_bytes, num_kv_heads)))
    return KvReport(
        config=shape.name, attention_layout=shape.attention_layout, num_layers=shape.num_layers,
        num_sliding_layers=shape.num_sliding_layers, sliding_window=shape.sliding_window,
        num_attention_heads=shape.num_attention_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        context_tokens=context_tokens, vram_gib=vram_gib, weights_bf16_gib=weights_bytes / GIB, rows=rows)


def format_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if num_bytes >= size:
            return f"{num_bytes / size:,.1f} {unit}"
    return f"{num_bytes:,.0f} B"


def _format_tokens(num_tokens: int | None) -> str:
    return "unbounded" if num_tokens is None else f"{num_tokens:,}"


def to_markdown(report: KvReport) -> str:
    sliding = (f"{report.num_sliding_layers} of {report.num_layers} layers slide over {report.sliding_window} tokens "
               "and are counted at min(context, window)" if report.num_sliding_layers else "no sliding-window layers")
    lines = [
        f"KV cache for **{report.config}**: {report.num_layers} layers, {report.num_attention_heads} query heads, "
        f"{report.num_kv_heads} KV heads ({report.attention_layout}), head_dim {report.head_dim}; {sliding}. "
        f"BF16 weights ≈ {report.weights_bf16_gib:.2f} GiB.",
        "",
        f"| layout | KV heads | KV dtype | per token | per 1k context | at {report.context_tokens:,} tokens "
        f"| tokens in {report.vram_gib:g} GiB | tokens beside BF16 weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(f"| {row.layout} | {row.num_kv_heads} | {row.kv_dtype} | {format_bytes(row.kv_bytes_per_token)} "
                     f"| {format_bytes(row.kv_bytes_per_1k)} | {format_bytes(row.kv_bytes_at_context)} "
                     f"| {_format_tokens(row.max_tokens_in_vram)} | {_format_tokens(row.max_tokens_beside_weights)} |")
    return "\n".join(lines)
