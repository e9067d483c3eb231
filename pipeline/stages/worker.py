"""A stage process other than stage 0: ``python -m pipeline.stages.worker --rank R --world S --addr A --port P``.

``--stages N`` spawns these on one machine; under ``torchrun`` the ``streamer`` command itself runs
this for every rank but 0 (:func:`pipeline.stages.launch.run_worker`).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.stages.launch import run_worker
from pipeline.stages.transport import Ring, stage_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (this rank's GPU)")
    args = parser.parse_args(argv)
    ring = Ring(args.rank, args.world, stage_device(args.device, args.rank), args.addr, args.port)
    return run_worker(ring)


if __name__ == "__main__":
    sys.exit(main())
