"""Soak run: many instances through persistent C solvers; resident memory stays flat, no process left behind.

Not a test (minutes at full size). Three parts:

1. Persistent solvers: for each backend (``--backends scs osqp``), ``--instances`` instances (default 100,000) of
   one family (``--family portfolio --size small``) are sampled (a new seed per batch), canonicalized and solved
   on one :class:`amortcvx.backends.PersistentSolver` (set up on the instance of the mean parameters) in batches
   of ``--batch`` (default 1000), at the backend's default settings. Printed: resident memory (``VmRSS`` of
   ``/proc/self/status``) at the start, every ``--every`` batches and at the end, its growth after the first
   ``--every`` batches (warm-up: allocator pools, caches), peak memory (``VmHWM``), throughput (solves only,
   and sampling + canonicalization + solves), solver setups, and the status counts: every instance must end
   ``optimal``.
2. Worker pool: ``--pool-instances`` instances through ``solve_batch(..., workers=--workers)`` (fresh solver
   object per instance, a spawned pool kept between batches); the child processes of this process (from
   ``/proc``) are listed while the pool is up and after :func:`amortcvx.backends.shutdown_workers`: no worker
   may be left (multiprocessing's resource tracker, which lives as long as this process, is listed apart).
3. Kill: a child Python process starts the same pool and is killed with SIGKILL; every process it started must
   be gone within ``--kill-timeout`` seconds (the workers' parent-sentinel watchdog, issue 10 item 9).

The run ends with a verdict per check and exit status 1 if any fails: a non-optimal status, resident memory
growth after warm-up above ``--max-growth-mb``, a worker left after shutdown or after the kill.

    nice python benchmarks/soak.py                          # 100,000 instances per backend (minutes)
    python benchmarks/soak.py --smoke                       # 2,000 instances per backend (seconds)
    python benchmarks/soak.py --instances 20000 --backends osqp --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from amortcvx import problems
from amortcvx.backends import PersistentSolver, get_backend, shutdown_workers, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.evaluation import environment, torch_threads
from amortcvx.solvers import FORMS, get_solver


def _status_kb(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``: resident memory, ``VmHWM``: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has exited


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root``: pid -> command line (from ``/proc``)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                parents[int(entry)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    out = {}
    for pid in sorted(found):
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _is_tracker(cmdline: str) -> bool:
    return "resource_tracker" in cmdline


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _workers_rss(children: dict[int, str]) -> list[float]:
    """Resident MB of each worker among ``children`` (the resource tracker left out)."""
    out = []
    for pid, cmd in children.items():
        if not _is_tracker(cmd):
            try:
                out.append(_status_kb("VmRSS", pid) / 1024)
            except (OSError, KeyError):
                pass
    return out


def _median(counts: Counter[int]) -> float:
    values = np.array(sorted(counts))
    cum = np.cumsum([counts[v] for v in values])
    total = cum[-1]
    lo, hi = values[np.searchsorted(cum, (total + 1) // 2)], values[np.searchsorted(cum, total // 2 + 1)]
    return (float(lo) + float(hi)) / 2


# ---------------------------------------------------------------------- part 1
def soak_persistent(family, backend: str, instances: int, batch: int, every: int) -> dict:
    pp = ParametricProblem(family.problem, form=FORMS[backend])
    sample = family.sample(1000, seed=10**6)
    mean = {k: np.asarray(v, dtype=np.float64).mean(axis=0) for k, v in sample.items()}
    solver = PersistentSolver(backend, pp.canonicalize(mean).instance(0))
    batches = max(1, instances // batch)
    statuses: Counter[str] = Counter()
    iterations: Counter[int] = Counter()  # bounded: a list of every count would itself grow the heap
    solve_s = total_s = 0.0
    start_mb = rss_mb()
    trace = [(0, start_mb)]
    print(f"[{backend}] n = {pp.n}, m = {pp.m}; {batches} batches of {batch}; settings {solver.settings}")
    print(f"[{backend}] rss at start {start_mb:.1f} MB")
    for b in range(batches):
        t0 = time.perf_counter()
        params = family.sample(batch, seed=b)
        data = pp.canonicalize(params)
        t1 = time.perf_counter()
        results = solver.solve(data)
        t2 = time.perf_counter()
        solve_s += t2 - t1
        total_s += t2 - t0
        statuses.update(str(r.status) for r in results)
        iterations.update(r.iterations for r in results)
        del params, data, results
        if (b + 1) % every == 0 or b + 1 == batches:
            mb = rss_mb()
            trace.append(((b + 1) * batch, mb))
            print(f"[{backend}] {(b + 1) * batch:>7} instances  rss {mb:7.1f} MB  "
                  f"{(b + 1) * batch / total_s:8.0f} inst/s  builds {solver.builds}", flush=True)
    solved = batches * batch
    warm = trace[1][1] if len(trace) > 2 else trace[0][1]
    out = {"backend": backend, "n": pp.n, "m": pp.m, "instances": solved, "batch": batch,
           "rss_start_mb": start_mb, "rss_after_warmup_mb": warm, "rss_end_mb": trace[-1][1],
           "growth_after_warmup_mb": trace[-1][1] - warm, "peak_mb": _status_kb("VmHWM") / 1024,
           "solve_per_s": solved / solve_s, "total_per_s": solved / total_s, "solve_seconds": solve_s,
           "total_seconds": total_s, "builds": solver.builds, "statuses": dict(statuses),
           "median_iterations": _median(iterations), "trace": trace}
    print(f"[{backend}] rss start {start_mb:.1f} MB, after {trace[1][0] if len(trace) > 2 else 0} instances "
          f"{warm:.1f} MB, end {trace[-1][1]:.1f} MB (growth after warm-up {out['growth_after_warmup_mb']:+.1f} MB)"
          f"; {out['solve_per_s']:.0f} solves/s ({out['total_per_s']:.0f}/s with sampling and canonicalization); "
          f"statuses {dict(statuses)}; median iterations {out['median_iterations']:g}; setups {solver.builds}")
    return out


# ---------------------------------------------------------------------- part 2
def _mbs(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "] MB"


def soak_pool(family, backend: str, instances: int, batch: int, workers: int) -> dict:
    pp = ParametricProblem(family.problem, form=FORMS[backend])
    me = os.getpid()
    before = descendants(me)
    statuses: Counter[str] = Counter()
    first_rss: list[float] = []
    t0 = time.perf_counter()
    for b in range(max(1, instances // batch)):
        insts = pp.canonicalize(family.sample(batch, seed=b)).instances()
        statuses.update(str(r.status) for r in solve_batch(insts, backend, workers=workers, exact_iterations=False))
        if b == 0:
            first_rss = _workers_rss(descendants(me))
    seconds = time.perf_counter() - t0
    during = descendants(me)
    last_rss = _workers_rss(during)
    shutdown_workers()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(not _is_tracker(c) for c in descendants(me).values()):
        time.sleep(0.1)
    after = descendants(me)
    left = {pid: cmd for pid, cmd in after.items() if not _is_tracker(cmd) and pid not in before}
    out = {"backend": backend, "workers": workers, "instances": sum(statuses.values()), "seconds": seconds,
           "statuses": dict(statuses), "children_during": len(during),
           "workers_during": sum(not _is_tracker(c) for c in during.values()),
           "workers_rss_after_first_batch_mb": first_rss, "workers_rss_at_end_mb": last_rss,
           "children_after_shutdown": {str(k): v for k, v in after.items()},
           "left": {str(k): v for k, v in left.items()}}
    print(f"[pool {backend}] {out['instances']} instances on {workers} workers in {seconds:.1f} s; statuses "
          f"{dict(statuses)}; children while the pool is up: {out['workers_during']} workers"
          f"{' + resource tracker' if len(during) > out['workers_during'] else ''} (worker rss after the first "
          f"batch {_mbs(first_rss)}, at the end {_mbs(last_rss)}); after shutdown_workers(): "
          f"{len(left)} workers left" + (f" ({left})" if left else "")
          + (", resource tracker (ends with this process)" if any(_is_tracker(c) for c in after.values()) else ""))
    return out


# ---------------------------------------------------------------------- part 3
def _child_pool(family_name: str, size: str, backend: str, workers: int) -> None:
    """Entry point of the killed child: start the pool, solve a batch, report, wait."""
    family = problems.make(family_name, size=size)
    pp = ParametricProblem(family.problem, form=FORMS[backend])
    solve_batch(pp.canonicalize(family.sample(4 * workers, seed=0)).instances(), backend, workers=workers,
                exact_iterations=False)
    print("ready", flush=True)
    time.sleep(600)


def soak_kill(family_name: str, size: str, backend: str, workers: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-pool", "--family", family_name, "--size", size,
           "--backends", backend, "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started: dict[int, str] = {}
    try:
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the child pool did not start (rc {proc.wait()})")
        started = descendants(proc.pid)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        while any(alive(pid) for pid in started) and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        gone_s = time.monotonic() - t0
        left = {pid: cmd for pid, cmd in started.items() if alive(pid)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # only what this run started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    out = {"started": len(started), "left": {str(k): v for k, v in left.items()}, "gone_seconds": gone_s}
    print(f"[kill] SIGKILL of a parent with {len(started)} children ({workers} workers + resource tracker): "
          + (f"all gone after {gone_s:.2f} s" if not left else f"{len(left)} left after {timeout:g} s: {left}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=100_000, help="instances per backend (part 1)")
    ap.add_argument("--batch", type=int, default=1000, help="instances per batch")
    ap.add_argument("--every", type=int, default=10, help="print resident memory every this many batches")
    ap.add_argument("--family", default="portfolio")
    ap.add_argument("--size", default="small")
    ap.add_argument("--backends", nargs="*", default=["scs", "osqp"])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of parts 2 and 3")
    ap.add_argument("--pool-instances", type=int, default=5000, help="instances through solve_batch (part 2)")
    ap.add_argument("--max-growth-mb", type=float, default=20.0,
                    help="largest resident memory growth after warm-up that counts as flat")
    ap.add_argument("--kill-timeout", type=float, default=10.0, help="seconds the workers get to exit (part 3)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="2,000 instances per backend in batches of 200, "
                                                         "400 through the pool")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--child-pool", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_pool:
        _child_pool(args.family, args.size, args.backends[0], args.workers)
        return 0
    if not sys.platform.startswith("linux"):
        print("soak.py reads /proc: Linux only", file=sys.stderr)
        return 2
    if args.smoke:
        args.instances, args.batch, args.pool_instances = 2000, 200, 400
        args.every = min(args.every, 5)
    family = problems.make(args.family, size=args.size)
    for backend in args.backends:
        if not get_solver(backend).accepts(family.problem):
            raise SystemExit(f"{backend} cannot solve family {args.family!r} of kind {family.kind!r}")
        get_backend(backend)
    env = environment()
    env.update({"load_at_start": _load(), "nice": os.nice(0)})
    print(f"machine: {env['cpu']} ({env['cpu_count']} cores), {env['platform']}, python {env['python']}, "
          f"torch {env['torch']}, scs {env['scs']}, osqp {env['osqp']}, cvxpy {env['cvxpy']}; "
          f"load average {env['load_at_start']}, nice {env['nice']}")
    print(f"family {args.family} ({args.size}, {family.kind}); {args.instances} instances per backend in batches "
          f"of {args.batch}")
    report: dict = {"environment": env, "args": vars(args), "persistent": [], "pool": [], "kill": None}
    t0 = time.perf_counter()
    with torch_threads(args.torch_threads):
        for backend in args.backends:
            report["persistent"].append(soak_persistent(family, backend, args.instances, args.batch, args.every))
        for backend in args.backends:
            report["pool"].append(soak_pool(family, backend, args.pool_instances, args.batch, args.workers))
    report["kill"] = soak_kill(args.family, args.size, args.backends[0], args.workers, args.kill_timeout)
    report["seconds"] = time.perf_counter() - t0
    report["load_at_end"] = _load()
    checks = {}
    for r in report["persistent"]:
        checks[f"{r['backend']}: every status optimal"] = set(r["statuses"]) == {"optimal"}
        checks[f"{r['backend']}: rss flat (growth after warm-up {r['growth_after_warmup_mb']:+.1f} MB <= "
               f"{args.max_growth_mb:g} MB)"] = r["growth_after_warmup_mb"] <= args.max_growth_mb
    for r in report["pool"]:
        checks[f"pool {r['backend']}: every status optimal"] = set(r["statuses"]) == {"optimal"}
        checks[f"pool {r['backend']}: no worker left after shutdown_workers()"] = not r["left"]
    checks["kill: no process left after SIGKILL of the parent"] = not report["kill"]["left"]
    report["checks"] = checks
    print(f"\ntotal {report['seconds']:.0f} s; load average at end {report['load_at_end']}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
