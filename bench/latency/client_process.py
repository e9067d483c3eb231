"""A t2v aiortc client in a process of its own, for the efficiency rounds: what a viewer on another machine
costs the server is the network path, not its own decoder and event loop competing for the server's GIL.

    python -m bench.latency.client_process BASE_URL SECONDS WARM_FRAMES

Connects (loopback only, empty ICE server list), lets ``WARM_FRAMES`` frames through, counts frames for
``SECONDS`` and prints one JSON line: ``{"frames": N, "seconds": S, "fps": F}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.latency.common import run_async
from bench.latency.served import open_client
from streamer.signaling import use_ice_addresses


async def count_frames(base: str, seconds: float, warm: int) -> dict[str, float]:
    client = await asyncio.wait_for(open_client(base, "t2v", None), 30)
    try:
        for _ in range(warm):
            await asyncio.wait_for(client.track.recv(), 60)
        t0, frames = time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            await asyncio.wait_for(client.track.recv(), 60)
            frames += 1
        elapsed = time.monotonic() - t0
        return {"frames": frames, "seconds": round(elapsed, 3), "fps": round(frames / elapsed, 3)}
    finally:
        await client.pc.close()


def main(argv: list[str]) -> int:
    base, seconds, warm = argv[0], float(argv[1]), int(argv[2])
    use_ice_addresses(["127.0.0.1"])
    print(json.dumps(run_async(count_frames(base, seconds, warm))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
