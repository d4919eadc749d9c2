"""`spec`: speculative decoding with transformers assisted generation, and its acceptance telemetry.

Drafting is prompt lookup (n-gram matching against the prompt and the text so far) unless the option
`draft_model` names a second model (a short name, local folder or hub id, resolved like the target);
that draft model must use the target's tokenizer, which load() checks. Verification is transformers'
own: under greedy decoding the output is the target model's greedy output, token for token.

Counters, per generation, taken from the candidate generator that generate() builds (wrapped, because
transformers neither exposes nor returns them). One verification step is one target forward pass:
- num_drafts: steps in which the drafter proposed at least one token;
- num_draft_tokens: tokens proposed, summed over steps;
- num_accepted_tokens: proposed tokens the target kept (n_matches, after generate() crops at EOS or
  max length); every step also yields one token of the target's own (the bonus token), so a step that
  streams k tokens accepted k - 1 drafts;
- acceptance_rate = num_accepted_tokens / num_draft_tokens;
- mean_accepted_len = 1 + num_accepted_tokens / num_drafts: tokens per drafted step, vLLM's definition.
- step_tokens, step_drafts: per step, in order, the tokens it streamed (accepted drafts + 1) and the
  tokens it drafted (0: a plain decode step).
They are pushed into the recorder after every step, so the UI sees the acceptance rate live.

How many tokens prompt lookup drafts per step depends on what verifying them costs here
(`plan_drafting`; the engine says why in `drafting_note`). A verification step is one target forward
over the k drafted tokens plus one, and each of those positions runs the 262k-vocabulary LM head
(greedy acceptance needs every position's argmax; transformers already computes logits only for those
k + 1 positions). Measured on Gemma-3-270M, 2 CPU cores, decode-phase times, k = 10:
- bf16 with native bf16 matmuls (AMX or AVX512-BF16): the matmuls stay bound by reading the weights,
  so a step over 11 positions costs about 1.1-1.3 decode steps: draft 10 (transformers' default);
- bf16 without them (AVX2, or AVX-512 without BF16): the bf16 matmuls are compute-bound and each
  position costs a third to a half of a decode step (issue 13's CI run: 10 drafts per step cost about
  6 decode steps, i.e. 0.73x once the first step is counted fairly; emulated here, 11 positions cost
  2.9 decode steps), so drafts are cut to 4: about 1.2-1.6x;
- float32 on CPU (MKL): 11 positions cost 1.5-2.5 decode steps; 4 drafts per step do as well or better
  (1.7x-5.4x, medians of 3 pairs, on AMX and emulated-AVX2 cores shared with other suites);
- GPU: 10.
Prompt lookup never drafts past the token budget (transformers would verify up to 10 tokens that
max_new_tokens then throws away). Neither changes the text: verification is unchanged.
`measure_speedup()` times the same loaded engine with and without speculation, in one run.
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field

from engines.hardware import cpu_flags
from engines.models.catalog import ModelSource, trust_remote_code
from engines.models.sources import resolve_model
from engines.protocol import (
    Drafting,
    EngineError,
    EngineStats,
    GenerationParams,
    ProgressCallback,
    describe_error,
    speculation_stats,
)
from engines.telemetry import GenerationRecorder
from engines.variants.transformers.engine import TransformersEngine
from engines.variants.transformers.options import SpeculativeOptions

DEFAULT_PROMPT_LOOKUP_NUM_TOKENS = 10       # where verifying 11 positions costs about one decode step
COMPUTE_BOUND_PROMPT_LOOKUP_NUM_TOKENS = 4  # where every verified position costs compute of its own
DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class DraftPlan:
    """Tokens prompt lookup drafts per step here, whether verifying them is cheap enough for copy-heavy
    text to beat plain decoding by a wide margin (every median measured 2x or more, under load), and
    why, in words."""
    num_tokens: int
    expects_gain: bool
    reason: str


def plan_drafting(device: str, dtype: str, flags: frozenset[str] | set[str], requested: int | None = None) -> DraftPlan:
    """How many tokens to draft per step, from what a verification step over k + 1 positions costs on this
    device, dtype and CPU (see the module docstring). An explicit `requested` count wins."""
    if device != "cpu":
        num_tokens, expects_gain, why = DEFAULT_PROMPT_LOOKUP_NUM_TOKENS, True, (
            "on a GPU a verification step over 11 positions costs about one decode step")
    elif dtype == "bfloat16" and NATIVE_BF16_CPU_FLAGS & set(flags):
        num_tokens, expects_gain, why = DEFAULT_PROMPT_LOOKUP_NUM_TOKENS, True, (
            "this CPU multiplies bf16 natively (AMX/AVX512-BF16), so a step verifying 11 positions reads the "
            "weights once and costs about 1.2 decode steps")
    elif dtype == "bfloat16":
        num_tokens, expects_gain, why = COMPUTE_BOUND_PROMPT_LOOKUP_NUM_TOKENS, False, (
            "this CPU has no native bf16 matmul (no AMX or AVX512-BF16), so bf16 is compute-bound and every "
            "verified position costs a third to a half of a decode step: prompt lookup gains about 1.2-1.6x "
            "here, where float32 weights would verify 5 positions for about 1.5 decode steps")
    else:
        num_tokens, expects_gain, why = COMPUTE_BOUND_PROMPT_LOOKUP_NUM_TOKENS, False, (
            f"{dtype} matmuls on the CPU are compute-bound over several positions: a step verifying 5 positions "
            "costs 1.5-2 decode steps")
    if requested is not None:
        return DraftPlan(requested, expects_gain, f"{requested} drafted tokens per step (option); {why}")
    return DraftPlan(num_tokens, expects_gain, f"up to {num_tokens} drafted tokens per step: {why}")


@dataclass
class DraftCounts:
    num_steps: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    step_tokens: list[int] = field(default_factory=list)
    step_drafts: list[int] = field(default_factory=list)

    def as_stats(self) -> dict:
        return speculation_stats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens streamed per target forward pass: a count, which no clock moves (plain decoding: 1)."""
        return sum(self.step_tokens) / self.num_steps if self.num_steps else None


