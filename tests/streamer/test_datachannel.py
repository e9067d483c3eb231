"""streamer.datachannel with two real aiortc peers on loopback: what it advertises and what it refuses."""

import asyncio

from aiortc import RTCConfiguration, RTCPeerConnection, rtcsctptransport

from streamer.datachannel import bound_messages
from streamer.signaling import use_ice_addresses

LIMIT = 4096


async def pair() -> tuple[RTCPeerConnection, RTCPeerConnection, asyncio.Queue]:
    """A sender and a receiver connected on loopback; the receiver's channels arrive in the queue."""
    use_ice_addresses(["127.0.0.1"])
    bound_messages(LIMIT)
    sender, receiver = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
    channels: asyncio.Queue = asyncio.Queue(maxsize=8)
    receiver.on("datachannel", channels.put_nowait)
    sender.createDataChannel("warm-up")
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    assert f"a=max-message-size:{LIMIT}" in receiver.localDescription.sdp  # advertised
    await sender.setRemoteDescription(receiver.localDescription)
    await asyncio.wait_for(channels.get(), 10)
    return sender, receiver, channels


async def opened(sender: RTCPeerConnection, channels: asyncio.Queue, label: str) -> tuple:
    """A new channel from the sender, as both ends see it, with the receiver's messages and refusals."""
    out = sender.createDataChannel(label)
    got = await asyncio.wait_for(channels.get(), 10)
    messages: asyncio.Queue = asyncio.Queue(maxsize=16)
    refused: asyncio.Queue = asyncio.Queue(maxsize=16)
    got.on("message", messages.put_nowait)
    got.on("oversized", refused.put_nowait)
    return out, got, messages, refused


def test_a_message_at_the_limit_passes_one_over_is_refused_before_reassembly():
    async def main() -> None:
        sender, receiver, channels = await pair()
        try:
            sender.sctp._remote_max_message_size = None  # a hostile sender ignores what was advertised
            out, _, messages, refused = await opened(sender, channels, "control")
            out.send("a" * LIMIT)
            assert await asyncio.wait_for(messages.get(), 10) == "a" * LIMIT
            # text that is not UTF-8 reaches the channel as bytes; aiortc alone raised and ended the connection
            out.transport._data_channel_queue.append((out, rtcsctptransport.WEBRTC_STRING, b"\xff{}"))
            await out.transport._data_channel_flush()
            assert await asyncio.wait_for(messages.get(), 10) == b"\xff{}"
            out.send("still open")
            assert await asyncio.wait_for(messages.get(), 10) == "still open"

            other, _, other_messages, _ = await opened(sender, channels, "other")
            out.send("b" * 1_000_000)
            seen = await asyncio.wait_for(refused.get(), 10)
            assert LIMIT < seen <= LIMIT + 1200  # at the fragment that crossed the limit
            out.send("after")  # the stream stays refused: nothing more of it is ever delivered
            other.send("still here")  # another stream of the same association is untouched
            assert await asyncio.wait_for(other_messages.get(), 10) == "still here"
            await asyncio.sleep(0.5)
            assert messages.empty()
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(main(), 60))
