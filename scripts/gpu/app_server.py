"""`python -m app`, unchanged, plus per-engine options and three measuring endpoints (the driver's app step).

What scripts/gpu/driver.py's `app` step needs to measure the page from outside:

- per-engine options for the picker's entries (`--engine-options '{"vllm": {"gpu_memory_utilization": 0.12}}'`):
  the page has no option path, and several vLLM engines on one GPU need their memory shares;
- three extra API endpoints, beside the page's own (/load, /run, /unload, /export ...):
  /standalone_decode(key, prompt, max_new_tokens): the loaded engine's stream() iterated directly in this
  process, no app path (P1's "standalone, same process"); returns the engine's stats as JSON;
  /token_stamps(): the engine-side stamp of every streamed event since the last call, as JSON
  [[key, perf_counter_s, cumulative_chars, num_tokens], ...] (P3); perf_counter is CLOCK_MONOTONIC on Linux,
  the same clock the client reads in another process on the same machine;
  /unload_engine(key): unload one engine (vLLM unload memory, measured by the driver with NVML).

    python3 scripts/gpu/app_server.py --engine-options JSON -- --port 7861 --max-panes 12
Everything after `--` goes to `python -m app` as it is (`-- --help` shows its options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STAMPS: list[list] = []
STAMPS_LOCK = threading.Lock()


def with_options(build_choices, extra: dict):
    def build():
        return [
            dataclasses.replace(choice, options={**choice.options, **extra[choice.key]})
            if choice.key in extra
            else choice
            for choice in build_choices()
        ]

    return build


class StampedRequest:
    """An engine's Request (engines.protocol) whose every event also records the engine's own stamp of its
    latest tokens; everything else (token_ids, is_waiting, close, stats) is the request's own."""

    def __init__(self, key: str, engine, request):
        self.key, self.engine, self.request = key, engine, request
        self.num_chars = 0

    def __iter__(self) -> "StampedRequest":
        return self

    def __next__(self):
        event = next(self.request)
        self.num_chars += len(event.text)
        chunks = getattr(getattr(self.engine, "recorder", None), "_chunk_times", None)
        stamp_s = chunks[-1][0] if chunks else time.perf_counter()
        with STAMPS_LOCK:
            STAMPS.append([self.key, stamp_s, self.num_chars, event.num_tokens])
        return event

    def __getattr__(self, name: str):
        return getattr(self.request, name)


def stamped(key: str, engine):
    """Wrap the engine's stream() so that its requests stamp their events."""
    inner = engine.stream

    def stream(prompt, params, cancel=None):
        return StampedRequest(key, engine, inner(prompt, params, cancel=cancel))

    engine.stream = stream
    engine._stamped = True
    return engine


def install(extra_options: dict) -> None:
    import gradio as gr

    import app.layout as layout
    import app.session as session

    session.build_choices = with_options(session.build_choices, extra_options)
    original_engine = session.EnginePool.engine

    def engine(self, key):
        found = original_engine(self, key)
        return found if getattr(found, "_stamped", False) else stamped(key, found)

    session.EnginePool.engine = engine

    original_build = layout.build_app

    def build_app(playground):
        demo = original_build(playground)
        pool = playground.pool

        def standalone_decode(key: str, prompt: str, max_new_tokens: int) -> str:
            from engines.protocol import GenerationParams

            found = pool.engine(key)
            # The class's own stream(), not the stamping wrapper: the engine as a script would call it.
            request = type(found).stream(found, prompt, GenerationParams(max_new_tokens=int(max_new_tokens)))
            for _ in request:
                pass
            return json.dumps(request.stats().to_dict())

        def token_stamps() -> str:
            with STAMPS_LOCK:
                taken = list(STAMPS)
                STAMPS.clear()
            return json.dumps(taken)

        def unload_engine(key: str) -> str:
            return json.dumps({"key": key, "was_loaded": pool.unload(key), "loaded": pool.loaded_keys()})

        with demo:
            gr.api(standalone_decode, api_name="standalone_decode", concurrency_id=layout.ENGINE_QUEUE)
            gr.api(token_stamps, api_name="token_stamps", queue=False)
            gr.api(unload_engine, api_name="unload_engine", concurrency_id=layout.ENGINE_QUEUE)
        return demo

    layout.build_app = build_app


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--engine-options", default="{}", help="JSON: pane key -> engine options")
    args = parser.parse_args(own)
    install(json.loads(args.engine_options))
    from app.__main__ import main as app_main

    return app_main(app_args)


if __name__ == "__main__":
    sys.exit(main())
