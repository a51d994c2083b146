"""Spawned solver workers exit when the process that started them dies (SIGKILL or SIGTERM), issue 10 item 9.

A child Python process starts the 2-worker pool of ``solve_batch``, reports its process id, then waits; the test
records every descendant of that child (the two workers and multiprocessing's resource tracker) from ``/proc``,
kills the child, and waits for all of them to be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import cvxpy as cp
    import numpy as np

    from amortcvx.backends import solve_batch
    from amortcvx.canon import ParametricProblem

    if __name__ == "__main__":
        x = cp.Variable(3)
        a = cp.Parameter(3, name="a")
        pp = ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0]), form="cone")
        instances = pp.canonicalize({"a": np.random.default_rng(0).normal(size=(8, 3))}).instances()
        results = solve_batch(instances, "scs", workers=2, exact_iterations=False)
        assert all(str(r.status) == "optimal" for r in results)
        print("ready", os.getpid(), flush=True)
        time.sleep(600)
""")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may contain spaces
    return fields[0], int(fields[1])


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents[int(entry)] = stat[1]
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has exited (waiting to be reaped)


# SIGTERM (no handler in the parent) ends it like SIGKILL as far as the workers can tell: the heavy variant
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_their_parent_dies(sig):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    workers: set[int] = set()
    try:
        line = proc.stdout.readline()  # blocks until the pool has solved the batch (or the child failed)
        assert line.startswith("ready"), proc.communicate(timeout=60)[1]
        children = _descendants(proc.pid)
        workers = {pid for pid in children if _alive(pid)}
        assert len(workers) >= 2, f"expected two spawned workers (and a resource tracker); found {children}"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                for pid in workers if _alive(pid)}
        assert not left, f"processes left behind after {sig.name} of their parent: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # whatever this test started and is still there
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
