"""Video files through PyAV: H.264 in mp4, VP9 in webm, chosen by the extension.

Frames go to a hidden partial file beside the target; ``close()`` finishes the container and moves
it into place, so the target is either absent or a complete, playable file (also after Ctrl-C,
where the caller closes instead of aborting). ``abort()`` removes the partial file; so does a
writer that cannot be set up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CONTAINERS = {".mp4": ("mp4", "libx264"), ".webm": ("webm", "libvpx-vp9")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputError(ValueError):
    """An output that cannot be written: the message names the path and why."""


def check_output_path(path: str | Path) -> Path:
    """Fail early, before any work, if ``path`` cannot be written (unknown extension, no folder,
    no permission). Writes and removes a probe file in the target folder."""
    path = Path(path)
    if path.suffix.lower() not in CONTAINERS:
        raise OutputError(
            f"output {str(path)!r}: extension {path.suffix!r} is not supported; use one of {sorted(CONTAINERS)}"
        )
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output {str(path)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output {str(path)!r} cannot be written: {e.strerror}") from None
    return path


class FileWriter:
    """Encode uint8 [N, H, W, 3] frames at a constant ``fps``."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int, crf: int = 20) -> None:
        self.path = check_output_path(path)
        self.name = str(self.path)
        fmt, codec = CONTAINERS[self.path.suffix.lower()]
        fd, partial = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent or ".")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the finished file gets the usual mode
        os.close(fd)
        self.partial = Path(partial)
        self.frames = 0
        self.width, self.height = width, height
        try:
            self._container = av.open(str(self.partial), mode="w", format=fmt)
        except (av.FFmpegError, OSError) as e:
            self.partial.unlink(missing_ok=True)
            raise OutputError(f"output {self.name!r} cannot be written: {e}") from None
        stream = self._container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": str(crf), "threads": "1"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf + 12), "b": "0", "threads": "1"}
        self._stream = stream

    def write(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames of shape {frames.shape} do not fit a {self.width}x{self.height} RGB video")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> Path:
        """Flush the encoder, finish the container and move it to the target path."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the partial file; the container may be broken (a full disk), so closing it may fail."""
        with contextlib.suppress(av.FFmpegError, OSError):
            self._container.close()
        self.partial.unlink(missing_ok=True)