class _CountingCandidateGenerator:
    """Delegates to transformers' candidate generator and counts what it proposed and what was kept."""

    def __init__(self, inner, counts: DraftCounts, recorder: GenerationRecorder):
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
        self._inner = inner
        self._counts = counts
        self._recorder = recorder
        self._num_proposed = 0
        # Prompt lookup's draft length: set per step, so that no draft reaches past the token budget.
        self._lookup_num_tokens = inner.num_output_tokens if isinstance(inner, PromptLookupCandidateGenerator) else None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_candidates(self, input_ids, **kwargs):
        if self._lookup_num_tokens is not None:
            # The step streams at most max_length - len tokens, its own target token included.
            budget = self._inner.max_length - input_ids.shape[1] - 1
            if budget < 1:
                self._num_proposed = 0
                return input_ids, None
            self._inner.num_output_tokens = min(self._lookup_num_tokens, budget)
        candidate_ids, candidate_logits = self._inner.get_candidates(input_ids, **kwargs)
        self._num_proposed = candidate_ids.shape[1] - input_ids.shape[1]
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counts = self._counts
        counts.num_steps += 1
        counts.step_tokens.append(int(num_matches) + 1)
        counts.step_drafts.append(self._num_proposed)
        if self._num_proposed > 0:
            counts.num_drafts += 1
            counts.num_draft_tokens += self._num_proposed
        counts.num_accepted_tokens += int(num_matches)
        self._recorder.update(**counts.as_stats())
        return self._inner.update_candidate_strategy(input_ids, scores, num_matches)


