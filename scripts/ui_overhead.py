"""Does the playground slow down what it measures? Decode tok/s of one engine, in one process, run
standalone (iterating engine.stream) and inside the app's streaming path in fair mode (the run
callback Gradio calls: worker thread, merge queue, throttled page updates, live plotly charts),
alternating A/B so drift and other load hit both. Prints a markdown table and writes JSON.

    .venv/bin/python scripts/ui_overhead.py --engine bf16 --max-new-tokens 64 --repeats 3 --out out/ui
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.callbacks import AppConfig, Playground  # noqa: E402
from app.layout import build_app  # noqa: E402
from app.session import EnginePool, build_choices  # noqa: E402
from engines.protocol import EngineError, GenerationParams  # noqa: E402
from engines.registry import create_engine  # noqa: E402

TARGET_RATIO = 0.97


def standalone_tok_s(engine, prompt: str, max_new_tokens: int) -> float:
    for _ in engine.stream(prompt, GenerationParams(max_new_tokens=max_new_tokens)):
        pass
    return engine.stats().decode_tok_s


def app_tok_s(playground: Playground, key: str, prompt: str, max_new_tokens: int) -> float:
    record = None
    for output in playground.run(prompt, max_new_tokens, 0.0, 0, "fair", [key]):
        record = output.get(playground.page.record, record)
    pane = record.panes[0]
    if pane.status != "done":
        raise EngineError(f"the app run ended as {pane.status}: {pane.message}")
    return pane.stats.decode_tok_s


def measure(engine, key: str, prompt: str, max_new_tokens: int, repeats: int, refresh_hz: float = 5.0) -> dict:
    """Warm up once each way, then `repeats` alternating pairs; the ratio is of the medians."""
    pool = EnginePool(None, build_choices())
    pool.adopt(key, engine)
    playground = Playground(AppConfig(refresh_hz=refresh_hz), pool)
    build_app(playground)  # the page the callbacks write to; nothing is served
    standalone_tok_s(engine, prompt, 4)
    app_tok_s(playground, key, prompt, 4)
    standalone, in_app = [], []
    for index in range(repeats):
        # Alternate which goes first, so a slow phase of the machine does not always hit the same side.
        pair = [("standalone", lambda: standalone_tok_s(engine, prompt, max_new_tokens)),
                ("app", lambda: app_tok_s(playground, key, prompt, max_new_tokens))]
        for name, run in pair if index % 2 == 0 else reversed(pair):
            (standalone if name == "standalone" else in_app).append(run())
    standalone_median, app_median = statistics.median(standalone), statistics.median(in_app)
    return {"engine": key, "max_new_tokens": max_new_tokens, "repeats": repeats, "refresh_hz": refresh_hz,
            "standalone_tok_s": standalone, "app_tok_s": in_app,
            "standalone_median_tok_s": standalone_median, "app_median_tok_s": app_median,
            "ratio": app_median / standalone_median, "target_ratio": TARGET_RATIO}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="bf16", help="registry engine to measure (default bf16)")
    parser.add_argument("--model", default=None, help="model name, hub id or path (default: the embedded model)")
    parser.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="standalone/app pairs (default 3)")
    parser.add_argument("--refresh-hz", type=float, default=5.0, help="the app's page updates per second")
    parser.add_argument("--out", default=os.environ.get("OUT", "out/ui_overhead"),
                        help="folder for ui_overhead.json (default $OUT or out/ui_overhead)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.repeats < 1:  # the medians need at least one pair
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not 0.5 <= args.refresh_hz <= 20:  # the app's own bounds (python -m app --refresh-hz)
        parser.error(f"--refresh-hz must be 0.5-20, got {args.refresh_hz}")
    try:
        engine = create_engine(args.engine, model=args.model)
        engine.load()
        result = measure(engine, args.engine, args.prompt, args.max_new_tokens, args.repeats, args.refresh_hz)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| engine | tokens | standalone tok/s (median) | in app, fair mode tok/s (median) | ratio | target |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.engine} | {args.max_new_tokens} | {result['standalone_median_tok_s']:.2f} | "
          f"{result['app_median_tok_s']:.2f} | {result['ratio']:.3f} | >= {TARGET_RATIO} |")
    print(f"runs: standalone {[round(v, 2) for v in result['standalone_tok_s']]}, "
          f"app {[round(v, 2) for v in result['app_tok_s']]}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ui_overhead.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
