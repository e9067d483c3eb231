"""The engine's step as data (StepOutput) and the one feed loop (Feeder) that every caller drives it with."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.commands import Command, Cut, Open, Query, SetParams
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.loader import load_models
from pipeline.types import UserParams
from tests.conftest import executor, open_t2v, tiny_config


class Counting(Engine):
    """The engine, noting every command applied to it (the feeder must never need a Query)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[type] = []

    def apply(self, command: Command):  # type: ignore[override]
        self.commands.append(type(command))
        return super().apply(command)


class Clock:
    """A clock the test sets: when chunks are handed out, for their deadlines."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Frames:
    """A v2v source of numbered frames, recording every take (how many, and whether it might wait)."""

    def __init__(self, config, n: int) -> None:
        self.frames = [np.full((config.height, config.width, 3), i % 256, np.uint8) for i in range(n)]
        self.at = 0
        self.asked: list[tuple[int, bool]] = []

    def take(self, n: int, wait: bool):
        self.asked.append((n, wait))
        if self.at >= len(self.frames):
            return None
        got = self.frames[self.at : self.at + n]
        self.at += len(got)
        return [(f, 1.0) for f in got]


def test_a_step_says_what_it_did_and_where_every_session_stands():
    config = tiny_config()
    engine = Engine(config)
    a, b = open_t2v(engine, 3, prompt="a"), open_t2v(engine, 1, prompt="b")
    first = engine.step()
    assert first.tick == 0 and first.chunks == () and first.busy and not first.idle
    assert set(first.sessions) == {a, b}
    for sid in (a, b):
        assert first.sessions[sid] == engine.apply(Query(sid))  # the same answer, without asking
    assert first.sessions[a].denoising == 1 and first.sessions[a].demand == 2
    outs = [first]
    while not outs[-1].idle:
        outs.append(engine.step())
    chunks = [c for o in outs for c in o.chunks]
    assert sorted((c.envelope.session_id, c.envelope.chunk_index) for c in chunks) == [(a, 0), (a, 1), (a, 2), (b, 0)]
    assert [o.tick for o in outs if o.tick is not None] == list(range(engine.stats.ticks))
    last = outs[-1].sessions[a]
    assert (last.undelivered, last.decoding, last.denoising, last.demand) == (0, 0, 0, 0)
    engine.close()


def test_deadline_misses_are_the_stalls_of_a_real_time_player():
    """16 fps: an epoch's first chunk is 1 frame, the others 4 (0.25 s). A chunk is due when a player that
    started with the epoch's first chunk reaches its first frame; a late one is a miss, and the player starts
    again from it; a cut's first chunk starts it again too."""
    config = tiny_config(context="clean")
    clock = Clock()
    engine = Engine(config, clock=clock)
    sid = open_t2v(engine, 5)
    # frames 0, 1, 5, 9, 13 handed out at: 100 (the player starts), 100.05 (due 100.0625: in time), 100.8 (due
    # 100.3125: a miss; the player restarts at frame 5), 101.05 (due 101.05: in time), 101.4 (due 101.3: a miss)
    times = iter([100.0, 100.05, 100.8, 101.05, 101.4])
    clock.now = next(times)
    misses = []
    while engine.has_work():
        out = engine.step()
        for c in out.chunks:
            misses.append((c.envelope.video_frame, out.sessions[sid].deadline_misses))
            clock.now = next(times, clock.now)
    assert misses == [(0, 0), (1, 0), (5, 1), (9, 1), (13, 2)]
    engine.apply(Cut(sid, demand=2))
    clock.now += 60.0  # a cut takes time; its first chunk starts the player anew: no miss
    while engine.has_work():
        out = engine.step()
        clock.now += 0.01
    assert out.sessions[sid].deadline_misses == 2 and out.sessions[sid].epoch == 1
    engine.close()


def test_t2v_is_kept_ahead_and_nothing_starts_past_until():
    config = tiny_config()
    engine = Counting(config)
    feeder = Feeder(engine)
    sid = feeder.open(Open(UserParams(prompt="x")), ahead=3).session_id
    chunks = []
    for _ in range(8):
        chunks += feeder.step().chunks
        st = feeder.status(sid)
        assert st.demand + st.undelivered <= 3  # never more asked for than ahead
    feeder.until(sid, 30)  # chunks start at frames 0, 1, 5, ..., 29 (1 frame, then 4); none at or past 30
    chunks += feeder.drain()
    assert [c.envelope.video_frame for c in chunks] == [0, *range(1, 30, 4)]
    assert feeder.status(sid).next_video_frame == 33 and feeder.status(sid).undelivered == 0
    assert Query not in engine.commands
    engine.close()
    # ahead of the whole pipeline: every tick a full StreamBatch (T chunks and a σ=0 write)
    engine = Engine(config)
    feeder = Feeder(engine)
    feeder.open(Open(UserParams(prompt="x")), ahead=engine.pipeline_depth + 1)
    slots = []
    for _ in range(12):
        before = engine.stats.slots
        feeder.step()
        slots.append(engine.stats.slots - before)
    assert slots[config.steps :] == [config.steps + 1] * (12 - config.steps)
    engine.close()


def test_v2v_is_handed_exactly_what_completes_its_next_chunk():
    config = tiny_config()
    models = load_models(config)
    engine = Counting(config, models, executor=executor(config, models), max_input_chunks=1)
    feeder = Feeder(engine)
    source = Frames(config, 21)  # 1 + 4 x 5
    sid = feeder.open(Open(UserParams(prompt="x"), "v2v"), source).session_id
    feeder.until(sid, 7)  # the chunk of frames 5..8 is begun before 7: it is completed, then nothing more
    chunks = feeder.drain()
    assert [n for n, _ in source.asked] == [1, 4, 2, 2]  # wanted 1, then 4; a limit of 2, then what completes
    assert sum(c.num_frames for c in chunks) == 9 and source.at == 9
    feeder.until(sid, None)
    chunks = feeder.drain()
    assert sum(c.num_frames for c in chunks) == 12 and feeder.ended(sid)  # the rest, to the source's end
    assert all(n == want for (n, _), want in zip(source.asked[4:-1], [4, 4, 4], strict=False))
    assert Query not in engine.commands and SetParams not in engine.commands
    engine.close()


def test_a_source_may_wait_only_when_the_engine_has_nothing_else_to_do():
    config = tiny_config()
    engine = Engine(config)
    feeder = Feeder(engine)
    source = Frames(config, 9)
    feeder.open(Open(UserParams(prompt="v"), "v2v"), source)
    feeder.drain()
    assert source.asked[0] == (1, True)  # nothing in flight yet: it may wait for the first frame
    assert (4, False) in source.asked  # asked while its first chunk was in flight: it must not
    engine.close()


def test_open_refuses_a_feed_that_does_not_fit_its_mode():
    feeder = Feeder(Engine(tiny_config()))
    with pytest.raises(ValueError, match="a v2v session is fed by a source"):
        feeder.open(Open(UserParams(), "v2v"))
    with pytest.raises(ValueError, match="ahead=0 is not allowed"):
        feeder.open(Open(UserParams()), ahead=0)
    feeder.engine.close()
