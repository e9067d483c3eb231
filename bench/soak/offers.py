"""Offer abuse: what must never hold a slot, take the server down, or keep others from being served.

- ``concurrent``: 3 x max_sessions real offers POSTed at once: exactly the free slots may get 200, the
  rest 503, none a 500. The successful ones connect, then close.
- ``held``: every slot taken by offers whose client never connects: an abandoned one (offer answered,
  then the client closes its pc), candidate-less ones (every ``a=candidate`` and ``a=end-of-candidates``
  line stripped) and one whose client answers connectivity checks but never nominates a pair
  (``bench.soak.peer hold``). A real offer meanwhile, what ``/api/health`` says, and the time until
  each slot is free again (the server's connect deadline: the slot must be free within it + 5 s).
- ``bad_params``: offers whose params are hostile numbers (integers of 401 digits, too large for a float;
  out of range; of the wrong type) or unknown fields: each must get 400 naming the field, none a 500.
- ``slow_bodies``: raw sockets that send the headers of ``POST /api/offer`` with Content-Length 1000,
  then one byte a second: each must get 408 or be closed within the body deadline, while a real
  offer meanwhile works.

Each part ends with a real offer (3 frames received). A part that leaves slots held past its bound
gets the server restarted for the next one (``restarted`` in the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from aiortc import RTCSessionDescription

from bench.latency.served import new_peer
from bench.soak.clients import Peer, peers, post_offer, real_offer_works, watching_health
from bench.soak.server import Served, ServerSpec, serving

SLACK_S = 5.0  # the guarantee: a slot is free within the connect deadline + this
OVER_S = 15.0  # how long past the guarantee a wait goes on, to measure a slot held too long
BODY_DEADLINE_S = 10.0  # the server's: a request body must have arrived within this
SLOW_SOCKETS = 3
CONNECT_BOUND = 30.0


def strip_candidates(sdp: str) -> str:
    keep = [line for line in sdp.splitlines() if not line.startswith(("a=candidate", "a=end-of-candidates"))]
    return "\r\n".join(keep) + "\r\n"


async def offer_sdp() -> tuple[Any, str]:
    """A fresh recvonly aiortc peer and its complete offer (candidates gathered)."""
    pc, _, _ = new_peer(None)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def connect_answered(pc: Any, body: dict[str, Any]) -> bool:
    """Whether ``pc`` connects with the server's answer ``body`` within ``CONNECT_BOUND`` s."""
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    deadline = time.monotonic() + CONNECT_BOUND
    while pc.connectionState != "connected" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return bool(pc.connectionState == "connected")


async def concurrent(served: Served) -> dict[str, Any]:
    free = (await served.health())["free_slots"]
    made = [await offer_sdp() for _ in range(3 * served.spec.max_sessions)]
    try:
        async with watching_health(served) as watch:
            answers = await asyncio.gather(*(post_offer(served.http, served.base, sdp) for _, sdp in made))
            when_full = (await served.health())["status"]  # every slot answered, none connected yet
            ok = [(pc, body) for (pc, _), (status, body) in zip(made, answers, strict=True) if status == 200]
            connected = await asyncio.gather(*(connect_answered(pc, body) for pc, body in ok))
    finally:
        for pc, _ in made:
            await pc.close()
    ended = time.monotonic()
    statuses = Counter(str(status) for status, _ in answers)
    idle = await served.wait_idle(CONNECT_BOUND)
    return {
        "offers": len(made),
        "free_slots_before": free,
        "statuses": dict(statuses),
        "succeeded": statuses["200"],
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5") and s != "503"),
        "connected": sum(connected),
        "health_when_full": when_full,
        "all_free_s": round(time.monotonic() - ended, 3) if idle else None,
        "health": watch.summary(),
    }


BAD_PARAMS = {  # params as JSON text -> the field the 400 must name
    '{"strength": 1' + "0" * 400 + "}": "strength",
    '{"strength": -1' + "0" * 400 + "}": "strength",
    '{"seed": 1' + "0" * 400 + "}": "seed",
    '{"seed": 1e400}': "seed",
    '{"strength": 2}': "strength",
    '{"seed": "seven"}': "seed",
    '{"prompt": 1' + "0" * 400 + "}": "prompt",
    '{"volume": 1' + "0" * 400 + "}": "volume",
}


async def bad_params(served: Served) -> dict[str, Any]:
    pc, sdp = await offer_sdp()
    rows: list[dict[str, Any]] = []
    try:
        for params, field in BAD_PARAMS.items():
            status, body = await post_offer(served.http, served.base, sdp, params)
            error = body.get("error", "") if isinstance(body, dict) else str(body)
            rows.append({"params": params[:40], "status": status, "named": field in error, "error": error[:160]})
    finally:
        await pc.close()
    return {
        "offers": len(rows),
        "refused_naming_the_field": sum(1 for r in rows if r["status"] == 400 and r["named"]),
        "server_errors": sum(1 for r in rows if int(r["status"]) >= 500),
        "rows": rows,
    }


