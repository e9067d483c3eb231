"""Prompt schedule files: parsing, times, due events and frames, and an error naming the line for every bad input."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.types import shown
from streamer import prompts as prompts_module
from streamer.prompts import PromptEvent, PromptScript, PromptScriptError, load_prompts, parse_time

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# The example of the module's documentation: the docs stay true.
EXAMPLE = textwrap.dedent(prompts_module.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]) + "\n"
EXAMPLE_EVENTS = (
    PromptEvent(at=0.0, prompt="a lighthouse on a cliff at dusk", cut=False, line=1),
    PromptEvent(at=4.5, prompt="a storm rolls in", cut=False, line=3),
    PromptEvent(at=10.0, prompt="morning, calm sea", cut=True, line=5),
)
TIMES_ALLOWED = re.escape('allowed: a number of seconds >= 0, or a string "M:SS", "H:MM:SS", "M:SS.s" or "H:MM:SS.s"')


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> PromptScript:
    return load_prompts(write(tmp_path, text))


def entries(times: list[float]) -> str:
    """A schedule with a prompt at each of ``times``, two lines per entry (entry ``i`` on line ``2 * i + 1``)."""
    return yaml.safe_dump([{"at": t, "prompt": f"prompt {i}"} for i, t in enumerate(times)], sort_keys=True)


# ---- reading ----


def test_the_example_gives_its_events_with_their_lines(tmp_path: Path) -> None:
    assert load(tmp_path, EXAMPLE).events == EXAMPLE_EVENTS


def test_a_path_may_be_a_string_and_prompts_are_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, "- at: 0\n  prompt: >\n    folded\n    text\n- at: 1\n  cut: yes\n")
    assert load_prompts(str(path)).events == (
        PromptEvent(at=0.0, prompt="folded text", cut=False, line=1),
        PromptEvent(at=1.0, prompt=None, cut=True, line=5),
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1:30", 90.0),
        ("0:05.5", 5.5),
        ("1:00:00", 3600.0),
        ("1:02:03.25", 3723.25),
        ("90:00", 5400.0),  # minutes may pass 59 without hours
        (" 0:10 ", 10.0),
        ("4.5", 4.5),
        ("1e3", 1000.0),  # what PyYAML reads from an unquoted 1e3
        (0, 0.0),
        (7, 7.0),
        (4.5, 4.5),
    ],
)
def test_parse_time(value: object, seconds: float) -> None:
    assert parse_time(value) == seconds


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (-1, "is negative"),
        (-0.5, "is negative"),
        (float("nan"), "is not finite"),
        (float("inf"), "is not finite"),
        (10**400, "is past 31536000 s"),
        (1e300, "is past 31536000 s"),
        ("9" * 400 + ":00:00", "is past 31536000 s"),
        ("1e400", "is not finite"),
        (True, "is a bool, not a number or a string"),
        (None, "is a NoneType, not a number or a string"),
        ([1], "is a list, not a number or a string"),
        ("", "is not a time"),
        ("abc", "is not a time"),
        ("-0:10", "is not a time"),
        ("1:60", "is not a time"),
        ("1:5", "is not a time"),
        ("1:60:00", "is not a time"),
        ("1:00:60", "is not a time"),
        ("1:2:3:4", "is not a time"),
        ("1.5:00", "is not a time"),
    ],
)
def test_parse_time_rejects(value: object, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid time {shown(value)}: {why}; ") + TIMES_ALLOWED):
        parse_time(value)


def test_a_time_of_401_digits_is_named_shortened():
    with pytest.raises(ValueError, match=r"^invalid time 100000000000…\(401 digits\): is past 31536000 s; "):
        parse_time(10**400)


def test_times_in_the_file_quoted_or_not(tmp_path: Path) -> None:
    # Unquoted, PyYAML reads 1:30 and 1:00:00 as base-60 integers and 0:05.5 as a float: the same seconds.
    text = "".join(f"- at: {t}\n  cut: true\n" for t in ['"0:05.5"', "1:30", '"1:30.5"', "1:00:00", '"1:00:01"'])
    assert [e.at for e in load(tmp_path, text).events] == [5.5, 90.0, 90.5, 3600.0, 3601.0]
    text = "- at: 0:05.5\n  cut: true\n- at: 0:10\n  cut: true\n"
    assert [e.at for e in load(tmp_path, text).events] == [5.5, 10.0]


def test_a_prompt_of_2000_characters_is_allowed(tmp_path: Path) -> None:
    assert load(tmp_path, f"- at: 0\n  prompt: {'a' * 2000}\n").initial_prompt() == "a" * 2000


# ---- the schedule ----


def test_initial_prompt(tmp_path: Path) -> None:
    assert load(tmp_path, EXAMPLE).initial_prompt() == "a lighthouse on a cliff at dusk"
    assert load(tmp_path, "- at: 0.5\n  prompt: late\n").initial_prompt() is None
    assert load(tmp_path, "- at: 0\n  cut: true\n- at: 1\n  prompt: x\n").initial_prompt() is None


def test_due_takes_events_after_the_start_up_to_and_including_the_end() -> None:
    schedule = PromptScript(EXAMPLE_EVENTS)
    start, storm, morning = EXAMPLE_EVENTS
    assert schedule.due(0, 4.4) == []
    assert schedule.due(0, 4.5) == [storm]
    assert schedule.due(4.5, 9.99) == []
    assert schedule.due(4.5, 10) == [morning]
    assert schedule.due(0, 100) == [storm, morning]
    assert schedule.due(10, 100) == []
    assert schedule.due(5, 5) == []
    # The entry at 0 is the initial state: never due, not even from before the start.
    assert schedule.due(-1, 100) == [storm, morning]
    assert start not in schedule.due(float("-inf"), 0)


@pytest.mark.parametrize(
    ("at", "fps", "frame"),
    [
        (0.0, 16, 0),
        (4.5, 16, 72),
        (10.0, 24, 240),
        (0.05, 16, 1),  # 0.8: the first frame at or after the time
        (0.34, 3, 2),  # 1.02
        (4.15, 60, 249),  # 4.15 * 60 = 249.00000000000003: noise, not a frame later
        (8.3, 30, 249),  # 8.3 * 30 = 249.00000000000003
        (249.001 / 60, 60, 250),  # a real fraction of a frame past 249
        (1 / 3, 3, 1),
    ],
)
def test_frame_of(at: float, fps: int, frame: int) -> None:
    event = PromptEvent(at=at, prompt="x", cut=False, line=1)
    assert PromptScript((event,)).frame_of(event, fps) == frame


def test_frame_of_needs_a_positive_fps() -> None:
    event = PromptEvent(at=1.0, prompt="x", cut=False, line=1)
    with pytest.raises(ValueError, match="fps must be positive, got 0"):
        PromptScript((event,)).frame_of(event, 0)


# ---- errors ----


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: cannot read the prompt schedule: No such file")):
        load_prompts(path)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "prompts.yaml"
    path.write_bytes(b"- at: 0\n  prompt: caf\xe9\n")
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: the prompt schedule is not UTF-8 text")):
        load_prompts(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # YAML syntax: the line of the problem
        ("- at: 0\n  prompt: [unclosed\n- at: 1\n", r"line 3: invalid YAML: while parsing a flow sequence \(line 2\)"),
        ('- at: 0\n  prompt: x\n- at: 1\n  prompt: "open\n', r"line 5: invalid YAML: while scanning a quoted scalar"),
        ("- at: 0\n\tprompt: x\n", r"line 2: invalid YAML: found character '\\t' that cannot start any token"),
        ("- at: 0\n  prompt: x\n---\n- at: 1\n", r"line 3: invalid YAML: expected a single document"),
        ("- at: !!python/object:os.system x\n", r"line 1: invalid YAML: could not determine a constructor"),
        ("- at: 0\n  cut: true\n- at: !!int abc\n  cut: true\n", r"line 3: invalid value 'abc': invalid literal"),
        # the top level
        ("", r"the prompt schedule is empty; expected a list of entries"),
        ("# only a comment\n", r"the prompt schedule is empty; expected a list of entries"),
        ("at: 0\nprompt: x\n", r"line 1: expected a list of entries \(- at: \.\.\.\), got a mapping"),
        ("# a comment\nhello\n", r"line 2: expected a list of entries \(- at: \.\.\.\), got 'hello'"),
        ("# a comment\n[]\n", r"line 2: the list of entries is empty; expected at least one"),
        (
            "- at: 0\n  prompt: x\n- hello\n",
            r"line 3: an entry must be a mapping with keys at, prompt, cut; got 'hello'",
        ),
        (
            "- at: 0\n  prompt: x\n- [1, 2]\n",
            r"line 3: an entry must be a mapping with keys at, prompt, cut; got a list",
        ),
        # keys
        ("- at: 0\n  prompt: x\n- at: 1\n  promt: y\n", r"line 3: unknown key 'promt'; allowed: at, prompt, cut$"),
        ("- at: 0\n  prompt: x\n  on: 1\n", r"line 1: unknown key True; allowed: at, prompt, cut$"),  # YAML 1.1: on
        ("- at: 0\n  prompt: x\n  prompt: y\n", r"line 1: duplicate key 'prompt'$"),
        (
            "- at: 0\n  prompt: x\n- prompt: y\n",
            r"line 3: missing key 'at' \(the time of the entry\); " + TIMES_ALLOWED,
        ),
        ("- at: 1\n", r"line 1: entry at=1 has neither a prompt nor cut: true; it needs at least one$"),
        ("- at: 0\n  prompt: x\n- at: 1\n  cut: false\n", r"line 3: entry at=1 has neither a prompt nor cut: true"),
        # at
        ("- at: -1\n  prompt: x\n", r"line 1: at=-1 is negative; " + TIMES_ALLOWED),
        ("- at: '-0:10'\n  prompt: x\n", r"line 1: at='-0:10' is not a time; " + TIMES_ALLOWED),
        ("- at: .nan\n  prompt: x\n", r"line 1: at=nan is not finite; " + TIMES_ALLOWED),
        ("- at: .inf\n  prompt: x\n", r"line 1: at=inf is not finite; " + TIMES_ALLOWED),
        ("- at: true\n  prompt: x\n", r"line 1: at=True is a bool, not a number or a string; " + TIMES_ALLOWED),
        ("- at:\n  prompt: x\n", r"line 1: at=None is a NoneType, not a number or a string; " + TIMES_ALLOWED),
        ("- at: [1]\n  prompt: x\n", r"line 1: at=\[1\] is a list, not a number or a string; " + TIMES_ALLOWED),
        ("- at: soon\n  prompt: x\n", r"line 1: at='soon' is not a time; " + TIMES_ALLOWED),
        ("- at: '1:75'\n  prompt: x\n", r"line 1: at='1:75' is not a time; " + TIMES_ALLOWED),
        ("- at: 2001-01-01\n  prompt: x\n", r"line 1: at=datetime\.date\(2001, 1, 1\) is a date, not a number"),
        # prompt
        ("- at: 0\n  prompt: 5\n", r"line 1: prompt=5 is not a string; allowed: text of 1 to 2000 characters$"),
        ("- at: 0\n  prompt:\n", r"line 1: prompt=None is not a string; allowed: text of 1 to 2000 characters$"),
        ("- at: 0\n  prompt: '  '\n", r"line 1: prompt='  ' is empty; allowed: text of 1 to 2000 characters$"),
        (
            f"- at: 0\n  prompt: {'a' * 2001}\n",
            r"line 1: prompt='a{32}'…\(2001 characters\) has 2001 characters; allowed: text of 1 to",
        ),
        # cut
        ("- at: 0\n  cut: 'true'\n", r"line 1: cut='true' is not a boolean; allowed: true, false$"),
        ("- at: 0\n  prompt: x\n  cut: 1\n", r"line 1: cut=1 is not a boolean; allowed: true, false$"),
        # order
        (
            "- at: 0\n  prompt: a\n- at: 4.5\n  prompt: b\n- at: 3\n  prompt: c\n",
            r"line 5: at=3 is not after line 3 \(at=4\.5\); times must be strictly increasing$",
        ),
        ("- at: 1\n  prompt: a\n- at: 1.0\n  cut: true\n", r"line 3: at=1\.0 is not after line 1 \(at=1\)"),
        (
            "- at: 10\n  prompt: a\n- at: '0:10'\n  cut: true\n",
            r"line 3: at='0:10' \(10 s\) is not after line 1 \(at=10\)",
        ),
        (
            "- at: '0:05.5'\n  prompt: a\n- at: 5\n  cut: true\n",
            r"line 3: at=5 is not after line 1 \(at='0:05\.5' \(5\.5 s\)\)",
        ),
    ],
)
def test_an_invalid_schedule_names_the_file_the_line_and_the_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: ") + message):
        load_prompts(path)


def deep_mapping(depth: int) -> str:
    """``depth`` mappings, one inside the other, in block style (one space of indentation a level)."""
    return "".join(f"{' ' * i}k{i}:\n" for i in range(depth - 1)) + f"{' ' * (depth - 1)}k: v\n"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3000 + "]" * 3000,
        "- " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
        deep_mapping(1000),  # 0.5 MB of indentation
        "- at: 0\n  prompt: " + "[" * 33 + "]" * 33 + "\n",  # one level past the limit, below an entry
    ],
    ids=["list-3000", "flow-mapping-3000", "block-mapping-1000", "value-33"],
)
def test_nesting_deeper_than_the_limit_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: line ") + r"\d+: nested more than 32 levels deep"):
        load_prompts(path)


def test_nesting_up_to_the_limit_is_read_and_checked_as_usual(tmp_path: Path) -> None:
    # the list of entries, an entry and its value are 3 levels; 30 more in the value make 32
    path = write(tmp_path, "- at: 0\n  prompt: " + "[" * 30 + "]" * 30 + "\n")
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: line 1: prompt=[[[") + r".* is not a string"):
        load_prompts(path)


def test_a_file_over_1_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, "- at: 0\n  prompt: x\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(PromptScriptError, match=re.escape(f"{path}: the prompt schedule is over 1 MiB")):
        load_prompts(path)


# ---- properties ----

distinct_times = st.lists(
    st.one_of(st.integers(0, 10**6), st.floats(0, 1e6, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=20,
    unique_by=float,
)


@PROPERTY
@given(times=distinct_times)
def test_sorted_distinct_times_load_back_in_order(tmp_path: Path, times: list[float]) -> None:
    times = sorted(times)
    schedule = load(tmp_path, entries(times))
    assert [e.at for e in schedule.events] == [float(t) for t in times]
    assert [e.line for e in schedule.events] == [2 * i + 1 for i in range(len(times))]
    assert [e.prompt for e in schedule.events] == [f"prompt {i}" for i in range(len(times))]


@PROPERTY
@given(data=st.data(), times=distinct_times.filter(lambda ts: len(ts) >= 2))
def test_unsorted_times_are_an_error_at_the_first_step_back(
    tmp_path: Path, data: st.DataObject, times: list[float]
) -> None:
    shuffled = data.draw(st.permutations(times))
    assume(shuffled != sorted(shuffled))
    back = next(i for i in range(1, len(shuffled)) if shuffled[i] < shuffled[i - 1])
    with pytest.raises(PromptScriptError, match=rf": line {2 * back + 1}: at=.* is not after line {2 * back - 1} "):
        load(tmp_path, entries(shuffled))


@PROPERTY
@given(ms=st.integers(0, 100 * 3600 * 1000))
def test_clock_strings_give_their_seconds(ms: int) -> None:
    seconds, fraction = divmod(ms, 1000)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    assert parse_time(f"{hours}:{minute:02}:{sec:02}.{fraction:03}") == pytest.approx(ms / 1000, abs=1e-9)
    assert parse_time(f"{minutes}:{sec:02}.{fraction:03}") == pytest.approx(ms / 1000, abs=1e-9)
