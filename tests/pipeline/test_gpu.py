"""The same rules on a CUDA device (skipped without one)."""

import pytest
import torch

from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.reference import reference_session
from pipeline.types import UserParams
from tests.conftest import executor, open_t2v, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("context", ["stream", "clean"])
def test_streambatch_equals_reference_on_cuda(context):
    config = tiny_config(device="cuda", dtype="float32", context=context, sink_frames=1, window_frames=3)
    models = load_models(config)
    engine = Engine(config, models, executor=executor(config, models, keep_latents=True))
    ids = [open_t2v(engine, 6, prompt=p, seed=i) for i, p in enumerate(["a", "b", "c"])]
    out = {}
    while engine.has_work():
        for c in engine.step().chunks:
            out.setdefault(c.envelope.session_id, []).append(c.latents)
    for i, (sid, p) in enumerate(zip(ids, ["a", "b", "c"], strict=True)):
        want = reference_session(models.dit, models.text, config, UserParams(prompt=p, seed=i), 6)
        for got, ref in zip(out[sid], want, strict=True):
            assert (got - ref.cpu()).abs().max() < 1e-4


def test_bfloat16_engine_runs_on_cuda():
    config = tiny_config(device="cuda", dtype="bfloat16", height=64, width=64)
    engine = Engine(config)
    open_t2v(engine, 8, prompt="x")
    frames = []
    while engine.has_work():
        frames += [c.frames for c in engine.step().chunks]
    assert len(frames) == 8 and frames[-1].shape == (4, 64, 64, 3) and frames[-1].std() > 0
