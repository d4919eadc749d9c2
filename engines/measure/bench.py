"""Headless benchmark: per engine, load time, TTFT, decode tok/s at N tokens, peak memory when encoding P
prompt tokens and when generating N, the decode roofline fraction, and quality against bf16.

Engines run one after another, each unloaded before the next, through the registry and the protocol,
so every variant added later appears here. A variant that is unavailable or fails becomes a row with
the reason. The speed runs use a short prompt and are the median of `num_repeats` after a warm-up;
the encode run feeds a P-token prompt and generates one token, its TTFT is the prefill time.
Quality comes from engines.measure.quality (reference built once from bf16); with random weights it is n/a.
"""
from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from engines.hardware import has_gpu
from engines.measure.bench_quality import QualityColumns
from engines.measure.roofline import decode_roofline, measure_bandwidth
from engines.models.catalog import DUMMY_PREFIX, trust_remote_code
from engines.models.dummy import is_token_id_in_vocab, materialize_weights
from engines.models.sources import load_shape, resolve_model
from engines.protocol import (
    GIB,
    EngineError,
    EngineUnavailable,
    GenerationParams,
    ProgressCallback,
    Scoring,
    describe_error,
)
from engines.registry import create_engine, get_spec, split_variant, unavailable_reason

FILLER = ("The history of the city begins with a small group of people who came to live by the river. They "
          "built houses of wood and stone, and they grew food in the fields around them. Over many years the "
          "town became a place of trade, where people from other lands would come to sell cloth, salt and "
          "metal. A school was opened, then a library, and the first book printed in the city told the story "
          "of its founders and of the long winter when the river froze and the market moved onto the ice.")
SHORT_PROMPT_WORDS = 12


@dataclass
class BenchConfig:
    engines: list[str]
    max_new_tokens: int = 128
    prompt_tokens: int = 512
    num_repeats: int = 3
    model: str | None = None
    dummy_config: str | None = None
    engine_options: dict = field(default_factory=dict)
    is_quality: bool = True
    warmup_tokens: int = 8
    is_chat: bool = False             # the timed prompt as a user message through the model's chat template
    system: str | None = None
    is_profiled: bool = False         # one more run under torch.profiler: kernel launches and time per token


@dataclass
class BenchRow:
    engine: str
    status: str = "ok"                  # "ok", "unavailable" or "error"
    reason: str = ""
    load_s: float | None = None
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    num_tokens: int | None = None
    prefill_tokens: int | None = None
    prefill_s: float | None = None
    encode_peak_gib: float | None = None
    generate_peak_gib: float | None = None
    torch_peak_gib: float | None = None
    memory_kind: str = ""
    roofline_tok_s: float | None = None
    roofline_frac: float | None = None
    read_per_token_gib: float | None = None
    greedy_agreement: float | None = None
    perplexity: float | None = None
    perplexity_ratio: float | None = None
    weight_footprint_gib: float | None = None
    quality_note: str = ""
    kernel_launches_per_token: float | None = None
    cpu_ms_per_token: float | None = None
    device_ms_per_token: float | None = None
    profile_note: str = ""


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    device: str
    machine: dict
    bandwidth: dict | None
    rows: list[BenchRow]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResult":
        """Read back results.json, e.g. to merge runs made in separate processes (its manifest is rebuilt
        when the merged result is written)."""
        data = {key: value for key, value in data.items() if key != "manifest"}
        return cls(**{**data, "config": BenchConfig(**data["config"]),
                      "rows": [BenchRow(**row) for row in data["rows"]]})


