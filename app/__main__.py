"""`python -m app`: serve the playground page (http://127.0.0.1:7860 unless told otherwise)."""
from __future__ import annotations

import argparse
import os
import sys

from engines.protocol import EngineError

DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)),
                        help=f"port (default $PORT or {DEFAULT_PORT})")
    parser.add_argument("--model", default=None,
                        help="short name from assets/models.toml, hub id or local path "
                             "(default: PLAYGROUND_MODEL or the embedded Gemma-3-270M)")
    parser.add_argument("--max-panes", type=int, default=6, help="most engines shown side by side (default 6)")
    parser.add_argument("--refresh-hz", type=float, default=5.0,
                        help="page updates per second while streaming (default 5; 4-10 is sensible)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait in Gradio's queue before visitors get 'queue full' (default 16)")
    return parser


def create(config):
    """Build the Blocks and its launch options for one AppConfig; every handle lives in the result."""
    from app.callbacks import Playground
    from app.layout import build_app, launch_options
    from app.session import EnginePool, build_choices
    playground = Playground(config, EnginePool(config.model, build_choices()))
    return build_app(playground), launch_options(playground)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.callbacks import AppConfig
    if not 1 <= args.max_panes <= 12 or not 0.5 <= args.refresh_hz <= 20 or args.max_queue < 1:
        print("error: --max-panes must be 1-12, --refresh-hz 0.5-20 and --max-queue at least 1", file=sys.stderr)
        return 2
    config = AppConfig(model=args.model, host=args.host, port=args.port, max_panes=args.max_panes,
                       refresh_hz=args.refresh_hz, max_queue=args.max_queue)
    try:
        demo, options = create(config)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.launch(**options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
