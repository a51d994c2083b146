"""Ranking a predictor's candidates: in groups on the batch taken ``g`` times against one call per candidate.

A predictor with several candidates per instance (the uncorrected first-order expansions from the ``choices`` nearest
training instances, :class:`~amortcvx.predictors.NeighborTangent`) is ranked by :func:`~amortcvx.predictors.predict`
with the optimality residual of each candidate. It ranks them a group at a time, on the batch taken ``g`` times
(``alg.take``, ``g B d <= RANK_ENTRIES``; an instance stops at its first exact candidate); ``rank_entries=1`` gives
one call per candidate. For each family,
candidate count and batch size this script times both (interleaved, median of ``--repeats``; the algorithm's setup
excluded, the same for both) and reports ms per instance, their ratio, and the largest difference between the two
picks (0 unless two candidates' residuals tie to rounding).

Usage::

    python benchmarks/bench_ranking.py                                    # portfolio small SCS, mpc large OSQP
    python benchmarks/bench_ranking.py --pairs lasso:small:scs --choices 8 1024 --batch 1 8 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.datasets import generate_dataset
from amortcvx.evaluation.machine import environment
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors import predict
from amortcvx.predictors.fixed_point import RANK_ENTRIES, output_space, rank_group
from amortcvx.solvers import get_solver
from amortcvx.training import SolvedSet
from amortcvx.training.recipe import Candidate, uncorrected_model


def bench_pair(name: str, size: str, alg_name: str, args) -> None:
    fam = problems.make(name, size=size)
    pp = ParametricProblem(fam.problem, get_solver(alg_name).form)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        ds = generate_dataset(pp, fam.sample(args.train, seed=0), alg_name, root, name="train", workers=args.workers,
                              progress=False)
        solved = SolvedSet.from_dataset(pp, ds)
    model = uncorrected_model(Candidate(kind="neighbor_tangent", correction=False, choices=max(args.choices)),
                              pp, alg_name, None, solved)
    print(f"{name} {size} {alg_name}: {len(solved)} training instances solved, derivatives at all of them, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    space, cache = output_space(alg_name), FactorCache()
    settings = model.meta.algorithm_settings()
    for choices in args.choices:
        model.core.choices = min(choices, len(solved))
        for B in args.batch:
            theta = pp.parameter_vector(fam.sample(B, seed=11), dtype=torch.float64)
            alg = make_algorithm(alg_name, pp.canonicalize_vector(theta), settings, cache=cache)
            times = {"grouped": [], "one call each": []}
            with torch.no_grad():
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    grouped = predict(model, space, alg, theta)
                    times["grouped"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    single = predict(model, space, alg, theta, rank_entries=1)
                    times["one call each"].append(time.perf_counter() - t)
            med = {k: 1e3 * float(np.median(v)) / B for k, v in times.items()}
            group = rank_group(model.core.choices, B, space.dim(alg.work.n, alg.work.m))
            print(f"    {choices:5d} candidates  batch {B:5d}  groups of {group:4d}"
                  f"  grouped {med['grouped']:9.3f} ms/instance  one call each {med['one call each']:9.3f}"
                  f"  ratio {med['grouped'] / med['one call each']:.2f}"
                  f"  picks differ by {float((grouped - single).abs().max()):.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", nargs="*", default=["portfolio:small:scs", "mpc:large:osqp"],
                    help="family:size:solver")
    ap.add_argument("--choices", type=int, nargs="*", default=[8, 64, 1024])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("machine:", environment(), "load", os.getloadavg())
    print(f"predict on the CPU in float64, torch 1 thread; RANK_ENTRIES = {RANK_ENTRIES}; predictor: uncorrected "
          f"tangent expansions from {args.train} training instances (solved at the dataset's default tolerance); "
          f"{args.repeats} interleaved repeats, medians; the algorithm's setup not timed")
    for pair in args.pairs:
        name, size, alg_name = pair.split(":")
        bench_pair(name, size, alg_name, args)


if __name__ == "__main__":
    main()
