"""Every use of aiortc's and aioice's private parts, in this one module, for the versions it was read from.

Nothing else in the project touches an underscore name of theirs or replaces one of their functions
(tests/streamer/test_datachannel.py scans for it); :func:`check` finds every one of them in the installed
versions and fails loudly, naming what is gone, when an upgrade moves it (the versions are pinned in
pyproject.toml: :data:`SUPPORTED`). What is here:

- the server's: data channels bounded on receive (:func:`bound_messages`), the host addresses ICE gathers
  (:func:`use_ice_addresses`) and its consent interval (:func:`use_consent_interval`);
- the benchmarks' and tests' clients: a sender's SSRCs and RTP timestamp origin, a receiver's packet
  arrivals, a hostile sender that ignores the advertised message size or sends raw bytes, one that never
  nominates a candidate pair.

Data channels bounded on receive: no message over the advertised size is ever reassembled.

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

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import aioice.ice
import aiortc.rtcrtpsender
from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, rtcsctptransport
from aiortc.rtcsctptransport import RTCSctpTransport

WEBRTC_STRING = rtcsctptransport.WEBRTC_STRING  # the payload protocol of a text message

# the versions whose private parts this module was written against (major.minor), as pyproject.toml pins them
SUPPORTED = {"aiortc": "1.16", "aioice": "0.13"}

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


# ---- ICE (aioice) ---------------------------------------------------------------------------------


def use_ice_addresses(addresses: list[str]) -> None:
    """Make every peer connection of this process gather host candidates on ``addresses`` only.

    aiortc has no option for it; aioice looks the addresses up through this module function."""
    chosen = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


def use_consent_interval(seconds: int) -> None:
    """How often ICE checks that the peer still consents (RFC 7675); after 6 failed checks in a row
    the connection fails and the server closes the session, so a vanished client is noticed after
    4.8 to 7.2 times ``seconds`` (the server's default, 1 s: within 15 s with room to spare).
    aioice's 5 s keeps a vanished client's session (and its engine memory) for ~30 s."""
    if not isinstance(seconds, int) or not 1 <= seconds <= 30:
        raise ValueError(f"consent interval {seconds!r} s is not allowed: a whole number of seconds, 1 to 30")
    aioice.ice.CONSENT_INTERVAL = seconds


@contextlib.contextmanager
def never_nominating() -> Iterator[None]:
    """While inside: this process's ICE checks carry no USE-CANDIDATE, so the controlled side (a server)
    never gets a nominated pair while this side believes it has one (a client that never connects)."""
    build = aioice.ice.Connection.build_request

    def build_request(self: aioice.ice.Connection, pair: Any, nominate: bool) -> Any:
        return build(self, pair, nominate=False)

    aioice.ice.Connection.build_request = build_request  # type: ignore[method-assign]
    try:
        yield
    finally:
        aioice.ice.Connection.build_request = build  # type: ignore[method-assign]


# ---- RTP ------------------------------------------------------------------------------------------


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    """A sender's SSRC and its retransmission SSRC."""
    return sender._ssrc, sender._rtx_ssrc


@contextlib.contextmanager
def recorded_rtp_origins() -> Iterator[list[int]]:
    """Record aiortc's random RTP numbers (a sender's SSRCs and its timestamp origin) while inside.

    aiortc sends a frame of pts p with RTP timestamp origin + p; the origin is drawn in the sender's RTP
    loop and kept nowhere else, so it is recorded here to match a browser's frames to the server's."""
    module = aiortc.rtcrtpsender
    original = module.random32
    values: list[int] = []

    def recording() -> int:
        value = original()
        if len(values) < 64:
            values.append(value)
        return value

    module.random32 = recording
    try:
        yield values
    finally:
        module.random32 = original


def on_rtp_packet(receiver: RTCRtpReceiver, seen: Callable[[Any], None]) -> None:
    """Call ``seen(packet)`` for every RTP packet ``receiver`` gets, as it arrives (before its jitter buffer)."""
    original = receiver._handle_rtp_packet

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        seen(packet)
        await original(packet, arrival_time_ms=arrival_time_ms)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]


