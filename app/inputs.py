"""Server-side checks of the values the page's events receive.

The page's events run with Gradio's preprocessing off (app/layout.py), so what a browser or an API
client sends reaches the callbacks as it was sent: any JSON value, of any type. Every callback checks
its inputs with these helpers before it loads or runs anything; each raises EngineError with a message
meant for the status line, naming the field, the bad value and what is accepted.
"""
from __future__ import annotations

import math
from typing import Iterable

from engines.protocol import EngineError

SHOWN_CHARS = 60


def shown(value) -> str:
    """A short repr of what arrived, for a message: long texts are cut, and the type is named."""
    text = repr(value)
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + "…"
    return f"{text} ({type(value).__name__})" if not isinstance(value, (int, float)) else text


def whole_number(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An int; a float with no fraction counts (Gradio numbers arrive as floats). None is 'empty'."""
    if value is None:
        raise EngineError(f"{name} is empty: type a whole number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(f"{name} must be a number, got {shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise EngineError(f"{name} must be a whole number, got {value}")
        value = int(value)
    _check_range(value, name, low, high)
    return value


def real_number(value, name: str, low: float | None = None, high: float | None = None,
                is_low_open: bool = False) -> float:
    """A float within [low, high] ((low, high] when is_low_open), so never NaN or infinite; give both
    bounds or neither. Without bounds only the type is checked, for values whose range the engines check
    (GenerationParams). None is 'empty'."""
    if value is None:
        raise EngineError(f"{name} is empty: type a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(f"{name} must be a number, got {shown(value)}")
    value = float(value)
    if low is None and high is None:
        return value
    is_too_low = value <= low if is_low_open else value < low
    if math.isnan(value) or is_too_low or value > high:
        bounds = f"more than {low:,g} and at most {high:,g}" if is_low_open else f"from {low:,g} to {high:,g}"
        raise EngineError(f"{name} must be {bounds}, got {value:g}")
    return value


def _check_range(value, name: str, low, high) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"from {low:,} to {high:,}" if low is not None and high is not None
                  else f"at least {low:,}" if low is not None else f"at most {high:,}")
        raise EngineError(f"{name} must be {bounds}, got {value:,}")


def flag(value, name: str) -> bool:
    """A checkbox: true or false, nothing else (an API client's "no" is not false)."""
    if not isinstance(value, bool):
        raise EngineError(f"{name} must be true or false, got {shown(value)}")
    return value


def one_of(value, name: str, choices: Iterable[str]) -> str:
    """A radio or dropdown value: exactly one of the choices."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise EngineError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def names(value, name: str) -> list[str]:
    """A checkbox group: a list of distinct texts (None, as an empty box may send, is no names).
    Whether each name is known is the caller's check, against its own list."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise EngineError(f"{name} must be a list of names, got {shown(value)}")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise EngineError(f"{name} must be names (text), got {shown(item)}")
        if item in seen:
            raise EngineError(f"{name}: '{item}' is picked twice")
        seen.append(item)
    return seen


def text_of(value, name: str, max_chars: int) -> str:
    """A free-text field that is not a prompt: text of at most max_chars (emptiness is the caller's check)."""
    if not isinstance(value, str):
        raise EngineError(f"{name} must be text, got {shown(value)}")
    if len(value) > max_chars:
        raise EngineError(f"{name} is {len(value):,} characters; the limit is {max_chars:,}")
    return value


def model_name(value, choices: Iterable[str]) -> str:
    """The model switcher's value: one of the models this page offers (never a path or hub id the list
    does not hold)."""
    return one_of(value, "model", choices)


def chat_histories(value) -> dict:
    """The per-session chat state: {model: {pane key: [{"role", "content"}, ...]}}; None is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EngineError(f"chat history must be a mapping, got {shown(value)}")
    for model, panes in value.items():
        if not isinstance(model, str) or not isinstance(panes, dict):
            raise EngineError(f"chat history: bad entry for {shown(model)}")
        for key, turns in panes.items():
            if not isinstance(turns, list) or not all(
                    isinstance(turn, dict) and set(turn) == {"role", "content"} and turn["role"] in
                    ("user", "assistant") and isinstance(turn["content"], str) for turn in turns):
                raise EngineError(f"chat history of {shown(key)} must be a list of user/assistant messages")
    return value
