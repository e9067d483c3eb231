"""A WebRTC client in its own process (t2v): connects, prints its session id, then just receives.

The vanish test kills it with SIGKILL: no goodbye reaches the server.
"""

from __future__ import annotations

import asyncio
import sys

from bench.latency.served import open_client
from streamer.rtc_internals import use_ice_addresses


async def main(base: str) -> None:
    use_ice_addresses(["127.0.0.1"])
    client = await open_client(base, "t2v", None)
    for _ in range(3):
        await asyncio.wait_for(client.track.recv(), 30)
    print(client.session_id, flush=True)
    while True:
        await client.track.recv()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
