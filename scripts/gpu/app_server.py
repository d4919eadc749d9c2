"""`python -m app`, unchanged, plus what the GPU driver (scripts/gpu/h200.py) needs to measure it from outside:

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
Everything after `--` goes to `python -m app` as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

# scripts/gpu/ holds a vllm.py: this folder must leave sys.path, or `import vllm` would import that script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parents[1]))

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


def stamped(key: str, engine):
    """Wrap the engine's stream() so each event records the engine's own stamp of its latest tokens."""
    inner = engine.stream

    def stream(prompt, params):
        chars = 0
        for event in inner(prompt, params):
            chars += len(event.text)
            recorder = getattr(engine, "recorder", None)
            chunks = getattr(recorder, "_chunk_times", None)
            stamp = chunks[-1][0] if chunks else time.perf_counter()
            with STAMPS_LOCK:
                STAMPS.append([key, stamp, chars, event.num_tokens])
            yield event

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
            for _ in type(found).stream(found, prompt, GenerationParams(max_new_tokens=int(max_new_tokens))):
                pass
            return json.dumps(found.stats().to_dict())

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-options", default="{}", help="JSON: pane key -> engine options")
    args = parser.parse_args(own)
    install(json.loads(args.engine_options))
    from app.__main__ import main as app_main

    return app_main(app_args)


if __name__ == "__main__":
    sys.exit(main())
