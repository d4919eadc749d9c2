"""The variant registry: data, not imports. name -> EngineSpec with its import target as a string.

Availability is decided without importing torch, vllm or bitsandbytes: installed packages are found
with importlib.util.find_spec, the GPU through NVML, CPU features through /proc/cpuinfo. Each
unavailable variant carries the reason a user would need to fix it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from engines.hardware import FP8_KV_ON_CPU, INT4_ON_CPU, CpuRequirement, has_gpu
from engines.models.catalog import ASSETS
from engines.protocol import EngineError, EngineUnavailable


@dataclass(frozen=True)
class EngineSpec:
    name: str
    label: str
    description: str
    target: str | None                      # "module:Class"; a missing module reads "not implemented yet"
    requires: tuple[str, ...] = ()          # importable modules
    needs_on_cpu: CpuRequirement | None = None   # CPU features needed when there is no GPU
    defaults: dict = field(default_factory=dict)
    # How the engine gets random weights of a shape (the bench's --dummy-weights): vLLM's own dummy load
    # format ("load_format"), built from the config in the target dtype ("from_config"), or a folder
    # of random weights saved once, for loaders that read only files ("saved").
    random_weights: str = "saved"
    # vLLM holds its GPU for the process lifetime; ZeroGPU lends one per call.
    is_zerogpu_compatible: bool = True
    # The model runs in this process (so torch's profiler sees its kernels); vLLM's runs in its engine core.
    is_in_process: bool = True
    # A CPU build (llama.cpp here): its weights are in host memory even on a GPU machine.
    is_cpu_only: bool = False


SPECS: dict[str, EngineSpec] = {spec.name: spec for spec in [
    EngineSpec("bf16", "BF16 (transformers)", "transformers baseline, attention eager/sdpa/flash_attention_2",
               "engines.variants.transformers.engine:TransformersEngine", ("torch", "transformers"),
               random_weights="from_config"),
    EngineSpec("bf16-compiled", "BF16 + torch.compile", "static KV cache and torch.compile",
               "engines.variants.transformers.engine:TransformersEngine", ("torch", "transformers"),
               defaults={"compile": True}, random_weights="from_config"),
    EngineSpec("gptq-int4", "INT4 GPTQ (GPTQModel)", "4-bit GPTQ, group size 128, quantized on first use",
               "engines.variants.transformers.gptq:GptqEngine", ("torch", "transformers", "gptqmodel", "optimum")),
    EngineSpec("nf4", "NF4 (bitsandbytes)", "bitsandbytes 4-bit NormalFloat weights",
               "engines.variants.transformers.bnb:BitsAndBytesEngine", ("torch", "transformers", "bitsandbytes"),
               defaults={"bits": 4}),
    EngineSpec("int8", "INT8 (bitsandbytes)", "bitsandbytes LLM.int8 weights",
               "engines.variants.transformers.bnb:BitsAndBytesEngine", ("torch", "transformers", "bitsandbytes"),
               defaults={"bits": 8}),
    EngineSpec("vllm", "vLLM (paged, BF16 KV)", "vLLM paged attention, KV cache in the model dtype",
               "engines.variants.vllm.engine:VllmEngine", ("vllm",), defaults={"kv_cache_dtype": "auto"},
               random_weights="load_format", is_zerogpu_compatible=False,
               is_in_process=False),
    EngineSpec("vllm-fp8kv", "vLLM (paged, FP8 KV)", "vLLM paged attention with an FP8 KV cache",
               "engines.variants.vllm.engine:VllmEngine", ("vllm",), needs_on_cpu=FP8_KV_ON_CPU,
               defaults={"kv_cache_dtype": "fp8"}, random_weights="load_format", is_zerogpu_compatible=False,
               is_in_process=False),
    EngineSpec("spec", "Speculative (transformers)", "assisted generation: prompt lookup, or a draft model",
               "engines.variants.transformers.speculative:SpeculativeEngine", ("torch", "transformers"),
               random_weights="from_config"),
    EngineSpec("vllm-spec", "Speculative (vLLM)", "vLLM speculative decoding: n-gram, draft model or EAGLE",
               "engines.variants.vllm.engine:VllmEngine", ("vllm",), defaults={"speculative": "ngram"},
               random_weights="load_format", is_zerogpu_compatible=False,
               is_in_process=False),
    EngineSpec("remote", "Remote (OpenAI API)", "any OpenAI-compatible server, with its /metrics scraped",
               "engines.variants.remote.engine:RemoteEngine", ("httpx", "openai", "prometheus_client"),
               random_weights="none", is_in_process=False),
    EngineSpec("vllm-int4", "vLLM INT4 (Marlin)",
               "vLLM serving the 4-bit GPTQ (or AWQ) checkpoint; Marlin kernels on a GPU",
               "engines.variants.vllm.int4:VllmInt4Engine", ("vllm",), defaults={"method": "gptq"},
               needs_on_cpu=INT4_ON_CPU, random_weights="load_format", is_zerogpu_compatible=False,
               is_in_process=False),
    EngineSpec("gguf", "GGUF (llama.cpp)", "llama.cpp on the GGUF file as it ships (or its Q8_0/F16 ladder); "
               "a CPU build, so it runs on the CPU of a GPU machine too", "engines.variants.llamacpp.engine:GgufEngine",
               ("llama_cpp", "gguf"), random_weights="none", is_cpu_only=True),
    EngineSpec("awq-int4", "INT4 AWQ (GPTQModel)", "4-bit AWQ, group size 128, quantized on first use or a catalogued "
               "AWQ checkpoint", "engines.variants.transformers.awq:AwqEngine",
               ("torch", "transformers", "gptqmodel", "optimum"), random_weights="saved"),
]}


def unavailable_reason(spec: EngineSpec) -> str | None:
    """None when the variant can run here, else why not."""
    if spec.target is None or importlib.util.find_spec(spec.target.split(":")[0]) is None:
        return "not implemented yet"
    missing = [module for module in spec.requires if importlib.util.find_spec(module) is None]
    if missing:
        return f"package not installed: {', '.join(missing)}"
    if spec.needs_on_cpu is not None and not has_gpu() and spec.needs_on_cpu.unmet_reason():
        return spec.needs_on_cpu.reason
    if os.environ.get("SPACES_ZERO_GPU") and not spec.is_zerogpu_compatible:
        return "vLLM needs a GPU for the whole process lifetime; ZeroGPU lends one per call"
    return None


REMOTE_CONFIG_KEYS = {"url", "served_model", "api_key_env", "metrics_url", "timeout_s", "api"}


def remote_config_path() -> Path:
    default = ASSETS / "remote.toml"
    return Path(os.environ.get("PLAYGROUND_REMOTE_CONFIG") or default)


def remote_specs() -> dict[str, EngineSpec]:
    """`remote:<label>` variants, one per [remote.<label>] table of the remote config file (keys in
    assets/remote.example.toml); none without a file. A broken file raises EngineError."""
    path = remote_config_path()
    if not path.is_file():
        return {}
    try:
        tables = tomllib.loads(path.read_text()).get("remote", {})
    except tomllib.TOMLDecodeError as error:
        raise EngineError(f"remote engine config {path} is not valid TOML: {error}") from None
    specs = {}
    for label, table in tables.items():
        unknown = sorted(set(table) - REMOTE_CONFIG_KEYS) if isinstance(table, dict) else ["(not a table)"]
        if unknown or "url" not in table:
            raise EngineError(f"remote engine config {path}: [remote.{label}] needs url and knows only "
                              f"{', '.join(sorted(REMOTE_CONFIG_KEYS))}; got {', '.join(unknown) or 'no url'}")
        specs[f"remote:{label}"] = EngineSpec(
            f"remote:{label}", f"Remote: {label}", f"{table.get('served_model', 'first served model')} at "
            f"{table['url']}", SPECS["remote"].target, SPECS["remote"].requires, defaults=dict(table))
    return specs


def all_specs() -> dict[str, EngineSpec]:
    """SPECS plus the configured remote servers; a broken remote config raises EngineError."""
    return {**SPECS, **remote_specs()}


def list_engines() -> list[dict]:
    try:
        specs, config_error = all_specs(), ""
    except EngineError as error:
        specs, config_error = SPECS, str(error)
    rows = [{"name": spec.name, "label": spec.label, "description": spec.description,
             "is_available": unavailable_reason(spec) is None,
             "reason": unavailable_reason(spec) or ""} for spec in specs.values()]
    if config_error:
        rows.append({"name": "remote:*", "label": "Remote servers (config file)", "description": "",
                     "is_available": False, "reason": config_error})
    return rows


def parse_option_value(text: str):
    """An option's value as typed on a command line: int, float, true/false, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def split_variant(label: str) -> tuple[str, dict]:
    """'gptq-int4[backend=gptq_marlin,group_size=64]' -> ('gptq-int4', {'backend': 'gptq_marlin', ...})."""
    label = label.strip()
    name, bracket, rest = label.partition("[")
    if not bracket:
        return label, {}
    if not rest.endswith("]"):
        raise EngineError(f"engine '{label}': options go in brackets, e.g. gptq-int4[backend=gptq_marlin]")
    options = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise EngineError(f"engine '{label}': each option is KEY=VALUE, got '{item}'")
        options[key.strip()] = parse_option_value(value.strip())
    return name.strip(), options


def get_spec(name: str) -> EngineSpec:
    specs = all_specs() if name.startswith("remote:") else SPECS
    if name not in specs:
        raise EngineError(f"unknown engine '{name}'. Known engines: {', '.join(specs)}")
    return specs[name]


def create_engine(name: str, model: str | None = None, **options):
    """Instantiate (not load) the variant `name` for `model`; raises EngineError/EngineUnavailable."""
    spec = get_spec(name)
    reason = unavailable_reason(spec)
    if reason:
        raise EngineUnavailable(f"engine '{name}' is unavailable: {reason}")
    module_name, class_name = spec.target.split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class(name=name, model=model, options={**spec.defaults, **options})
