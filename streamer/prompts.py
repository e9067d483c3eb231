"""Prompt schedules: a YAML file that scripts a long take (``streamer run --prompts prompts.yaml``).

The file is a list of entries. Each has a time ``at`` and one or both of ``prompt`` and ``cut``::

    - at: 0
      prompt: a lighthouse on a cliff at dusk
    - at: 4.5
      prompt: a storm rolls in
    - at: "0:10"
      cut: true
      prompt: morning, calm sea

* ``at``: seconds from the start of the video, required. A number >= 0 (not NaN or infinite), or a string
  ``"M:SS"``, ``"H:MM:SS"``, either with a fraction (``"0:05.5"`` is 5.5 s), or a plain number (``"1e3"``).
* ``prompt``: the prompt from that time on; text of 1 to 2000 characters (surrounding whitespace is stripped).
* ``cut``: ``true`` for a hard cut at that time, applied before the prompt of the same entry; ``false`` is no cut.

An entry needs a ``prompt`` or ``cut: true``; other keys are errors, and times must be strictly increasing. The
entry at time 0, if any, sets the initial state. Every violation raises :class:`PromptScriptError`, whose message names
the file, the line of the entry, the field and its value, and what is allowed. A file over 1 MiB, or nested more
than 32 levels deep (a schedule needs 3: the list, an entry, its values), is refused before it is read further.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import yaml

from pipeline.types import shown, within
from streamer.flags import MAX_SECONDS

KEYS = ("at", "prompt", "cut")
MAX_PROMPT = 2000
MAX_BYTES = 1 << 20  # a schedule of thousands of entries is a few hundred KiB
MAX_DEPTH = 32  # nesting levels of YAML collections and values; a schedule needs 3
TIME_FORMS = 'a number of seconds >= 0, or a string "M:SS", "H:MM:SS", "M:SS.s" or "H:MM:SS.s"'
PROMPT_FORM = f"text of 1 to {MAX_PROMPT} characters"

# "H:MM:SS(.s)" (groups 1, 2, 4) or "M:SS(.s)" (groups 3, 4); minutes may exceed 59 only without hours.
_CLOCK = re.compile(r"(?:(\d+):([0-5]\d)|(\d+)):([0-5]\d(?:\.\d+)?)")
_DECIMAL = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")


class PromptScriptError(ValueError):
    """A prompt schedule that can't be used; the message names the file, the line, the field and the value."""


@dataclass(frozen=True)
class PromptEvent:
    at: float  # seconds
    prompt: str | None  # the prompt from then on, or None
    cut: bool  # a hard cut at that time (applied before the prompt of the same entry)
    line: int  # the entry's line in the file, for messages


@dataclass(frozen=True)
class PromptScript:
    events: tuple[PromptEvent, ...]  # in strictly increasing time

    def initial_prompt(self) -> str | None:
        """The prompt of an entry at time 0, if any."""
        return next((e.prompt for e in self.events if e.at == 0), None)

    def due(self, after: float, until: float) -> list[PromptEvent]:
        """The events with ``after < at <= until``, in order; one at time 0 is the initial state, never due."""
        return [e for e in self.events if e.at > 0 and after < e.at <= until]

    def frame_of(self, event: PromptEvent, fps: int) -> int:
        """The first video frame the event applies to: ``ceil(at * fps)``, minus float noise (8.3 s at 30 fps: 249)."""
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        frame = event.at * fps
        nearest = round(frame)
        return nearest if abs(frame - nearest) < 1e-6 else math.ceil(frame)


def parse_time(value: object) -> float:
    """``value`` (a number of seconds, "M:SS(.s)" or "H:MM:SS(.s)") in seconds; ValueError naming it if invalid."""
    try:
        return _seconds(value)
    except ValueError as e:
        raise ValueError(f"invalid time {shown(value)}: {e}; allowed: {TIME_FORMS}") from None


