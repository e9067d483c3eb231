"""streamer.rtc_internals' bounded data channels with two real aiortc peers on loopback: what they advertise and
what they refuse; and the check that every private part of aiortc used is where it was."""

import asyncio
import re
import subprocess

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from streamer import rtc_internals
from streamer.rtc_internals import WEBRTC_STRING, bound_messages, ignore_send_limit, send_raw, use_ice_addresses
from tests.conftest import ROOT

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
            ignore_send_limit(sender)  # a hostile sender ignores what was advertised
            out, _, messages, refused = await opened(sender, channels, "control")
            out.send("a" * LIMIT)
            assert await asyncio.wait_for(messages.get(), 10) == "a" * LIMIT
            # text that is not UTF-8 reaches the channel as bytes; aiortc alone raised and ended the connection
            await send_raw(out, WEBRTC_STRING, b"\xff{}")
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


def test_every_private_part_of_aiortc_used_is_there():
    rtc_internals.check()


def test_the_check_fails_loudly_when_a_part_is_gone(monkeypatch):
    monkeypatch.delattr(rtc_internals.RTCRtpReceiver, "_handle_rtp_packet")
    monkeypatch.setitem(rtc_internals.SUPPORTED, "aiortc", "9.9")
    with pytest.raises(
        RuntimeError, match=r"aiortc 1\.16\.\d+ is installed; .*written for 9\.9\.x.*_handle_rtp_packet"
    ):
        rtc_internals.check()


# what reaching into aiortc's or aioice's private parts looks like in a file
PRIVATE = re.compile(
    r"sctp\._|\._ssrc|_rtx_ssrc|_handle_rtp_packet|_remote_max_message_size|_data_channel|_addBufferedAmount"
    r"|aioice\.ice\.|rtcsctptransport|rtcrtpsender|RTCSctpTransport\._"
)


def test_nothing_but_the_adapter_reaches_into_aiortc():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    mine = {"streamer/rtc_internals.py", "tests/streamer/test_datachannel.py"}
    found = []
    for name in listed.stdout.split():
        if name in mine or not (ROOT / name).is_file():
            continue
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
