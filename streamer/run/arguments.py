"""``streamer run``'s flags, checked before anything is loaded: every number in its range, the outputs (two
that are one file, or one that is the input, are refused), ``--split``, ``--stages`` and ``--timesteps``."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

from pipeline.config import MAX_FPS, MAX_SIZE
from streamer.egress.file import OutputError, check_output_path
from streamer.egress.rtmp import check_rtmp_url, is_stream_url
from streamer.flags import MAX_SECONDS, check_flag

MAX_STAGE_TIMEOUT = 600  # seconds a stage may go without a heartbeat
MAX_RETRY_SECONDS = 3600
MAX_KEYFRAME_SECONDS = 60


@dataclass(frozen=True)
class Target:
    """One ``--out``/``--also-record`` destination, checked before any work starts."""

    where: str  # a file path or a stream URL
    stream: bool  # True for rtmp:// URLs


def check_numbers(args: argparse.Namespace) -> None:
    """Every number flag in its range, nan and inf never; ValueError naming the flag and the value."""
    check_flag(
        "--seconds", args.seconds, 0, MAX_SECONDS, f"a finite number more than 0, at most {MAX_SECONDS} (365 days)",
        low_open=True,
    )  # fmt: skip
    check_flag("--frames", args.frames, 1, math.inf, "an integer from 1", integer=True)
    check_flag(
        "--retry-seconds", args.retry_seconds, 0, MAX_RETRY_SECONDS, f"a finite number from 0 to {MAX_RETRY_SECONDS}"
    )
    check_flag(
        "--keyframe-seconds", args.keyframe_seconds, 0, MAX_KEYFRAME_SECONDS,
        f"a finite number more than 0, at most {MAX_KEYFRAME_SECONDS}", low_open=True,
    )  # fmt: skip
    check_flag("--strength", args.strength, 0, 1, "a number in (0, 1]", low_open=True)
    check_flag("--fps", args.fps, 1, MAX_FPS, f"an integer from 1 to {MAX_FPS}", integer=True)
    check_flag("--seed", args.seed, 0, 2**63, "an integer in [0, 2**63)", integer=True, high_open=True)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_flag(flag, value, 1, MAX_SIZE, f"an integer from 1 to {MAX_SIZE}", integer=True)
    check_stage_timeout(args.stage_timeout)


def check_stage_timeout(seconds: float) -> None:
    check_flag(
        "--stage-timeout", seconds, 0, MAX_STAGE_TIMEOUT, f"more than 0, at most {MAX_STAGE_TIMEOUT} s", low_open=True
    )


def check_targets(outs: list[str], also_record: list[str], input_: str | None = None) -> list[Target]:
    """The outputs, each checked; refused (OutputError) where two are one file, or one is the input file.

    Files are compared as files, not as spellings (``a.mp4``, ``./a.mp4``, a symlink or a hard link to
    it are one file); stream URLs as written. Nothing is written before this passes."""
    wheres = [*outs, *also_record]
    input_key = file_identity(path) if input_ is not None and (path := input_file(input_)) is not None else None
    seen: dict[tuple[object, ...], str] = {}
    for where in wheres:
        key = ("stream", where) if is_stream_url(where) else file_identity(where)
        if key == input_key:
            raise OutputError(
                f"output {where!r} is the same file as the input {input_!r}; writing it would destroy the input"
            )
        if key in seen:
            what = "stream" if key[0] == "stream" else "file"
            raise OutputError(f"outputs {seen[key]!r} and {where!r} are the same {what}; each output needs its own")
        seen[key] = where
    return [
        Target(check_rtmp_url(where), stream=True)
        if is_stream_url(where)
        else Target(str(check_output_path(where)), stream=False)
        for where in wheres
    ]


def input_file(where: str) -> str | None:
    """The file path an ``--input`` reads, or None for a stream URL or a pipe (no file to protect)."""
    if where.startswith("file:"):  # FFmpeg's file protocol: the rest is the path
        return where.removeprefix("file:")
    if is_stream_url(where) or where.startswith("pipe:"):
        return None
    return where


def file_identity(path: str) -> tuple[object, ...]:
    """What ``path`` names as a file: its device and inode where it exists (a symlink or a hard link to a
    file is that file); else the real path, folders and symlinks resolved (also a dangling symlink's target)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def parse_split(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--split={text!r} is not allowed: blocks per stage, e.g. 16,14") from None


def check_stages(stages: int, split: list[int] | None, num_blocks: int) -> None:
    check_flag("--stages", stages, 1, num_blocks, f"from 1 to the model's {num_blocks} blocks (one each)", integer=True)
    if split is not None and (len(split) != stages or min(split) < 1 or sum(split) != num_blocks):
        raise ValueError(
            f"--split={','.join(map(str, split))} is not allowed: {stages} counts of at least 1 block adding up to "
            f"the model's {num_blocks}"
        )


def parse_timesteps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--timesteps={text!r} is not allowed: comma-separated numbers, e.g. 700,500,400,200"
        ) from None
