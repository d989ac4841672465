"""``--workers N``: the same command as N processes on this machine, started the way ``torchrun
--standalone --nproc-per-node N`` starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so
the workers run exactly the code a torchrun launch runs.

Rank 0 prints; the other ranks' standard output is dropped (their errors still show, each line marked with
its rank). When a worker fails, the others are given the run's timeout to notice it and say where the run
stopped, then stopped; the exit status is the first failure's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(stream, rank: int) -> None:
    for line in iter(stream.readline, b""):
        sys.stderr.write(f"[rank {rank}] {line.decode(errors='replace')}")
        sys.stderr.flush()


def launch(argv: list[str], workers: int, timeout: float, threads: int | None = None) -> int:
    """Run ``llmquant ARGV`` as ``workers`` ranks of one run; returns the exit status."""
    port = _free_port()
    per = threads or max(1, (os.cpu_count() or 1) // workers)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(workers),
            "LOCAL_WORLD_SIZE": str(workers), "GROUP_RANK": "0", "LLMQUANT_DIST_TIMEOUT": str(timeout),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(per))}
    procs, relays = [], []
    for r in range(workers):
        env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        p = subprocess.Popen([sys.executable, "-m", "llmquant", *argv], env=env,
                             stdout=None if r == 0 else subprocess.DEVNULL,
                             stderr=None if r == 0 else subprocess.PIPE)
        procs.append(p)
        if r:
            t = threading.Thread(target=_relay, args=(p.stderr, r), daemon=True)
            t.start()
            relays.append(t)
    first = None  # (rank, status) of the first worker to fail
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            for r, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and first is None:
                    first = (r, code)
                    # the others get the timeout to notice and say where the run stopped (rank 0, the
                    # coordinator, failing: they cannot say more than it did)
                    deadline = time.monotonic() + (5 if r == 0 else timeout + 10)
                    how = f"signal {-code}" if code < 0 else f"status {code}"
                    print(f"llmquant: worker rank {r} of {workers} exited with {how}", file=sys.stderr)
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        first = first or (0, 130)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for t in relays:
        t.join(timeout=2)
    if first is None:
        return 0
    return first[1] if first[1] > 0 else 128 - first[1]
