"""Reliability harness: no client can hold the server, no hostile input goes unanswered (issue 10).

    python -m bench.soak --json out.json --plot out.png            # the long run (~20 minutes on 2 cores)
    python -m bench.soak --short --height 32 --width 32             # the test-sized run (~3 minutes)
    python -m bench.soak --only fuzz,offers --server-root ../old  # some scenarios, against another checkout

The server under test is ``python -m streamer serve`` in a process of its own (``server``), on
127.0.0.1 and a free port, started afresh for each scenario and watched from outside: its RSS,
threads and open files with psutil on its pid, its slots through ``/api/health`` and
``/api/metrics``. The clients are aiortc peers on loopback with an empty ICE server list, in this
process (``clients``) or in processes of their own (``peer``: killed, stopped, never nominating,
sending a huge message). Every loop is bounded in count and time, and each scenario has a bound of
its own besides.

Scenarios (``--only``), each a function returning a dict of figures, held to the guarantees in
``checks``:

- ``churn`` (``churn``): cycles of a clean close, a SIGKILLed client and a dropped peer (SIGSTOP);
  per cycle the time to free each slot and the server's RSS, threads and open files.
- ``stream`` (``stream``): one t2v client for ``--stream-seconds``: frames per 1-s window, gaps.
- ``fuzz`` (``fuzz``, ``corpus``, ``control``): a seeded corpus of hostile control messages, each
  answered or (over the limit) its channel closed; then one ``--big-bytes`` message from another
  client while a victim session streams, and the victim's worst gap between frames.
- ``offers`` (``offers``): concurrent offers, offers whose client never connects (abandoned,
  candidate-less, never nominating), slow bodies; time to free, ``/api/health`` meanwhile.

The JSON has every figure, the checks, the machine, the command and the commits of the harness and
the server. Exit status: 0; 1 when a check failed; 2 when a scenario could not run.
"""
