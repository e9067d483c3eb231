"""The control-message fuzz corpus on the "control" channel, and one big message from another client.

Each message of the corpus (``bench.soak.corpus``) is sent on its own and the next waits for its
answer (or ``REPLY_SECONDS``): a message is answered by a ``{"type": "ack"|"error"}`` reply; one
over the limit may get its channel closed instead. After any close the client connects again.

The big message (``big_message``): a peer process sends one control message of many megabytes while
a victim session in this process streams; the victim's worst gap between frames around it is what
another user would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.latency.served import Client
from bench.soak.clients import Peer, connect, frames, peers
from bench.soak.control import WEBRTC_STRING, Outcome, Replies, control_channel, lift_send_limit, send_raw
from bench.soak.corpus import CONTROL_LIMIT, Case, corpus
from bench.soak.server import Served, ServerSpec, serving
from bench.soak.stream import STALL_S, gap_figures, receive_for

REPLY_SECONDS = 3.0  # an answer later than this counts as none (a valid message waits for an engine tick)
MAX_RECONNECTS = 200
MAX_FAILURES_LISTED = 40
SETTLE_S = 6.0  # after the sender connected, before it sends: the victim's playout settles
BEFORE_S = 3.0  # the victim's gaps over this long before the send are the baseline


@dataclass
class Row:
    case: Case
    outcome: Outcome
    late: int  # replies to earlier messages that came after their timeout, dropped before this one
    health: str | None = None  # /api/health's status after the message
    session_lost: bool = False  # no answer, and the server had dropped the client's session


class Fuzzer:
    """One connected client and its control channel, connected again whenever the channel closes."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.client: Client | None = None
        self.replies: Replies | None = None
        self.connects = 0

    async def ready(self) -> Replies:
        if self.replies is not None and self.replies.open:
            return self.replies
        await self.close()
        if self.connects > MAX_RECONNECTS:
            raise RuntimeError(f"the control channel closed {self.connects} times: giving up")
        self.connects += 1
        self.client = await connect(self.served.base)
        await frames(self.client, 1)
        self.replies = Replies(await control_channel(self.client.pc))
        lift_send_limit(self.client.pc)  # the server, not aiortc, must refuse what is too big
        return self.replies

    async def send(self, case: Case) -> Row:
        """One case: its outcome, and what the server looked like after it when it got no answer."""
        replies = await self.ready()
        assert self.client is not None
        late = replies.drain()
        channel, started = replies.channel, time.monotonic()
        if case.wire == "raw":
            assert isinstance(case.payload, bytes)
            send_raw(self.client.pc, channel, WEBRTC_STRING, case.payload)
        else:
            channel.send(case.payload)
        outcome = await replies.next(started, REPLY_SECONDS)
        row = Row(case, outcome, late)
        if outcome.answer is None and not outcome.closed:
            await asyncio.sleep(0.5)  # a reply just after the timeout is not taken for the next message's
        row.health = (await self.served.health()).get("status")
        if outcome.answer is None and not outcome.closed:
            row.session_lost = self.client.session_id not in await self.served.session_ids()
            if row.session_lost:  # the server dropped the session without a word: the channel looks open here
                await self.close()
        return row

    async def close(self) -> None:
        if self.client is not None:
            await self.client.pc.close()
            self.client, self.replies = None, None


def passed(case: Case, outcome: Outcome) -> bool:
    """Answered as the case expects (any answer, where it says nothing), or over the limit and its channel closed."""
    if case.over_limit and outcome.closed:
        return True
    if case.names and outcome.answer == "error" and case.names not in outcome.message:
        return False  # refused, but without naming what was wrong
    return outcome.answer == case.expect if case.expect else outcome.answer in ("ack", "error")


async def fuzz(spec: ServerSpec, seed: int, size: int) -> dict[str, Any]:
    """The corpus for ``seed`` with ``size`` random cases; the counts, by category, and every failure."""
    cases = corpus(seed, size)
    async with serving(spec) as served:
        fuzzer = Fuzzer(served)
        rows = []
        stopped = None
        try:
            for case in cases:
                rows.append(await fuzzer.send(case))
        except Exception as e:  # the client could not connect again: the server no longer serves
            stopped = {"at": len(rows), "why": f"{type(e).__name__}: {e}"[:300]}
        finally:
            await fuzzer.close()
        health = await served.health()
        return figures(cases, rows, fuzzer.connects) | {
            "corpus": len(cases),
            "stopped": stopped,
            "seed": seed,
            "health_after": health.get("status"),
            "log_errors": served.log_errors(),
        }


