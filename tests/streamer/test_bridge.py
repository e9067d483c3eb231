"""The bridge's t2v flow control: credits keep the pipeline full for a fast consumer, short for a slow one."""

import asyncio

import pytest

from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.types import UserParams
from streamer.bridge import Credits, EngineBridge
from tests.conftest import executor, tiny_config


def test_credits_grow_when_starved_and_shrink_when_ahead():
    c = Credits(low=2, high=5, patience=2)
    assert c.target == 2
    asked = [c.after_take(starved=True) for _ in range(4)]
    assert asked == [2, 2, 2, 1] and c.target == 5  # one more each time, up to high, then one for one
    asked = [c.after_take(starved=False) for _ in range(7)]
    assert asked == [1, 0, 1, 0, 1, 0, 1] and c.target == 2  # one fewer every `patience` takes, down to low
    assert c.after_take(starved=False) == 1 and c.target == 2
    assert c.after_take(starved=True) == 2 and c.target == 3
    assert c.after_take(starved=False) == 1 and c.after_take(starved=True) == 2  # a starved take resets patience
    assert c.target == 4 and Credits(2, 6).patience == 6


@pytest.mark.parametrize("low, high", [(0, 2), (3, 2)])
def test_credit_bounds_are_checked(low, high):
    with pytest.raises(ValueError, match=f"low={low}, high={high}"):
        Credits(low, high)


async def consume(bridge: EngineBridge, sid: str, chunks: int, pause: float) -> float:
    """Take ``chunks`` chunks, ``pause`` seconds apart; slots per tick over the second half."""
    stats = bridge.engine.stats
    for i in range(chunks):
        if i == chunks // 2:
            slots, ticks = stats.slots, stats.ticks
        assert await bridge.get_chunk(sid, timeout=30) is not None
        await asyncio.sleep(pause)
    return (stats.slots - slots) / (stats.ticks - ticks)


@pytest.mark.parametrize(("pause", "decode"), [(0.0, "inline"), (0.0, "thread"), (0.3, "thread")])
def test_a_fast_consumer_gets_a_full_pipeline_a_slow_one_a_short_one(pause, decode):
    config = tiny_config()
    models = load_models(config)
    engine = Engine(config, models, executor=executor(config, models, threaded_decode=decode == "thread"))
    depth = engine.pipeline_depth
    assert depth == config.steps + (decode == "thread")  # T chunks denoising, one decoding beside them

    async def main() -> tuple[float, int | None, list[int]]:
        bridge = EngineBridge(engine, d_out=2)
        await bridge.start()
        try:
            sid = await bridge.open_session(UserParams(prompt="x"), "t2v")
            per_tick = await consume(bridge, sid, 16, pause)
            credits = bridge.credits(sid)
            # Whatever the credits, no chunk is lost and they come in order.
            indices = [c.envelope.chunk_index for c in [await bridge.get_chunk(sid, 30) for _ in range(3)]]
            await bridge.close_session(sid)
            return per_tick, credits, indices
        finally:
            await bridge.stop()

    per_tick, credits, indices = asyncio.run(main())
    assert indices == [16, 17, 18]
    if pause == 0.0:  # taken as fast as it comes: the credits grow to the whole pipeline
        assert credits == 2 + depth
        if decode == "inline":  # a tick lasts as long as a chunk takes: every slot of the StreamBatch busy
            assert per_tick > config.steps  # (T steps + the σ=0 write)
    else:  # the engine (~20 ms a tick here) is far ahead of the consumer: two chunks ahead, no more
        assert credits == 2
        assert per_tick <= 3


def test_a_client_that_stops_reading_holds_exactly_its_credits_also_after_a_cut():
    engine = Engine(tiny_config())

    async def idle(bridge: EngineBridge) -> None:
        quiet = 0
        for _ in range(600):
            await asyncio.sleep(0.05)
            quiet = quiet + 1 if not bridge.engine.has_work() else 0
            if quiet == 3:
                return
        raise TimeoutError("the engine never went idle")

    async def main() -> tuple[int | None, int, list[int]]:
        bridge = EngineBridge(engine, d_out=2)
        await bridge.start()
        try:
            sid = await bridge.open_session(UserParams(prompt="x"), "t2v")
            for _ in range(6):  # taken as fast as they come: the credits grow
                await bridge.get_chunk(sid, 30)
            assert (await bridge.cut(sid))[0] == 1
            epochs = [(await bridge.get_chunk(sid, 30)).envelope.epoch for _ in range(3)]  # type: ignore[union-attr]
            await idle(bridge)  # the client stops reading: the engine finishes what it was asked for
            return bridge.credits(sid), bridge.queue_depths()["d_out"][sid], epochs
        finally:
            await bridge.stop()

    credits, queued, epochs = asyncio.run(main())
    assert epochs == [1, 1, 1]
    assert credits is not None and credits > 2  # it grew
    assert queued == credits  # no chunk lost, none made beyond the credits: the cut voided the old ones
