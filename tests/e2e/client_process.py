"""A WebRTC client in its own process (t2v): connects, prints its session id, then just receives.

The vanish test kills it with SIGKILL: no goodbye reaches the server.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.signaling import use_ice_addresses


async def main(base: str) -> None:
    use_ice_addresses(["127.0.0.1"])
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: got.done() or got.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with http.post(base + "/api/offer", json=offer) as r:
            body = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    track = await asyncio.wait_for(got, 10)
    for _ in range(3):
        await asyncio.wait_for(track.recv(), 30)
    print(body["session_id"], flush=True)
    while True:
        await track.recv()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
