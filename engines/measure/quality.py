"""Quality beside speed: how far a variant's output is from the bf16 reference of the same model.

- greedy_agreement: each prompt of assets/quality_prompts.txt is generated greedily for N tokens by
  the variant and by bf16; the fraction of positions whose token ids are equal, averaged over prompts.
  It is strict: after the first differing token the continuations usually part ways.
- perplexity on assets/perplexity.txt (BOS first, as Gemma needs), and its ratio to bf16's.
- weight_footprint_gib: parameter and buffer bytes of the loaded weights.

Engines that declare the Scoring protocol (engines/protocol.py) give `last_token_ids` (the ids of the
latest stream), `perplexity(text)` and `weight_footprint_gib()`; for any other engine these measures
read None ("n/a").
The bf16 reference is cached on disk (JSON) keyed by model, device, N and the assets' hash.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from engines.models.catalog import ASSETS, cache_dir, default_model_name
from engines.protocol import EngineError, GenerationParams, ProgressCallback, Scoring

PROMPTS_PATH = ASSETS / "quality_prompts.txt"
PERPLEXITY_PATH = ASSETS / "perplexity.txt"
# Garbage (a tokenizer split into characters, a wrong dequantization, a missing BOS) shows as near-zero
# agreement or a perplexity several times bf16's. Sound 4-bit quantization of the 270M model keeps the
# ratio near 1.3 yet parts from bf16's greedy text after a few tokens (GPTQ measured 0.15 over 8 x 32
# tokens), so the agreement bar only catches output that shares almost nothing with bf16's.
MIN_AGREEMENT = 0.05
MAX_PERPLEXITY_RATIO = 1.5
# Any working language model scores coherent English prose far below this, whatever bf16 says.
MAX_PERPLEXITY = 100.0


def quality_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS_PATH.read_text().splitlines() if line.strip()]


def perplexity_text() -> str:
    return PERPLEXITY_PATH.read_text()


def assets_sha256() -> str:
    return hashlib.sha256((PROMPTS_PATH.read_text() + "\0" + perplexity_text()).encode()).hexdigest()


@dataclass
class QualityReference:
    """bf16's greedy token ids per prompt and its perplexity: what every variant is compared with."""
    model: str
    device: str
    num_tokens: int
    prompts: list[str]
    token_ids: list[list[int]]
    perplexity: float | None
    assets_sha256: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.partial")   # two writers never share a staging file
        staging.write_text(json.dumps(asdict(self)))
        staging.replace(path)

    @classmethod
    def load(cls, path: Path) -> "QualityReference":
        return cls(**json.loads(path.read_text()))


