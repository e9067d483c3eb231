"""The client's side of the "control" data channel: find it, send anything on it, read what comes back.

aiortc checks a message against the size the server advertises before sending it, and only encodes
text as UTF-8: a hostile client does neither, so :func:`lift_send_limit` and :func:`send_raw` step
around both (through :mod:`streamer.rtc_internals`, where every reach into aiortc's private parts is).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection

from streamer.rtc_internals import data_channels, ignore_send_limit
from streamer.rtc_internals import send_raw as raw_send

WEBRTC_STRING, WEBRTC_BINARY = 51, 53  # SCTP payload protocol ids of text and binary messages (RFC 8831)
_flushes: set[asyncio.Future[None]] = set()  # raw sends in flight (a task needs an owner)
MAX_REPLIES = 64  # replies waiting to be read; more are dropped (a fuzzer reads each before it sends again)


async def control_channel(pc: RTCPeerConnection, bound: float = 10.0) -> RTCDataChannel:
    """The peer's open "control" channel (``bench.latency.served.new_peer`` made it), within ``bound`` s."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        for channel in data_channels(pc):
            if channel.label == "control" and channel.readyState == "open":
                return channel
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the control channel did not open within {bound:g} s")


def lift_send_limit(pc: RTCPeerConnection) -> None:
    """Let this client send messages of any size."""
    ignore_send_limit(pc)


def send_raw(pc: RTCPeerConnection, channel: RTCDataChannel, ppid: int, data: bytes) -> None:
    """Send ``data`` as one message with payload protocol ``ppid``, unchecked (text that is not UTF-8)."""
    flush = raw_send(channel, ppid, data)
    _flushes.add(flush)
    flush.add_done_callback(_flushes.discard)


@dataclass(frozen=True)
class Outcome:
    answer: str | None  # the reply's "type" ("ack", "error", or "other" for a reply that is not that JSON)
    closed: bool  # the channel closed before an answer came, or right after it
    seconds: float  # from the send to the answer or the close (the timeout when neither came)
    message: str = ""  # an error reply's message


class Replies:
    """What the server sends back on ``channel``, in order, and whether the channel closed."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=MAX_REPLIES)
        self.closed = asyncio.Event()

        @channel.on("message")
        def on_message(message: Any) -> None:
            if not self.queue.full():
                self.queue.put_nowait(message)

        @channel.on("close")
        def on_close() -> None:
            self.closed.set()

    @property
    def open(self) -> bool:
        """Neither closed nor closing (the server may have reset the channel's stream)."""
        return not self.closed.is_set() and self.channel.readyState == "open"

    def drain(self) -> int:
        """Drop replies that came late (after their message's timeout); how many."""
        n = 0
        while not self.queue.empty():
            self.queue.get_nowait()
            n += 1
        return n

    async def next(self, started: float, timeout: float, linger: float = 0.3) -> Outcome:
        """The next reply or the close, whichever comes first, within ``timeout`` s of ``started``; after a
        reply, up to ``linger`` s more to see whether the channel closes too (an over-limit message)."""
        got = asyncio.ensure_future(self.queue.get())
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            left = max(0.0, started + timeout - time.monotonic())
            await asyncio.wait({got, closing}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            seconds = round(time.monotonic() - started, 4)
            if got.done():
                if not closing.done():
                    await asyncio.wait({closing}, timeout=linger)
                kind, said = reply(got.result())
                return Outcome(kind, not self.open, seconds, said)
            return Outcome(None, not self.open, seconds)
        finally:
            for f in (got, closing):
                f.cancel()


def reply(message: Any) -> tuple[str, str]:
    """A reply's "type" if it is ``{"type": "ack"|"error", ...}``, else "other"; and its message, if any."""
    try:
        body = json.loads(message) if isinstance(message, str) else None
    except ValueError:
        body = None
    kind = body.get("type") if isinstance(body, dict) else None
    said = body.get("message") if isinstance(body, dict) else None
    return (kind if kind in ("ack", "error") else "other"), said if isinstance(said, str) else ""
