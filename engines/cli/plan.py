"""`python -m engines plan`: the device memory a set of engines will need, each vLLM engine's
gpu_memory_utilization share, and whether the set fits, before anything loads (engines/measure/memory_plan.py)."""
from __future__ import annotations

import json

from engines.cli.bench import split_engines
from engines.cli.common import add_model_argument
from engines.measure.memory_plan import plan, plan_for_device, to_markdown
from engines.protocol import EngineError


def add_arguments(parser) -> None:
    parser.add_argument("--engines", required=True,
                        help="comma-separated engine labels, options in brackets: bf16,vllm,vllm-fp8kv,"
                             "vllm[max_model_len=8192]")
    add_model_argument(parser, more=", dummy:<shape>, or a config path; catalogue models that are not embedded "
                                    "use their shape")
    parser.add_argument("--device-gib", type=float, default=None,
                        help="plan for a device of this many GiB (e.g. 139 for an H200) instead of this machine's")
    parser.add_argument("--free-gib", type=float, default=None,
                        help="with --device-gib: free memory on it now (default: all of it)")
    parser.add_argument("--cpu", action="store_true", help="with --device-gib: plan system RAM, not a GPU")
    parser.add_argument("--context", type=int, default=None,
                        help="KV context of the in-process engines, tokens (default: the model's maximum)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")


def run(args) -> int:
    labels = split_engines(args.engines)
    if args.device_gib is None:
        if args.free_gib is not None or args.cpu:
            raise EngineError("--free-gib and --cpu go with --device-gib (without it, this machine's memory is read)")
        memory_plan = plan_for_device(labels, args.model, context_tokens=args.context)
    else:
        free = args.device_gib if args.free_gib is None else args.free_gib
        memory_plan = plan(labels, args.model, args.device_gib, free, device="cpu" if args.cpu else "cuda",
                           context_tokens=args.context)
    print(json.dumps(memory_plan.to_dict(), indent=2) if args.json else to_markdown(memory_plan))
    return 0 if memory_plan.fits else 1

