"""Starting a ring of stages: on one machine (``--stages N`` spawns the other N-1 processes), or as
``torchrun`` started them on one or many nodes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Stage 0 is the process that runs the engine (the CLI or the server). It hosts the rendezvous store,
splits the blocks so that every stage costs about the same (from what each block and the decoder cost,
measured by :func:`pipeline.start.measure`; the last stage, which also decodes, gets fewer), and tells
every stage its blocks through the store (:class:`StagePlan`). Every stage loads the same model from the same
place (the preset's seeded weights, or ``--model``) and keeps only its own blocks.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from pipeline.config import SystemConfig
from pipeline.decode import DecodePhase
from pipeline.models.loader import Models
from pipeline.stages.balance import split_blocks
from pipeline.stages.ring import RingExecutor
from pipeline.stages.stage import Stage
from pipeline.stages.transport import Board, Ring, StageFailure, connect, edge_groups, stage_device
from pipeline.stats import PhaseTimer

STAGE_TIMEOUT_S = 2.5  # a stage with no heartbeat for this long died or hangs
START_TIMEOUT_S = 300.0  # every stage loads its model within this


@dataclass(frozen=True)
class StagePlan:
    """What stage 0 tells every stage before work starts."""

    config: SystemConfig
    blocks: tuple[range, ...]  # each stage's blocks, contiguous, in order
    random_weights: bool  # the preset's seeded weights in place of its source (GPU speed runs)
    threaded_decode: bool  # the last stage decodes in a thread of its own
    keep_latents: bool  # decoded chunks carry x0 (tests)
    decode_bound: int
    timeout: float  # heartbeat timeout, seconds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_ring(config: SystemConfig) -> Ring | None:
    """This process's place when ``torchrun`` started it (its environment says so), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    return Ring(rank, world, stage_device(config.device, rank), addr, port)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def trim(models: Models, blocks: range) -> None:
    """Free the blocks this stage does not own."""
    dit = models.dit
    transformer = getattr(dit, "transformer", None)
    if transformer is None:
        return
    for i in range(dit.num_blocks):
        if i not in blocks:
            transformer.blocks[i] = torch.nn.Module()


def start_ring(
    config: SystemConfig,
    models: Models,
    stages: int,
    split: Sequence[int] | None = None,
    costs: dict[str, Any] | None = None,
    random_weights: bool = False,
    threaded_decode: bool | None = None,
    keep_latents: bool = False,
    timeout: float = STAGE_TIMEOUT_S,
    log: Any = None,
) -> RingExecutor:
    """Stage 0 of a ring of ``stages`` processes: spawns the others on this machine (unless torchrun
    started them), hands every stage its blocks, and returns the engine's executor.

    ``split``: blocks per stage (e.g. 10,12,8); else ``costs`` (:func:`pipeline.start.measure`) balance them."""
    num_blocks = models.dit.num_blocks
    if stages < 2:
        raise ValueError(f"stages={stages} is not allowed: a ring has at least 2 (1 stage is the local executor)")
    if stages > num_blocks:
        raise ValueError(f"stages={stages} is not allowed: the model has {num_blocks} blocks, at most one stage each")
    ring = torchrun_ring(config)
    processes: list[subprocess.Popen[bytes]] = []
    if ring is None:
        device = stage_device(config.device, 0)
        ring = Ring(0, stages, device, "127.0.0.1", free_port())
        processes = [spawn(ring, r) for r in range(1, stages)]
    elif ring.rank != 0 or ring.world != stages:
        raise ValueError(f"torchrun started rank {ring.rank} of {ring.world}; this is stage 0 of --stages {stages}")
    try:
        store = connect(ring, backend_for(ring.device))
        groups = edge_groups(stages)
        threads = share_cores(ring)
        if split is not None:
            blocks, costs = blocks_of(split, num_blocks, stages), {}
        elif costs is not None:
            blocks = split_blocks(costs, stages)
        else:
            raise ValueError("a ring needs its blocks: split, or the measured costs to balance them by")
        threaded = config.threaded_decode if threaded_decode is None else threaded_decode
        plan = StagePlan(config, blocks, random_weights, threaded, keep_latents, max(2, config.max_sessions), timeout)
        store.set("plan", pickle.dumps(plan))  # type: ignore[arg-type]  # the store takes bytes too
        board = Board(store, ring, timeout, processes)
        wait_ready(store, board, stages)
        if log is not None:
            sizes = ", ".join(f"stage {r}: blocks {b.start}-{b.stop - 1}" for r, b in enumerate(blocks))
            log(f"{stages} stages ({backend_for(ring.device)}): {sizes}; the last one decodes")
        trim(models, blocks[0])
        stage = Stage(models.dit, config, blocks[0], models.sampler, None, PhaseTimer(ring.device.type))
        return RingExecutor(
            stage,
            ring,
            board,
            groups,
            capacity=2 * stages,
            blocks=blocks,
            costs=costs,
            decode_depth=1 if threaded else 0,
            processes=processes,
            threads=threads,
        )
    except BaseException:
        for p in processes:
            p.kill()
        raise