def build_prompt(tokenizer, num_tokens: int, vocab_size: int) -> str:
    """Filler text of about `num_tokens` tokens (BOS included) using only ids below `vocab_size`."""
    words = [word for word in FILLER.split()
             if is_token_id_in_vocab(tokenizer(" " + word, add_special_tokens=False).input_ids, vocab_size)]
    if not words:
        raise EngineError(f"no filler word of the tokenizer lies inside a vocabulary of {vocab_size}")
    lengths = [len(tokenizer(" " + word, add_special_tokens=False).input_ids) for word in words]
    chosen, count, index = [], len(tokenizer("").input_ids), 0
    while count < num_tokens:
        chosen.append(words[index % len(words)])
        count += lengths[index % len(words)]
        index += 1
    return " ".join(chosen)


def run_bench(config: BenchConfig, progress: ProgressCallback | None = None) -> BenchResult:
    say = progress or (lambda message: None)
    if not config.engines:
        raise EngineError("name at least one engine (see `python -m engines list`)")
    GenerationParams(max_new_tokens=config.max_new_tokens).validate()
    if config.prompt_tokens < 2 or config.num_repeats < 1:
        raise EngineError("--prompt-tokens must be at least 2 and --repeats at least 1")
    device = config.engine_options.get("device") or ("cuda" if has_gpu() else "cpu")
    model_name = f"{DUMMY_PREFIX}{config.dummy_config}" if config.dummy_config else config.model
    source = resolve_model(model_name, say)
    shape = load_shape(str(source.path))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code())
    short_prompt = " ".join(build_prompt(tokenizer, 64, shape.vocab_size).split()[:SHORT_PROMPT_WORDS])
    if config.is_chat:
        from engines.models.chat import chat_prompt_for
        short_prompt = chat_prompt_for(source, short_prompt, system=config.system)
    elif config.system:
        raise EngineError("a system message needs chat mode")
    long_prompt = build_prompt(tokenizer, config.prompt_tokens, shape.vocab_size)
    say(f"measuring {device} memory bandwidth")
    bandwidth = measure_bandwidth(device)
    say(f"bandwidth {bandwidth.bandwidth_gb_s:.1f} GB/s ({bandwidth.method})")
    quality = QualityColumns(config.engines, config.model, config.is_quality, source.origin == "dummy", say)
    quality.prepare()
    rows = []
    for index, name in enumerate(quality.order(config.engines)):
        say(f"[{index + 1}/{len(config.engines)}] {name}")
        row = _bench_engine(name, config, source, short_prompt, long_prompt, shape, bandwidth, quality, device, say)
        rows.append(row)
        say(f"{name}: {row.status}" + (f" ({row.reason})" if row.reason else
                                       f", decode {row.decode_tok_s:.1f} tok/s, TTFT {row.ttft_s:.3f} s"))
    import torch
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return BenchResult(config, source.name, device, machine, asdict(bandwidth), rows)


