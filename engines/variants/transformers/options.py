"""The transformers family's options, one dataclass per variant (parsed by engines/options.py, so an
unknown key or a bad value is refused with the valid ones named)."""
from __future__ import annotations

from dataclasses import dataclass

from engines.options import option
from engines.variants.transformers.attention import ATTENTION_IMPLEMENTATIONS, SDPA_BACKENDS

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TransformersOptions:
    """bf16, bf16-compiled and the base of every in-process variant."""
    device: str | None = option(None, doc="cpu, cuda or cuda:N (default: cuda when a GPU is present)")
    dtype: str = option("bfloat16", choices=DTYPES)
    attn_implementation: str = option("sdpa", choices=ATTENTION_IMPLEMENTATIONS)
    sdpa_backend: str = option("auto", choices=SDPA_BACKENDS)
    compile: bool = option(False, doc="static KV cache + torch.compile (GPU)")
    dummy_weights: bool = option(False, doc="random weights built from the config (the bench's --dummy-weights)")
    share_weights: bool = option(True, doc="share one copy of the weights with engines of the same model and dtype")


@dataclass(frozen=True)
class BitsAndBytesOptions(TransformersOptions):
    bits: int = option(4, choices=(4, 8), doc="4: NF4, 8: LLM.int8 (set by the registry)")
    double_quant: bool = option(False, doc="NF4: quantize the absmax constants too")
    int8_threshold: float = option(6.0, minimum=0.0, doc="LLM.int8 outlier threshold")


@dataclass(frozen=True)
class GptqOptions(TransformersOptions):
    checkpoint: str | None = option(None, doc="a GPTQ checkpoint folder or hub id to load instead of quantizing")
    backend: str | None = option(None, doc="a GPTQModel BACKEND value (default: the first that loads here)")
    group_size: int = option(128, choices=(32, 64, 128, 256))
    desc_act: bool = option(False)
    num_calibration_samples: int = option(16, minimum=1)


@dataclass(frozen=True)
class SpeculativeOptions(TransformersOptions):
    prompt_lookup_num_tokens: int | None = option(None, minimum=1, doc="tokens drafted per step by prompt lookup")
    max_matching_ngram_size: int | None = option(None, minimum=1)
    draft_model: str | None = option(None, doc="a draft model (same tokenizer) instead of prompt lookup")
    num_assistant_tokens: int | None = option(None, minimum=1, doc="draft tokens per step (draft model)")


@dataclass(frozen=True)
class AwqOptions(TransformersOptions):
    checkpoint: str | None = option(None, doc="an AWQ checkpoint folder or hub id to load instead of quantizing "
                                              "(default: the catalogue's awq_hub_id for the model, if any)")
    backend: str | None = option(None, doc="a GPTQModel BACKEND value, e.g. awq_torch (default: the first that loads)")
    # GPTQModel's AWQ kernels: torch and ATen take groups of 16-128, Marlin 32-128.
    group_size: int = option(128, choices=(32, 64, 128))
    num_calibration_samples: int = option(16, minimum=1)
