"""Number flags of ``streamer run`` and ``streamer serve``: each in its range, checked before it is used.

The check compares the value as argparse made it (an int of any size, or a float that may be inf or nan)
before anything converts it, and the error names the flag and the value, shortened
(:func:`pipeline.types.shown`): ``--seed=100000000000…(401 digits) is not allowed: an integer in [0, 2**63)``.
"""

from __future__ import annotations

from pipeline.types import shown, within

MAX_SECONDS = 365 * 24 * 3600  # the longest run (--seconds), and the latest time a --prompts entry may name


def check_flag(
    flag: str,
    value: float | None,
    low: float,
    high: float,
    allowed: str,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError naming ``flag`` and its value unless the value is None (not given) or a number in the range."""
    if value is not None and not within(value, low, high, integer=integer, low_open=low_open, high_open=high_open):
        raise ValueError(f"{flag}={shown(value)} is not allowed: {allowed}")
