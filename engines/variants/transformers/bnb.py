"""`nf4` and `int8`: bitsandbytes weight quantization through transformers' BitsAndBytesConfig.

NF4 stores linear weights as 4-bit NormalFloat blocks and computes in the model dtype; LLM.int8 stores
int8 weights and keeps outlier activation columns (above llm_int8_threshold) in 16 bits. Embeddings and
norms stay in the model dtype, so the footprint drops less than the bit width suggests on a model whose
embedding is large (Gemma-3-270M's is two thirds of its parameters).
"""
from __future__ import annotations

from engines.models.catalog import ModelSource, trust_remote_code
from engines.protocol import Precision, ProgressCallback
from engines.variants.transformers.engine import TransformersEngine
from engines.variants.transformers.options import BitsAndBytesOptions


class BitsAndBytesEngine(TransformersEngine):
    """Options: bits=4|8 (set by the registry), double_quant (NF4, default off), int8_threshold (INT8)."""

    options_class = BitsAndBytesOptions

    @property
    def bits(self) -> int:
        return self.options.bits

    def precision(self) -> Precision:
        """NF4: 4 bits plus an fp32 absmax per block of 64 (with double quantization, an 8-bit absmax and
        an fp32 scale per 256 blocks); LLM.int8: 1 byte plus an fp32 scale per output row, left out.
        Embeddings, the output head and the KV cache stay in the compute dtype."""
        compute = super().precision()
        if self.bits == 8:
            linear, label = 1.0, "LLM.int8 linear"
        elif self.options.double_quant:
            linear, label = 0.5 + 1 / 64 + 4 / (64 * 256), "NF4 (double quant) linear"
        else:
            linear, label = 0.5 + 4 / 64, "NF4 linear"
        return Precision(linear, compute.other_bytes_per_weight, compute.kv_bytes_per_element,
                         f"{label}, {compute.label} elsewhere")

    def quantization_config(self):
        from transformers import BitsAndBytesConfig
        if self.bits == 4:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=self._torch_dtype(),
                                      bnb_4bit_use_double_quant=self.options.double_quant)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.options.int8_threshold)

    def _load_model(self, source: ModelSource, progress: ProgressCallback | None):
        from transformers import AutoModelForCausalLM
        config = self.quantization_config()
        if progress:
            progress(f"{self.name}: quantizing the weights to {'NF4' if self.bits == 4 else 'INT8'} while loading")
        return AutoModelForCausalLM.from_pretrained(
            source.path, quantization_config=config, dtype=self._torch_dtype(), device_map=self.device,
            attn_implementation=self.options.attn_implementation, trust_remote_code=trust_remote_code())
