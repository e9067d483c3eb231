"""The paced track's clock: the delay grows at once when a frame is late and shrinks back after a hiccup,
and the video plays at its fps, never faster."""

import itertools

import pytest

from streamer.egress.webrtc import Playout

FPS, PER_CHUNK = 16, 4


def play(playout: Playout, arrivals: list[float]) -> list[tuple[float, float]]:
    """Chunk k (frames 4k..4k+3) reaches the track at ``arrivals[k]``; the track asks for each frame
    once the previous one is sent and the frame is there. (arrived, sent) per frame."""
    out, sent = [], 0.0
    for k, arrived in enumerate(arrivals):
        for j in range(PER_CHUNK):
            now = max(sent, arrived)
            sent = playout.send_time((PER_CHUNK * k + j) / FPS, arrived, now)
            assert sent >= now  # never before it is asked for (nor before it arrived)
            out.append((arrived, sent))
    return out


def first_frame_delays(frames: list[tuple[float, float]], chunks: range) -> list[float]:
    return [round(frames[PER_CHUNK * k][1] - frames[PER_CHUNK * k][0], 6) for k in chunks]


def test_an_even_stream_is_sent_at_its_pace_with_no_added_delay():
    frames = play(Playout(), [0.25 * k + 0.05 for k in range(40)])
    sends = [s for _, s in frames]
    assert sends == pytest.approx([0.05 + i / FPS for i in range(len(frames))])
    assert set(first_frame_delays(frames, range(40))) == {0.0}


def test_a_hiccup_grows_the_delay_at_once_and_it_shrinks_back_by_steps():
    arrivals = [0.25 * k + 0.05 for k in range(80)]
    arrivals[5] += 0.3  # one chunk 300 ms late; the rest on time again
    frames = play(Playout(margin=0.03, window=2.0, max_step=0.1), arrivals)
    delays = first_frame_delays(frames, range(80))
    assert delays[5] == 0.0 and delays[6] == pytest.approx(0.3)  # late: sent as it came; the clock moved back
    assert max(delays[6:14]) == pytest.approx(0.3)  # the new delay holds for a window
    assert delays[-1] == pytest.approx(0.03)  # then it shrank back to the margin, and no further
    shrinking = [b - a for a, b in itertools.pairwise(delays[6:])]
    assert min(shrinking) >= -0.1 - 1e-9  # at most max_step at a time
    sends = [s for _, s in frames]
    assert sends == sorted(sends)  # frames leave in order
    gaps = [b - a for a, b in itertools.pairwise(sends[40:])]
    assert min(gaps) >= 0 and max(gaps) <= 1 / FPS + 1e-9  # after a step: no pause longer than a frame


def test_jitter_within_the_margin_keeps_the_delay():
    jitter = [0.0, 0.02, 0.01, 0.025, 0.0, 0.015] * 10
    arrivals = [0.25 * k + 0.05 + jitter[k] for k in range(60)]
    frames = play(Playout(margin=0.03), arrivals)
    delays = first_frame_delays(frames, range(10, 60))
    assert max(delays) <= 0.025 + 1e-9  # never more than the worst jitter: nothing late, no growth


def test_frames_that_always_come_early_are_played_at_their_fps_not_faster():
    """A t2v session keeps a chunk in hand, so every frame is there long before its time. That slack
    was never added by a hiccup: taking it back would play the video faster than real time for ever
    (the long soak run measured 16.8 fps for a 16 fps model before this was fixed)."""
    arrivals = [0.25 * (k - 1) for k in range(200)]  # each chunk arrives a whole chunk before it plays
    frames = play(Playout(margin=0.03, window=2.0, max_step=0.1), arrivals)
    sends = [s for _, s in frames]
    start = sends[0]
    assert sends == pytest.approx([start + i / FPS for i in range(len(frames))])


def test_after_a_hiccup_only_the_added_delay_is_taken_back():
    arrivals = [0.25 * (k - 1) for k in range(120)]  # a chunk in hand, as above
    arrivals[10] += 0.25 + 0.4  # one chunk comes 0.4 s after its time
    frames = play(Playout(margin=0.03, window=2.0, max_step=0.1), arrivals)
    sends = [s for _, s in frames]
    lag = [s - (sends[0] + i / FPS) for i, s in enumerate(sends)]
    assert max(lag) == pytest.approx(0.4)  # the hiccup added 0.4 s
    assert lag[-1] == pytest.approx(0.0)  # and exactly that was taken back: the clock is where it started
    assert min(lag) >= -1e-9  # never ahead of the timeline the first frame set
