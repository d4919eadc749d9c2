"""The survey's engine runs (engines/measure/survey.py drives them): per precision, one load per
attention implementation, every SDPA kernel and token count on the sdpa load, quality and the vLLM
test's transformers rows on that same load; then the vLLM engines. A kernel, engine or cell that
cannot run becomes a row with the reason. Generation goes through the bench's `_generate` (peak
memory reset on a GPU, then the engine's own telemetry), so the numbers mean what the bench's mean.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
from dataclasses import dataclass, field

from engines.measure.bench import BenchConfig, _generate, _model_and_options, build_prompt
from engines.measure.survey_attention import ATTENTION_CHOICES, PRIMARY_ATTENTION, sdpa_backend_of, sdpa_kernel_reason
from engines.measure.survey_cloze import score_cloze
from engines.measure.survey_data import (
    SURVEY_MEMORY_BF16,
    SURVEY_MMLU,
    SURVEY_PROMPT,
    SURVEY_SERVING,
    SURVEY_SPEED_FA2_BF16,
    MemoryRow,
    QualityRow,
    ServingRow,
    SpeedRow,
)
from engines.models.catalog import trust_remote_code
from engines.models.dummy import RANDOM_WEIGHTS_NOTE, is_token_id_in_vocab
from engines.protocol import ChatPrompt, EngineUnavailable, Scoring, describe_error
from engines.registry import create_engine, get_spec, split_variant, unavailable_reason
from engines.telemetry import MemoryProbe
from engines.variants.transformers.attention import attention_unavailable_reason

SERVING_FROM_PRECISIONS = {"baseline": "bf16", "nf4": "nf4"}
REFERENCE_TOKENS = 32   # the bf16 reference's greedy tokens per prompt (cached on disk, as the bench's)
WARMUP_TOKENS = 8
SURVEY_MMLU_ROWS = {"bf16": "bf16", "int8": "int8", "gptq-int4": "int4", "awq-int4": "int4"}


@dataclass
class PrecisionResult:
    quality: QualityRow
    memory: MemoryRow
    speed: list[SpeedRow] = field(default_factory=list)
    serving: dict[str, ServingRow] = field(default_factory=dict)
    is_transformers: bool | None = None


def one_token_prompt(tokenizer, vocab_size: int) -> ChatPrompt:
    """The survey's 1-token context as token ids: BOS, or the first token of " The" without one."""
    token_id = tokenizer.bos_token_id
    if token_id is None or token_id >= vocab_size:
        token_id = tokenizer(" The", add_special_tokens=False).input_ids[0]
    return ChatPrompt(messages=(), text=tokenizer.decode([token_id]), token_ids=(int(token_id),),
                      stop_token_ids=(), stop_strings=())


