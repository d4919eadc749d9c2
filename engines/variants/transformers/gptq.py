"""`gptq-int4`: 4-bit GPTQ weights through GPTQModel (auto-gptq is archived).

A model whose config carries a GPTQ quantization_config, or `checkpoint=PATH`, loads directly. Any
other model is quantized on first use from assets/calibration.txt and cached under cache_dir()/gptq/,
with a manifest that is verified on every load (engines/variants/transformers/int4_cache.py, shared with
awq-int4). `kernel_name` says which kernel ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.models.catalog import ModelSource, trust_remote_code
from engines.variants.transformers.int4_cache import (
    MANIFEST,
    Int4Engine,
    Int4Method,
    cache_problem,
    calibration_samples,
    library_output_to_stderr,
)
from engines.variants.transformers.options import GptqOptions

__all__ = ["BACKENDS", "GPTQ", "MANIFEST", "GptqEngine", "GptqSettings", "cache_problem"]

# Tried in order until one loads; the first is what GPTQModel itself picks on each device when it can.
BACKENDS = {"cpu": ("gptq_torch_aten", "gptq_torch"), "cuda": ("gptq_triton", "gptq_torch")}


@dataclass(frozen=True)
class GptqSettings:
    """What a quantized cache depends on besides the model; every field goes into the cache key."""
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    # The 16 paragraphs of assets/calibration.txt (~50 tokens each): quantizing the embedded model then
    # takes ~2 min on 2 cores, most of it packing, and perplexity stays within 1.3x of bf16.
    num_calibration_samples: int = 16


def _quantize(source: ModelSource, settings: GptqSettings, device: str, out_dir: Path) -> None:
    with library_output_to_stderr():
        from gptqmodel import GPTQModel, QuantizeConfig
        config = QuantizeConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act)
        model = GPTQModel.load(str(source.path), config, device=device, trust_remote_code=trust_remote_code())
        model.quantize(calibration_samples(settings.num_calibration_samples), batch_size=1)
        model.save(str(out_dir))


GPTQ = Int4Method("gptq", BACKENDS, _quantize, cpu_estimate="about 2 minutes")


class GptqEngine(Int4Engine):
    """INT4 GPTQ. Options: checkpoint=PATH, backend=NAME (a GPTQModel BACKEND value),
    num_calibration_samples, group_size, desc_act."""

    options_class = GptqOptions
    int4 = GPTQ

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        super().__init__(name, model, options)
        self.settings = GptqSettings(group_size=self.options.group_size, desc_act=self.options.desc_act,
                                     num_calibration_samples=self.options.num_calibration_samples)
