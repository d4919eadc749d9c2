"""Where a pane's greedy tokens part from the bf16 reference, and how close the call was there.

- `first_divergence(reference_ids, ids)`: the first position whose token differs. While streams are
  still running (`is_complete=False`) a shorter list that agrees so far has not diverged yet; once both
  are finished, one that stopped early (EOS) diverges where it stopped.
- `running_agreement(reference_ids, ids)`: after each position i, the fraction of positions 0..i whose
  tokens are equal. Its last value is engines.measure.quality.token_agreement over the same tokens when
  the reference is at least as long.
- `divergence_report(reference_ids, ids, decode)`: both of the above and the character offset of the
  divergence in the pane's text, for marking it there.
- `top2_margin(engine, prompt, ids, position)`: the logits that chose `ids[position]` (the prompt plus
  the first `position` generated ids), their two best tokens and the gap between them. A gap near zero
  is a near-tie that any rounding change (FP8 KV, INT4 weights, another kernel) may flip. Transformers
  engines give raw logits from one forward pass; vLLM engines give the two best logprobs of one
  1-token request, whose difference equals the logit gap (both share one softmax normaliser). Other
  engines expose no logits: None.

Pure Python except `top2_margin`, which imports torch (transformers) or talks to the loaded vLLM engine.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from engines.protocol import ChatPrompt, EngineError, validate_prompt

_request_numbers = itertools.count()


def first_divergence(reference_ids: Sequence[int], ids: Sequence[int], is_complete: bool = True) -> int | None:
    """Index of the first position where `ids` differs from `reference_ids`; None where they agree.
    With is_complete (both generations finished), lists of different lengths that agree on the shorter
    one diverge at the shorter's length (one engine stopped, the other went on); while streaming
    (is_complete=False) that is only a lead, not a divergence."""
    for index, (expected, got) in enumerate(zip(reference_ids, ids)):
        if expected != got:
            return index
    if is_complete and len(reference_ids) != len(ids):
        return min(len(reference_ids), len(ids))
    return None


def running_agreement(reference_ids: Sequence[int], ids: Sequence[int]) -> list[float]:
    """Greedy agreement after each of `ids`' positions: equal tokens in 0..i over i + 1. Positions past
    the end of the reference count as different."""
    result, matches = [], 0
    for index, got in enumerate(ids):
        matches += index < len(reference_ids) and reference_ids[index] == got
        result.append(matches / (index + 1))
    return result


@dataclass
class DivergenceReport:
    """One pane against the reference, for the race view: where it parts, its agreement so far, and
    where in its own text the first differing token starts (for marking it)."""
    divergence_index: int | None
    running_agreement: list[float]
    agreement: float | None             # the last running value; None for no tokens yet
    text_offset: int | None             # characters of the pane's text before the divergence

    def to_dict(self) -> dict:
        return asdict(self)


def divergence_report(reference_ids: Sequence[int], ids: Sequence[int], decode=None,
                      is_complete: bool = True) -> DivergenceReport:
    """`decode` (an engine's decode(ids) -> text) gives the text offset of the divergence."""
    index = first_divergence(reference_ids, ids, is_complete)
    agreement = running_agreement(reference_ids, ids)
    offset = len(decode(list(ids[:index]))) if decode is not None and index is not None else None
    return DivergenceReport(index, agreement, agreement[-1] if agreement else None, offset)


@dataclass
class TopTwo:
    """The two best next tokens at one position of a generation, by the engine's own logits."""
    position: int               # index into the generated ids (0: the token right after the prompt)
    best_id: int
    second_id: int
    best_logit: float
    second_logit: float
    margin: float               # best - second (>= 0); logit units, so it compares across engines
    best_text: str
    second_text: str
    source: str                 # "logits" (transformers forward) or "logprobs" (vLLM top-2)

    def to_dict(self) -> dict:
        return asdict(self)


def top2_margin(engine, prompt: "str | ChatPrompt", ids: Sequence[int], position: int) -> TopTwo | None:
    """The top-2 margin at `position` of the greedy continuation `ids` of `prompt`, from the loaded
    `engine`; None for an engine that exposes no logits. Raises EngineError for a bad position or an
    engine that is not loaded."""
    if not 0 <= position <= len(ids):
        raise EngineError(f"position {position} is outside the {len(ids)} generated tokens")
    prompt = validate_prompt(prompt)
    from engines.variants.transformers.engine import TransformersEngine
    from engines.variants.vllm.engine import VllmEngine  # imports no vLLM until an engine loads
    if isinstance(engine, TransformersEngine):
        return _transformers_top2(engine, prompt, list(ids[:position]), position)
    if isinstance(engine, VllmEngine):
        return _vllm_top2(engine, prompt, list(ids[:position]), position)
    return None


def _transformers_top2(engine, prompt, prefix_ids: list[int], position: int) -> TopTwo:
    if engine.model is None:
        raise EngineError(f"{engine.name}: not loaded")
    import torch
    input_ids, _ = engine.encode(prompt)
    prefix = torch.tensor([prefix_ids], dtype=input_ids.dtype, device=input_ids.device)
    full = torch.cat([input_ids, prefix], dim=1)
    # The engine's own lock keeps this forward from running beside one of its streams.
    with engine._lock, torch.inference_mode():
        logits = engine.model(input_ids=full).logits[0, -1].float()
    values, indices = torch.topk(logits, 2)
    return _top_two(engine, position, [(int(indices[0]), float(values[0])), (int(indices[1]), float(values[1]))],
                    "logits")


def _vllm_top2(engine, prompt, prefix_ids: list[int], position: int) -> TopTwo:
    if not engine.is_loaded:
        raise EngineError(f"{engine.name}: not loaded")
    from engines.protocol import GenerationParams
    prompt_ids = engine.encode(prompt, 1) + prefix_ids
    sampling = engine._sampling_params(GenerationParams(max_new_tokens=1), logprobs=2)
    ranked = engine._call(_vllm_logprobs(engine._llm, f"{engine.name}-top2-{next(_request_numbers)}", prompt_ids,
                                         sampling))
    return _top_two(engine, position, ranked, "logprobs")


async def _vllm_logprobs(llm, request_id: str, prompt_ids: list[int], sampling) -> list[tuple[int, float]]:
    position_logprobs = None
    async for output in llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id):
        position_logprobs = (output.outputs[0].logprobs or [None])[0] or position_logprobs
    if not position_logprobs:
        raise EngineError("vLLM returned no logprobs for the position")
    ranked = sorted(((int(token), float(item.logprob)) for token, item in position_logprobs.items()),
                    key=lambda pair: -pair[1])
    return ranked[:2]


def _top_two(engine, position: int, ranked: list[tuple[int, float]], source: str) -> TopTwo:
    best_id, best = ranked[0]
    second_id, second = ranked[1] if len(ranked) > 1 else (best_id, -math.inf)
    return TopTwo(position=position, best_id=best_id, second_id=second_id, best_logit=best, second_logit=second,
                  margin=best - second, best_text=engine.decode([best_id]), second_text=engine.decode([second_id]),
                  source=source)
