"""Video files through PyAV, chosen by the name: H.264 in ``.mp4``, VP9 in ``.webm``, and two lossless forms,
FFV1 in Matroska (``.mkv``, RGB as it is: ``bgr0``) and a PNG sequence (``DIR/%05d.png``, ffmpeg's pattern:
frame 0 is ``DIR/00000.png``). A lossless output reads back as exactly the frames generated, so two runs
compared through it differ where their frames do, by one level or more, never by an encoder's rounding.

Frames go to a hidden partial file (a PNG sequence: a hidden partial folder) beside the target; ``close()``
finishes it and moves it into place, so the target is either absent (or as it was) or complete and playable,
also after Ctrl-C, where the caller closes instead of aborting. ``abort()`` removes the partial file or folder;
so does a writer that cannot be set up. A finished PNG sequence replaces every file of its pattern that was
there (the frames of an earlier, longer run do not linger after the new ones).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# extension -> (container, codec, pixel format)
CONTAINERS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".webm": ("webm", "libvpx-vp9", "yuv420p"),
    ".mkv": ("matroska", "ffv1", "bgr0"),  # lossless: RGB kept as it is
}
SEQUENCE_NUMBER = re.compile(r"%(0\d+)?d")  # ffmpeg's image-sequence counter, e.g. %05d
SEQUENCES = (".png",)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputError(ValueError):
    """An output that cannot be written: the message names the path and why."""


def is_sequence(path: str | Path) -> bool:
    """``path`` names an image sequence (its file name holds ffmpeg's counter, ``%05d``)."""
    return "%" in Path(path).name


def check_output_path(path: str | Path) -> Path:
    """Fail early, before any work, if ``path`` cannot be written (unknown extension, a sequence pattern that
    is not one, no folder, no permission). Writes and removes a probe file in the target folder."""
    path = Path(path)
    if is_sequence(path):
        counters = SEQUENCE_NUMBER.findall(path.name)
        if len(counters) != 1 or path.name.count("%") != 1 or path.suffix.lower() not in SEQUENCES:
            raise OutputError(
                f"output {str(path)!r}: an image sequence is a folder and a name with one counter and a "
                f"{'/'.join(SEQUENCES)} extension, e.g. frames/%05d.png"
            )
    elif path.suffix.lower() not in CONTAINERS:
        allowed = [*sorted(CONTAINERS), "DIR/%05d.png"]
        raise OutputError(f"output {str(path)!r}: extension {path.suffix!r} is not supported; use one of {allowed}")
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
        fmt, codec, pix_fmt = CONTAINERS[self.path.suffix.lower()]
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
        stream.pix_fmt = pix_fmt
        stream.time_base = Fraction(1, fps)
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": str(crf), "threads": "1"}
        elif codec == "ffv1":
            stream.options = {"threads": "1"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf + 12), "b": "0", "threads": "1"}
        self._stream = stream

    def write(self, frames: np.ndarray) -> None:
        check_frames(frames, self.width, self.height)
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


def check_frames(frames: np.ndarray, width: int, height: int) -> None:
    if frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ValueError(f"frames of shape {frames.shape} do not fit a {width}x{height} RGB video")


class PngSequence:
    """Each frame a PNG file (PyAV's PNG encoder, RGB as it is), named by the pattern's counter from 0."""

    def __init__(self, path: str | Path, width: int, height: int) -> None:
        self.path = check_output_path(path)
        self.name = str(self.path)
        self.width, self.height = width, height
        self.folder = self.path.parent
        counter = SEQUENCE_NUMBER.search(self.path.name)
        assert counter is not None  # check_output_path
        before, after = self.path.name[: counter.start()], self.path.name[counter.end() :]
        self._ours = re.compile(re.escape(before) + r"\d+" + re.escape(after))  # the names of the pattern's files
        hidden = f".{before or 'frames'}{after}."
        self.partial = Path(tempfile.mkdtemp(prefix=hidden, suffix=".partial", dir=self.folder))
        self.frames = 0
        self._codec = av.CodecContext.create("png", "w")
        self._codec.width, self._codec.height, self._codec.pix_fmt = width, height, "rgb24"

    def _file(self, folder: Path, index: int) -> Path:
        return folder / (self.path.name % index)

    def write(self, frames: np.ndarray) -> None:
        check_frames(frames, self.width, self.height)
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            self._file(self.partial, self.frames).write_bytes(b"".join(bytes(p) for p in self._codec.encode(frame)))
            self.frames += 1

    def close(self) -> Path:
        """The pattern's files in the folder become this run's frames (any others of the pattern go)."""
        for old in self.folder.iterdir():
            if self._ours.fullmatch(old.name) and old.is_file():
                old.unlink()
        mode = 0o666 & ~_umask()
        for index in range(self.frames):
            done = self._file(self.partial, index)
            os.chmod(done, mode)
            os.replace(done, self._file(self.folder, index))
        self.partial.rmdir()
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
