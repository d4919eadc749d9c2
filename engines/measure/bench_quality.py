"""The benchmark's quality columns: greedy agreement and perplexity against a bf16 reference, through
engines.measure.quality (`build_reference`, `reference_for`, `evaluate_quality`). The reference comes once per
run, from the bf16 row, or else from the disk cache or a bf16 loaded first; with random weights,
without quality, or without a reference, every row says why the columns are n/a.
"""
from __future__ import annotations

from engines.models.dummy import RANDOM_WEIGHTS_NOTE
from engines.protocol import ProgressCallback, describe_error

REFERENCE_TOKENS = 32


class QualityColumns:
    """Builds the bf16 reference once (engines.measure.quality) and fills each row's quality columns."""

    def __init__(self, engines: list[str], model: str | None, is_quality: bool, is_random: bool,
                 say: ProgressCallback):
        self.engines, self.model, self.say = list(engines), model, say
        self.reference, self.note = None, ""
        if is_random:
            self.note = RANDOM_WEIGHTS_NOTE
        elif not is_quality:
            self.note = "n/a (skipped)"

    def order(self, engines: list[str]) -> list[str]:
        """bf16 first when quality is measured: it provides the reference."""
        return sorted(engines, key=lambda name: name != "bf16") if not self.note else list(engines)

    def prepare(self) -> None:
        """Without bf16 among the engines, take the reference from the disk cache or from a bf16 loaded
        alone for it (engines.measure.quality.reference_for)."""
        if self.note or "bf16" in self.engines:
            return
        from engines.measure.quality import reference_for
        try:
            self.reference = reference_for(self.model, REFERENCE_TOKENS, self.say)
        except Exception as error:  # the speed and memory columns stand without quality
            self.note = f"n/a (no bf16 reference: {describe_error(error)})"

    def _build_reference(self, engine):
        from engines.measure.quality import build_reference
        return build_reference(engine, num_tokens=REFERENCE_TOKENS)

    def evaluate(self, engine, row) -> None:
        """Fill row.greedy_agreement, perplexity, perplexity_ratio, weight_footprint_gib and quality_note."""
        if self.note:
            row.quality_note = self.note
            return
        from engines.measure.quality import evaluate_quality
        if self.reference is None:
            if engine.name != "bf16":
                # bf16 runs first; without its reference an engine would be scored against itself.
                row.quality_note = "n/a (bf16, the reference, did not run)"
                return
            self.reference = self._build_reference(engine)
        report = evaluate_quality(engine, self.reference)
        row.greedy_agreement, row.perplexity = report.greedy_agreement, report.perplexity
        row.perplexity_ratio, row.weight_footprint_gib = report.perplexity_ratio, report.weight_footprint_gib
        row.quality_note = f"suspect: {report.reason}" if report.is_suspect else report.reason