class SpeculativeEngine(TransformersEngine, Drafting):
    """TransformersEngine whose generate() drafts by prompt lookup or with a draft model."""
    options_class = SpeculativeOptions

    def __init__(self, name: str, model: str | None = None, options: dict | None = None):
        super().__init__(name, model, options)
        self.draft_source: ModelSource | None = None
        self.draft_model = None
        self.last_counts = DraftCounts()
        self.is_speculating = True
        if self.options.compile:
            raise EngineError(f"{name}: assisted generation needs a dynamic KV cache; drop the compile option")
        self.draft_plan = plan_drafting(self.device, self.options.dtype, cpu_flags(),
                                        self.options.prompt_lookup_num_tokens)

    def draft_steps(self) -> list[int]:
        return list(self.last_counts.step_tokens)

    @property
    def drafting(self) -> str:
        return f"draft model {self.draft_source.name}" if self.draft_source else "prompt lookup"

    @property
    def drafting_note(self) -> str:
        """One line for the pane: how this engine drafts, and why that many tokens on this machine."""
        if self.options.draft_model:
            tokens = self.options.num_assistant_tokens or "transformers' adaptive number of"
            return f"draft model {self.options.draft_model}: {tokens} draft tokens per step"
        return f"prompt lookup, {self.draft_plan.reason}"

    def _load_model(self, source: ModelSource, progress: ProgressCallback | None):
        model = super()._load_model(source, progress)
        if self.options.draft_model:
            self.draft_model = self._load_draft(self.options.draft_model, progress)
        self._wrap_candidate_generator(model)
        return model

    def _load_draft(self, name: str, progress: ProgressCallback | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.draft_source = resolve_model(name, progress)
        draft_tokenizer = AutoTokenizer.from_pretrained(self.draft_source.path, trust_remote_code=trust_remote_code())
        reason = tokenizer_mismatch(self.tokenizer, draft_tokenizer)
        if reason:
            raise EngineError(f"{self.name}: draft model '{name}' cannot draft for '{self.source.name}': {reason}. "
                              "Assisted generation here needs the same tokenizer for both models.")
        if progress:
            progress(f"{self.name}: loading draft model {self.draft_source.name}")
        try:
            draft = AutoModelForCausalLM.from_pretrained(
                self.draft_source.path, dtype=self._torch_dtype(),
                attn_implementation=self.options.attn_implementation,
                trust_remote_code=trust_remote_code()).to(self.device)
        except Exception as error:
            raise EngineError(f"{self.name}: could not load draft model {name}: {describe_error(error)}") from error
        if self.options.num_assistant_tokens:
            draft.generation_config.num_assistant_tokens = self.options.num_assistant_tokens
        return draft.eval()

    def _wrap_candidate_generator(self, model) -> None:
        # transformers builds the candidate generator inside generate() and offers no hook to observe it;
        # shadowing the method on this one instance wraps whatever generator it chooses.
        build = model._get_candidate_generator

        def build_and_count(*args, **kwargs):
            self.last_counts = DraftCounts()
            return _CountingCandidateGenerator(build(*args, **kwargs), self.last_counts, self.recorder)

        model._get_candidate_generator = build_and_count

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        self.last_counts = DraftCounts()
        if not self.is_speculating:
            return {}
        if self.draft_model is not None:
            return {"assistant_model": self.draft_model}
        return {"prompt_lookup_num_tokens": self.draft_plan.num_tokens,
                "max_matching_ngram_size": self.options.max_matching_ngram_size or DEFAULT_MAX_MATCHING_NGRAM_SIZE}

    @contextmanager
    def speculation(self, is_on: bool):
        """Run the enclosed generations with speculation on or off (same weights, same process)."""
        previous, self.is_speculating = self.is_speculating, is_on
        try:
            yield self
        finally:
            self.is_speculating = previous

    def unload(self) -> None:
        self.draft_model = None
        super().unload()


def tokenizer_mismatch(target, draft) -> str | None:
    """None when both tokenizers map text to the same ids, else what differs."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if len(target_vocab) != len(draft_vocab):
        return f"its tokenizer has {len(draft_vocab):,} tokens, the target's has {len(target_vocab):,}"
    num_different = sum(1 for token, token_id in target_vocab.items() if draft_vocab.get(token) != token_id)
    if num_different:
        return f"{num_different:,} of {len(target_vocab):,} tokens have different ids in its tokenizer"
    return None


@dataclass
class SpeedupResult:
    """One engine with and without speculation, from interleaved pairs of runs on the same loaded weights.

    Per pair, both runs generate the same tokens (greedy), so their times compare directly:
    - speedup: median over pairs of (plain decode time / speculative decode time), the decode phase being
      first token to last, i.e. without the prefill that both runs pay once. Speculation's first step
      already streams several tokens, so its decode phase covers num_tokens - step_tokens[0] tokens; the
      tok/s fields below count them that way (the recorder's decode_tok_s counts num_tokens - 1 and so
      overstates a speculative run);
    - tokens_per_step: tokens per target forward pass, a count (plain decoding: 1);
    - verify_cost: median over pairs of (time of one speculative decode step / time of one plain decode
      step); pair by pair, speedup = (decode-phase tokens per step) / verify_cost, where the decode-phase
      tokens per step differ from tokens_per_step only by leaving out the first step.
    """
    engine: str
    drafting: str
    drafting_note: str
    num_tokens: int
    baseline_decode_tok_s: float
    spec_decode_tok_s: float
    speedup: float
    pair_speedups: list[float]
    tokens_per_step: float
    verify_cost: float
    num_steps: int
    acceptance_rate: float | None
    mean_accepted_len: float | None
    is_same_text: bool          # every run, with speculation or without, gave the same token ids
    token_ids: list[int]        # the last plain run's
    spec_token_ids: list[int]   # the last speculative run's

    def describe(self) -> str:
        return (f"{self.engine} ({self.drafting}): {self.speedup:.2f}x over plain decoding "
                f"(pairs {', '.join(f'{x:.2f}' for x in self.pair_speedups)}); {self.num_tokens} tokens in "
                f"{self.num_steps} forward passes ({self.tokens_per_step:.2f} per pass), one speculative step "
                f"costing {self.verify_cost:.2f} plain decode steps; {self.drafting_note}")


@dataclass
class _Run:
    stats: EngineStats
    num_steps: int           # target forward passes (plain decoding: one per token)
    num_decoded: int         # tokens after the first step's, i.e. streamed in the decode phase
    token_ids: list[int]

    @property
    def decode_tok_s(self) -> float:
        """nan when the run had no decode phase (everything streamed in its first step)."""
        return self.num_decoded / self.stats.decode_s if self.stats.decode_s else float("nan")

    @property
    def step_s(self) -> float:
        """Mean time of one decode-phase step."""
        return self.stats.decode_s / (self.num_steps - 1) if self.num_steps > 1 else float("nan")


def _timed_run(engine: SpeculativeEngine, prompt: str, params: GenerationParams, is_on: bool) -> _Run:
    with engine.speculation(is_on):
        for _event in engine.stream(prompt, params):
            pass
    stats, counts = engine.stats(), engine.last_counts
    num_steps = counts.num_steps if is_on else stats.num_tokens
    first_step = counts.step_tokens[0] if is_on and counts.step_tokens else 1
    return _Run(stats, num_steps, stats.num_tokens - first_step, list(engine.last_token_ids))


def measure_speedup(engine: SpeculativeEngine, prompt: str, params: GenerationParams,
                    repeats: int = 3) -> SpeedupResult:
    """`repeats` pairs of runs without and with speculation on the loaded engine, the order alternating
    from pair to pair (plain first, then speculative first), so a slow spell on a shared machine lands on
    either side; see SpeedupResult for what is compared."""
    if repeats < 1:
        raise EngineError("repeats must be at least 1")
    pairs = []
    for pair in range(repeats):
        order = (False, True) if pair % 2 == 0 else (True, False)
        runs = {is_on: _timed_run(engine, prompt, params, is_on) for is_on in order}
        pairs.append((runs[False], runs[True]))
    speedups = [spec.decode_tok_s / base.decode_tok_s for base, spec in pairs]
    costs = [spec.step_s / base.step_s for base, spec in pairs]
    last = pairs[-1][1]
    is_same_text = all(run.token_ids == pairs[0][0].token_ids for pair in pairs for run in pair)
    return SpeedupResult(
        engine.name, engine.drafting, engine.drafting_note, last.stats.num_tokens,
        statistics.median(base.decode_tok_s for base, _ in pairs),
        statistics.median(spec.decode_tok_s for _, spec in pairs),
        statistics.median(speedups), speedups, last.stats.num_tokens / last.num_steps,
        statistics.median(costs), last.num_steps, last.stats.acceptance_rate, last.stats.mean_accepted_len,
        is_same_text, pairs[-1][0].token_ids, last.token_ids)
