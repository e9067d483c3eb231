"""The two helpers every numeric check and error message goes through, pinned with fixed values."""

import math

from pipeline.types import frame_pts, shown, within


def test_shown_shortens_what_is_long_and_says_how_long():
    assert shown(7) == "7" and shown(-2.5) == "-2.5" and shown("a/b.pth") == "'a/b.pth'"
    assert shown(10**400) == "100000000000…(401 digits)"
    assert shown(-(10**400)) == "-10000000000…(401 digits)"
    assert shown(10**39) == str(10**39)  # 40 digits: shown whole
    assert shown("p" * 5000) == repr("p" * 32) + "…(5000 characters)"
    path = "/" + "d" * 150 + "/taew2_1.pth"
    assert shown(path) == repr(path)  # a path of 163 characters is shown whole
    assert shown([10**400]) == "[" + "1" + "0" * 30 + "…(403 characters of repr)"
    assert shown(True) == "True"


def test_within_compares_before_converting_and_refuses_what_is_no_number():
    assert within(0.5, 0, 1) and within(1, 0, 1) and within(0, 0, 1)
    assert not within(0, 0, 1, low_open=True) and not within(1, 0, 1, high_open=True)
    assert not within(10**400, 0, 1) and not within(-(10**400), -1, 1)  # no OverflowError
    assert within(10**400, 0, math.inf)
    assert not within(math.nan, 0, 1) and not within(math.inf, 0, math.inf) and not within(-math.inf, -math.inf, 0)
    assert not within(True, 0, 1) and not within("0.5", 0, 1) and not within(None, 0, 1)
    assert within(3, 1, 5, integer=True) and not within(3.0, 1, 5, integer=True)


def test_frame_pts_is_the_90_khz_clock():
    assert [frame_pts(k, 16) for k in range(4)] == [0, 5625, 11250, 16875]
    assert frame_pts(1, 30) == 3000 and frame_pts(7, 24) == 26250 and frame_pts(1, 7) == 12857  # floor
