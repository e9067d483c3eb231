"""A t2v aiortc client in a process of its own, for the efficiency rounds: what a viewer on another machine
costs the server is the network path, not its own decoder and event loop competing for the server's GIL.

    python -m bench.latency.client_process BASE_URL SECONDS WARM_FRAMES

Connects (loopback only, empty ICE server list), lets ``WARM_FRAMES`` frames through, counts frames for
``SECONDS`` (``efficiency.inline_client``, here in this process) and prints the window as one JSON line:
``{"fps": F, "frames": N, "seconds": S, "cpu_ms_per_frame": C}`` (C: this client process's CPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from bench.latency.common import run_async
from bench.latency.efficiency import inline_client
from bench.latency.served import Server
from streamer.rtc_internals import use_ice_addresses


def main(argv: list[str]) -> int:
    base, seconds, warm = argv[0], float(argv[1]), int(argv[2])
    use_ice_addresses(["127.0.0.1"])
    window = run_async(inline_client(Server(base, None), seconds, warm))
    print(json.dumps(dataclasses.asdict(window)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
