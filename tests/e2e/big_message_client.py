"""A hostile WebRTC client in its own process: connects (t2v), then sends one control message of SIZE
bytes, over the server's advertised a=max-message-size (aiortc's own send check lifted).

    python -m tests.e2e.big_message_client BASE_URL SIZE   (from the repository root)

Prints one line as it goes: ``sending``, the server's reply (JSON), the channel's state (``closing``:
the server reset it), then ``frames N``: the video received in the three seconds after that.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from streamer.rtc_internals import ignore_send_limit, use_ice_addresses
from tests.e2e.test_webrtc import connect


async def main(base: str, size: int) -> None:
    use_ice_addresses(["127.0.0.1"])
    client = await connect(base)
    await client.frames(3)
    ignore_send_limit(client.pc)  # a hostile sender ignores the advertised limit
    print("sending", flush=True)
    client.control.send('"' + "x" * (size - 2) + '"')
    reply = await asyncio.wait_for(client.replies.get(), 60)
    print(json.dumps(reply), flush=True)
    end = time.monotonic() + 5
    while client.control.readyState == "open" and time.monotonic() < end:
        await asyncio.sleep(0.05)
    print(f"channel {client.control.readyState}", flush=True)  # closing: the server reset the stream
    frames, end = 0, time.monotonic() + 3
    while time.monotonic() < end:
        await asyncio.wait_for(client.track.recv(), 10)
        frames += 1
    print(f"frames {frames}", flush=True)
    await client.pc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
