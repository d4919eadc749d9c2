"""Arguments and helpers shared by the subcommands that run engines."""
from __future__ import annotations

import sys

from engines.protocol import EngineError, GenerationParams
from engines.registry import parse_option_value
from engines.variants.transformers.attention import ATTENTION_IMPLEMENTATIONS


def add_model_argument(parser, default: str = "PLAYGROUND_MODEL or the embedded Gemma-3-270M", more: str = "") -> None:
    """The one --model flag of every command (and of `python -m app`): what a model name can be."""
    parser.add_argument("--model", default=None, help=f"short name from assets/models.toml, hub id or local path"
                                                      f"{more} (default: {default})")


def add_model_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--attn", dest="attn_implementation", default=None,
                        choices=ATTENTION_IMPLEMENTATIONS, help="transformers attention (default sdpa)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="transformers weight dtype (default bfloat16)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="engine-specific option, repeatable (e.g. kv_cache_dtype=fp8)")


def add_chat_arguments(parser) -> None:
    parser.add_argument("--chat", action="store_true",
                        help="chat mode: apply the model's chat template (with add_generation_prompt) to the prompt "
                             "as a user message; every local engine gets the same ids, remote ones the same messages")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="system message in chat mode (default: the template's own, if it has one)")


def as_prompt(args, text: str):
    """The text itself, or with --chat the model's chat template applied to it once (ChatPrompt)."""
    if not getattr(args, "chat", False):
        if getattr(args, "system", None):
            raise EngineError("--system needs --chat")
        return text
    from engines.models.chat import chat_prompt_for
    from engines.models.sources import resolve_model
    return chat_prompt_for(resolve_model(args.model, progress_to_stderr), text, system=args.system)


def add_generation_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def engine_options(args) -> dict:
    options = {key: getattr(args, key) for key in ("attn_implementation", "dtype") if getattr(args, key, None)}
    for item in args.option:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise EngineError(f"--option wants KEY=VALUE, got '{item}'")
        options[key.strip()] = parse_option_value(value.strip())
    return options


def generation_params(args) -> GenerationParams:
    return GenerationParams(args.max_new_tokens, args.temperature, args.top_p, args.seed).validate()


def progress_to_stderr(message: str) -> None:
    print(f"[progress] {message}", file=sys.stderr, flush=True)
