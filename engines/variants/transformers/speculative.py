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
They are pushed into the recorder after every step, so the UI sees the acceptance rate live.
`measure_speedup()` times the same loaded engine with and without speculation, in one run.
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import dataclass

from engines.variants.transformers.engine import TransformersEngine
from engines.variants.transformers.options import SpeculativeOptions
from engines.models.catalog import ModelSource, trust_remote_code
from engines.models.sources import resolve_model
from engines.protocol import EngineError, GenerationParams, ProgressCallback, describe_error, speculation_stats
from engines.telemetry import GenerationRecorder

DEFAULT_PROMPT_LOOKUP_NUM_TOKENS = 10
DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2


@dataclass
class DraftCounts:
    num_steps: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_stats(self) -> dict:
        return speculation_stats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)


class _CountingCandidateGenerator:
    """Delegates to transformers' candidate generator and counts what it proposed and what was kept."""

    def __init__(self, inner, counts: DraftCounts, recorder: GenerationRecorder):
        self._inner = inner
        self._counts = counts
        self._recorder = recorder
        self._num_proposed = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_candidates(self, input_ids, **kwargs):
        candidate_ids, candidate_logits = self._inner.get_candidates(input_ids, **kwargs)
        self._num_proposed = candidate_ids.shape[1] - input_ids.shape[1]
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counts = self._counts
        counts.num_steps += 1
        if self._num_proposed > 0:
            counts.num_drafts += 1
            counts.num_draft_tokens += self._num_proposed
        counts.num_accepted_tokens += int(num_matches)
        self._recorder.update(**counts.as_stats())
        return self._inner.update_candidate_strategy(input_ids, scores, num_matches)


class SpeculativeEngine(TransformersEngine):
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

    @property
    def drafting(self) -> str:
        return f"draft model {self.draft_source.name}" if self.draft_source else "prompt lookup"

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
        return {"prompt_lookup_num_tokens": self.options.prompt_lookup_num_tokens or DEFAULT_PROMPT_LOOKUP_NUM_TOKENS,
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
    """Decode speed of one engine with and without speculation, medians over the repeats."""
    engine: str
    drafting: str
    num_tokens: int
    baseline_decode_tok_s: float
    spec_decode_tok_s: float
    speedup: float
    acceptance_rate: float | None
    mean_accepted_len: float | None
    is_same_text: bool


def measure_speedup(engine: SpeculativeEngine, prompt: str, params: GenerationParams,
                    repeats: int = 3) -> SpeedupResult:
    """Alternate runs without and with speculation on the loaded engine; compare median decode tok/s."""
    if repeats < 1:
        raise EngineError("repeats must be at least 1")
    baseline_runs, spec_runs = [], []
    baseline_ids = spec_ids = None
    for _ in range(repeats):
        for is_on, runs in ((False, baseline_runs), (True, spec_runs)):
            with engine.speculation(is_on):
                for _event in engine.stream(prompt, params):
                    pass
            runs.append(engine.stats())
            if is_on:
                spec_ids = list(engine.last_token_ids)
            else:
                baseline_ids = list(engine.last_token_ids)
    baseline_tok_s = statistics.median(run.decode_tok_s or 0.0 for run in baseline_runs)
    spec_tok_s = statistics.median(run.decode_tok_s or 0.0 for run in spec_runs)
    last = spec_runs[-1]
    return SpeedupResult(engine.name, engine.drafting, last.num_tokens, baseline_tok_s, spec_tok_s,
                         spec_tok_s / baseline_tok_s if baseline_tok_s else float("nan"),
                         last.acceptance_rate, last.mean_accepted_len, baseline_ids == spec_ids)