def figures(cases: list[Case], rows: list[Row], connects: int) -> dict[str, Any]:
    by_category: dict[str, dict[str, int]] = {}
    for case in cases:
        by_category.setdefault(case.category, {"corpus": 0, "sent": 0, "passed": 0})["corpus"] += 1
    for r in rows:
        c = by_category[r.case.category]
        c["sent"] += 1
        c["passed"] += passed(r.case, r.outcome)
    failures = [
        {"index": i, "category": r.case.category, "name": r.case.name, "bytes": r.case.size, "wire": r.case.wire}
        | {"answer": r.outcome.answer, "closed": r.outcome.closed, "health": r.health, "session_lost": r.session_lost}
        for i, r in enumerate(rows)
        if not passed(r.case, r.outcome)
    ]
    over = [r.outcome for r in rows if r.case.over_limit]
    bad = next((i for i, r in enumerate(rows) if r.health != "ok"), None)
    unhealthy = None if bad is None else {"index": bad, "after": [r.case.name for r in rows[max(0, bad - 2) : bad + 1]]}
    answer_ms = [r.outcome.seconds * 1000 for r in rows if r.outcome.answer is not None]
    return {
        "limit_bytes": CONTROL_LIMIT,
        "reply_timeout_s": REPLY_SECONDS,
        "sent": len(rows),
        "answered": sum(1 for r in rows if r.outcome.answer in ("ack", "error")),
        "passed": len(rows) - len(failures),
        "unanswered": sum(1 for r in rows if r.outcome.answer is None and not r.outcome.closed),
        "bad_replies": sum(1 for r in rows if r.outcome.answer == "other"),
        "closed_under_limit": sum(1 for r in rows if r.outcome.closed and not r.case.over_limit),
        "sessions_lost": sum(1 for r in rows if r.session_lost),
        "first_unhealthy": unhealthy,  # the first message after which /api/health was not ok, and the two before
        "over_limit": {"sent": len(over), "closed": sum(1 for o in over if o.closed)},
        "connects": connects,
        "late_replies": sum(r.late for r in rows),
        "answer_ms": {
            "median": round(statistics.median(answer_ms), 1) if answer_ms else None,
            "max": round(max(answer_ms), 1) if answer_ms else None,
        },
        "by_category": by_category,
        "failures": failures[:MAX_FAILURES_LISTED],
    }


async def big_message(spec: ServerSpec, size: int, bound: float = 120.0) -> dict[str, Any]:
    """A control message of ``size`` bytes from a peer process while a victim session streams here."""
    async with peers() as started:
        sender = await Peer.start("big", bound, size)  # it imports while the server starts
        started.append(sender)
        return await with_sender(spec, sender, bound)


async def with_sender(spec: ServerSpec, sender: Peer, bound: float) -> dict[str, Any]:
    async with serving(spec) as served:
        victim = await connect(served.base)
        times: list[float] = []
        receiving = asyncio.create_task(receive_for(victim, bound + 60, times))
        try:
            await sender.go(served.base)
            await sender.line("sid", 60)
            await asyncio.sleep(SETTLE_S)  # two sessions in steady state; the victim's gaps before, for comparison
            await sender.tell("send")
            await sender.line("sending", 30)
            sent = time.monotonic()
            result = json.loads(await sender.line("result", bound + 10))
            answered = time.monotonic()
            await asyncio.sleep(2.0)
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await receiving
            await victim.pc.close()
        before = [t for t in times if sent - BEFORE_S <= t < sent]
        during = before[-1:] + [t for t in times if sent <= t <= answered + 1.0]
        return {
            "bytes": result["bytes"],
            "answer": result["answer"],
            "closed": result["closed"],
            "answer_s": result["seconds"],
            "stall_threshold_s": STALL_S,
            "victim_before": gap_figures(before),
            "victim_during": gap_figures(during),
            "health_after": (await served.health()).get("status"),
            "log_errors": served.log_errors(),
        }