async def held(served: Served, hold: Peer) -> dict[str, Any]:
    """Every slot taken by a client that never connects; their times to free."""
    deadline = served.spec.connect_deadline
    n = served.spec.max_sessions
    kinds = ["abandoned", "nominate-less"] + ["candidate-less"] * max(0, n - 2)
    since: dict[str, tuple[str, float]] = {}  # sid -> (kind, when its offer was answered)
    statuses = []
    async with watching_health(served) as watch:
        for kind in kinds[:n]:
            if kind == "nominate-less":
                await hold.go(served.base)
                sid = await hold.line("sid", 60)
                since[sid] = (kind, time.monotonic())
                continue
            pc, sdp = await offer_sdp()
            status, body = await post_offer(
                served.http, served.base, strip_candidates(sdp) if kind != "abandoned" else sdp
            )
            statuses.append(status)
            await pc.close()  # never connected
            if status == 200:
                since[body["session_id"]] = (kind, time.monotonic())
        meanwhile = await real_offer_works(served, 10)
        bound = deadline + SLACK_S + OVER_S
        waits = [served.wait_gone({sid}, t, bound) for sid, (_, t) in since.items()]
        gone = {k: v for d in await asyncio.gather(*waits) for k, v in d.items()}
    by_kind: dict[str, list[float | None]] = {}
    for sid, (kind, _) in since.items():
        by_kind.setdefault(kind, []).append(gone[sid])
    freed = [v for v in gone.values() if v is not None]
    return {
        "kinds": kinds,
        "offer_statuses": statuses,
        "held": len(since),
        "connect_deadline_s": deadline,
        "bound_s": bound,
        "free_s": by_kind,
        "not_freed": len(gone) - len(freed),
        "max_free_s": max(freed, default=None),
        "real_offer_while_held": meanwhile,
        "health": watch.summary(),
    }


async def slow_body(port: int, bound: float) -> dict[str, Any]:
    """Headers of a 1000-byte POST, then a byte a second: what came back, and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = f"POST /api/offer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    writer.write((head + "Content-Length: 1000\r\n\r\n{").encode())
    answer: str | None = None
    try:
        reading = asyncio.ensure_future(reader.readline())
        while time.monotonic() - started < bound:
            await asyncio.wait({reading}, timeout=1.0)
            if reading.done():
                line = reading.result().decode(errors="replace").strip()
                answer = line.split(" ")[1] if line.startswith("HTTP/") else "closed"
                break
            with contextlib.suppress(ConnectionError):
                writer.write(b" ")
                await writer.drain()
        reading.cancel()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"answer": answer, "seconds": round(time.monotonic() - started, 3)}


async def slow_bodies(served: Served) -> dict[str, Any]:
    bound = BODY_DEADLINE_S + SLACK_S + OVER_S / 3
    async with watching_health(served) as watch:
        slow = [asyncio.ensure_future(slow_body(served.port, bound)) for _ in range(SLOW_SOCKETS)]
        await asyncio.sleep(1.0)
        meanwhile = await real_offer_works(served)
        results = await asyncio.gather(*slow)
    return {
        "sockets": SLOW_SOCKETS,
        "body_deadline_s": BODY_DEADLINE_S,
        "bound_s": bound,
        "answers": [r["answer"] for r in results],
        "max_s": max(r["seconds"] for r in results),
        "real_offer_meanwhile": meanwhile,
        "health": watch.summary(),
    }


async def offers(spec: ServerSpec) -> dict[str, Any]:
    """The three parts in turn, each followed by a real offer; a fresh server when slots stay held."""
    out: dict[str, Any] = {}
    async with peers() as started:
        hold = await Peer.start("hold", 120.0)  # it imports while the server starts
        started.append(hold)
        parts = [
            ("concurrent", concurrent),
            ("bad_params", bad_params),
            ("held", lambda s: held(s, hold)),
            ("slow_bodies", slow_bodies),
        ]
        restarted, errors = [], 0
        async with contextlib.AsyncExitStack() as stack:
            served = await stack.enter_async_context(serving(spec))
            for name, part in parts:
                out[name] = await part(served)
                idle = await served.wait_idle(1.0)
                out[name]["real_offer_after"] = await real_offer_works(served) if idle else {"ok": False}
                out[name]["slots_held_after"] = not idle
                if not idle and name != parts[-1][0]:
                    restarted.append(name)
                    errors += served.log_errors()
                    await stack.aclose()  # the server is stopped; the stack takes the next one
                    served = await stack.enter_async_context(serving(spec))
            out["log_errors"] = errors + served.log_errors()
        out["restarted_after"] = restarted
    return out
