"""StreamDiffusionV2's source, from the package registry, unpacked into the repository's ignored cache.

    python -m bench.peers.sdv2.source        # fetch it once (``make peers``); prints the folder

``pip download --no-deps streamdiffusionv2==0.1.1`` brings the wheel; its sha256 must be :data:`WHEEL_SHA256`
(kept here) before it is unpacked into ``.cache/peers/streamdiffusionv2-0.1.1/src``. ``$SDV2_SRC`` overrides
the folder (a checkout of their repository, say); nothing else is looked for. The project never imports the
peer's packages except through :mod:`bench.peers.sdv2.driver` and the tests that compare with its modules.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.config import REPO_ROOT

PACKAGE = "streamdiffusionv2"
VERSION = "0.1.1"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "8a04de9e0c44ed30d971d6aff849ce6e302338187a39a0f44cfe924df1e9c9c2"
CACHE = REPO_ROOT / ".cache" / "peers"
STREAM_MODULE = Path("models/wan/causal_stream_inference.py")  # what a source folder must hold
WAN_MODULES = Path("models/wan/wan_base/modules")  # their copy of Wan2.1's own model, VAE and T5 files


class RegistryUnreachable(RuntimeError):
    """``pip download`` could not bring the peer's wheel (no network to the package registry, or it is down)."""


def source_dir(cache: Path = CACHE) -> Path:
    """Where the unpacked source is (or will be) kept."""
    return cache / f"{PACKAGE}-{VERSION}" / "src"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(cache: Path = CACHE) -> Path:
    """The peer's source folder, downloaded and checked once; later calls find it in the cache."""
    src = source_dir(cache)
    if (src / STREAM_MODULE).is_file():
        return src
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        cmd += [f"{PACKAGE}=={VERSION}", "-d", str(wheels)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RegistryUnreachable(f"pip download {PACKAGE}=={VERSION} took over 300 s") from None
        if done.returncode != 0 or not wheel.is_file():
            said = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:]) or f"exit {done.returncode}"
            raise RegistryUnreachable(f"pip download {PACKAGE}=={VERSION} failed: {said}")
    got = sha256(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL} has sha256 {got}, not {WHEEL_SHA256}: refused (removed; fetch again)")
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp, src)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it made
    return src


def peer_source() -> Path:
    """``$SDV2_SRC`` if set (it must hold their stream module), else the cache, fetched if absent."""
    given = os.environ.get("SDV2_SRC")
    if given:
        src = Path(given).expanduser().resolve()
        if not (src / STREAM_MODULE).is_file():
            raise FileNotFoundError(f"SDV2_SRC={given!r} does not hold {STREAM_MODULE} (StreamDiffusionV2's source)")
        return src
    return fetch()


def main() -> int:
    try:
        print(peer_source())
    except (RegistryUnreachable, RuntimeError, FileNotFoundError) as e:
        print(f"bench.peers.sdv2.source: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
