"""The decode phase: sessions decoded together give the frames of one by one, a cut drops pending decodes of
the old epoch, and the queue is bounded (the DiT waits for room, nothing is lost)."""

from __future__ import annotations

import threading

import torch

from pipeline.decode import DecodeJob, DecodePhase
from pipeline.models.loader import load_models
from pipeline.types import Envelope, UserParams
from tests.conftest import tiny_config


def latents(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16, 1, 4, 4, generator=g) for _ in range(n)]


def test_sessions_decoded_together_give_the_frames_of_one_by_one():
    """Three sessions, the third joining two chunks late: batched where the caches line up, one by one
    where they do not; the frames are those of each session decoded alone."""
    vae = load_models(tiny_config()).vae
    per_session = [latents(6, seed) for seed in range(3)]
    alone = [vae.new_stream() for _ in range(3)]
    together = [vae.new_stream() for _ in range(3)]
    paths = []
    for k in range(6):
        active = [0, 1] if k < 2 else [0, 1, 2]
        xs = [per_session[i][k if i < 2 else k - 2] for i in active]
        want = [vae.decode(alone[i], x) for i, x in zip(active, xs, strict=True)]
        paths.append(vae._batchable([together[i] for i in active], xs))
        got = vae.decode_many([together[i] for i in active], xs)
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape and (w - g).abs().max() < 1e-5
    assert paths[:2] == [True, True] and paths[2] is False and paths[-1] is True  # both ways were taken


def envelope(epoch: int, index: int, first: bool) -> Envelope:
    return Envelope("s0", epoch, index, index, 4 * index, 0, 1 if first else 4, UserParams())


class Gated:
    """The real passthrough decoder, held at a gate before each decode (to see what the queue does)."""

    def __init__(self, inner):
        self.inner, self.vae = inner, inner.vae
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def new_stream(self):
        return self.inner.new_stream()

    def decode_many(self, streams, xs):
        self.entered.release()
        assert self.gate.wait(10)
        return self.inner.decode_many(streams, xs)


def passthrough_vae():
    from pipeline.config import CONFIG_DIR, load_system_config

    return load_models(load_system_config(CONFIG_DIR / "passthrough.yaml")).vae


def job(epoch: int, index: int, first: bool = False) -> DecodeJob:
    return DecodeJob(envelope(epoch, index, first or index == 0), torch.zeros(768, 1, 2, 2), 0.0, ())


def test_a_cut_drops_the_pending_decodes_of_the_old_epoch():
    vae = Gated(passthrough_vae())
    phase = DecodePhase(vae, fps=16, bound=4, threaded=True)
    try:
        phase.put([job(0, 0)])
        assert vae.entered.acquire(timeout=10)  # the worker holds chunk 0 at the gate
        phase.put([job(0, 1)])
        phase.put([job(0, 2)])
        phase.epoch("s0", 1)  # a cut: chunks 1 and 2 are of an epoch that ended
        phase.put([job(1, 3, first=True)])
        vae.gate.set()
        out = []
        while phase.pending:
            out += phase.take(timeout=1.0)
        assert [c.envelope.key for c in out] == [("s0", 0, 0), ("s0", 1, 3)]  # 0 was decoding already
        assert phase.dropped == 2
        assert out[1].num_frames == 1  # the new epoch's decoder started over (its first latent frame: 1 frame)
    finally:
        vae.gate.set()
        phase.stop()


def test_the_queue_is_bounded_and_put_waits_for_room():
    vae = Gated(passthrough_vae())
    phase = DecodePhase(vae, fps=16, bound=1, threaded=True)
    try:
        phase.put([job(0, 0)])
        assert vae.entered.acquire(timeout=10)
        phase.put([job(0, 1)])  # the one place in the queue
        third = threading.Thread(target=phase.put, args=([job(0, 2)],))
        third.start()
        third.join(timeout=0.3)
        assert third.is_alive()  # waiting for room: the DiT would wait here
        vae.gate.set()
        third.join(timeout=10)
        assert not third.is_alive()
        out = []
        while phase.pending:
            out += phase.take(timeout=1.0)
        assert [c.envelope.chunk_index for c in out] == [0, 1, 2]  # nothing lost, in order
    finally:
        vae.gate.set()
        phase.stop()
