"""Writes an MPEG-TS stream into a path (a FIFO) in real time: a stand-in for a live camera feed.

python live_writer.py PATH --fps 25 --seconds 4
"""

from __future__ import annotations

import argparse
import time

import av
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("path")
parser.add_argument("--fps", type=int, default=25)
parser.add_argument("--seconds", type=float, default=4.0)
args = parser.parse_args()
with av.open(args.path, mode="w", format="mpegts", container_options={"flush_packets": "1"}) as out:
    stream = out.add_stream("libx264", rate=args.fps)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.options = {"tune": "zerolatency", "preset": "veryfast", "bf": "0"}
    start = time.monotonic()
    for i in range(round(args.seconds * args.fps)):
        time.sleep(max(0.0, start + i / args.fps - time.monotonic()))
        img = np.full((48, 64, 3), (i * 9) % 256, np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
