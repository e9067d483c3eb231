"""What the server refuses before it does any work: foreign hosts and origins, malformed bodies, deep JSON.

* **Host.** A request whose ``Host`` header names anything but the server (the address it is bound to,
  ``localhost`` for a loopback address, every interface address for a wildcard bind, and the names given
  with ``--allow-host``) gets 421: a page on another site that resolves its own name to this machine
  (DNS rebinding) reaches nothing. A request without a Host header (HTTP/1.0 tools) is served.
* **Origin.** A request that carries an ``Origin`` header is served only if that origin is the
  server's own (its host and port are the Host header's) or one named with ``--allow-origin``; other
  origins get 403. Answers to an allowed foreign origin carry the CORS headers, and its preflight
  (``OPTIONS``) is answered. Requests without an Origin (curl, scripts, aiortc clients) are served: a
  browser always sends one with a cross-origin POST, so no web page can start or hold a session.
* **Bodies.** JSON in UTF-8 only (another ``charset`` is 415), at most ``max_bytes`` (413), in at most
  ``BODY_SECONDS`` (408), nested at most ``MAX_JSON_DEPTH`` deep, with no NaN or Infinity (400).
* **API errors** are JSON ``{"error": ...}`` naming what was wrong, also for a wrong path or method.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32  # an offer is 3 deep, a control message 1
BODY_SECONDS = 10.0  # a request body must arrive within this (slow bodies hold a connection, never a slot)
UTF8 = ("utf-8", "utf8")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class HttpError(Exception):
    """A request refused with ``status``; ``message`` names the field or header and its value."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_depth(text: str) -> int:
    """How deep the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON ``text``; ValueError naming ``what`` if it is not JSON, nests deeper than
    ``max_depth`` or holds NaN/Infinity. Never RecursionError: the depth is checked first."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep; at most {max_depth} are allowed")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON: {e.msg} at position {e.pos}") from None
    except ValueError as e:  # NaN/Infinity, or an integer of more digits than Python converts
        raise ValueError(f"{what} is not allowed: {e}") from None


async def read_json(request: web.Request, max_bytes: int, seconds: float = BODY_SECONDS) -> Any:
    """The request's body as JSON, or HttpError: 415 for a charset other than UTF-8, 408 for a body
    slower than ``seconds``, 413 over ``max_bytes``, 400 for bytes that are not UTF-8 or not JSON."""
    charset = request.charset
    if charset is not None and charset.strip().lower() not in UTF8:
        raise HttpError(415, f"Content-Type charset={charset!r} is not allowed: the body is JSON in UTF-8")
    try:
        async with asyncio.timeout(seconds):
            raw = await request.read()
    except TimeoutError:
        raise HttpError(408, f"the body did not arrive within {seconds:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, f"body is larger than {max_bytes} bytes") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HttpError(400, f"body is not UTF-8: byte 0x{raw[e.start]:02x} at position {e.start}") from None
    try:
        return loads(text, "body")
    except ValueError as e:
        raise HttpError(400, str(e)) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_names(bind_host: str, interfaces: Iterable[str] = (), extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a Host header may use for a server bound to ``bind_host``: the address itself and
    ``localhost`` for loopback; for a wildcard address (0.0.0.0, ::) every address in ``interfaces``
    plus loopback and this machine's host name; and ``extra`` (``--allow-host``). Lower case."""
    names = {bind_host.strip("[]").lower(), *(n.lower() for n in extra)}
    if bind_host in ("", "0.0.0.0", "::", "[::]"):
        names |= {a.lower() for a in interfaces} | {"127.0.0.1", "::1", "localhost", socket.gethostname().lower()}
    if _is_loopback(bind_host.strip("[]")):
        names |= {"localhost", "127.0.0.1"} if ":" not in bind_host else {"localhost", "::1"}
    names.discard("")
    return frozenset(names)


def normal_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, no path; ValueError naming it if it is not one."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--allow-origin={origin!r} is not allowed: an origin such as https://studio.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class Access:
    """Who may use the server (see the module docstring)."""

    hosts: frozenset[str]  # Host header names (lower case, no port)
    origins: frozenset[str] = frozenset()  # foreign origins opened with --allow-origin, normalised

    def refuse(self, request: web.Request) -> HttpError | None:
        """Why ``request`` is refused, or None."""
        host = request.headers.get("Host")
        if host is not None:
            try:
                name = urlsplit(f"//{host}").hostname
            except ValueError:
                name = None
            if name is None or name.lower() not in self.hosts:
                allowed = ", ".join(sorted(self.hosts))
                return HttpError(421, f"Host {host!r} is not allowed: this server answers to {allowed}")
        origin = request.headers.get("Origin")
        if origin is not None and not self.same_origin(origin, host) and origin.lower() not in self.origins:
            return HttpError(
                403,
                f"Origin {origin!r} is not allowed: this server serves its own origin only; "
                "open it to a site with --allow-origin",
            )
        return None

    @staticmethod
    def same_origin(origin: str, host: str | None) -> bool:
        parts = urlsplit(origin)
        return host is not None and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def cors(self, request: web.Request) -> dict[str, str]:
        """CORS headers for an allowed foreign origin; none for the server's own or no origin."""
        origin = request.headers.get("Origin")
        if origin is None or origin.lower() not in self.origins:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(access: Access) -> Any:
    """The aiohttp middleware that applies :class:`Access`, answers preflights and turns every API
    error into JSON."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = access.refuse(request)
        if refused is not None:
            log.warning("refused %s %s: %s", request.method, request.path, refused.message)
            return error(refused.status, refused.message)
        cors = access.cors(request)
        if request.method == "OPTIONS" and cors:  # a preflight from an --allow-origin site
            cors |= {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            }
            return web.Response(status=204, headers=cors)
        try:
            response = await handler(request)
        except HttpError as e:
            response = error(e.status, e.message)
        except web.HTTPException as e:
            if not request.path.startswith("/api/") or e.status < 400:
                raise
            response = error(e.status, f"{request.method} {request.path}: {e.reason}")
        response.headers.update(cors)
        return response

    return guard
