"""`streamer run` end to end, in real subprocesses: files, v2v, seeds, bad input, Ctrl-C."""

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from streamer.cli import main
from streamer.egress.file import FileWriter, PngSequence
from tests.conftest import ROOT, TINY_32, count_frames, free_port, run_streamer

SMALL = TINY_32

pytestmark = pytest.mark.slow  # real subprocesses: ~5 s each to import torch and diffusers


def read_video(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, s.codec_context.name, float(s.average_rate)


def write_clip(path, n, size=(48, 64), fps=25):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.zeros((*size, 3), np.uint8)
            img[:, :, 0] = (i * 9) % 256
            img[: size[0] // 2, :, 1] = 200
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))


def test_t2v_writes_a_playable_mp4(tmp_path):
    out = tmp_path / "out.mp4"
    r = run_streamer("run", "--prompt", "a red fox", "--seconds", "1.5", "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    frames, codec, rate = read_video(out)
    assert codec == "h264" and rate == 16
    assert len(frames) == 24 and frames[0].shape == (32, 32, 3)
    assert "x real time" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no partial file left
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # an ordinary file, not mkstemp's 0600


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_webm_output(tmp_path):
    out = tmp_path / "out.webm"
    r = run_streamer("run", "--frames", "9", "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    frames, codec, _ = read_video(out)
    assert codec == "vp9" and len(frames) == 9


def test_lossless_outputs_hold_exactly_the_frames_generated(tmp_path, monkeypatch, capsys):
    """FFV1 in .mkv and a PNG sequence read back as the same RGB frames, bit for bit; the PNG sequence replaces
    every file of its pattern (an earlier, longer run's frames go) and leaves nothing hidden behind."""
    seq = tmp_path / "frames"
    seq.mkdir()
    (seq / "00099.png").write_bytes(b"an older run's frame")
    (seq / "notes.txt").write_text("kept")
    mkv, pattern = tmp_path / "take.mkv", seq / "%05d.png"
    monkeypatch.chdir(tmp_path)
    args = ["run", "--prompt", "p", "--frames", "9", "--seed", "3", "--quiet", *SMALL]
    assert main([*args, "--out", str(mkv), "--also-record", str(pattern)]) == 0, capsys.readouterr().err
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].codec_context.name == "ffv1"
        a = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(pattern)) as c:
        b = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert a.shape == (9, 32, 32, 3) and np.array_equal(a, b)
    assert sorted(p.name for p in seq.iterdir()) == [f"{i:05d}.png" for i in range(9)] + ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "take.mkv"]
    assert (seq / "00000.png").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_an_aborted_png_sequence_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "00000.png").write_bytes(b"kept")
    seq = PngSequence(tmp_path / "%05d.png", 32, 32)
    seq.write(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert len(list(tmp_path.iterdir())) == 2  # the old frame and the hidden partial folder
    seq.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"] and (tmp_path / "00000.png").read_bytes() == b"kept"


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("frames.png", "extension '.png' is not supported; use one of ['.mkv', '.mp4', '.webm', 'DIR/%05d.png']"),
        ("%05d_%05d.png", "an image sequence is a folder and a name with one counter"),
        ("%05d.jpg", "an image sequence is a folder and a name with one counter and a .png extension"),
        ("nowhere/%05d.png", "folder 'nowhere' does not exist"),
    ],
)
def test_a_bad_lossless_output_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys, out, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", out, "--quiet", *SMALL, "--frames", "1"]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_frames(tmp_path):
    outs = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        out = tmp_path / f"{name}.mp4"
        r = run_streamer("run", "--prompt", "p", "--frames", "9", "--seed", str(seed), "--out", str(out), *SMALL)
        assert r.returncode == 0, r.stderr
        outs.append(np.stack(read_video(out)[0]))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_v2v_from_a_file(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 30, fps=25)  # 1.2 s at 25 fps -> 19 frames at 16 fps
    out = tmp_path / "out.mp4"
    r = run_streamer("run", "--input", str(clip), "--strength", "0.6", "--out", str(out), "--seconds", "10", *SMALL)
    assert r.returncode == 0, r.stderr
    frames, _, _ = read_video(out)
    # every complete chunk of the input comes out: 1 + 4k frames of the 19
    assert len(frames) == 17


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "configs/nope.yaml"], "system config file 'configs/nope.yaml' does not exist"),
        (["--height", "100"], "height=100 is not allowed: a multiple of 16"),
        (["--model", "/definitely/not/here"], "model path '/definitely/not/here' does not exist"),
        (["--strength", "2"], "strength=2.0 is not allowed"),
        (["--frames", "0"], "--frames=0 is not allowed"),
        (["--timesteps", "700,x"], "--timesteps='700,x' is not allowed"),
        (["--timesteps", "500,700"], "timesteps=[500.0, 700.0] is not allowed: strictly decreasing"),
        (["--context", "future"], "context='future' is not allowed"),
        (["--seconds", "inf"], "streamer: error: --seconds=inf is not allowed: a finite number more than 0"),
        (["--retry-seconds", "nan"], "streamer: error: --retry-seconds=nan is not allowed: a finite number"),
    ],
)
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, args, message):
    out = tmp_path / "out.mp4"
    r = run_streamer("run", "--out", str(out), *SMALL, *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seconds", "inf"],
            "--seconds=inf is not allowed: a finite number more than 0, at most 31536000 (365 days)",
        ),
        (["--seconds", "nan"], "--seconds=nan is not allowed: a finite number more than 0"),
        (["--seconds=-inf"], "--seconds=-inf is not allowed"),
        (["--seconds", "1e999"], "--seconds=inf is not allowed"),
        (["--seconds", "1e308"], "--seconds=1e+308 is not allowed"),
        (["--seconds", "0"], "--seconds=0.0 is not allowed"),
        (["--retry-seconds", "nan"], "--retry-seconds=nan is not allowed: a finite number from 0 to 3600"),
        (["--retry-seconds", "inf"], "--retry-seconds=inf is not allowed"),
        (["--retry-seconds", "-1"], "--retry-seconds=-1.0 is not allowed"),
        (
            ["--keyframe-seconds", "nan"],
            "--keyframe-seconds=nan is not allowed: a finite number more than 0, at most 60",
        ),
        (["--keyframe-seconds", "inf"], "--keyframe-seconds=inf is not allowed"),
        (["--keyframe-seconds", "0"], "--keyframe-seconds=0.0 is not allowed"),
        (["--strength", "nan"], "--strength=nan is not allowed: a number in (0, 1]"),
        (["--strength", "inf"], "--strength=inf is not allowed"),
        (["--strength", "0"], "--strength=0.0 is not allowed"),
        (["--frames", "-1"], "--frames=-1 is not allowed: an integer from 1"),
        (["--fps", "0"], "--fps=0 is not allowed: an integer from 1 to 240"),
        (["--fps", "100000"], "--fps=100000 is not allowed: an integer from 1 to 240"),
        (["--seed", "-1"], "--seed=-1 is not allowed: an integer in [0, 2**63)"),
        (["--seed", str(2**63)], f"--seed={2**63} is not allowed"),
        (["--seed", "1" * 401], "--seed=111111111111…(401 digits) is not allowed: an integer in [0, 2**63)"),
        (["--fps", "1" + "0" * 400], "--fps=100000000000…(401 digits) is not allowed: an integer from 1 to 240"),
        (["--frames", "1" + "0" * 400], "--frames=100000000000…(401 digits) is not allowed: an integer from 1 to"),
        (["--strength", "1" + "0" * 400], "--strength=inf is not allowed: a number in (0, 1]"),
        (["--stage-timeout", "inf"], "--stage-timeout=inf is not allowed: more than 0, at most 600 s"),
        (["--stage-timeout", "0"], "--stage-timeout=0.0 is not allowed"),
        (["--stages", "1" + "0" * 400], "--stages=100000000000…(401 digits) is not allowed: from 1 to the model's"),
        (["--height", "-16"], "--height=-16 is not allowed: an integer from 1 to 4096"),
        (["--height", "100000"], "--height=100000 is not allowed"),
        (["--width", "0"], "--width=0 is not allowed: an integer from 1 to 4096"),
    ],
)
def test_number_flags_out_of_range_are_refused_naming_the_flag(tmp_path, monkeypatch, capsys, args, message):
    # in process, for speed: every check comes before the engine is built
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", "out.mp4", "--quiet", *SMALL, "--frames", "1", *args]) == 2
    assert f"streamer: error: {message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_frames_past_a_year_of_video_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", "out.mp4", "--quiet", *SMALL, "--frames", str(10**12)]) == 2
    said = capsys.readouterr().err
    assert (
        f"streamer: error: --frames={10**12} is not allowed: an integer from 1 to 504576000 (365 days at 16 fps)"
        in said
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "1.5"], "argument --frames: invalid int value: '1.5'"),
        (["--seed", "1e3"], "argument --seed: invalid int value: '1e3'"),
        (["--fps", "x"], "argument --fps: invalid int value: 'x'"),
        (["--height", ""], "argument --height: invalid int value: ''"),
        (["--seconds", "soon"], "argument --seconds: invalid float value: 'soon'"),
    ],
)
def test_numbers_that_do_not_parse_are_named_by_argparse(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--out", "out.mp4", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_input_file_as_output_is_refused_and_stays_as_it_was(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 30)
    before = clip.read_bytes()
    r = run_streamer("run", "--input", str(clip), "--out", str(clip), *SMALL)
    assert r.returncode == 2, r.stderr
    assert f"output {str(clip)!r} is the same file as the input {str(clip)!r}" in r.stderr
    assert "Traceback" not in r.stderr
    assert clip.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def links(tmp_path):
    """In ``tmp_path``: ``a.mp4`` (a file), ``sym.mp4`` (a symlink to it), ``hard.mp4`` (a hard link to it),
    ``dangling.mp4`` (a symlink to the absent ``b.mp4``), ``sub/`` (a folder) and ``here`` (a symlink to ``.``)."""
    write_clip(tmp_path / "a.mp4", 5)
    (tmp_path / "sym.mp4").symlink_to("a.mp4")
    os.link(tmp_path / "a.mp4", tmp_path / "hard.mp4")
    (tmp_path / "dangling.mp4").symlink_to("b.mp4")
    (tmp_path / "sub").mkdir()
    (tmp_path / "here").symlink_to(".")


@pytest.mark.parametrize(
    ("input_", "out"),
    [
        ("a.mp4", "./a.mp4"),
        ("a.mp4", "sub/../a.mp4"),
        ("./sub/../a.mp4", "a.mp4"),
        ("a.mp4", "sym.mp4"),
        ("sym.mp4", "a.mp4"),
        ("a.mp4", "hard.mp4"),
        ("a.mp4", "here/a.mp4"),
        ("a.mp4", "{tmp}/a.mp4"),
    ],
)
def test_an_output_that_is_the_input_file_in_another_spelling_is_refused(tmp_path, monkeypatch, capsys, input_, out):
    monkeypatch.chdir(tmp_path)
    links(tmp_path)
    out = out.format(tmp=tmp_path)
    before = (tmp_path / "a.mp4").read_bytes()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", "--input", input_, "--out", out, "--quiet", *SMALL]) == 2
    said = capsys.readouterr().err
    assert f"streamer: error: output {out!r} is the same file as the input {input_!r}" in said
    assert (tmp_path / "a.mp4").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("b.mp4", "b.mp4"),
        ("b.mp4", "./b.mp4"),
        ("b.mp4", "sub/../b.mp4"),
        ("b.mp4", "here/b.mp4"),
        ("b.mp4", "{tmp}/b.mp4"),
        ("b.mp4", "dangling.mp4"),  # a symlink to b.mp4, which does not exist yet
        ("a.mp4", "sym.mp4"),
        ("a.mp4", "hard.mp4"),
        ("sym.mp4", "hard.mp4"),
    ],
)
@pytest.mark.parametrize("flag", ["--out", "--also-record"])
def test_two_outputs_that_are_one_file_are_refused(tmp_path, monkeypatch, capsys, first, second, flag):
    monkeypatch.chdir(tmp_path)
    links(tmp_path)
    second = second.format(tmp=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", "--out", first, flag, second, "--quiet", *SMALL, "--frames", "1"]) == 2
    said = capsys.readouterr().err
    assert f"streamer: error: outputs {first!r} and {second!r} are the same file" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_outputs_that_are_different_files_are_all_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    links(tmp_path)
    assert main(["run", "--out", "b.mp4", "--out", "sub/b.mp4", "--also-record", "here/c.mp4", "--quiet", *SMALL,
                 "--frames", "5"]) == 0  # fmt: skip
    assert [count_frames(tmp_path / name) for name in ("b.mp4", "sub/b.mp4", "c.mp4")] == [5, 5, 5]


def test_input_that_cannot_be_decoded(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    out = tmp_path / "out.mp4"
    r = run_streamer("run", "--input", str(bad), "--out", str(out), *SMALL)
    assert r.returncode == 2
    assert f"input {str(bad)!r} cannot be" in r.stderr
    assert not out.exists()


def test_output_that_cannot_be_written(tmp_path):
    r = run_streamer("run", "--out", str(tmp_path / "missing" / "out.mp4"), *SMALL)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_streamer("run", "--out", str(tmp_path / "out.avi"), *SMALL)
    assert r.returncode == 2 and "extension '.avi' is not supported" in r.stderr
    r = run_streamer("run", "--out", "/proc/out.mp4", *SMALL)  # not writable, even for root
    assert r.returncode == 2 and "output '/proc/out.mp4' cannot be written" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_a_playable_file_of_what_was_generated(tmp_path, sig):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--seconds", "600", "--out", str(out), *SMALL],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait for generation to be under way (the progress bar counts frames), then interrupt
    buf = ""
    deadline = time.monotonic() + 120
    while "generating:" not in buf or "/9600" not in buf.split("generating:")[-1]:
        assert time.monotonic() < deadline, buf
        buf += proc.stderr.read(1)
    time.sleep(1.5)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, buf + rest
    said = [line for line in rest.splitlines() if "interrupted by signal" in line]
    assert said, rest
    written = int(said[0].split("generated ")[1].split(" frames")[0])
    frames, _, _ = read_video(out)
    assert written > 0 and len(frames) == written
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_when_every_output_fails_the_run_stops_with_exit_3_and_leaves_no_partial_file(tmp_path):
    # Python ignores SIGXFSZ: past the file-size limit a write gets EFBIG, as on a full disk
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    args = ["run", "--seconds", "300", "--out", str(a), "--also-record", str(b), "--quiet", *SMALL]
    r = run_streamer(*args, preexec_fn=limit)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert f"streamer: output {a} failed: OSError: [Errno 27] File too large" in r.stderr
    last = [line for line in r.stderr.splitlines() if line.startswith("streamer: error:")]
    assert len(last) == 1 and last[0].startswith("streamer: error: every output failed; generation stopped after "), (
        r.stderr
    )
    made = int(last[0].split("stopped after ")[1].split(" frames")[0])
    assert 0 < made < 300 * 16 // 2  # stopped, not carried on to the end
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


class FullDisk(FileWriter):
    """A FileWriter whose disk is full after ``FAIL_AT`` frames: writing then fails with EFBIG."""

    FAIL_AT = 8

    def write(self, frames):
        if self.frames + len(frames) > self.FAIL_AT:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(self.partial))
        super().write(frames)


class Watching(FileWriter):
    """A FileWriter that notes, once it has written ``LOOK_AT`` frames, the partial files in its folder."""

    LOOK_AT = 200
    seen: list[str] | None = None

    def write(self, frames):
        super().write(frames)
        if Watching.seen is None and self.frames >= self.LOOK_AT:
            Watching.seen = sorted(p.name for p in self.path.parent.iterdir() if p.name.endswith(".partial"))


def writers(path, *args, **kw):
    """``bad*`` files fail after 8 frames; the others watch."""
    return (FullDisk if os.path.basename(path).startswith("bad") else Watching)(path, *args, **kw)


def test_a_failed_output_is_removed_at_once_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("streamer.run.outputs.FileWriter", writers)
    monkeypatch.setattr(Watching, "seen", None)
    assert main(["run", "--frames", "300", "--out", "bad.mp4", "--also-record", "good.mp4", "--quiet", *SMALL]) == 3
    said = capsys.readouterr().err
    assert "streamer: output bad.mp4 failed: OSError: [Errno 27] File too large" in said
    assert [
        line for line in said.splitlines() if line.startswith("streamer:   bad.mp4: ") and "FAILED: OSError" in line
    ]
    assert Watching.seen is not None and [n for n in Watching.seen if "bad" in n] == []  # gone while the run went on
    assert count_frames(tmp_path / "good.mp4") == 300  # every frame
    assert [p.name for p in tmp_path.iterdir()] == ["good.mp4"]


def test_when_every_output_failed_generation_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("streamer.run.outputs.FileWriter", writers)
    assert main(["run", "--frames", "4000", "--out", "bad1.mp4", "--out", "bad2.webm", "--quiet", *SMALL]) == 3
    said = capsys.readouterr().err
    last = [line for line in said.splitlines() if line.startswith("streamer: error:")]
    assert len(last) == 1 and last[0].startswith("streamer: error: every output failed; generation stopped after "), (
        said
    )
    assert int(last[0].split("stopped after ")[1].split(" frames")[0]) < 400
    assert list(tmp_path.iterdir()) == []


def test_serve_answers_health_and_stops_cleanly_on_sigint():
    import json
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "serve", "--port", str(port), "--max-sessions", "3"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        words = health.pop("words")  # the demo model's vocabulary, which the page lists
        assert {"red", "circle", "on", "black"} <= set(words)
        assert health == {"status": "ok", "model": "demo", "sessions": 0, "max_sessions": 3, "free_slots": 3}
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, err
    assert "ICE addresses ['127.0.0.1'], ICE servers []" in err  # loopback only, no STUN server


def test_serve_on_a_busy_port_is_a_one_line_error_before_any_banner():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_streamer("serve", "--port", str(port), timeout=60)
    assert r.returncode == 2, r.stderr
    *plan, last = r.stderr.splitlines()  # the memory plan (before any weight is loaded), then the one error
    assert last == f"streamer: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "serving" not in r.stderr and "Traceback" not in r.stderr and "error" not in "".join(plan)


def test_serve_on_an_address_it_cannot_bind_names_it():
    r = run_streamer("serve", "--host", "192.0.2.1", "--port", str(free_port()), timeout=60)  # TEST-NET-1, not ours
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("streamer: error: cannot listen on 192.0.2.1:"), r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port=0 is not allowed"),
        (["--consent-interval", "0"], "--consent-interval=0 is not allowed"),
    ],
)
def test_serve_bad_arguments(args, message):
    r = run_streamer("serve", *args)
    assert r.returncode == 2 and message in r.stderr


def test_the_default_config_is_the_trained_demo_model():
    from streamer.cli import build_parser

    for argv in (["run", "--out", "a.mp4"], ["serve"]):
        assert Path(build_parser().parse_args(argv).config) == ROOT / "configs" / "demo.yaml"
