"""`run_survey(config, progress) -> SurveyReport`: the survey's tables (issue 19) for any model on this
machine, each beside the survey's own quoted figures (engines/measure/survey_data.py), then its three
conclusions checked on these numbers (survey_conclusions.py). survey_report.py writes it out.

Each precision is loaded once per attention implementation (eager, sdpa, flash_attention_2). The sdpa
load serves the SDPA kernels (switched per generate through the engine's own sdpa_backend option),
the encode-memory run, quality (perplexity, greedy agreement against bf16, the cloze score) and, for
bf16 and nf4, the vLLM test's baseline and nf4 rows. Timed runs go through the bench's own
generation helper and read the engine's telemetry, as `python -m engines bench` does.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from engines.hardware import has_gpu
from engines.measure.survey_attention import ATTENTION_CHOICES, PRIMARY_ATTENTION
from engines.measure.survey_data import (
    SURVEY_KV_CONTEXT,
    SURVEY_SERVING,
    ServingRow,
    SurveyReport,
    kv_layouts,
    number_formats,
)
from engines.measure.survey_session import REFERENCE_TOKENS, SERVING_FROM_PRECISIONS, SurveySession
from engines.models.catalog import DUMMY_PREFIX
from engines.models.sources import load_shape, resolve_model
from engines.protocol import EngineError, ProgressCallback
from engines.registry import SPECS, get_spec, split_variant

PRECISIONS = ("bf16", "int8", "nf4", "gptq-int4", "awq-int4", "gguf")   # those in the registry run by default
DEFAULTS = {  # (GPU, CPU): on a CPU the survey's sizes would take hours
    "tokens": ([2048, 8192], [32, 64]), "prompt_tokens": (2048, 64), "runs": (10, 2),
    "serving_max_new_tokens": (256, 32), "quality_tokens": (32, 8), "quality_prompts": (None, 4),
    "vllm_engines": (["vllm", "vllm[kv_cache_dtype=fp8_e5m2]"],
                     ["vllm[enforce_eager=true]", "vllm[enforce_eager=true,kv_cache_dtype=fp8_e5m2]"]),
}


@dataclass
class SurveyConfig:
    model: str | None = None
    dummy_config: str | None = None      # random weights of a shape: speed and memory only
    engines: list[str] | None = None     # precisions; None: PRECISIONS found in the registry
    attention: list[str] | None = None   # ATTENTION_CHOICES keys; None: all of them
    tokens: list[int] | None = None      # N, new tokens per speed run
    prompt_tokens: int | None = None     # P, the encode-memory prompt
    runs: int | None = None              # K, the vLLM test's runs (mean)
    repeats: int = 1                     # timed runs per speed cell (median)
    vllm_engines: list[str] | None = None
    serving_max_new_tokens: int | None = None
    quality_tokens: int | None = None    # greedy tokens compared with bf16's per prompt
    quality_prompts: int | None = None   # prompts compared (None: all)
    is_cloze: bool = True
    kv_memory_gib: float = 80.0
    kv_context: int = SURVEY_KV_CONTEXT  # tokens per sequence in the MQA/GQA/MHA table (arithmetic only)
    reference_shape: str = "llama-3-8b"  # the bandwidth-bound shape the conclusions compare with
    engine_options: dict = field(default_factory=dict)

    def resolved(self, device: str) -> "SurveyConfig":
        """Defaults filled in for `device`, every count checked; raises EngineError naming the bad one."""
        column = 1 if device == "cpu" else 0
        values = {key: getattr(self, key) if getattr(self, key) is not None else choices[column]
                  for key, choices in DEFAULTS.items()}
        values["engines"] = self.engines or [name for name in PRECISIONS if name in SPECS]
        values["attention"] = list(dict.fromkeys([PRIMARY_ATTENTION, *(self.attention or ATTENTION_CHOICES)]))
        config = replace(self, **values)
        for label in config.engines + config.vllm_engines:
            get_spec(split_variant(label)[0])          # an unknown name fails here, before anything loads
        unknown = [key for key in config.attention if key not in ATTENTION_CHOICES]
        if unknown:
            raise EngineError(f"unknown attention {', '.join(unknown)}; choose from {', '.join(ATTENTION_CHOICES)}")
        if not config.tokens or any(n < 1 for n in config.tokens):
            raise EngineError(f"--tokens must be positive counts, got {config.tokens}")
        for key in ("prompt_tokens", "runs", "repeats", "serving_max_new_tokens", "quality_tokens"):
            if getattr(config, key) < 1:
                raise EngineError(f"{key.replace('_', '-')} must be at least 1, got {getattr(config, key)}")
        if config.quality_tokens > REFERENCE_TOKENS:
            raise EngineError(f"quality-tokens compares against a {REFERENCE_TOKENS}-token reference; at most that")
        if not config.kv_memory_gib > 0:
            raise EngineError(f"--kv-memory-gib must be positive, got {config.kv_memory_gib}")
        if config.kv_context < 1:
            raise EngineError(f"--kv-context must be at least 1 token, got {config.kv_context}")
        return config


def run_survey(config: SurveyConfig, progress: ProgressCallback | None = None) -> SurveyReport:
    """Every table of the survey for `config.model` on this machine, with its conclusions."""
    from engines.measure.survey_conclusions import conclude
    say = progress or (lambda message: None)
    device = config.engine_options.get("device") or ("cuda" if has_gpu() else "cpu")
    config = config.resolved(device)
    source = resolve_model(f"{DUMMY_PREFIX}{config.dummy_config}" if config.dummy_config else config.model, say)
    shape = load_shape(str(source.path))
    session = SurveySession(config, source, shape, device, say)
    quality, speed, memory, serving = [], [], [], {}
    for index, label in enumerate(session.order(config.engines)):
        say(f"[{index + 1}/{len(config.engines)}] {label}")
        result = session.run_precision(label)
        quality.append(result.quality)
        speed += result.speed
        memory.append(result.memory)
        serving.update(result.serving)
    for index, label in enumerate(config.vllm_engines):
        say(f"[vLLM test {index + 1}/{len(config.vllm_engines)}] {label}")
        kv_dtype = str(split_variant(label)[1].get("kv_cache_dtype", "auto"))
        row_name = "vllm" if kv_dtype == "auto" else f"vllm-{kv_dtype}"
        serving[row_name if row_name not in serving else label] = session.run_serving(label, row_name)
    report = SurveyReport(
        model=source.name, device=device, machine=_machine(device), settings=_settings(config, session),
        notes=session.notes, formats=number_formats(), quality=quality, speed=speed, memory=memory,
        serving=_serving_rows(serving, config), kv=kv_layouts(shape, config.kv_context, config.kv_memory_gib),
        kv_context=config.kv_context, kv_memory_gib=config.kv_memory_gib, precisions=session.precisions,
        bandwidth_gb_s=session.bandwidth_gb_s, shape=asdict(shape))
    report.conclusions = conclude(report, load_shape(config.reference_shape))
    return report


def _serving_rows(serving: dict[str, ServingRow], config: SurveyConfig) -> list[ServingRow]:
    """The survey's four rows first (a precision that was not among --engines says so), then extras."""
    rows = []
    for row_name, precision in SERVING_FROM_PRECISIONS.items():
        rows.append(serving.pop(row_name, None) or ServingRow(
            row=row_name, engine=precision, status="skipped", reason=f"{precision} is not among --engines",
            survey_tok_s=SURVEY_SERVING[row_name]))
    for row_name in ("vllm", "vllm-fp8_e5m2"):
        rows.append(serving.pop(row_name, None) or ServingRow(
            row=row_name, engine="", status="skipped", reason="not among --vllm-engines",
            survey_tok_s=SURVEY_SERVING[row_name]))
    return rows + list(serving.values())


def _settings(config: SurveyConfig, session) -> dict:
    settings = {key: value for key, value in asdict(config).items() if key != "engine_options"}
    from engines.measure.survey_cloze import cloze_chance, cloze_items
    settings.update(engine_options=dict(config.engine_options), speed_prompt_tokens=session.speed_prompt_tokens,
                    cloze_items=len(cloze_items()), cloze_chance=cloze_chance(),
                    serving_mode=session.serving_mode, serving_prompt_tokens=session.serving_prompt_tokens)
    return settings


def _machine(device: str) -> dict:
    import torch
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

