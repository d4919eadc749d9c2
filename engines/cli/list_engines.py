"""`python -m engines list`: every registered variant, whether it runs here, and why not."""
from __future__ import annotations

import json

from engines.registry import list_engines


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON array instead of a table")


def run(args) -> int:
    rows = list_engines()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        status = "available" if row["is_available"] else f"unavailable: {row['reason']}"
        print(f"{row['name']:<{width}}  {row['label']:<28}  {status}")
    return 0
