"""Headless Debian Chromium for measurements and tests: its flags, and loopback in a fresh netns.

Chromium runs inside a network namespace that has only ``lo`` (``unshare -n``), so the page, the
browser and the server can reach nothing but loopback; these flags keep it from trying anyway.
"""

from __future__ import annotations

import fcntl
import socket
import struct

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never a downloaded browser

CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a namespace
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--allow-loopback-in-peer-connection",  # WebRTC ICE candidates on 127.0.0.1
    "--use-fake-ui-for-media-stream",  # grant the camera without asking
    "--use-fake-device-for-media-stream",  # a synthetic camera
]


def bring_loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (a fresh network namespace starts with lo down)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, ifr))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        s.close()
