"""A t2v client in a process of its own, for what must not happen in the harness's process.

    python -m bench.soak.peer ROLE [--seconds S] [--bytes N]

It prints ``ready`` once imported (the imports take seconds: the harness starts it ahead of time, even
before the server), waits for a line ``go BASE_URL`` on stdin, then plays ``ROLE`` against that server;
every wait is bounded by ``--seconds``:

- ``receive``: connects (``bench.latency.served.open_client``), prints ``sid ID`` after 3 frames, then
  receives. The harness SIGKILLs it (no goodbye) or SIGSTOPs it (its network just stops).
- ``hold``: answers ICE connectivity checks but never nominates a pair (aioice's requests never carry
  USE-CANDIDATE), so the server's ICE never completes; prints ``sid ID`` once the offer is answered.
- ``big``: connects, prints ``sid ID`` after 3 frames, waits for a line ``send``, prints ``sending``,
  sends one control message of ``--bytes`` bytes (aiortc's own send check lifted) and prints
  ``result {json}``: the answer, whether the channel closed and the seconds it took.

Loopback only, with an empty ICE server list.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time

from aiortc import RTCSessionDescription

from bench.latency.common import PROMPT, http_json, run_async
from bench.latency.served import new_peer, open_client
from bench.soak.control import Replies, control_channel, lift_send_limit
from streamer.rtc_internals import never_nominating, use_ice_addresses

ROLES = ("receive", "hold", "big")


def say(line: str) -> None:
    print(line, flush=True)


async def read_line(seconds: float) -> str:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), seconds)


async def wait_for_go(seconds: float) -> str:
    """The server's URL, from the line ``go BASE_URL``."""
    line = await read_line(seconds)
    word, _, base = line.strip().partition(" ")
    if word != "go" or not base.startswith("http://"):
        raise SystemExit(f"peer: expected 'go BASE_URL' on stdin, got {line!r}")
    return base


async def receive(base: str, seconds: float) -> None:
    client = await open_client(base, "t2v", None)
    for _ in range(3):
        await asyncio.wait_for(client.track.recv(), 30)
    say(f"sid {client.session_id}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.wait_for(client.track.recv(), 30)
    await client.pc.close()


async def hold(base: str, seconds: float) -> None:
    with never_nominating():
        await holding(base, seconds)


async def holding(base: str, seconds: float) -> None:
    pc, _, _ = new_peer(None)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "params": {"prompt": PROMPT}, "mode": "t2v"}
        status, body = await http_json("POST", base + "/api/offer", offer)
        if status != 200:
            raise RuntimeError(f"/api/offer answered {status}: {body}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        say(f"sid {body['session_id']}")
        await asyncio.sleep(seconds)
    finally:
        await pc.close()


async def big(base: str, seconds: float, size: int) -> None:
    client = await open_client(base, "t2v", None)
    try:
        for _ in range(3):
            await asyncio.wait_for(client.track.recv(), 30)
        channel = await control_channel(client.pc)
        replies = Replies(channel)
        say(f"sid {client.session_id}")
        head = '{"type": "prompt", "prompt": "'
        message = head + "x" * max(0, size - len(head) - 2) + '"}'
        lift_send_limit(client.pc)
        if (await read_line(seconds)).strip() != "send":
            raise SystemExit("peer: expected 'send' on stdin")
        say("sending")
        started = time.monotonic()
        channel.send(message)
        outcome = await replies.next(started, seconds, linger=2.0)
        say("result " + json.dumps({"bytes": len(message), **dataclasses.asdict(outcome)}))
    finally:
        await client.pc.close()


async def play(args: argparse.Namespace) -> None:
    use_ice_addresses(["127.0.0.1"])
    say("ready")
    base = await wait_for_go(args.seconds)
    if args.role == "receive":
        await receive(base, args.seconds)
    elif args.role == "hold":
        await hold(base, args.seconds)
    else:
        await big(base, args.seconds, args.bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak.peer", description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--seconds", type=float, default=60.0, help="bound of every wait, and of receiving")
    parser.add_argument("--bytes", type=int, default=1_000_000, help="big: the message's size")
    run_async(play(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
