"""The quantization ladder beside a shipped GGUF: the same model written once as Q8_0 or F16, cached.

The `gguf` package reads the shipped file, dequantizes each weight matrix (gguf.quants) and writes it
again in the target type; 1-D tensors (norms) stay as they are, and every metadata key (architecture,
tokenizer, chat template) is copied, with general.file_type set to the new type. The source values are
those of the shipped quantization (Q4_K_M for the embedded Gemma), the same values the converted
transformers checkpoint holds, so a rung can only lose to the shipped file what its own type rounds.
"""
from __future__ import annotations

from pathlib import Path

from engines.models.catalog import cache_dir
from engines.protocol import EngineError, ProgressCallback, say

# type option -> (GGML tensor type name, llama file type name)
LADDER = {"q8_0": ("Q8_0", "MOSTLY_Q8_0"), "f16": ("F16", "MOSTLY_F16")}


def ladder_path(source: Path, gguf_type: str) -> Path:
    return cache_dir() / "gguf-ladder" / f"{source.stem}.{gguf_type}.gguf"


def ensure_rung(source: Path, gguf_type: str, progress: ProgressCallback | None = None) -> Path:
    """The cached `gguf_type` copy of `source`, written atomically under a lock on first use."""
    from filelock import FileLock
    if gguf_type not in LADDER:
        raise EngineError(f"no ladder rung '{gguf_type}'; the ladder writes {', '.join(LADDER)}")
    target = ladder_path(source, gguf_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        say(progress, f"writing {target.name} from {source.name} (once)")
        partial = target.with_suffix(".partial")
        _write(source, partial, gguf_type)
        partial.rename(target)
    return target


def _write(source: Path, out: Path, gguf_type: str) -> None:
    import gguf
    import numpy as np
    tensor_type, file_type = LADDER[gguf_type]
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    target = getattr(gguf.GGMLQuantizationType, tensor_type)
    for tensor in reader.tensors:
        if len(tensor.shape) < 2 or tensor.shape[0] % 32:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if target == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