class SurveySession:
    def __init__(self, config, source, shape, device: str, say):
        from transformers import AutoTokenizer

        from engines.measure.roofline import measure_bandwidth
        from engines.models.chat import chat_prompt_for, has_chat_template
        self.config, self.source, self.shape, self.device, self.say = config, source, shape, device, say
        self.is_random = source.origin == "dummy"
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code())
        self.speed_prompt = one_token_prompt(tokenizer, shape.vocab_size)
        self.speed_prompt_tokens = len(self.speed_prompt.token_ids)
        self.encode_prompt = build_prompt(tokenizer, config.prompt_tokens, shape.vocab_size)
        self.notes: list[str] = []
        if has_chat_template(tokenizer) and not self.is_random:
            self.serving_prompt, self.serving_mode = chat_prompt_for(source, SURVEY_PROMPT), "chat"
            self.serving_prompt_tokens = self.serving_prompt.num_tokens
        else:
            self.serving_prompt, self.serving_mode = SURVEY_PROMPT, "completion"
            ids = tokenizer(SURVEY_PROMPT).input_ids
            if not is_token_id_in_vocab(ids, shape.vocab_size):
                self.serving_prompt = " ".join(build_prompt(tokenizer, len(ids), shape.vocab_size).split()[:len(ids)])
                ids = tokenizer(self.serving_prompt).input_ids
                self.notes.append("The survey's prompt has ids outside this random shape's vocabulary; filler text "
                                  "of about its length stands in for it in the vLLM test.")
            self.notes.append(f"{source.name} has no chat template (or random weights), so the vLLM test "
                              "prompts it in completion mode; the survey used Qwen-7B-Chat's chat format.")
            self.serving_prompt_tokens = len(ids)
        self.precisions: dict[str, dict] = {}
        self.reference = None
        say(f"measuring {device} memory bandwidth")
        self.bandwidth_gb_s = measure_bandwidth(device).bandwidth_gb_s

    def order(self, labels: list[str]) -> list[str]:
        """bf16 first: its greedy ids and perplexity are every other precision's reference."""
        return sorted(labels, key=lambda label: split_variant(label)[0] != "bf16")

    # -- precisions ------------------------------------------------------------------------------------
    def run_precision(self, label: str) -> PrecisionResult:
        name = split_variant(label)[0]
        result = PrecisionResult(
            QualityRow(engine=label, survey_mmlu=SURVEY_MMLU.get(SURVEY_MMLU_ROWS.get(name, ""))),
            MemoryRow(engine=label, survey_gb=dict(SURVEY_MEMORY_BF16) if name == "bf16" else {}))
        for row_name, precision in SERVING_FROM_PRECISIONS.items():
            if name == precision and row_name not in result.serving:
                result.serving[row_name] = ServingRow(row=row_name, engine=label, survey_tok_s=SURVEY_SERVING[row_name])
        groups: dict[str, list[str]] = {}
        for key in self.config.attention:
            groups.setdefault(ATTENTION_CHOICES[key][0], []).append(key)
        for implementation, keys in groups.items():
            rows = {key: [SpeedRow(engine=label, attention=key, new_tokens=n, survey_tok_s=(
                        SURVEY_SPEED_FA2_BF16.get(n) if name == "bf16" and key == "flash_attention_2" else None))
                          for n in self.config.tokens] for key in keys}
            result.speed += [row for key_rows in rows.values() for row in key_rows]
            self._run_group(label, implementation, rows, result)
        return result

    def _run_group(self, label: str, implementation: str, rows: dict[str, list[SpeedRow]],
                   result: PrecisionResult) -> None:
        is_primary = implementation == ATTENTION_CHOICES[PRIMARY_ATTENTION][0]
        everything = [row for key_rows in rows.values() for row in key_rows]
        if is_primary:
            everything += [result.quality, result.memory, *result.serving.values()]
        name, variant_options = split_variant(label)
        reason = unavailable_reason(get_spec(name))
        if not reason and not is_primary:
            reason = ("n/a: the engine runs its own attention, not transformers'"
                      if result.is_transformers is False else attention_unavailable_reason(implementation, self.device))
        if reason:
            return _mark(everything, "unavailable", reason)
        engine = None
        try:
            if is_primary:
                result.memory.baseline_gib = MemoryProbe(self.device).read().memory_gib
            engine = self._load(name, variant_options, {} if is_primary else {"attn_implementation": implementation})
            result.is_transformers = hasattr(getattr(engine, "options", None), "sdpa_backend")
            built = getattr(getattr(getattr(engine, "model", None), "config", None), "_attn_implementation", None)
            if built and built != implementation:
                return _mark(everything, "unavailable", f"n/a: {name} built its model with {built} attention, not "
                                                        f"{implementation} (its loader takes no attention choice)")
            _generate(engine, self.speed_prompt, WARMUP_TOKENS, self.device)
            if is_primary:
                self._primary(engine, label, result)
            for key, key_rows in rows.items():
                self._speed_rows(engine, key, key_rows, result.is_transformers)
            if is_primary:
                result.memory.generate_peak_gib = {str(row.new_tokens): row.generate_peak_gib
                                                  for row in rows[PRIMARY_ATTENTION]}
        except EngineUnavailable as error:
            _mark(everything, "unavailable", str(error))
        except Exception as error:  # one engine's failure is rows with the reason, never the end of the survey
            _mark(everything, "error", describe_error(error))
        finally:
            if engine is not None:
                engine.unload()
            gc.collect()

    def _load(self, name: str, variant_options: dict, extra: dict):
        bench_config = BenchConfig(engines=[name], model=self.config.model, dummy_config=self.config.dummy_config,
                                   engine_options=self.config.engine_options)
        model, options = _model_and_options(name, bench_config, self.source, self.device, self.say)
        engine = create_engine(name, model=model, **{**options, **extra, **variant_options})
        engine.load(progress=self.say)
        return engine

    def _primary(self, engine, label: str, result: PrecisionResult) -> None:
        precision = engine.precision()
        if precision is not None:
            self.precisions[label] = dataclasses.asdict(precision)
        stats = _generate(engine, self.encode_prompt, 1, self.device)
        memory = result.memory
        memory.encode_tokens, memory.encode_peak_gib = stats.num_prompt_tokens, stats.peak_memory_gib
        memory.memory_kind = stats.memory_kind
        if isinstance(engine, Scoring):
            memory.weight_footprint_gib = result.quality.weight_footprint_gib = engine.weight_footprint_gib()
        self._quality(engine, label, result.quality)
        for row in result.serving.values():
            try:
                self._serve(engine, row)
            except Exception as error:  # the speed table still runs on this load
                row.status, row.reason = "error", describe_error(error)

    def _quality(self, engine, label: str, row: QualityRow) -> None:
        from engines.measure.quality import build_reference, evaluate_quality, reference_for
        if self.is_random:
            row.note = row.cloze_note = RANDOM_WEIGHTS_NOTE
            return
        try:
            if self.reference is None:
                self.reference = build_reference(engine, REFERENCE_TOKENS) if split_variant(label)[0] == "bf16" \
                    else reference_for(self.config.model, REFERENCE_TOKENS, self.say)
            self.say(f"{label}: perplexity and greedy agreement against bf16")
            report = evaluate_quality(engine, self.reference, num_tokens=self.config.quality_tokens,
                                      max_prompts=self.config.quality_prompts)
            row.perplexity, row.perplexity_ratio = report.perplexity, report.perplexity_ratio
            row.greedy_agreement = report.greedy_agreement
            row.note = f"suspect: {report.reason}" if report.is_suspect else ""
        except Exception as error:  # speed and memory stand without quality
            row.note = f"n/a (quality failed: {describe_error(error)[:200]})"
        if not self.config.is_cloze:
            row.cloze_note = "n/a (skipped)"
            return
        try:
            self.say(f"{label}: cloze items")
            score = score_cloze(engine)
            row.cloze_correct, row.cloze_total, row.cloze_note = score.correct, score.total, score.note
        except Exception as error:
            row.cloze_note = f"n/a (cloze failed: {describe_error(error)[:200]})"

    def _speed_rows(self, engine, key: str, rows: list[SpeedRow], is_transformers: bool) -> None:
        backend = ATTENTION_CHOICES[key][1]
        if not is_transformers:
            if key != PRIMARY_ATTENTION:
                return _mark(rows, "unavailable", "n/a: the engine runs its own attention, not transformers' SDPA")
            for row in rows:
                row.attention = "engine's own"
        dtype = getattr(getattr(engine, "options", None), "dtype", "bfloat16")
        reason = sdpa_kernel_reason(backend, self.device, dtype, self.shape.head_dim) if is_transformers else None
        if reason:
            return _mark(rows, "unavailable", reason)
        for row in rows:
            self.say(f"{row.engine} {key}: {row.new_tokens} tokens from a {self.speed_prompt_tokens}-token context")
            try:
                with sdpa_backend_of(engine, backend):
                    runs = [_generate(engine, self.speed_prompt, row.new_tokens, self.device)
                            for _ in range(self.config.repeats)]
            except Exception as error:
                row.status, row.reason = "error", describe_error(error) + self._refusal_hint(error, backend)
                continue
            row.decode_tok_s = _median([run.decode_tok_s for run in runs])
            row.num_tokens, row.prompt_tokens = min(run.num_tokens for run in runs), runs[0].num_prompt_tokens
            row.ttft_s = _median([run.ttft_s for run in runs])
            row.generate_peak_gib = max((run.peak_memory_gib for run in runs if run.peak_memory_gib is not None),
                                       default=None)
            if row.decode_tok_s is None:
                row.reason = "ended after its first token, so there is no decode speed"

    def _refusal_hint(self, error: BaseException, backend: str) -> str:
        if backend == "flash" and self.shape.sliding_window and "kernel" in str(error).lower():
            return (f" (this model's sliding-window layers ({self.shape.sliding_window} tokens) pass an explicit "
                    "attention mask, which SDPA's flash kernel does not take; cuDNN and math do)")
        return ""

    # -- the vLLM test -----------------------------------------------------------------------------------
    def run_serving(self, label: str, row_name: str) -> ServingRow:
        row = ServingRow(row=row_name, engine=label, survey_tok_s=SURVEY_SERVING.get(row_name))
        engine = None
        try:
            name, variant_options = split_variant(label)
            reason = unavailable_reason(get_spec(name))
            if reason:
                return _mark([row], "unavailable", reason)[0]
            engine = self._load(name, variant_options, {})
            _generate(engine, self.serving_prompt, WARMUP_TOKENS, self.device)
            self._serve(engine, row)
        except EngineUnavailable as error:
            _mark([row], "unavailable", str(error))
        except Exception as error:
            _mark([row], "error", describe_error(error))
        finally:
            if engine is not None:
                engine.unload()
            gc.collect()
        return row

    def _serve(self, engine, row: ServingRow) -> None:
        """The survey's prompt K times; the mean decode speed, as the survey averages its runs."""
        row.mode, row.prompt_tokens = self.serving_mode, self.serving_prompt_tokens
        row.max_new_tokens, row.num_runs = self.config.serving_max_new_tokens, self.config.runs
        self.say(f"{row.engine}: the survey's prompt, {self.config.runs} runs of up to {row.max_new_tokens} tokens")
        runs = [_generate(engine, self.serving_prompt, row.max_new_tokens, self.device)
                for _ in range(self.config.runs)]
        speeds = [run.decode_tok_s for run in runs if run.decode_tok_s]
        row.mean_tok_s = statistics.mean(speeds) if speeds else None
        row.mean_tokens = statistics.mean(run.num_tokens for run in runs)
        row.peak_gib = max((run.peak_memory_gib for run in runs if run.peak_memory_gib is not None), default=None)
        if not speeds:
            row.reason = "every run ended after its first token, so there is no decode speed"


def _median(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


# A row counts as measured once it holds this field; a failure later on the same load leaves it alone.
_MEASURED = {SpeedRow: "num_tokens", QualityRow: "weight_footprint_gib", MemoryRow: "encode_peak_gib",
             ServingRow: "mean_tokens"}


def _mark(rows: list, status: str, reason: str) -> list:
    for row in rows:
        if row.status == "ok" and getattr(row, _MEASURED[type(row)]) is None:
            row.status, row.reason = status, reason
    return rows
