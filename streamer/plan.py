"""The memory plan at the command line: printed before any weight is loaded, a plan that does not fit refused.

``--memory-plan`` prints it and exits (0 when it fits, 2 when it does not); ``--memory-limit GiB`` replaces
every device's capacity (free GPU memory, the host's MemAvailable). The offload flags are the config's
``text_encoder_device`` and ``offload`` (pipeline/memory.py states what each costs).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import OFFLOADS, SystemConfig
from pipeline.memory import check_limit, plan_memory

EXIT_DOES_NOT_FIT = 2  # bad input: the config asks for more memory than there is


def add_memory_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-plan", action="store_true", help="print what each device will hold, and exit (2: it does not fit)"
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GiB",
        help="each device's memory for the plan (default: free GPU memory, the host's available RAM)",
    )
    parser.add_argument(
        "--text-encoder-device", default=None, help="run the text encoder on 'cpu' (default: the DiT's device)"
    )
    parser.add_argument(
        "--offload", default=None, choices=OFFLOADS, help="keep off the GPU: text (built); swap, layers (not yet)"
    )


def memory_gate(config: SystemConfig, args: argparse.Namespace, stages: int, split: list[int] | None) -> int | None:
    """Print the plan (stdout with --memory-plan, else stderr); the exit status when the command ends here:
    --memory-plan, or a plan that does not fit. ValueError for a bad --memory-limit."""
    check_limit(args.memory_limit)
    plan = plan_memory(config, stages, split, args.memory_limit)
    print(plan.table(), file=sys.stdout if args.memory_plan else sys.stderr, flush=True)
    if plan.short():
        print(f"streamer: error: {plan.refusal()}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0 if args.memory_plan else None
