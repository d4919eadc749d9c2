"""The survey's small multiple-choice score: assets/cloze.jsonl holds simple factual cloze items (a
context, the right continuation and three distractors). An item counts as right when the right
continuation has the highest log-likelihood under the engine's weights: the sum of its tokens' log
probabilities after the context (BOS first when the tokenizer adds it, as for perplexity).

It scores through the engine's own loaded transformers model (`score_continuations`), so it applies to
TransformersEngine and its subclasses (bf16, nf4, int8, gptq-int4, spec); any other engine gets a
reason instead of a score. Call it between generations, not while the engine streams.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from engines.models.catalog import ASSETS
from engines.protocol import EngineError

CLOZE_PATH = ASSETS / "cloze.jsonl"


@dataclass(frozen=True)
class ClozeItem:
    context: str
    answer: str
    distractors: tuple[str, ...]


@dataclass
class ClozeScore:
    correct: int | None
    total: int
    note: str = ""
    chosen: list[str] | None = None      # the continuation each item picked


def cloze_items() -> list[ClozeItem]:
    items = []
    for number, line in enumerate(CLOZE_PATH.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            item = ClozeItem(data["context"], data["answer"], tuple(data["distractors"]))
        except (ValueError, KeyError, TypeError) as error:
            raise EngineError(f"{CLOZE_PATH.name} line {number} is not a cloze item: {error}") from None
        if not item.context or not item.answer or len(item.distractors) < 1 or item.answer in item.distractors:
            raise EngineError(f"{CLOZE_PATH.name} line {number}: needs a context, an answer and other distractors")
        items.append(item)
    return items


def cloze_unavailable_reason(engine) -> str | None:
    from engines.variants.transformers.engine import TransformersEngine
    if not isinstance(engine, TransformersEngine):
        return f"n/a: {engine.name} has no in-process transformers model to score continuations with"
    if engine.model is None:
        return f"n/a: {engine.name} is not loaded"
    return None


def score_continuations(engine, context: str, continuations: list[str]) -> list[float]:
    """Log-likelihood (natural log, summed over tokens) of each continuation after `context`, in one
    right-padded batch through `engine.model`."""
    reason = cloze_unavailable_reason(engine)
    if reason:
        raise EngineError(reason)
    import torch
    context_ids = engine.encode(context)[0][0].tolist()
    options = [engine.tokenizer(text, add_special_tokens=False).input_ids for text in continuations]
    if not context_ids or any(not ids for ids in options):
        raise EngineError("a cloze context and each continuation need at least one token")
    length = len(context_ids) + max(len(ids) for ids in options)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(options), length), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(options):
        sequence = context_ids + ids
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
    with torch.inference_mode():
        logits = engine.model(input_ids=input_ids.to(engine.device),
                              attention_mask=attention_mask.to(engine.device)).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = []
    for row, ids in enumerate(options):
        # The token at position p is predicted by the logits at p - 1.
        positions = torch.arange(len(context_ids) - 1, len(context_ids) - 1 + len(ids))
        targets = torch.tensor(ids)
        scores.append(float(log_probs[row, positions, targets].sum()))
    return scores


def score_cloze(engine, items: list[ClozeItem] | None = None) -> ClozeScore:
    """How many items the engine's weights get right; a reason instead for engines it cannot score."""
    items = cloze_items() if items is None else items
    reason = cloze_unavailable_reason(engine)
    if reason:
        return ClozeScore(None, len(items), reason)
    correct, chosen = 0, []
    for item in items:
        options = [item.answer, *item.distractors]
        scores = score_continuations(engine, item.context, options)
        best = options[max(range(len(options)), key=scores.__getitem__)]
        chosen.append(best)
        correct += best == item.answer
    return ClozeScore(correct, len(items), "", chosen)


def cloze_chance(items: list[ClozeItem] | None = None) -> float:
    """Items a guesser gets right on average: one over the options of each."""
    return sum(1 / (1 + len(item.distractors)) for item in (cloze_items() if items is None else items))