# ---- data channels, as a hostile sender uses them -------------------------------------------------


def data_channels(pc: RTCPeerConnection) -> list[RTCDataChannel]:
    """The peer connection's data channels (the ones the other side opened too)."""
    sctp = pc.sctp
    return [] if sctp is None else list(sctp._data_channels.values())


def ignore_send_limit(pc: RTCPeerConnection) -> None:
    """Let this side send messages of any size, whatever the other side advertised."""
    assert pc.sctp is not None
    pc.sctp._remote_max_message_size = 0  # 0: no limit, as aiortc reads it


def send_raw(channel: RTCDataChannel, ppid: int, data: bytes) -> asyncio.Future[None]:
    """Send ``data`` as one message with payload protocol ``ppid`` (text that is not UTF-8, say), unchecked;
    the flush, to await or to keep."""
    sctp = channel.transport
    channel._addBufferedAmount(len(data))
    sctp._data_channel_queue.append((channel, ppid, data))
    return asyncio.ensure_future(sctp._data_channel_flush())


# ---- the check ------------------------------------------------------------------------------------


def check() -> None:
    """Every private part used here is there, of the kind used, in versions of :data:`SUPPORTED`; else a
    RuntimeError naming each that is not (run by the tests: an upgrade that moves one fails loudly)."""
    problems = []
    for package, wanted in SUPPORTED.items():
        installed = version(package)
        if not (installed == wanted or installed.startswith(wanted + ".")):
            problems.append(f"{package} {installed} is installed; this module was written for {wanted}.x")
    callables = {
        "RTCSctpTransport._receive_data_chunk": RTCSctpTransport.__dict__.get("_receive_data_chunk"),
        "RTCSctpTransport._data_channel_receive": RTCSctpTransport.__dict__.get("_data_channel_receive"),
        "RTCSctpTransport._mark_received": getattr(RTCSctpTransport, "_mark_received", None),
        "RTCSctpTransport._data_channel_flush": getattr(RTCSctpTransport, "_data_channel_flush", None),
        "RTCDataChannel._addBufferedAmount": getattr(RTCDataChannel, "_addBufferedAmount", None),
        "RTCRtpReceiver._handle_rtp_packet": getattr(RTCRtpReceiver, "_handle_rtp_packet", None),
        "aiortc.rtcrtpsender.random32": getattr(aiortc.rtcrtpsender, "random32", None),
        "aioice.ice.get_host_addresses": getattr(aioice.ice, "get_host_addresses", None),
        "aioice.ice.Connection.build_request": getattr(aioice.ice.Connection, "build_request", None),
    }
    problems += [f"{name} is not there (or not callable)" for name, f in callables.items() if not callable(f)]
    for module, names in ((rtcsctptransport, ("LOCAL_MAX_MESSAGE_SIZE", "SCTP_DATA_UNORDERED", "WEBRTC_STRING")),
                          (aioice.ice, ("CONSENT_INTERVAL",))):  # fmt: skip
        problems += [
            f"{module.__name__}.{n} is not an int" for n in names if not isinstance(getattr(module, n, None), int)
        ]
    problems += asyncio.run(_missing_attributes())
    if problems:
        raise RuntimeError("aiortc's private parts moved under streamer/rtc_internals.py: " + "; ".join(problems))


async def _missing_attributes() -> list[str]:
    """The instance attributes used here, looked for on real objects (a peer connection never connected)."""
    pc = RTCPeerConnection()
    try:
        channel = pc.createDataChannel("check")
        sender = pc.addTransceiver("video").sender
        wanted = {
            "RTCSctpTransport": (pc.sctp, ("_last_received_tsn", "_sack_needed", "_inbound_streams",
                                           "_advertised_rwnd", "_data_channels", "_data_channel_queue",
                                           "_remote_max_message_size")),
            "RTCRtpSender": (sender, ("_ssrc", "_rtx_ssrc")),
            "RTCDataChannel": (channel, ("transport",)),
        }  # fmt: skip
        return [f"a {kind} has no {a}" for kind, (obj, attrs) in wanted.items() for a in attrs if not hasattr(obj, a)]
    finally:
        await pc.close()
