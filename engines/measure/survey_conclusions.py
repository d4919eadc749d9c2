"""The survey's three conclusions checked on a SurveyReport: yes or no by a stated rule, with the numbers
that decide it, what limits decoding here (launch-bound or bandwidth-bound, from the roofline), and
why the answer differs from the survey's where it does.

The survey's answers are yes, yes, yes: quantization barely moves quality (MMLU 55.8 / 55.4 / 55.1),
quantized speed does not rise much, quantized memory drops a lot.
"""
from __future__ import annotations

import math

from engines.measure.roofline import decode_roofline
from engines.measure.survey_attention import PRIMARY_ATTENTION
from engines.measure.survey_data import (
    SURVEY_MEMORY_BF16,
    SURVEY_MMLU,
    SURVEY_SERVING,
    SURVEY_SPEED_FA2_BF16,
    Conclusion,
    SurveyReport,
)
from engines.models.shape import ModelShape
from engines.protocol import Precision
from engines.registry import split_variant

MAX_PERPLEXITY_RATIO = 1.10     # "barely moves": every quantized perplexity within 10% of bf16's ...
MAX_CLOZE_DROP = 0.10           # ... and its cloze score at most 10 points (2 of 20 items) below
MAX_SPEED_RATIO = 1.30          # "does not rise much": no quantized precision decodes above 1.3x bf16
MAX_MEMORY_RATIO = 0.75         # "drops a lot": some quantized precision's peak is at most 0.75x bf16's
LAUNCH_BOUND_FRACTION = 0.30    # bf16 below this share of its bandwidth roofline is launch/compute-bound
NOT_QUANTIZED = ("bf16", "bf16-compiled", "spec")


def conclude(report: SurveyReport, reference_shape: ModelShape) -> list[Conclusion]:
    return [quality_conclusion(report), speed_conclusion(report, reference_shape),
            memory_conclusion(report, reference_shape)]


def _split(rows):
    ok = [row for row in rows if row.status == "ok"]
    bf16 = next((row for row in ok if split_variant(row.engine)[0] == "bf16"), None)
    return bf16, [row for row in ok if split_variant(row.engine)[0] not in NOT_QUANTIZED]


def _answer(survey: str, answer: str, numbers: list[str], rule: str, claim: str, survey_numbers: str,
            note: str = "", reason: str = "") -> Conclusion:
    return Conclusion(claim=claim, survey_answer=survey, survey_numbers=survey_numbers, answer=answer,
                      numbers=numbers, rule=rule, note=note, reason=reason)


def quality_conclusion(report: SurveyReport) -> Conclusion:
    claim = "quantization barely moves quality"
    survey_numbers = "MMLU {bf16} (BF16) / {int8} (Int8) / {int4} (Int4)".format(**SURVEY_MMLU)
    rule = (f"yes when every quantized precision's perplexity is within {MAX_PERPLEXITY_RATIO:.2f}x bf16's and its "
            f"cloze score at most {MAX_CLOZE_DROP:.0%} below")
    bf16, quantized = _split(report.quality)
    quantized = [row for row in quantized if row.perplexity_ratio is not None or row.cloze_accuracy is not None]
    if bf16 is None or (bf16.perplexity is None and bf16.cloze_accuracy is None) or not quantized:
        return _answer("yes", "n/a", [], rule, claim, survey_numbers,
                       reason="needs bf16 and at least one quantized precision with a perplexity or a cloze score")
    numbers = [f"bf16: perplexity {_number(bf16.perplexity)}, cloze {_cloze(bf16)}"]
    failing = []
    for row in quantized:
        drop = (bf16.cloze_accuracy - row.cloze_accuracy) if None not in (bf16.cloze_accuracy,
                                                                           row.cloze_accuracy) else None
        ratio = f" ({row.perplexity_ratio:.3f}x bf16)" if row.perplexity_ratio is not None else ""
        numbers.append(f"{row.engine}: perplexity {_number(row.perplexity)}{ratio}, greedy agreement "
                       f"{_number(row.greedy_agreement, 2)}, cloze {_cloze(row)}"
                       + (f" ({-drop * 100:+.0f} points)" if drop is not None else ""))
        if (row.perplexity_ratio or 0) > MAX_PERPLEXITY_RATIO or (drop is not None and drop > MAX_CLOZE_DROP):
            failing.append(row.engine)
    if any(row.perplexity_ratio is None for row in quantized):
        numbers.append("perplexity n/a for some precisions (see the quality table): those are decided on the cloze "
                       "score alone")
    reason = ""
    if failing:
        millions = _params(report.shape) / 1e6
        reason = (f"{', '.join(failing)} moved more than the rule allows. Small models lose more to weight "
                  f"quantization than 7B ones: a {millions:.0f}M-parameter model has less redundancy per weight than "
                  "the survey's Qwen-7B; one cloze item is 5 points of 20")
    return _answer("yes", "no" if failing else "yes", numbers, rule, claim, survey_numbers, reason=reason)


