"""A hostile but fair client cannot hold the server (issue 10): slots, control messages, HTTP, origins.

The server runs in this process (as in test_webrtc); clients that must not share its event loop run
in their own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from itertools import pairwise
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.app import STATE, ServerOptions
from streamer.rtc_internals import never_nominating
from streamer.session import CONTROL_WAITING
from tests.conftest import ROOT, free_port, run_streamer
from tests.e2e.test_webrtc import connect, get, post, run, serve

pytestmark = pytest.mark.slow

DEADLINE = 2.0  # connect_timeout in these tests


def hardened(**changes: Any) -> ServerOptions:
    return ServerOptions(**({"connect_timeout": DEADLINE} | changes))


async def new_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("control")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def without_candidates(sdp: str) -> str:
    return "".join(
        line for line in sdp.splitlines(keepends=True) if not line.startswith(("a=candidate", "a=end-of-candidates"))
    )


async def health(base: str) -> dict[str, Any]:
    status, body = await get(base, "/api/health")
    assert status == 200, body
    return body


async def wait_for_free_slots(base: str, free: int, seconds: float) -> float:
    """Seconds until /api/health reports ``free`` slots; fails after ``seconds``."""
    start = time.monotonic()
    while (body := await health(base))["free_slots"] != free:
        assert time.monotonic() - start < seconds, body
        await asyncio.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.parametrize("client", ["no candidates", "gone before connecting", "never nominates"])
def test_a_client_that_never_connects_loses_its_slot_within_the_deadline(client):
    hostile = contextlib.ExitStack()
    if client == "never nominates":  # answers connectivity checks, but its requests never carry USE-CANDIDATE
        hostile.enter_context(never_nominating())

    async def main() -> None:
        async with serve(options=hardened(), max_sessions=1) as (base, app):
            pc, sdp = await new_offer()
            offered = without_candidates(sdp) if client == "no candidates" else sdp
            status, body = await post(base, "/api/offer", json={"sdp": offered, "type": "offer"})
            assert status == 200, body
            if client == "gone before connecting":
                await pc.close()
            elif client == "never nominates":
                await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
            full = await health(base)
            assert full["status"] == "degraded" and full["free_slots"] == 0 and full["sessions"] == 1
            other, other_sdp = await new_offer()
            status, refused = await post(base, "/api/offer", json={"sdp": other_sdp, "type": "offer"})
            assert status == 503 and "limit of 1 sessions" in refused["error"]
            await other.close()

            freed_after = await wait_for_free_slots(base, 1, DEADLINE + 5)
            assert body["session_id"] not in app[STATE].bridge.engine.sessions
            assert (await health(base))["status"] == "ok"
            hostile.close()  # the next client is an ordinary one
            real = await connect(base)
            assert len(await real.frames(3)) == 3
            print(f"{client}: slot free {freed_after:.1f} s after the answer (deadline {DEADLINE} s)")
            await real.pc.close()
            await pc.close()

    try:
        run(main())
    finally:
        hostile.close()


def test_offers_at_once_take_no_more_slots_than_there_are():
    async def main() -> None:
        async with serve(options=hardened(), max_sessions=2) as (base, _):
            offers = [await new_offer() for _ in range(6)]
            results = await asyncio.gather(
                *(post(base, "/api/offer", json={"sdp": sdp, "type": "offer"}) for _, sdp in offers)
            )
            statuses = sorted(status for status, _ in results)
            assert statuses == [200, 200, 503, 503, 503, 503], results
            body = await health(base)
            assert body["sessions"] == 2 and body["free_slots"] == 0 and body["status"] == "degraded"
            for pc, _ in offers:
                await pc.close()
            await wait_for_free_slots(base, 2, DEADLINE + 5)

    run(main())


def sent_gaps(sent: list[Any], start: float, end: float) -> list[float]:
    times = [f.when for f in sent if start <= f.when <= end]
    return [b - a for a, b in pairwise(times)]


def test_a_huge_control_message_is_refused_unassembled_and_stalls_no_other_session():
    async def main() -> None:
        async with serve(options=hardened(), max_sessions=2) as (base, app):
            victim = await connect(base)
            await victim.frames(8)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.e2e.big_message_client",
                base,
                str(10_000_000),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            lines = []
            try:
                while not lines or not lines[-1].startswith("frames"):
                    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
                    assert line, f"the client process ended: {lines}"
                    lines.append(line)
                    if line == "sending":
                        start = time.monotonic()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            end = time.monotonic()
            session = app[STATE].sessions[victim.session_id]
            gaps = sent_gaps(list(session.metrics.sent_log), start, end)
            print(f"the other session's worst gap between frames meanwhile: {max(gaps) * 1000:.0f} ms")
            assert len(gaps) > 20 and max(gaps) < 0.0625 + 0.25, gaps  # a frame every 62.5 ms at 16 fps
            reply = json.loads(lines[1])
            assert reply["type"] == "error" and "at most 16384 bytes" in reply["message"], lines
            assert lines[2] == "channel closing" and int(lines[3].split()[1]) > 10, lines  # its video goes on
            assert len(await victim.frames(4)) == 4
            await victim.pc.close()

    run(main())


def test_every_control_message_gets_an_answer():
    async def main() -> None:
        async with serve(options=hardened()) as (base, _):
            client = await connect(base)
            for message, expected in [
                ("[" * 1000 + "]" * 1000, "nests 1000 levels deep; at most 32"),
                ('{"type": "params", "strength": NaN}', "NaN is not a JSON number"),
                ('{"type": "params", "seed": ' + "9" * 5000 + "}", "not allowed"),
                (json.dumps({"type": "prompt", "prompt": "[" * 3000}), "prompt of 3000 characters is not allowed"),
                (json.dumps({"type": "prompt", "prompt": "\ud800"}), "'\\ud800' at position 0 is not a character"),
            ]:
                reply = await client.send(message)
                assert reply["type"] == "error" and expected in reply["message"], reply
            # a burst past what may wait: every message is answered, the ones past the bound "busy" at once
            burst = CONTROL_WAITING + 100
            for i in range(burst):
                client.control.send(json.dumps({"type": "params", "seed": i}))
            replies = [await asyncio.wait_for(client.replies.get(), 30) for _ in range(burst)]
            acks = [r for r in replies if r["type"] == "ack"]
            busy = [r for r in replies if r["type"] == "error" and r["message"].startswith("busy")]
            assert len(acks) + len(busy) == burst and len(acks) >= CONTROL_WAITING, replies[:3]
            assert (await client.send({"type": "cut"}))["type"] == "ack"
            assert len(await client.frames(4)) == 4
            await client.pc.close()

    run(main())


async def raw(base: str, request: bytes, read_after: float = 30) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as bytes on a socket; the status and JSON body of the answer."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_after)
    status = int(head.split()[1])
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    body = json.loads(await reader.readexactly(length))
    writer.close()
    return status, body


def test_malformed_requests_get_a_4xx_naming_what_was_wrong():
    async def main() -> None:
        async with serve(options=hardened(body_timeout=1.0)) as (base, app):
            cases = [
                (dict(data=b"\xff\xfe{}"), 400, "body is not UTF-8: byte 0xff at position 0"),
                (dict(data=("[" * 5000 + "]" * 5000).encode()), 400, "body nests 5000 levels deep"),
                (
                    dict(data=b"{}", headers={"Content-Type": "application/json; charset=nope"}),
                    415,
                    "charset='nope' is not allowed",
                ),
                (dict(data=b'{"sdp": NaN}'), 400, "NaN is not a JSON number"),
            ]
            for kw, status, message in cases:
                got, body = await post(base, "/api/offer", **kw)
                assert got == status and message in body["error"], (kw, got, body)
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/api/offer") as r:
                    assert r.status == 405 and "GET /api/offer" in (await r.json())["error"]
                async with http.get(base + "/api/nothing") as r:
                    assert r.status == 404 and "error" in await r.json()
            # a body that trickles in holds a connection for the body deadline, then 408; others go on
            port = base.rsplit(":", 1)[1]
            head = f"POST /api/offer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000\r\n\r\n{{"
            slow = asyncio.ensure_future(raw(base, head.encode()))
            assert (await health(base))["status"] == "ok"
            status, body = await asyncio.wait_for(slow, 10)
            assert status == 408 and "did not arrive within 1 s" in body["error"]
            assert not app[STATE].sessions

    run(main())


def test_only_the_servers_own_origin_and_names_are_served():
    async def main() -> None:
        async with serve(options=hardened()) as (base, app):
            own = base.removeprefix("http://")
            pc, sdp = await new_offer()
            offer = json.dumps({"sdp": sdp, "type": "offer"})
            plain = {"Content-Type": "text/plain"}  # what a page may POST cross-origin without a preflight
            status, body = await post(base, "/api/offer", data=offer, headers=plain | {"Origin": "http://evil.example"})
            assert status == 403 and "Origin 'http://evil.example' is not allowed" in body["error"], body
            assert "--allow-origin" in body["error"]
            # DNS rebinding: the foreign page's own name resolves here; its Host is its own name
            foreign = {
                "Origin": "http://evil.example:" + own.split(":")[1],
                "Host": "evil.example:" + own.split(":")[1],
            }
            status, body = await post(base, "/api/offer", data=offer, headers=plain | foreign)
            assert status == 421 and "Host 'evil.example:" in body["error"], body
            async with aiohttp.ClientSession() as http:
                for path in ("/api/metrics", "/api/health", "/"):
                    async with http.get(base + path, headers={"Host": "evil.example"}) as r:
                        assert r.status == 421, path
            assert not app[STATE].sessions  # none of them opened a session

            # the demo page's own requests (same origin), by address or by localhost, and origin-less clients
            for name in (own, "localhost:" + own.split(":")[1]):
                headers = {"Origin": f"http://{name}", "Host": name}
                status, body = await get_with(base, "/api/health", headers)
                assert status == 200, body
            status, body = await post(base, "/api/offer", data=offer)
            assert status == 200, body
            await pc.close()

    run(main())


async def get_with(base: str, path: str, headers: dict[str, str], method: str = "GET") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, base + path, headers=headers) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else dict(r.headers))


def test_allow_origin_opens_the_api_to_a_named_site_with_cors_headers():
    async def main() -> None:
        async with serve(options=hardened(allow_origins=("https://Studio.example",))) as (base, _):
            site = {"Origin": "https://studio.example"}
            status, headers = await get_with(
                base, "/api/offer", site | {"Access-Control-Request-Method": "POST"}, method="OPTIONS"
            )
            assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://studio.example"
            assert "POST" in headers["Access-Control-Allow-Methods"]
            async with aiohttp.ClientSession() as http, http.get(base + "/api/health", headers=site) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://studio.example"
            status, body = await get_with(base, "/api/health", {"Origin": "https://other.example"})
            assert status == 403, body

    run(main())


def test_bad_server_flags_are_one_line_errors():
    for flags, message in [
        (["--allow-origin", "studio.example"], "--allow-origin='studio.example' is not allowed"),
        (["--connect-timeout", "nan"], "--connect-timeout=nan is not allowed"),
        (["--d-in", "1" + "0" * 400], "--d-in=100000000000…(401 digits) is not allowed: an integer from 1 to 4096"),
        (["--d-out", "0"], "--d-out=0 is not allowed: an integer from 1 to 64"),
        (["--stage-timeout", "nan"], "--stage-timeout=nan is not allowed"),
        (["--max-sessions", "1" + "0" * 400], "max_sessions=100000000000…(401 digits) is not allowed"),
    ]:
        r = run_streamer("serve", "--port", str(free_port()), *flags, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
