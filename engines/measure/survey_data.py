"""The survey's report as data: one dataclass per table, the survey's own quoted figures, and the two
tables that need no model run (number formats from torch.finfo, KV layouts from engines.measure.kv_calc).

The quoted figures are the survey's (Qwen-7B-Chat on an A100), as issue 19 quotes them. They are
reference values shown beside the measured ones under SURVEY_LABEL, never measurements of this tool.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from engines.measure.kv_calc import KV_DTYPE_BYTES, WEIGHT_BYTES_BF16, kv_bytes
from engines.models.shape import ModelShape
from engines.protocol import GIB

SURVEY_LABEL = "survey (Qwen-7B-Chat, A100)"
SURVEY_PROMPT = "输出20个任意的中文字符。"
SURVEY_MMLU = {"bf16": 55.8, "int8": 55.4, "int4": 55.1}              # BF16 / Int8 / Int4
SURVEY_SPEED_FA2_BF16 = {2048: 40.93, 8192: 36.14}                     # tok/s, BF16 + FlashAttention v2
SURVEY_MEMORY_BF16 = {"encode_2048": 16.99, "generate_8192": 22.53}   # GB, BF16
SURVEY_KV_CONTEXT = 2048 + 8192   # the survey's encode + generate lengths: the KV table's default context
SURVEY_SERVING = {"baseline": 40.12, "nf4": 27.51, "vllm": 88.16, "vllm-fp8_e5m2": 91.07}  # tok/s
FORMAT_DTYPES = (("FP32", "float32"), ("FP16", "float16"), ("BF16", "bfloat16"))


@dataclass
class FormatRow:
    name: str
    dtype: str
    bits: int
    exponent_bits: int
    fraction_bits: int
    min_normal: float
    max: float
    eps: float
    decimal_digits: int             # torch.finfo.resolution = 10^-digits
    decimal_digits_exact: float     # log10(2 ** (fraction_bits + 1))


@dataclass
class QualityRow:
    engine: str
    status: str = "ok"              # ok, unavailable, error
    reason: str = ""
    perplexity: float | None = None
    perplexity_ratio: float | None = None
    greedy_agreement: float | None = None
    cloze_correct: int | None = None
    cloze_total: int | None = None
    cloze_note: str = ""
    weight_footprint_gib: float | None = None
    note: str = ""
    survey_mmlu: float | None = None

    @property
    def cloze_accuracy(self) -> float | None:
        # None where the engine cannot be scored (llama.cpp has no in-process model): total is still the items'.
        return self.cloze_correct / self.cloze_total if self.cloze_correct is not None and self.cloze_total else None


@dataclass
class SpeedRow:
    engine: str
    attention: str                  # an ATTENTION_CHOICES key: eager, sdpa, sdpa-flash, ..., flash_attention_2
    new_tokens: int                 # N asked for
    status: str = "ok"
    reason: str = ""
    decode_tok_s: float | None = None
    num_tokens: int | None = None   # generated (fewer than N when the model ended at EOS)
    prompt_tokens: int | None = None
    ttft_s: float | None = None
    generate_peak_gib: float | None = None
    survey_tok_s: float | None = None


@dataclass
class MemoryRow:
    engine: str
    status: str = "ok"
    reason: str = ""
    encode_tokens: int | None = None
    encode_peak_gib: float | None = None
    generate_peak_gib: dict[str, float | None] = field(default_factory=dict)   # str(N) -> GiB
    weight_footprint_gib: float | None = None
    baseline_gib: float | None = None    # the process's memory before this engine loaded (same kind)
    memory_kind: str = ""
    survey_gb: dict[str, float] = field(default_factory=dict)


@dataclass
class ServingRow:
    row: str                        # baseline, nf4, vllm, vllm-fp8_e5m2
    engine: str                     # the label that ran
    status: str = "ok"
    reason: str = ""
    mode: str = ""                  # chat or completion
    prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    mean_tokens: float | None = None
    mean_tok_s: float | None = None
    num_runs: int = 0
    peak_gib: float | None = None
    survey_tok_s: float | None = None


@dataclass
class KvLayoutRow:
    layout: str                     # MHA, GQA, MQA
    num_kv_heads: int | None
    is_model_own: bool
    reason: str = ""                # why the layout has no row (e.g. no group size between MQA and MHA)
    kv_bytes_per_token: int | None = None          # BF16, every layer
    kv_bytes_per_sequence: int | None = None       # BF16 at the report's context, sliding layers capped
    max_sequences_bf16: int | None = None          # beside the BF16 weights in the report's memory
    max_sequences_fp8: int | None = None


@dataclass
class Conclusion:
    claim: str
    survey_answer: str
    survey_numbers: str
    answer: str                     # yes, no, n/a
    numbers: list[str] = field(default_factory=list)   # the measurements that decide it
    rule: str = ""                  # the threshold applied
    note: str = ""                  # what limits it here (speed: launch-bound or bandwidth-bound)
    reason: str = ""                # why the answer differs from the survey's (or why it is n/a)


@dataclass
class SurveyReport:
    model: str
    device: str
    machine: dict
    settings: dict                  # the counts used: tokens, prompt tokens, runs, repeats, engines ...
    notes: list[str]
    formats: list[FormatRow]
    quality: list[QualityRow]
    speed: list[SpeedRow]
    memory: list[MemoryRow]
    serving: list[ServingRow]
    kv: list[KvLayoutRow]
    kv_context: int
    kv_memory_gib: float
    precisions: dict[str, dict]     # engine -> its Precision (bytes per weight / KV element) as measured
    bandwidth_gb_s: float | None
    shape: dict
    conclusions: list[Conclusion] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, item in zip(self.quality, data["quality"]):
            item["cloze_accuracy"] = row.cloze_accuracy
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SurveyReport":
        tables = {"formats": FormatRow, "quality": QualityRow, "speed": SpeedRow, "memory": MemoryRow,
                  "serving": ServingRow, "kv": KvLayoutRow, "conclusions": Conclusion}
        known = {name: {item.name for item in fields(kind)} for name, kind in tables.items()}
        values = dict(data)
        for name, kind in tables.items():
            values[name] = [kind(**{key: value for key, value in row.items() if key in known[name]})
                            for row in data.get(name, [])]
        return cls(**values)


def number_formats() -> list[FormatRow]:
    """FP32, FP16 and BF16 from torch.finfo: fraction bits from eps (eps = 2^-fraction), exponent bits
    what is left of the width after the sign."""
    import torch
    rows = []
    for name, dtype_name in FORMAT_DTYPES:
        info = torch.finfo(getattr(torch, dtype_name))
        fraction = round(-math.log2(info.eps))
        rows.append(FormatRow(name=name, dtype=dtype_name, bits=info.bits, exponent_bits=info.bits - 1 - fraction,
                              fraction_bits=fraction, min_normal=float(info.smallest_normal), max=float(info.max),
                              eps=float(info.eps), decimal_digits=round(-math.log10(info.resolution)),
                              decimal_digits_exact=(fraction + 1) * math.log10(2)))
    return rows


def gqa_kv_heads(num_attention_heads: int) -> int | None:
    """A grouped-query layout for a model that is not GQA itself: the largest divisor of the head count
    at most a quarter of it (Llama-3-8B's 32/8), else any divisor between 1 and the count."""
    divisors = [d for d in range(2, num_attention_heads) if num_attention_heads % d == 0]
    quarter = [d for d in divisors if d <= num_attention_heads // 4]
    if quarter:
        return quarter[-1]
    return divisors[0] if divisors else None


def kv_layouts(shape: ModelShape, context_tokens: int, memory_gib: float) -> list[KvLayoutRow]:
    """KV bytes per token and sequences of `context_tokens` that fit beside the BF16 weights in
    `memory_gib` GiB, for MHA, GQA and MQA on this model's layers and head size (kv_calc)."""
    heads = shape.num_attention_heads
    own = shape.attention_layout
    layouts = {"MHA": heads, "GQA": shape.num_kv_heads if own == "GQA" else gqa_kv_heads(heads), "MQA": 1}
    budget = memory_gib * GIB - shape.num_params * WEIGHT_BYTES_BF16
    rows = []
    for layout, num_kv_heads in layouts.items():
        if num_kv_heads is None:
            rows.append(KvLayoutRow(layout, None, False, f"{heads} query heads leave no group size between "
                                                         "MQA (1 KV head) and MHA"))
            continue
        per_sequence = {dtype: kv_bytes(shape, context_tokens, size, num_kv_heads)
                        for dtype, size in KV_DTYPE_BYTES.items()}
        rows.append(KvLayoutRow(
            layout=layout, num_kv_heads=num_kv_heads, is_model_own=layout == own,
            kv_bytes_per_token=2 * num_kv_heads * shape.head_dim * KV_DTYPE_BYTES["BF16"] * shape.num_layers,
            kv_bytes_per_sequence=int(per_sequence["BF16"]),
            max_sequences_bf16=max(0, int(budget // per_sequence["BF16"])),
            max_sequences_fp8=max(0, int(budget // per_sequence["FP8"]))))
    return rows