def speed_conclusion(report: SurveyReport, reference_shape: ModelShape) -> Conclusion:
    claim = "quantized speed does not rise much"
    survey_numbers = (f"vLLM test: nf4 {SURVEY_SERVING['nf4']} vs baseline {SURVEY_SERVING['baseline']} tok/s; BF16 + "
                      "FA2 " + " / ".join(f"{value} tok/s at {n}" for n, value in SURVEY_SPEED_FA2_BF16.items()))
    rule = (f"yes when no quantized precision decodes faster than {MAX_SPEED_RATIO:.1f}x bf16 (sdpa; the geometric "
            "mean of its ratios over the N)")
    rows = [row for row in report.speed if row.attention in (PRIMARY_ATTENTION, "engine's own")]
    bf16, quantized = _split(rows)
    if bf16 is None or not quantized:
        return _answer("yes", "n/a", [], rule, claim, survey_numbers,
                       reason="needs bf16 and at least one quantized precision that decoded")
    numbers, ratios = [], {}
    for n in sorted({row.new_tokens for row in rows}):
        base = next((row for row in rows if row.new_tokens == n and row.engine == bf16.engine), None)
        if base is None or base.status != "ok" or not base.decode_tok_s:
            continue
        parts = [f"N={n}: bf16 {base.decode_tok_s:.1f} tok/s"]
        for row in quantized:
            if row.new_tokens == n and row.decode_tok_s:
                ratios.setdefault(row.engine, []).append(row.decode_tok_s / base.decode_tok_s)
                parts.append(f"{row.engine} {row.decode_tok_s:.1f} ({ratios[row.engine][-1]:.2f}x)")
        numbers.append(", ".join(parts))
    if not ratios:
        return _answer("yes", "n/a", numbers, rule, claim, survey_numbers, reason="no quantized speed to compare")
    means = {engine: math.prod(values) ** (1 / len(values)) for engine, values in ratios.items()}
    numbers.append("geometric mean over the N: " + ", ".join(f"{engine} {mean:.2f}x" for engine, mean in means.items()))
    best, best_engine = max((mean, engine) for engine, mean in means.items())
    answer = "yes" if best <= MAX_SPEED_RATIO else "no"
    note, bound = _bound(report, bf16, reference_shape, numbers)
    reason = ""
    if answer == "no":
        reason = f"{best_engine} decodes {best:.2f}x bf16 on average. " + (
            "bf16 is far below its bandwidth roofline here, so the gain is not fewer weight bytes: that engine's "
            "kernels do less work per token on this device than bf16's" if bound == "launch" else
            "bf16 is bandwidth-bound here and the quantized weights are fewer bytes per token; the survey's "
            "quantized kernels (dequantizing in every matmul) did not turn fewer bytes into speed")
        if _is_busy(report):
            reason += (f"; the machine was busy (load average {report.machine['load_average']} on "
                       f"{report.machine['cpu_count']} cores) and each cell is the median of "
                       f"{report.settings['repeats']} run(s), so part of the gap may be timing noise")
    return _answer("yes", answer, numbers, rule, claim, survey_numbers, note=note, reason=reason)


def _is_busy(report: SurveyReport) -> bool:
    load, cores = report.machine.get("load_average"), report.machine.get("cpu_count")
    return load is not None and cores is not None and load > cores


def _bound(report: SurveyReport, bf16_row, reference_shape: ModelShape, numbers: list[str]) -> tuple[str, str]:
    """What limits bf16 decoding here, from its roofline; adds the deciding numbers."""
    precision = report.precisions.get(bf16_row.engine)
    if precision is None or not report.bandwidth_gb_s:
        return "", ""
    shape = ModelShape(**report.shape)
    bf16 = Precision(**precision)
    context = (bf16_row.prompt_tokens or 1) + bf16_row.new_tokens // 2
    roofline = decode_roofline(shape, bf16, report.bandwidth_gb_s, context).roofline_tok_s
    fraction = bf16_row.decode_tok_s / roofline
    bound = "launch" if fraction < LAUNCH_BOUND_FRACTION else "bandwidth"
    numbers.append(f"bf16 at N={bf16_row.new_tokens} reaches {fraction:.0%} of its {roofline:.0f} tok/s bandwidth "
                   f"roofline ({report.bandwidth_gb_s:.0f} GB/s measured)")
    gains = []
    for engine, values in report.precisions.items():
        if split_variant(engine)[0] in NOT_QUANTIZED:
            continue
        quantized = Precision(**values)
        gain = (decode_roofline(reference_shape, quantized, report.bandwidth_gb_s, context).roofline_tok_s
                / decode_roofline(reference_shape, bf16, report.bandwidth_gb_s, context).roofline_tok_s)
        gains.append(f"{engine} {gain:.1f}x")
    if gains:
        numbers.append(f"on the {reference_shape.name} shape, bandwidth-bound at batch 1, the roofline speed-up over "
                       "bf16 is " + ", ".join(gains))
    if bound == "launch":
        note = (f"launch-bound: bf16 runs at {fraction:.0%} of its bandwidth roofline, so a token's time goes to "
                "kernel launches, framework overhead and compute rather than to reading weights; fewer weight bytes "
                "alone cannot make it much faster here, where on a bandwidth-bound 8B shape they could")
    else:
        note = (f"bandwidth-bound: bf16 runs at {fraction:.0%} of its bandwidth roofline; each token reads every "
                "weight, so fewer weight bytes can make it faster, if the quantized kernels keep up")
    return note, bound


