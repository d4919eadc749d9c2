"""`awq-int4`: 4-bit AWQ weights through GPTQModel, whose AWQ quantizer and kernels replace the deprecated
AutoAWQ. AWQ's GEMM layout: asymmetric, a 4-bit zero point and an fp16 scale per group of 128 weights.

The weights come from, in order: `checkpoint=PATH`; the AWQ checkpoint the model catalogue names
(assets/models.toml `awq_hub_id`, e.g. Qwen/Qwen2.5-7B-Instruct-AWQ); the model itself when its config
says quant_method awq; otherwise a quantization on first use from assets/calibration.txt, cached under
cache_dir()/awq/ with a verified manifest (engines/variants/transformers/int4_cache.py, shared with
gptq-int4).

Kernels, tried in order: on a CPU the ATen int4pack kernel (TorchAtenAwqLinear), then plain torch
(AwqTorchLinear); on a GPU Marlin (AwqMarlinLinear), then GEMM (AwqGEMMLinear), both CUDA extensions that
GPTQModel 7.6 builds just in time, then torch. `kernel_name` says which one ran.

Gemma3 (checked with GPTQModel 7.6.0): its Gemma3 definition is Llama's, and for AWQ that fails three
ways, so quantizing a Gemma3 goes through `gemma3_definition()`, a subclass that fixes them:
- AWQ's scale search recomputes rotary embeddings without Gemma3's `layer_type` (a TypeError). The
  subclass computes them per layer type (local base on sliding layers, global on full) for every
  replayed layer, and AWQ keeps them (`awq_preserve_explicit_position_embeddings`).
- Llama's module tree makes post_attention_layernorm the op before gate/up_proj. In Gemma3 that norm
  closes the attention branch and pre_feedforward_layernorm feeds the MLP, so the scales would be folded
  into a norm the MLP never sees.
- AWQ folds scales into a norm as w / s, but Gemma3RMSNorm multiplies by (1 + w). GPTQModel does
  (1 + w) / s - 1 only for GemmaRMSNorm and Gemma2RMSNorm, so each Gemma3RMSNorm is made a GemmaRMSNorm
  as well (a subclass that keeps Gemma3's own forward) before its layer is scaled.
- Gemma-3-270M's pre_feedforward_layernorm has 1-2 dead channels per layer (1 + w == 0). Their mean
  activation of 0 puts AWQ's smallest scale at its 1e-4 floor, and normalising by sqrt(max * min) then
  inflates every scale ~500x, so (1 + w) / s - 1 lands within a few bf16 steps of -1 and the stored
  multipliers keep ~10 distinct values (perplexity 325 against bf16's 16). The scale search sees those
  channels at the median activation instead; at run time they stay zero.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from engines.models.catalog import ModelSource, default_model_name, int4_checkpoint, trust_remote_code
from engines.variants.transformers.int4_cache import (
    Int4Engine,
    Int4Method,
    calibration_samples,
    library_output_to_stderr,
)
from engines.variants.transformers.options import AwqOptions

BACKENDS = {"cpu": ("awq_torch_aten", "awq_torch"), "cuda": ("awq_marlin", "awq_gemm", "awq_torch")}
# The kernel that packs the quantized weights. GPTQModel's default, AwqGEMMLinear, needs CUDA; the torch
# kernel writes the same GEMM layout on any device.
PACKING_BACKEND = "awq_torch"


@dataclass(frozen=True)
class AwqSettings:
    """What a quantized cache depends on besides the model; every field goes into the cache key."""
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True         # asymmetric, as AWQ's GEMM layout is
    format: str = "gemm"
    num_calibration_samples: int = 16
    recipe: int = 1                 # bumped when _quantize changes what it writes (the Gemma3 fixes)


@functools.cache
def gemma3_definition():
    """GPTQModel's Gemma3 text definition with the three AWQ fixes of the module docstring."""
    import torch
    from gptqmodel.models.definitions.gemma3 import Gemma3QModel
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    offset_norm = type("Gemma3OffsetRMSNorm", (Gemma3RMSNorm, GemmaRMSNorm), {})

    class Gemma3AwqQModel(Gemma3QModel):
        awq_preserve_explicit_position_embeddings = True
        module_tree = ["model", "layers", "#", {
            "input_layernorm": ("input_layernorm:!",),
            "self_attn": ("q_proj:0:in=x", "k_proj:0:in=x", "v_proj:0:in=x", "o_proj:1"),
            "pre_feedforward_layernorm": ("pre_feedforward_layernorm:!",),
            "mlp": ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1"),
        }]

        def awq_get_modules_for_scaling(self, module, input_feat, module_kwargs):
            nodes = super().awq_get_modules_for_scaling(module, input_feat, module_kwargs)
            for node in nodes:
                if not isinstance(node["prev_op"], Gemma3RMSNorm):
                    continue
                x_mean = node["inp"].abs().flatten(0, -2).float().mean(0)
                dead = x_mean < 1e-3 * x_mean.median()
                if dead.any():
                    node["inp"] = node["inp"].clone()
                    node["inp"][..., dead] = x_mean.median().to(node["inp"].dtype)
            return nodes

        def prepare_layer_replay_kwargs(self, layer, layer_input, additional_inputs, target_device):
            for module in layer.modules():
                if type(module) is Gemma3RMSNorm:
                    module.__class__ = offset_norm
            hidden = layer_input[0]
            positions = additional_inputs.get("position_ids")
            if positions is None or positions.shape[-1] != hidden.shape[1]:
                positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                additional_inputs["position_ids"] = positions
            embeddings = self.model.model.rotary_emb(hidden, positions.to(hidden.device), layer.self_attn.layer_type)
            additional_inputs["position_embeddings"] = tuple(part.to(target_device) for part in embeddings)
            return additional_inputs

    return Gemma3AwqQModel


def _quantize(source: ModelSource, settings: AwqSettings, device: str, out_dir: Path) -> None:
    with library_output_to_stderr():
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.quantization.config import FORMAT, METHOD
        config = QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT(settings.format), bits=settings.bits,
                                group_size=settings.group_size, sym=not settings.zero_point)
        kwargs = {"device": device, "trust_remote_code": trust_remote_code()}
        model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
        if model_type == "gemma3_text":
            model = gemma3_definition().from_pretrained(pretrained_model_id_or_path=str(source.path),
                                                        quantize_config=config, **kwargs)
        else:
            model = GPTQModel.load(str(source.path), config, **kwargs)
        model.quantize(calibration_samples(settings.num_calibration_samples), batch_size=1, backend=PACKING_BACKEND)
        model.save(str(out_dir))


AWQ = Int4Method("awq", BACKENDS, _quantize, cpu_estimate="about 2 minutes")


class AwqEngine(Int4Engine):
    """INT4 AWQ. Options: checkpoint=PATH, backend=NAME (a GPTQModel BACKEND value), group_size,
    num_calibration_samples."""

    options_class = AwqOptions
    int4 = AWQ

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        super().__init__(name, model, options)
        if not self.options.checkpoint:
            self.model_name = int4_checkpoint(model or default_model_name(), "awq") or model
        self.settings = AwqSettings(group_size=self.options.group_size,
                                    num_calibration_samples=self.options.num_calibration_samples)
