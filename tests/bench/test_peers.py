"""The peer's source from the package registry (bench/peers/sdv2/source.py) and the bench that times it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.peers.sdv2 import source
from bench.peers.sdv2.source import STREAM_MODULE, WHEEL, RegistryUnreachable, fetch, peer_source
from tests.conftest import ROOT


def test_the_source_is_the_checked_wheel_unpacked_in_the_cache(sdv2_src, monkeypatch):
    assert (sdv2_src / STREAM_MODULE).is_file()
    monkeypatch.delenv("SDV2_SRC", raising=False)
    cached = peer_source()
    assert cached == source.source_dir() and cached.is_relative_to(source.CACHE)
    wheel = source.CACHE / "wheels" / WHEEL
    assert source.sha256(wheel) == source.WHEEL_SHA256


def test_a_wheel_with_another_sha256_is_refused_and_removed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / WHEEL).write_bytes(b"not their wheel")
    with pytest.raises(RuntimeError, match=f"{WHEEL} has sha256 .*, not {source.WHEEL_SHA256}"):
        fetch(tmp_path)
    assert not (wheels / WHEEL).exists()
    assert not source.source_dir(tmp_path).exists()


def test_an_unreachable_registry_is_said_plainly(tmp_path, monkeypatch):
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(RegistryUnreachable, match=r"pip download streamdiffusionv2==0\.1\.1 failed"):
        fetch(tmp_path / "cache")


def test_sdv2_src_must_hold_their_stream_module(tmp_path, monkeypatch):
    monkeypatch.setenv("SDV2_SRC", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"SDV2_SRC=.* does not hold models/wan/causal_stream_inference\.py"):
        peer_source()


def test_the_peer_bench_times_their_loop_beside_ours(sdv2_src, tmp_path):
    out = tmp_path / "peer.json"
    args = ["--rounds", "1", "--iters", "3", "--warmup", "1", "--steps", "2", "--context", "per-step"]
    cmd = [sys.executable, "-m", "bench.peer_sdv2", *args, "--json", str(out)]
    env = dict(os.environ, SDV2_SRC=str(sdv2_src))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    theirs = [r for r in report["rows"] if r["engine"] == "sdv2"]
    assert len(theirs) == 1 and theirs[0]["params"] == 984_256 and theirs[0]["slots_per_forward"] == 2
    case = report["summary"]["per-step/levers-on/steps2"]
    assert case["peer_chunks_per_s_median"] > 0 and case["ours_over_peer_chunks_per_s_median"] > 0