def memory_conclusion(report: SurveyReport, reference_shape: ModelShape) -> Conclusion:
    claim = "quantized memory drops a lot"
    survey_numbers = (f"BF16 {SURVEY_MEMORY_BF16['encode_2048']} GB encoding 2048 tokens / "
                      f"{SURVEY_MEMORY_BF16['generate_8192']} GB generating 8192 (its quantized figures are not "
                      "quoted here)")
    rule = f"yes when some quantized precision's peak generating the largest N is at most {MAX_MEMORY_RATIO}x bf16's"
    bf16, quantized = _split(report.memory)
    n = str(max(report.settings["tokens"]))
    if bf16 is None or bf16.generate_peak_gib.get(n) is None or not quantized:
        return _answer("yes", "n/a", [], rule, claim, survey_numbers,
                       reason="needs bf16 and a quantized precision with a measured peak")
    base, kind = bf16.generate_peak_gib[n], bf16.memory_kind or "memory"
    numbers = [f"bf16: peak {base:.2f} GiB generating {n} ({kind}), weights {_number(bf16.weight_footprint_gib)} GiB, "
               f"{_added(bf16, base)}"]
    ratios = []
    for row in quantized:
        peak = row.generate_peak_gib.get(n)
        if peak is None:
            continue
        ratios.append(peak / base)
        weights = ""
        if row.weight_footprint_gib and bf16.weight_footprint_gib:
            weights = (f", weights {row.weight_footprint_gib:.2f} GiB "
                       f"({row.weight_footprint_gib / bf16.weight_footprint_gib:.2f}x)")
        numbers.append(f"{row.engine}: peak {peak:.2f} GiB ({ratios[-1]:.2f}x){weights}, {_added(row, peak)}")
    if not ratios:
        return _answer("yes", "n/a", numbers, rule, claim, survey_numbers, reason="no quantized peak to compare")
    answer = "yes" if min(ratios) <= MAX_MEMORY_RATIO else "no"
    kept = 1 - _linear_params(report.shape) / _params(report.shape)
    kept_reference = 1 - reference_shape.num_linear_params / reference_shape.num_params
    numbers.append(f"parameters outside the quantized linear layers (embeddings, output head): {kept:.0%} here, "
                   f"{kept_reference:.0%} on {reference_shape.name}")
    reason = ""
    if answer == "no":
        reason = _memory_reason(bf16, quantized, n, kind) + (
            f"; {kept:.0%} of this model's parameters (embeddings, output head) stay in bf16, while on "
            f"{reference_shape.name} the linear layers hold {1 - kept_reference:.0%} of the weights, so 4-bit weights "
            "cut its peak by far more")
    return _answer("yes", answer, numbers, rule, claim, survey_numbers, reason=reason)


def _memory_reason(bf16, quantized, n: str, kind: str) -> str:
    best = min((row for row in quantized if row.generate_peak_gib.get(n) is not None),
               key=lambda row: row.generate_peak_gib[n])
    peak, base = best.generate_peak_gib[n], bf16.generate_peak_gib[n]
    if peak >= base and None not in (best.weight_footprint_gib, bf16.weight_footprint_gib, best.baseline_gib,
                                      bf16.baseline_gib):
        smaller_gib = bf16.weight_footprint_gib - best.weight_footprint_gib
        return (f"even {best.engine}, the smallest quantized peak, is {peak / base:.2f}x bf16's: its weights are "
                f"{smaller_gib:.2f} GiB smaller, but the process ({kind}) held more beside them: "
                f"{best.baseline_gib:.2f} GiB before it loaded against bf16's {bf16.baseline_gib:.2f} "
                "(libraries imported and memory earlier engines left), then its loader's and kernels' buffers")
    if bf16.weight_footprint_gib is not None:
        return (f"bf16's weights are {bf16.weight_footprint_gib:.2f} of its {base:.2f} GiB peak; the rest (the "
                f"process's own memory, {kind}, activations, KV cache) is memory weight quantization does not touch")
    return "the peak is mostly memory that weight quantization does not touch"


def _added(row, peak: float) -> str:
    if row.baseline_gib is None:
        return "nothing measured before it loaded"
    return f"{peak - row.baseline_gib:+.2f} GiB over the {row.baseline_gib:.2f} GiB before it loaded"


def _params(shape: dict) -> int:
    return ModelShape(**shape).num_params


def _linear_params(shape: dict) -> int:
    return ModelShape(**shape).num_linear_params


def _cloze(row) -> str:
    return f"{row.cloze_correct}/{row.cloze_total}" if row.cloze_correct is not None else "n/a"


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
