"""Hugging Face Spaces entry point (the README front matter's app_file).

Spaces runs `python app/space.py` from the repository root, so the root is put on sys.path first;
the page then binds to 0.0.0.0 on the port Spaces gives (7860), because Spaces proxies to it. On a
ZeroGPU Space the generation events run under spaces.GPU (app/hosting.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.__main__ import resolve_port, serve  # noqa: E402
from app.callbacks import AppConfig  # noqa: E402


def main() -> int:
    argparse.ArgumentParser(description="Serve the playground as a Hugging Face Space: 0.0.0.0, port $PORT "
                                        "(7860), model $PLAYGROUND_MODEL. Locally, use `python -m app`.").parse_args()
    try:
        port = resolve_port(None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve(AppConfig(model=os.environ.get("PLAYGROUND_MODEL"), host="0.0.0.0", port=port))


if __name__ == "__main__":
    sys.exit(main())
