"""WebRTC signalling: offer validation, ICE servers and which local addresses ICE may offer.

aiortc gathers host candidates on every interface (and aioice leaves out 127.0.0.1), and contacts
Google's STUN server when given no ICE servers at all. Here the ICE server list is explicit and
empty by default, and the host addresses come from :func:`streamer.rtc_internals.use_ice_addresses`: a
server bound to a loopback host offers only loopback candidates, so it never exposes another interface.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import ifaddr
from aiortc import RTCConfiguration, RTCIceServer, RTCSessionDescription

from pipeline.commands import MODES
from pipeline.types import UserParams

MAX_SDP_BYTES = 64 * 1024
MAX_MEDIA_SECTIONS = 4  # m-lines in an offer: video, the data channel, and room for audio
MAX_CANDIDATES = 64  # a=candidate lines in an offer (a browser on a busy machine offers ~10)


class BadRequest(ValueError):
    """A request the server refuses with 400; the message names the field and the value."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def interface_addresses() -> list[str]:
    """Every IPv4 address of this machine's interfaces."""
    return [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]


def ice_addresses_for(host: str, configured: list[str] | None) -> list[str]:
    """The host addresses ICE may offer: the configured ones, else loopback only for a loopback
    host, else every interface's address but loopback (aioice's own choice)."""
    if configured:
        return list(configured)
    if is_loopback(host):
        return ["127.0.0.1"]
    return [a for a in interface_addresses() if not ipaddress.ip_address(a).is_loopback]


def rtc_configuration(ice_servers: list[str]) -> RTCConfiguration:
    """An explicit (by default empty) ICE server list: aiortc otherwise adds a public STUN server."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


@dataclass(frozen=True)
class Offer:
    sdp: str
    mode: str  # "t2v" (receive only) or "v2v" (the client sends its camera)
    params: dict[str, Any]  # user params, validated

    @property
    def description(self) -> RTCSessionDescription:
        return RTCSessionDescription(sdp=self.sdp, type="offer")


def parse_offer(body: Any) -> Offer:
    """Validate an /api/offer body; every refusal names the field and the value."""
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, not {type(body).__name__}")
    unknown = sorted(set(body) - {"sdp", "type", "params", "mode"})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; allowed: ['mode', 'params', 'sdp', 'type']")
    if body.get("type") != "offer":
        raise BadRequest(f"type={body.get('type')!r} is not allowed: 'offer'")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        shown = sdp[:40] if isinstance(sdp, str) else sdp
        raise BadRequest(f"sdp={shown!r} is not allowed: an SDP offer starting with 'v=0'")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise BadRequest(f"sdp of {len(sdp.encode())} bytes is not allowed: at most {MAX_SDP_BYTES}")
    if "m=video" not in sdp:
        raise BadRequest("sdp has no video m-line: offer to receive (t2v) or send and receive (v2v) video")
    lines = sdp.splitlines()
    sections = sum(1 for line in lines if line.startswith("m="))
    if sections > MAX_MEDIA_SECTIONS:
        raise BadRequest(f"sdp with {sections} media sections (m=) is not allowed: at most {MAX_MEDIA_SECTIONS}")
    candidates = sum(1 for line in lines if line.startswith("a=candidate"))
    if candidates > MAX_CANDIDATES:
        raise BadRequest(f"sdp with {candidates} ICE candidates is not allowed: at most {MAX_CANDIDATES}")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest(f"params={params!r} is not allowed: a JSON object of user params")
    try:
        UserParams().updated(params)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    mode = body.get("mode", "v2v" if sends_video(sdp) else "t2v")
    if mode not in MODES:
        raise BadRequest(f"mode={mode!r} is not allowed: one of {list(MODES)}")
    if mode == "v2v" and not sends_video(sdp):
        raise BadRequest("mode='v2v' needs a video track in the offer (sendrecv or sendonly)")
    return Offer(sdp=sdp, mode=mode, params=dict(params))


def sends_video(sdp: str) -> bool:
    """Whether the offer's first video section sends video to us."""
    section = sdp.split("m=video", 1)[1].split("\nm=", 1)[0] if "m=video" in sdp else ""
    return "a=sendrecv" in section or "a=sendonly" in section
