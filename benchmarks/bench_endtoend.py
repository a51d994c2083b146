"""End-to-end wall time per instance, parameter values to answers at the tolerance (issue: wall-time savings).

Strategies, timed back to back in each round (interleaved), medians over rounds:

* (b) ``loop``: the hand-written persistent cold loop on the solver's own Python API
  (:class:`amortcvx.evaluation.PersistentColdLoop`): the best a user does without amortcvx.
* (a) ``package cold``: ``AmortizedSolver`` without predictor, ``k = 0``, ``finish="c"`` (persistent solver object).
* ``refine k + certify``: ``AmortizedSolver`` without predictor, ``k`` torch steps (Anderson) from the cold start,
  certified finish, the rest warm-started on the persistent object (what the refinement alone buys; a learned
  prediction starts the same path from a better point).
* ``floor``: the persistent solver object warm-started at the optimum (solved beforehand at eps 1e-9).

Usage: ``python benchmarks/bench_endtoend.py [--families ...] [--size small] [--batch 256] [--rounds 3]
[--k 60] [--json PATH] [--smoke]``. Prints machine, load, sizes, dtype and settings beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

import problems
from amortcvx.backends import PersistentSolver, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver
from amortcvx.evaluation import PersistentColdLoop
from amortcvx.iterations import AndersonSettings


def _per_instance(fn, params, batch: int) -> float:
    n = next(iter(params.values())).shape[0]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        fn({k: v[start:start + batch] for k, v in params.items()})
    return (time.perf_counter() - t0) / n * 1e3


def bench_pair(name: str, alg: str, size: str, batch: int, count: int, rounds: int, k: int, eps: float) -> dict:
    fam = problems.make(name, size=size)
    pp = ParametricProblem(fam.problem, {"scs": "cone", "osqp": "qp"}[alg])
    tol = {"eps_abs": eps, "eps_rel": eps}
    params = fam.sample(count, seed=11)
    ref = {key: v.mean(axis=0) for key, v in fam.sample(64, seed=12).items()}
    loop = PersistentColdLoop(pp, alg, tol)
    package = AmortizedSolver(pp, algorithm=alg, k=0, solver_settings=tol, finish="c", reference_params=ref)
    refine = AmortizedSolver(pp, algorithm=alg, k=k, anderson=AndersonSettings(), solver_settings=tol,
                             reference_params=ref)
    data = pp.canonicalize(params)
    opt = solve_batch(data.instances(), alg, settings={"eps_abs": 1e-9, "eps_rel": 1e-9}, workers=1)
    warm = {"x": np.stack([r.x for r in opt]), "y": np.stack([r.y for r in opt])}
    if alg == "scs":
        warm["s"] = np.stack([r.s for r in opt])
    floor_solver = PersistentSolver(alg, pp.canonicalize(ref).instance(0), tol)

    def floor(p):  # the optimum of the same rows (parameters are looked up by position)
        rows = floor.rows
        floor_solver.solve(data.take(rows[: next(iter(p.values())).shape[0]]),
                           {key: v[rows[: next(iter(p.values())).shape[0]]] for key, v in warm.items()})
        floor.rows = rows[next(iter(p.values())).shape[0]:]

    strategies = {"loop (b)": loop.solve, "package cold (a)": lambda p: package.solve(p),
                  f"refine {k} + certify": lambda p: refine.solve(p), "floor (optimum)": floor}
    first = {key: v[:batch] for key, v in params.items()}
    for fn in strategies.values():  # warm-up: imports, first setups
        floor.rows = np.arange(count)
        fn(first)
    times = {s: [] for s in strategies}
    for _ in range(rounds):
        for s, fn in strategies.items():
            floor.rows = np.arange(count)
            times[s].append(_per_instance(fn, params, batch))
    med = {s: float(np.median(v)) for s, v in times.items()}
    cert = float(np.mean(refine.solve(params).certified))
    return {"family": name, "algorithm": alg, "size": size, "n": pp.n, "m": pp.m, "batch": batch,
            "instances": count, "ms_per_instance": med, "certified_fraction": cert,
            "ratio_to_loop": {s: med[s] / med["loop (b)"] for s in med}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=problems.names())
    ap.add_argument("--size", default="small", choices=problems.SIZES)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--instances", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=60)
    ap.add_argument("--eps", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="portfolio only, 16 instances, 1 round (for CI)")
    args = ap.parse_args()
    if args.smoke:
        args.families, args.instances, args.rounds, args.batch = ["portfolio"], 16, 1, [1, 16]
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; device cpu, float64, torch threads 1; eps_abs = eps_rel = {args.eps:g}, "
          f"other solver settings default (SCS qdldl, OSQP adaptive_rho_interval 50); {args.instances} instances, "
          f"medians of {args.rounds} interleaved rounds; refinement k = {args.k} (Anderson), no predictor")
    rows = []
    for name in args.families:
        for alg in ("scs", "osqp"):
            if alg == "osqp" and problems.make(name).kind not in ("qp", "lp"):
                continue
            for batch in args.batch:
                r = bench_pair(name, alg, args.size, batch, args.instances, args.rounds, args.k, args.eps)
                rows.append(r)
                ms = r["ms_per_instance"]
                print(f"{name:14s} {alg:4s} n={r['n']:5d} m={r['m']:5d} batch {batch:4d}: " + ", ".join(
                    f"{s} {v:.3f} ms ({r['ratio_to_loop'][s]:.2f}x loop)" for s, v in ms.items())
                    + f"; certified {r['certified_fraction']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
