"""Batched C solves (SCS 3 / OSQP 1) with amortcvx.backends.solve_batch: 1 worker against k worker processes.

For each backend, a batch of instances of one problem family (cold starts, fresh solver per instance) is
solved with ``workers=1`` (in process) and with each larger worker count (a spawned pool, started by a
warm-up batch whose time is reported separately). Printed per run: batch wall time (median of
``--repeats``), wall time per instance (throughput), the median solver-reported setup + solve time per
instance, the median iteration count, and the speedup over 1 worker.

    python benchmarks/bench_backends.py                               # mpc large, 200 instances
    python benchmarks/bench_backends.py --family portfolio --size small --batch 1000 --workers 1 2

Timings use ``exact_iterations=False`` unless ``--exact`` is given (exact mode logs every SCS iteration
and makes OSQP check termination every iteration, so its times are not representative).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from amortcvx import problems
from amortcvx.backends import get_backend, shutdown_workers, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.solvers import get_solver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="mpc")
    ap.add_argument("--size", default="large")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--backends", nargs="*", default=["scs", "osqp"])
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exact", action="store_true", help="exact iteration counts (slower, see docstring)")
    ap.add_argument("--eps", type=float, default=1e-5, help="eps_abs = eps_rel")
    args = ap.parse_args()

    import osqp
    import scs

    fam = problems.make(args.family, args.size)
    params = fam.sample(args.batch, seed=0)
    tparams = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count() = {os.cpu_count()}, python {platform.python_version()}; "
          f"scs {scs.__version__}, osqp {osqp.__version__}; load average at start {os.getloadavg()[0]:.2f}")
    print(f"family {args.family} ({args.size}), batch {args.batch} cold starts, "
          f"exact_iterations={args.exact}, repeats {args.repeats} (median), eps_abs = eps_rel = {args.eps:g}")
    for backend in args.backends:
        info = get_backend(backend)
        if not get_solver(backend).accepts(fam.problem):
            print(f"{backend}: skipped ({args.family} is {fam.kind}, not a QP)")
            continue
        data = ParametricProblem(fam.problem, info.form).canonicalize(tparams)
        insts = data.instances()
        settings = {**info.default_settings, "eps_abs": args.eps, "eps_rel": args.eps}
        print(f"\n{backend}: n = {data.n}, m = {data.m}, settings {settings}")
        print(f"{'workers':>8}{'batch [s]':>11}{'wall/inst [ms]':>16}{'solver/inst [ms]':>18}{'iters':>7}"
              f"{'speedup':>9}{'startup [s]':>13}")
        base = None
        for workers in args.workers:
            startup = float("nan")
            if workers > 1:  # start the pool (spawn + imports) outside the timed runs
                t0 = time.perf_counter()
                solve_batch(insts[:workers], backend, settings=settings, exact_iterations=args.exact,
                            workers=workers, chunksize=1)
                startup = time.perf_counter() - t0
            walls, results = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                results = solve_batch(insts, backend, settings=settings, exact_iterations=args.exact,
                                      workers=workers)
                walls.append(time.perf_counter() - t0)
            wall = statistics.median(walls)
            base = wall if base is None else base
            solver_ms = np.median([r.setup_time + r.solve_time for r in results]) * 1e3
            iters = np.median([r.iterations for r in results])
            bad = sum(not r.status.has_solution for r in results)
            note = f"  ({bad} not solved)" if bad else ""
            print(f"{workers:>8}{wall:>11.3f}{wall / len(insts) * 1e3:>16.3f}{solver_ms:>18.3f}{iters:>7.0f}"
                  f"{base / wall:>9.2f}{startup:>13.2f}{note}")
        shutdown_workers()
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other processes on the machine slow the workers)")


if __name__ == "__main__":
    main()
