"""Chat mode: a model's own chat template applied once, with add_generation_prompt, into the token ids
that every local engine is given (transformers, bitsandbytes, GPTQ, spec, vLLM as a token-id prompt,
llama.cpp), plus the ids that end the assistant's turn.

- The rendered text is tokenized with add_special_tokens=False: the template owns BOS. SmolLM2's opens
  with `<|im_start|>` (its BOS token, id 1) and the GGUF sets add_bos_token false, so adding one would
  double it; Gemma-it and Llama 3.1 templates write `{{ bos_token }}` themselves; Qwen uses none.
- Stop ids: the end-of-turn token the template writes after an assistant message (`<|im_end|>` for
  SmolLM2 and Qwen, `<|eot_id|>` for Llama 3.1, `<end_of_turn>` for Gemma-it), then the generation
  config's and the tokenizer's EOS.
- A model without a chat template (the embedded Gemma-3-270M base) raises EngineError; there is no
  silent fallback to a made-up format.

Only imports transformers lazily (chat_prompt_for); the functions take any Hugging Face tokenizer.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

from engines.models.catalog import ModelSource
from engines.protocol import ChatPrompt, EngineError

ROLES = ("system", "user", "assistant")
# The probe's assistant text: what follows it in the rendered template is the end of a turn.
_PROBE = "\u2063probe-7c1e\u2063"


def chat_messages(prompt: str, system: str | None = None,
                  history: Sequence[Mapping[str, str]] = ()) -> list[dict[str, str]]:
    """[system?] + earlier turns + the new user message, as {"role", "content"} dicts."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": turn["role"], "content": turn["content"]} for turn in history]
    messages.append({"role": "user", "content": prompt})
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _model_label(tokenizer, model_name: str | None) -> str:
    return model_name or str(getattr(tokenizer, "name_or_path", "") or "this model")


def _checked_messages(messages: str | Sequence[Mapping[str, str]], system: str | None) -> list[dict[str, str]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) - {"role", "content"} or "role" not in message:
            raise EngineError(f"chat message {index} must be a {{'role', 'content'}} mapping, not {message!r}")
        role, content = message["role"], message.get("content", "")
        if role not in ROLES:
            raise EngineError(f"chat message {index} has role '{role}'; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise EngineError(f"chat message {index} ({role}) must have text content")
        if role == "system" and index > 0:
            raise EngineError("a system message can only come first")
        checked.append({"role": role, "content": content})
    if system:
        if checked and checked[0]["role"] == "system":
            raise EngineError("give the system message either as `system` or as the first message, not both")
        checked.insert(0, {"role": "system", "content": system})
    if not checked or checked[-1]["role"] != "user":
        raise EngineError("a chat prompt must end with a user message (the assistant answers it)")
    return checked


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, label: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja2's TemplateError (e.g. "roles must alternate") or a raise_exception()
        raise EngineError(f"the chat template of {label} refused these messages: {error}") from None


def _generation_eos_ids(generation_config) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token_id) for token_id in eos]


def template_end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the template writes right after an assistant message's text (empty when it
    writes none, or the template cannot render the probe conversation)."""
    if not has_chat_template(tokenizer):
        return []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    except Exception:
        return []
    if _PROBE not in text:
        return []
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(token, "special", False)}
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return [token_id]
        if tokenizer.decode([token_id]).strip():  # ordinary text before any special token: none marks the end
            return []
    return []


def end_of_turn_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Ids that end the assistant's turn: the template's end-of-turn token, then the generation config's
    EOS ids, then the tokenizer's EOS; each once, in that order."""
    ids = template_end_of_turn_ids(tokenizer) + _generation_eos_ids(generation_config)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def build_chat_ids(tokenizer, messages: str | Sequence[Mapping[str, str]], *, system: str | None = None,
                   generation_config=None, model_name: str | None = None) -> ChatPrompt:
    """Apply the model's chat template once, with add_generation_prompt=True, and tokenize the result.

    `messages`: a user prompt, or {"role", "content"} messages (system first if any, ending with a user
    message); `system` adds a system message in front. `generation_config` (a transformers
    GenerationConfig, or anything with eos_token_id) adds its EOS ids to the stop ids. Raises
    EngineError for a tokenizer without a chat template, naming `model_name`."""
    label = _model_label(tokenizer, model_name)
    if not has_chat_template(tokenizer):
        raise EngineError(f"model '{label}' has no chat template, so chat mode cannot prompt it; "
                          "use completion mode, or pick an instruct model (e.g. smollm2-135m-instruct)")
    checked = _checked_messages(messages, system)
    text = _render(tokenizer, checked, True, label)
    token_ids = tuple(int(token_id) for token_id in tokenizer(text, add_special_tokens=False)["input_ids"])
    stop_ids = end_of_turn_ids(tokenizer, generation_config)
    stop_strings = tuple(token for token in tokenizer.convert_ids_to_tokens(list(stop_ids)) if token)
    return ChatPrompt(tuple(checked), text, token_ids, stop_ids, stop_strings)


@functools.lru_cache(maxsize=8)
def _tokenizer_and_generation_config(path: str):
    from transformers import AutoTokenizer, GenerationConfig
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    return tokenizer, generation_config


def chat_prompt_for(source: ModelSource | str | Path, messages: str | Sequence[Mapping[str, str]], *,
                    system: str | None = None) -> ChatPrompt:
    """build_chat_ids with the tokenizer and generation config of a provisioned checkpoint (a ModelSource
    or its folder): for engines that have no Hugging Face tokenizer of their own, such as llama.cpp, so
    that every local engine gets the same ids."""
    path = source.path if isinstance(source, ModelSource) else Path(source)
    name = source.name if isinstance(source, ModelSource) else str(path)
    tokenizer, generation_config = _tokenizer_and_generation_config(str(path))
    return build_chat_ids(tokenizer, messages, system=system, generation_config=generation_config, model_name=name)