def load_prompts(path: str | Path) -> PromptScript:
    """Read and check the prompt schedule at ``path`` (see the module docstring); PromptScriptError if it is invalid."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more, whatever the file is (/dev/zero, a pipe)
        if len(data) > MAX_BYTES:
            raise PromptScriptError(f"{path}: the prompt schedule is over 1 MiB; allowed: at most {MAX_BYTES} bytes")
        text = data.decode("utf-8")
    except OSError as e:
        raise PromptScriptError(f"{path}: cannot read the prompt schedule: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PromptScriptError(f"{path}: the prompt schedule is not UTF-8 text: {e}") from e

    loader = _Loader(text, path)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PromptScriptError(f"{path}: the prompt schedule is empty; expected a list of entries (- at: ...)")
        if not isinstance(root, yaml.SequenceNode):
            raise _error(path, root, f"expected a list of entries (- at: ...), got {_kind(root)}")
        if not root.value:
            raise _error(path, root, "the list of entries is empty; expected at least one")
        entries = [_entry(path, loader, node) for node in root.value]
    except yaml.MarkedYAMLError as e:
        raise PromptScriptError(f"{path}: {_yaml_problem(e)}") from e
    except yaml.YAMLError as e:
        raise PromptScriptError(f"{path}: invalid YAML: {e}") from e
    finally:
        loader.dispose()

    for (before, before_at), (event, at) in pairwise(entries):
        if event.at <= before.at:
            raise PromptScriptError(
                f"{path}: line {event.line}: {_show_at(at, event.at)} is not after line {before.line} "
                f"({_show_at(before_at, before.at)}); times must be strictly increasing"
            )
    return PromptScript(tuple(event for event, _ in entries))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing to compose nodes nested more than ``MAX_DEPTH`` deep.

    The composer recurses once per level, so without a limit a file of ``[[[[...`` ends in a RecursionError."""

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self._path = path
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise PromptScriptError(
                    f"{self._path}: line {line}: nested more than {MAX_DEPTH} levels deep; "
                    "a schedule is a list of entries (- at: ...) of plain values"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _seconds(value: object) -> float:
    """``value`` in seconds; otherwise ValueError saying what is wrong with it (as a predicate: "is negative")."""
    if isinstance(value, str):
        text = value.strip()
        if clock := _CLOCK.fullmatch(text):
            hours, minutes_after_hours, minutes, seconds = clock.groups()
            whole = int(hours) * 3600 + int(minutes_after_hours) * 60 if hours is not None else int(minutes) * 60
            if not within(whole, 0, MAX_SECONDS):
                raise ValueError(f"is past {MAX_SECONDS} s")
            total = whole + float(seconds)
        elif _DECIMAL.fullmatch(text):
            total = float(text)
        else:
            raise ValueError("is not a time")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, int) and not within(value, 0, MAX_SECONDS):
            raise ValueError("is negative" if value < 0 else f"is past {MAX_SECONDS} s")
        total = float(value)
    else:
        raise ValueError(f"is a {type(value).__name__}, not a number or a string")
    if not math.isfinite(total):
        raise ValueError("is not finite")
    if total < 0:
        raise ValueError("is negative")
    if total > MAX_SECONDS:
        raise ValueError(f"is past {MAX_SECONDS} s")
    return total


def _entry(path: Path, loader: yaml.SafeLoader, node: yaml.Node) -> tuple[PromptEvent, object]:
    """The event of one entry, and its ``at`` as written (for messages)."""
    if not isinstance(node, yaml.MappingNode):
        raise _error(path, node, f"an entry must be a mapping with keys {', '.join(KEYS)}; got {_kind(node)}")
    fields: dict[str, object] = {}
    for key_node, value_node in node.value:
        key = _construct(path, loader, key_node)
        if not isinstance(key, str) or key not in KEYS:
            raise _error(path, node, f"unknown key {shown(key)}; allowed: {', '.join(KEYS)}")
        if key in fields:
            raise _error(path, node, f"duplicate key {key!r}")
        fields[key] = _construct(path, loader, value_node)

    if "at" not in fields:
        raise _error(path, node, f"missing key 'at' (the time of the entry); allowed: {TIME_FORMS}")
    raw_at = fields["at"]
    try:
        at = _seconds(raw_at)
    except ValueError as e:
        raise _error(path, node, f"at={shown(raw_at)} {e}; allowed: {TIME_FORMS}") from None

    prompt = None
    if "prompt" in fields:
        raw = fields["prompt"]
        if not isinstance(raw, str):
            raise _error(path, node, f"prompt={shown(raw)} is not a string; allowed: {PROMPT_FORM}")
        prompt = raw.strip()
        if not prompt:
            raise _error(path, node, f"prompt={raw!r} is empty; allowed: {PROMPT_FORM}")
        if len(prompt) > MAX_PROMPT:
            raise _error(path, node, f"prompt={shown(raw)} has {len(prompt)} characters; allowed: {PROMPT_FORM}")

    cut = fields.get("cut", False)
    if not isinstance(cut, bool):
        raise _error(path, node, f"cut={shown(cut)} is not a boolean; allowed: true, false")
    if prompt is None and not cut:
        raise _error(path, node, f"entry at={shown(raw_at)} has neither a prompt nor cut: true; it needs at least one")
    return PromptEvent(at=at, prompt=prompt, cut=cut, line=_line(node)), raw_at


def _construct(path: Path, loader: yaml.SafeLoader, node: yaml.Node) -> object:
    """The Python value of ``node``; a tagged value that doesn't parse (``!!int abc``) is a PromptScriptError."""
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError) as e:
        raise _error(path, node, f"invalid value {shown(node.value)}: {e}") from None


def _error(path: Path, node: yaml.Node, message: str) -> PromptScriptError:
    return PromptScriptError(f"{path}: line {_line(node)}: {message}")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return shown(node.value)


def _show_at(raw: object, seconds: float) -> str:
    """``at`` as written, with its seconds where it was written as a string: "at='0:10' (10 s)"."""
    if not isinstance(raw, str):
        return f"at={shown(raw)}"
    text = repr(seconds)
    return f"at={shown(raw)} ({text.removesuffix('.0')} s)"


def _yaml_problem(e: yaml.MarkedYAMLError) -> str:
    """A YAML error as "line N: invalid YAML: ...", the line being where the problem was found."""
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}: " if mark is not None else ""
    context = f"{e.context} (line {e.context_mark.line + 1}): " if e.context and e.context_mark is not None else ""
    return f"{where}invalid YAML: {context}{e.problem or e.context}"
