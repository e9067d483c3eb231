"""Latency benchmark: the engine alone, the served WebRTC path and a real browser, in one run.

    python -m bench.latency --config configs/tiny.yaml --mode t2v --seconds 10 --json out.json --plot out.png
    python -m bench.latency --config configs/passthrough.yaml --mode v2v --seconds 10 --json out.json
    python -m bench.latency --from-json new.json --compare old.json     # regression check only, no measuring

Paths, measured one after the other in this order (``--paths``), each for ``--seconds`` of steady state
(counted from its first frame out), one session, the same config and the same model weights:

- ``engine``: the engine alone in this process, ``step()`` in a loop (the ceiling), on a thread of its own as
  the server's engine runs (torch's intra-op threads behave differently on the main thread: on a busy
  2-core machine the main thread ran the same ticks up to 8x slower). t2v: chunks are asked for ahead
  (the pipeline stays full). v2v: numbered frames (``bench.frameid``) from a synthetic source
  of the model's fps; ``--engine-source max`` (default) makes them the moment the engine wants input,
  so neither throughput nor latency waits for a camera; ``realtime`` makes frame k at t0 + k/fps and
  the newest waiting frames win, as the server's chunker does (handed over by the one feeder,
  ``pipeline.feeder``). Stage times: the engine's own phase timer (``engine.timer``: DiT, decode,
  encode per call) and the whole tick (``engine.stats``).
- ``webrtc``: a server made with ``create_app`` in this process on 127.0.0.1, port 0 (or ``--server
  URL``), and an aiortc client on loopback with an empty ICE server list. t2v receives; v2v sends
  numbered frames at 30 fps (aiortc's ``VideoStreamTrack`` clock) and reads the ids back.
- ``browser``: Debian's Chromium, headless, driven by Playwright on the demo page, in a subprocess under
  ``unshare -n`` (a network namespace with only ``lo``) that also runs its own server: the browser
  cannot reach anything else, so ``--server`` does not apply to it. Needs root, ``unshare``, Chromium
  and Playwright; without them the path is skipped with the reason (an error when asked for by name).

How each number is measured (per path; times are ``time.monotonic()`` unless said otherwise):

- ``ttff_ms``: engine: the ``Open`` command -> first chunk out of ``step()``; webrtc: offer POSTed -> first
  frame out of the client track's ``recv()``; browser: ``#start`` clicked -> first frame presented
  (``requestVideoFrameCallback``'s ``presentationTime``), both on the page's clock.
- ``fps``: frames out after the first output / time since the first output (engine: chunks out of
  ``step()``; webrtc: frames received; browser: ``presentedFrames`` counted by Chromium).
- ``period_ms``: time between consecutive outputs (engine: chunks; webrtc: frames received; browser:
  frames presented), p50/p95/max.
- ``latency_ms`` (p50/p95/p99/max, nearest rank as ``/api/metrics``) and ``latency_source``:
  - engine t2v: chunk scheduled (``scheduled_at``) -> chunk out; engine v2v: input frame submitted
    (max) or made by the source (realtime) -> the same frame out (frame k out is input frame k).
  - ``frame_id`` (webrtc v2v where frames survive the model, e.g. ``configs/passthrough.yaml``): the
    client's camera frame made -> the same frame, id read from its pixels, received back. Exact.
  - ``pts_match`` (webrtc t2v, and v2v where the model does not keep the ids, e.g. ``tiny``): chunk
    scheduled at the in-process server -> frame received by the client, frames matched by pts (the
    server's session records every frame it sends: ``SessionMetrics.sent_log``).
  - ``server_metrics`` (``--server URL`` when ids are not readable): the server's own p50/p95/p99 of
    chunk scheduled -> frame sent, from ``/api/metrics``; no per-frame data, no max.
  - ``rtp_match`` (browser): chunk scheduled at the server -> frame presented by Chromium, matched by RTP
    timestamp (the sender's random RTP origin, which aiortc keeps nowhere, is recorded by wrapping its
    ``random32`` while the browser path's server runs), page clock mapped onto ``time.monotonic()``
    by the sample of ``performance.now()`` with the shortest round trip. ``latency_estimate_ms`` adds
    the server's p50 to ``getStats()``'s mean jitter-buffer delay and decode time instead.
- ``deadline_miss_rate``: the share of frames whose latency is over ``--target-ms``.
- ``latency_parts`` (webrtc, browser): where the time goes. aiortc's jitter buffer hands a frame on only
  when the next frame's first packet arrives, so the webrtc path also times each frame's last packet
  (``latency_to_arrival_ms``, ``ttff_arrival_ms``) and the hold (``client_jitter_buffer_ms``); with an
  in-process server, ``server_ms`` (chunk scheduled -> frame sent) and ``server_send_period_ms``.
  Browser: ``server_ms``, ``sent_to_received_ms`` and ``received_to_presented_ms`` (rVFC receiveTime).
- ``stages_ms``: ms per call of the engine's phases (``dit``, ``decode``, ``encode``, from its own timer)
  and per tick (``tick``); for webrtc and browser, those of the server's engine.

Top level: the webrtc path's numbers (what a client is served) and the system efficiency
(``bench/latency/efficiency.py``): t2v, the served path's throughput with pacing off ÷ the engine alone,
measured after the paths in ``--rounds`` interleaved rounds of ``--round-seconds`` windows (median of the
per-round ratios; ``efficiency_detail`` has every window, and the same with the client inline); v2v, the
paced served FPS ÷ min(engine FPS, the model's fps). ``efficiency_capped`` is the latter in every mode: the
server paces by pts, so it never serves faster than real time. Exit status: 0; 1 when ``--compare``
finds something worse beyond ``--tolerance``; 2 for bad arguments, or a path that could not run or failed.

Modules: ``common`` (statistics, stage timers), ``engine_path``, ``served`` (the aiortc client and an
in-process server), ``browser_path``, ``efficiency`` (+ ``client_process``), ``report`` (JSON, table, plot,
``--compare``), ``cli``.
"""