@dataclass
class QualityReport:
    engine: str
    greedy_agreement: float | None
    perplexity: float | None
    perplexity_ratio: float | None
    weight_footprint_gib: float | None
    reference_perplexity: float | None
    num_prompts: int
    num_tokens: int
    is_suspect: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def reference_path(model: str, device: str, num_tokens: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_")[:80]
    return cache_dir() / "quality" / f"{slug}-{device}-{num_tokens}tok-{assets_sha256()[:12]}.json"


def build_reference(bf16_engine, num_tokens: int = 32, use_cache: bool = True) -> QualityReference:
    """The reference from a loaded bf16 engine, read from the disk cache when it is there."""
    if not 1 <= num_tokens <= 1024:
        raise EngineError(f"num_tokens must be between 1 and 1024, got {num_tokens}")
    model = bf16_engine.model_name or default_model_name()
    path = reference_path(model, bf16_engine.device, num_tokens)
    cached = _cached_reference(path) if use_cache else None
    if cached is not None:
        return cached
    if not isinstance(bf16_engine, Scoring):
        raise EngineError(f"{bf16_engine.name} does not expose the token ids it generated; it cannot be a reference")
    prompts = quality_prompts()
    reference = QualityReference(model=model, device=bf16_engine.device, num_tokens=num_tokens, prompts=prompts,
                                 token_ids=[_greedy_ids(bf16_engine, prompt, num_tokens) for prompt in prompts],
                                 perplexity=bf16_engine.perplexity(perplexity_text()),
                                 assets_sha256=assets_sha256())
    reference.save(path)
    return reference


def reference_for(model: str | None, num_tokens: int = 32,
                  progress: ProgressCallback | None = None) -> QualityReference:
    """The cached reference for `model`, or one built by loading bf16 for it (then unloading it)."""
    from engines.registry import create_engine
    bf16_engine = create_engine("bf16", model=model)
    cached = _cached_reference(reference_path(model or default_model_name(), bf16_engine.device, num_tokens))
    if cached is not None:
        return cached
    if progress:
        progress(f"quality: building the bf16 reference ({num_tokens} greedy tokens per prompt; once per model)")
    bf16_engine.load(progress)
    try:
        return build_reference(bf16_engine, num_tokens)
    finally:
        bf16_engine.unload()


def _cached_reference(path: Path) -> QualityReference | None:
    try:
        reference = QualityReference.load(path)
    except (OSError, ValueError, TypeError):
        return None
    return reference if reference.assets_sha256 == assets_sha256() else None


def evaluate_quality(engine, reference: QualityReference, num_tokens: int | None = None,
                     max_prompts: int | None = None) -> QualityReport:
    """Compare a loaded engine with the reference. num_tokens/max_prompts shorten the comparison (slow
    CPU variants in tests); they default to the whole reference."""
    num_tokens = min(num_tokens or reference.num_tokens, reference.num_tokens)
    pairs = list(zip(reference.prompts, reference.token_ids))[:max_prompts]
    if not isinstance(engine, Scoring):
        return QualityReport(engine=engine.name, greedy_agreement=None, perplexity=None, perplexity_ratio=None,
                             weight_footprint_gib=None, reference_perplexity=reference.perplexity,
                             num_prompts=0, num_tokens=num_tokens, is_suspect=False,
                             reason="n/a: the engine exposes neither token ids nor perplexity")
    agreements = []
    for prompt, expected in pairs:
        generated = _greedy_ids(engine, prompt, num_tokens)
        agreements.append(token_agreement(expected[:num_tokens], generated[:num_tokens]))
    agreement = sum(agreements) / len(agreements) if agreements else None
    perplexity = engine.perplexity(perplexity_text())
    ratio = perplexity / reference.perplexity if perplexity is not None and reference.perplexity else None
    is_suspect, reason = judge(agreement, perplexity, ratio)
    return QualityReport(engine=engine.name, greedy_agreement=agreement, perplexity=perplexity,
                         perplexity_ratio=ratio, weight_footprint_gib=engine.weight_footprint_gib(),
                         reference_perplexity=reference.perplexity, num_prompts=len(pairs), num_tokens=num_tokens,
                         is_suspect=is_suspect, reason=reason)


def token_agreement(expected: list[int], generated: list[int]) -> float:
    """Position-wise equal fraction; a continuation that stops early (EOS) counts its missing positions
    as different, unless the reference stopped there too."""
    length = max(len(expected), len(generated))
    if length == 0:
        return 1.0
    return sum(a == b for a, b in zip(expected, generated)) / length


def judge(agreement: float | None, perplexity: float | None, ratio: float | None) -> tuple[bool, str]:
    """(is_suspect, reason): garbage is flagged from these numbers alone."""
    reasons = []
    if agreement is not None and agreement < MIN_AGREEMENT:
        reasons.append(f"greedy agreement {agreement:.2f} < {MIN_AGREEMENT}")
    if ratio is not None and ratio > MAX_PERPLEXITY_RATIO:
        reasons.append(f"perplexity {ratio:.2f}x bf16's > {MAX_PERPLEXITY_RATIO}x")
    if perplexity is not None and (not math.isfinite(perplexity) or perplexity > MAX_PERPLEXITY):
        reasons.append(f"perplexity {perplexity:.1f} > {MAX_PERPLEXITY:.0f} on plain English prose")
    if agreement is None and perplexity is None:
        return False, "n/a: the engine exposes neither token ids nor perplexity"
    return bool(reasons), "; ".join(reasons) or "close to bf16"


def _greedy_ids(engine: Scoring, prompt: str, num_tokens: int) -> list[int]:
    request = engine.stream(prompt, GenerationParams(max_new_tokens=num_tokens))
    for _ in request:
        pass
    return list(request.token_ids)[:num_tokens]
