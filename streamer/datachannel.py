"""Data channels bounded on receive: no message over the advertised size is ever reassembled.

aiortc advertises ``a=max-message-size:262144`` but does not enforce it when it receives: it keeps
every fragment of a message, however large, and rescans them all for each new one. A 10 MB control
message cost ~8,000 fragments and seconds of event loop (every other session's video stopped). With
:func:`bound_messages` installed, this process advertises ``max_bytes`` and, per SCTP stream:

* a message whose fragments pass ``max_bytes``, or a stream with more than ``MAX_PENDING_CHUNKS``
  fragments waiting, is refused at the fragment that crosses the line: the fragments held for the
  stream are dropped (and acknowledged, so the sender moves on), every later fragment on that stream
  too, and the channel emits ``"oversized"`` with the bytes seen; its owner answers and closes it;
* a DATA chunk more than ``MAX_TSN_AHEAD`` sequence numbers ahead of what was received is dropped
  unacknowledged (a real sender is never that far ahead; a hostile one would grow the gap set);
* a text message that is not UTF-8 reaches its channel as bytes (its owner answers "not text")
  instead of raising in aiortc, which ended the whole connection; a malformed channel-open or ack
  message is ignored (logged), for the same reason.

The cost of a fragment is then bounded by the limit, never by the size of the message. Other streams
and other sessions are untouched.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from aiortc import rtcsctptransport
from aiortc.rtcsctptransport import RTCSctpTransport

log = logging.getLogger(__name__)

MAX_PENDING_CHUNKS = 256  # fragments waiting for reassembly on one stream (a 16 KiB message is 15)
MAX_TSN_AHEAD = 4096  # how far ahead of the cumulative TSN a chunk may be (aiortc's window: ~900)

_original_receive = RTCSctpTransport._receive_data_chunk
_original_channel_receive = RTCSctpTransport._data_channel_receive
_limit: dict[str, int] = {}


def bound_messages(max_bytes: int) -> None:
    """Advertise and enforce ``max_bytes`` for every data channel of this process (idempotent)."""
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes={max_bytes!r} is not allowed: a whole number of bytes, at least 1024")
    _limit["bytes"] = max_bytes
    rtcsctptransport.LOCAL_MAX_MESSAGE_SIZE = max_bytes  # what the SDP answer advertises
    RTCSctpTransport._receive_data_chunk = _bounded_receive  # type: ignore[method-assign]
    RTCSctpTransport._data_channel_receive = _checked_channel_receive  # type: ignore[method-assign]


def _tsn_ahead(tsn: int, last: int) -> int:
    return (tsn - last) % (1 << 32)


async def _bounded_receive(self: RTCSctpTransport, chunk: Any) -> None:
    max_bytes = _limit["bytes"]
    refused: set[int] = self.__dict__.setdefault("_refused_streams", set())
    last = self._last_received_tsn
    if last is not None and min(_tsn_ahead(chunk.tsn, last), _tsn_ahead(last, chunk.tsn)) > MAX_TSN_AHEAD:
        return  # neither a duplicate nor within any real window: ignored, unacknowledged
    if chunk.stream_id in refused:
        self._sack_needed = True
        self._mark_received(chunk.tsn)  # acknowledged and dropped
        return
    stream = self._inbound_streams.get(chunk.stream_id)
    if stream is not None and stream.reassembly:
        same = [c for c in stream.reassembly if c.stream_seq == chunk.stream_seq and not _unordered(c)]
        message = len(chunk.user_data) + sum(len(c.user_data) for c in same)
        pending = len(stream.reassembly) + 1
        if (not _unordered(chunk) and message > max_bytes) or pending > MAX_PENDING_CHUNKS:
            _refuse(self, chunk, message, refused)
            return
    elif len(chunk.user_data) > max_bytes:
        _refuse(self, chunk, len(chunk.user_data), refused)
        return
    await _original_receive(self, chunk)


def _unordered(chunk: Any) -> bool:
    return bool(chunk.flags & rtcsctptransport.SCTP_DATA_UNORDERED)


def _refuse(self: RTCSctpTransport, chunk: Any, seen: int, refused: set[int]) -> None:
    self._sack_needed = True
    if self._mark_received(chunk.tsn):
        return
    refused.add(chunk.stream_id)
    stream = self._inbound_streams.get(chunk.stream_id)
    if stream is not None:
        self._advertised_rwnd += sum(len(c.user_data) for c in stream.reassembly)
        stream.reassembly.clear()
    channel = self._data_channels.get(chunk.stream_id)
    log.warning(
        "data channel %s: a message of at least %d bytes (limit %d) refused; the channel is closed",
        channel.label if channel is not None else chunk.stream_id,
        seen,
        _limit["bytes"],
    )
    if channel is not None:
        channel.emit("oversized", seen)


async def _checked_channel_receive(self: RTCSctpTransport, stream_id: int, pp_id: int, data: bytes) -> None:
    if pp_id == rtcsctptransport.WEBRTC_STRING:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            channel = self._data_channels.get(stream_id)
            if channel is not None:
                channel.emit("message", bytes(data))  # not text: answered as such
            return
    try:
        await _original_channel_receive(self, stream_id, pp_id, data)
    except (UnicodeDecodeError, AssertionError, struct.error) as e:  # a malformed DCEP open or ack
        log.warning(
            "data channel stream %d: malformed channel message ignored (%s: %s)", stream_id, type(e).__name__, e
        )