def blocks_of(split: Sequence[int], num_blocks: int, stages: int) -> tuple[range, ...]:
    if len(split) != stages or any(n < 1 for n in split) or sum(split) != num_blocks:
        raise ValueError(
            f"split={','.join(map(str, split))} is not allowed: {stages} counts of at least 1 block that add up "
            f"to the model's {num_blocks} blocks"
        )
    starts = [sum(split[:i]) for i in range(stages)]
    return tuple(range(a, a + n) for a, n in zip(starts, split, strict=True))


def spawn(ring: Ring, rank: int) -> subprocess.Popen[bytes]:
    """Stage ``rank`` in a process of its own on this machine."""
    cmd = [sys.executable, "-m", "pipeline.stages.worker", "--rank", str(rank), "--world", str(ring.world)]
    cmd += ["--addr", ring.addr, "--port", str(ring.port), "--device", ring.device.type]
    return subprocess.Popen(cmd)


def share_cores(ring: Ring) -> int:
    """CPU stages on one machine share its cores: each takes its part, unless OMP_NUM_THREADS says
    otherwise (torchrun sets it), so that S processes do not oversubscribe them. Returns the thread
    count before."""
    before = torch.get_num_threads()
    if ring.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ring.world))
    return before


def wait_ready(store: Any, board: Board, stages: int) -> None:
    """Every stage has loaded its blocks (or one failed: its error, here)."""
    keys = [f"ready/{r}" for r in range(1, stages)]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):
        board.check(force=True)
        if time.monotonic() > deadline:
            raise StageFailure(f"the stages were not ready within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


def run_worker(ring: Ring) -> NoReturn:
    """Stage ``ring.rank`` (not 0): load the model, keep this stage's blocks, run until stop."""
    from pipeline.models.loader import load_models
    from pipeline.stages.ring import run_stage

    store = connect(ring, backend_for(ring.device))
    groups = edge_groups(ring.world)
    share_cores(ring)
    plan: StagePlan = pickle.loads(store.get("plan"))
    board = Board(store, ring, plan.timeout)
    try:
        config = plan.config
        if config.device.startswith("cuda"):
            torch.cuda.set_device(ring.device)
        models = load_models(_on(config, ring.device), random_weights=plan.random_weights)
        blocks = plan.blocks[ring.rank]
        trim(models, blocks)
        last = blocks.stop == models.dit.num_blocks
        timer = PhaseTimer(ring.device.type)
        decoder = None
        if last:
            decoder = DecodePhase(
                models.vae, config.fps, plan.decode_bound, plan.threaded_decode, plan.keep_latents, timer
            )
        stage = Stage(models.dit, config, blocks, models.sampler, decoder, timer)
        store.set(f"ready/{ring.rank}", "1")
        run_stage(stage, ring, board, groups)
    except BaseException as e:
        if not isinstance(e, StageFailure):
            board.post(f"{type(e).__name__}: {e}")
        print(f"streamer stage {ring.rank}: error: {e if isinstance(e, StageFailure) else repr(e)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(4)  # at once: the ring is broken, and gloo's teardown would wait for the peer that is gone
    finally:
        board.close()
    # The stop went round and everything this stage owed is sent. Leave without the interpreter's teardown:
    # under torchrun it sometimes destroyed gloo's objects in an order that aborted the process
    # ("terminate called without an active exception", exit -6) after a run that had gone right.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _on(config: SystemConfig, device: torch.device) -> SystemConfig:
    import dataclasses

    return dataclasses.replace(config, device=str(device))