def _bench_engine(label, config, source, short_prompt, long_prompt, shape, bandwidth, quality, device, say) -> BenchRow:
    """One row; `label` is a registry name, optionally with its own options: gptq-int4[backend=gptq_marlin]."""
    row = BenchRow(engine=label)
    engine = None
    try:
        name, variant_options = split_variant(label)
        spec = get_spec(name)
        reason = unavailable_reason(spec)
        if reason:
            return BenchRow(engine=label, status="unavailable", reason=reason)
        model, options = _model_and_options(name, config, source, device, say)
        engine = create_engine(name, model=model, **options, **variant_options)
        started = time.perf_counter()
        engine.load(progress=say)
        row.load_s = time.perf_counter() - started
        row.weight_footprint_gib = engine.weight_footprint_gib() if isinstance(engine, Scoring) else None
        _generate(engine, short_prompt, config.warmup_tokens, device)
        encode = _generate(engine, long_prompt, 1, device)
        row.prefill_tokens, row.prefill_s = encode.num_prompt_tokens, encode.ttft_s
        row.encode_peak_gib = encode.peak_memory_gib
        runs = [_generate(engine, short_prompt, config.max_new_tokens, device) for _ in range(config.num_repeats)]
        row.ttft_s = statistics.median(run.ttft_s for run in runs)
        row.decode_tok_s = statistics.median(run.decode_tok_s or 0.0 for run in runs)
        row.num_tokens = min(run.num_tokens for run in runs)
        row.generate_peak_gib = max(run.peak_memory_gib or 0.0 for run in runs)
        row.torch_peak_gib = runs[-1].torch_peak_gib
        row.memory_kind = runs[-1].memory_kind
        context = runs[0].num_prompt_tokens + config.max_new_tokens // 2
        precision = engine.precision()
        if precision is not None:
            roofline = decode_roofline(shape, precision, bandwidth.bandwidth_gb_s, context)
            row.roofline_tok_s, row.read_per_token_gib = roofline.roofline_tok_s, roofline.bytes_per_token / GIB
            row.roofline_frac = row.decode_tok_s / roofline.roofline_tok_s if row.decode_tok_s else None
        if config.is_profiled:
            _profile(engine, spec, short_prompt, config.max_new_tokens, device, row)
        try:
            quality.evaluate(engine, row)
        except Exception as error:  # speed and memory stand even when the quality pass fails
            row.quality_note = f"n/a (quality failed: {describe_error(error)[:200]})"
    except EngineUnavailable as error:
        row.status, row.reason = "unavailable", str(error)
    except Exception as error:  # one engine's failure is a row, never the end of the run
        row.status, row.reason = "error", describe_error(error)
    finally:
        if engine is not None:
            engine.unload()
        gc.collect()
    return row


def _model_and_options(name: str, config: BenchConfig, source, device: str, say) -> tuple[str | None, dict]:
    """Random weights reach each loader its own way: vLLM's dummy load format, the transformers engine's
    init from config, and saved random weights for loaders that only read files."""
    options = dict(config.engine_options)
    if source.origin != "dummy":
        return config.model, options
    way = get_spec(name).random_weights
    if way == "none":
        raise EngineUnavailable(f"{name} serves its own weights; random weights of a shape do not apply")
    if way == "load_format":
        return str(source.path), {**options, "load_format": "dummy"}
    if way == "from_config":
        return str(source.path), {**options, "dummy_weights": True}
    return str(materialize_weights(source, device, say)), options


def _generate(engine, prompt: str, max_new_tokens: int, device: str):
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch
        torch.cuda.reset_peak_memory_stats()
    for _ in engine.stream(prompt, GenerationParams(max_new_tokens=max_new_tokens)):
        pass
    return engine.stats()


def _profile(engine, spec, prompt, max_new_tokens: int, device: str, row: BenchRow) -> None:
    """One more generation under torch.profiler: kernel launches (device kernels on a GPU, ATen ops on a
    CPU) and self time per generated token. An engine whose model runs in another process (vLLM's engine
    core) is invisible to this process's profiler, so its row says so instead."""
    if not spec.is_in_process:
        row.profile_note = "n/a (the model runs in another process)"
        return
    import torch
    from torch.profiler import ProfilerActivity, profile
    is_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    # The engines generate on their own worker thread, which the profiler records only when asked to.
    all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=activities, experimental_config=all_threads) as prof:
        stats = _generate(engine, prompt, max_new_tokens, device)
        if is_cuda:
            torch.cuda.synchronize()
    num_tokens = max(stats.num_tokens, 1)
    events = prof.key_averages()
    device_events = [event for event in events if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA]
    cpu_ops = [event for event in events if event.key.startswith("aten::")]
    launches = sum(event.count for event in device_events) if is_cuda else sum(event.count for event in cpu_ops)
    row.kernel_launches_per_token = launches / num_tokens
    row.cpu_ms_per_token = sum(event.self_cpu_time_total for event in events) / 1000 / num_tokens
    if is_cuda:
        row.device_ms_per_token = sum(event.self_device_time_total for event in device_events) / 1000 / num_tokens
    row.profile_note = "CUDA kernel launches" if is_cuda else "ATen op calls, nested ones included (CPU)"
