"""A real RTMP receiver for the tests: FFmpeg's RTMP server side through PyAV (``listen``).

    python rtmp_receiver.py rtmp://127.0.0.1:PORT/app/key [--max-frames N]

Prints "listening" once bound, then one JSON line when the stream ends: frames decoded, their
sizes, the stream's frame rate. With --max-frames it hangs up after N frames (a vanishing server).
"""

from __future__ import annotations

import argparse
import json
import sys

import av

parser = argparse.ArgumentParser()
parser.add_argument("url")
parser.add_argument("--max-frames", type=int, default=None)
args = parser.parse_args()
print("listening", flush=True)
container = av.open(args.url, mode="r", format="flv", options={"listen": "1"}, timeout=(60, 10))
stream = container.streams.video[0]
frames, sizes, keyframes = 0, set(), 0
try:
    for frame in container.decode(stream):
        frames += 1
        sizes.add((frame.width, frame.height))
        keyframes += frame.key_frame
        if args.max_frames is not None and frames >= args.max_frames:
            break
except (av.FFmpegError, OSError) as e:  # the sender closing the connection ends the stream
    print(f"receiver: stream ended: {e}", file=sys.stderr)
rate = float(stream.average_rate or 0)
container.close()
print(json.dumps({"frames": frames, "sizes": sorted(sizes), "rate": rate, "keyframes": keyframes}), flush=True)
