"""`python -m engines kv`: KV-cache bytes per token and per context, and how many tokens fit in a memory."""
from __future__ import annotations

import json
import math

from engines.measure.kv_calc import calculate, to_markdown
from engines.models.shape import available_configs
from engines.models.sources import load_shape
from engines.protocol import EngineError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help=f"a shipped shape ({', '.join(available_configs())}), a config.json or checkpoint "
                             "folder, or a model name such as gemma-3-270m")
    parser.add_argument("--vram-gib", type=float, default=80.0, help="memory to fill with KV, GiB (default 80)")
    parser.add_argument("--context", type=int, default=8192, help="context length to price, tokens (default 8192)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")


def run(args) -> int:
    if not (math.isfinite(args.vram_gib) and args.vram_gib > 0):
        raise EngineError(f"--vram-gib must be positive and finite, got {args.vram_gib}")
    if args.context <= 0:
        raise EngineError(f"--context must be a positive number of tokens, got {args.context}")
    report = calculate(load_shape(args.config), vram_gib=args.vram_gib, context_tokens=args.context)
    print(json.dumps(report.to_dict(), indent=2) if args.json else to_markdown(report))
    return 0
