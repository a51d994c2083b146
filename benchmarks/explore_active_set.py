"""How far is an LP's learned warm start from its active set? A measurement for the learning issue (13).

On an LP the Newton finish (``kkt.newton_refine``) lands on the optimum in one step from any point whose
inequality rows are split as at the optimum (active: slack 0; inactive: dual 0), and the bare regression
predictor's points rarely have that split. This script measures, on held-out instances, how often a classifier
trained for that split alone gets it exactly right, and how often a small set of candidate splits around its
prediction contains the right one:

1. ``--train`` instances (sampler seed 0) and ``--test`` instances (seed 12345) solved by SCS at ``1e-9``; the
   label of each nonnegative row is "active" where its slack is below ``1e-7 (1 + max slack)``.
2. An MLP (256, 256) on the standardized parameters, one logit per nonnegative row, binary cross-entropy, Adam
   ``1e-3``, batch 64, ``--epochs`` epochs, 10% of the training instances held out for the printed validation.
3. Candidates: the signs of the logits; flips of up to 3 of the ``r`` least certain rows; and, where an LP's
   vertex has exactly ``n`` active rows, the ``n`` largest logits with 1 or 2 swaps within a band of ``r`` rows
   on each side of the cut (``iterations.polish.candidate_active_sets``, what polishing tries).
4. For each split: the fraction of test instances it (or a candidate set) matches exactly, and the fraction the
   Newton finish certifies from the split's point (``x = 0``, ``w = +-1``; up to 4 steps; ``kkt.converged``).
5. Neighbour splits (``predictors.NeighborActiveSet``, no training): the ``K`` distinct splits of the nearest
   training instances (``--choices``), how often the test instance's own is among them, and the median exact SCS
   iterations at ``1e-4`` from the predictor's bare prediction (each split solved on the test instance's data, the
   best by the optimality residual, ``predictors.predict``), against the cold start.

Prints the machine, the family's sizes and these settings beside the numbers.

    python benchmarks/explore_active_set.py --family transport
    python benchmarks/explore_active_set.py --family degenerate_lp --epochs 60
    python benchmarks/explore_active_set.py --family mpc --epochs 0 --choices 1 8 64   # a QP; classifier skipped
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch

from amortcvx.backends import solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.evaluation.machine import environment
from amortcvx.iterations import kkt
from amortcvx.iterations.polish import candidate_active_sets
from amortcvx.problems import make
from amortcvx.training.recipe import Candidate, c_iterations, uncorrected_model
from amortcvx.training.trainer import SolvedSet

SETTINGS = {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000}


def solved(pp: ParametricProblem, family, n: int, seed: int):
    """Parameters, canonical data and SCS's solution (a ``SolvedSet``) of ``n`` sampled instances."""
    theta = pp.parameter_vector(family.sampler(n, np.random.default_rng(seed)), dtype=torch.float64, device="cpu")
    data = pp.canonicalize_vector(theta)
    res = solve_batch([data.instance(i) for i in range(n)], "scs", settings=SETTINGS, workers=1)
    x, y, s = (torch.tensor(np.stack([getattr(r, f) for r in res])) for f in ("x", "y", "s"))
    return theta, data, SolvedSet(theta, x, y, s)


def active(s: torch.Tensor, zero: int) -> torch.Tensor:
    """1 where a nonnegative row's slack is zero at the optimum."""
    rows = s[:, zero:]
    return (rows < 1e-7 * (1 + rows.abs().amax(dim=1, keepdim=True))).double()


def certified(data, split: torch.Tensor, zero: int, n: int) -> torch.Tensor:
    """Where the Newton finish certifies from the point ``x = 0``, ``w = +1`` (active) / ``-1`` (inactive)."""
    d = kkt.auto(data)
    w = torch.zeros(split.shape[0], zero + split.shape[1], dtype=torch.float64)
    w[:, zero:] = 2 * split - 1
    ref = kkt.newton_refine(d, kkt.Point(torch.zeros(split.shape[0], n, dtype=torch.float64), w), steps=4,
                            passes=4, near=None)
    return kkt.converged(d, ref.norm)


def flips(base: torch.Tensor, logit: torch.Tensor, r: int) -> list[torch.Tensor]:
    """``base`` and its flips of up to 3 of the ``r`` least certain rows."""
    order, rows = logit.abs().argsort(dim=1), torch.arange(base.shape[0])
    out = [base]
    for k in (1, 2, 3):
        for comb in itertools.combinations(range(r), k):
            c = base.clone()
            for j in comb:
                c[rows, order[:, j]] = 1 - c[rows, order[:, j]]
            out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="transport")
    ap.add_argument("--size", default="small")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=100, help="classifier epochs (0: no classifier)")
    ap.add_argument("--choices", type=int, nargs="+", default=[1, 8, 64, 512, 4096],
                    help="neighbour splits per instance (step 5; those above --train are skipped)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("machine:", environment(), "load", os.getloadavg())
    family = make(args.family, args.size)
    pp = ParametricProblem(family.problem, "cone")
    start = time.perf_counter()
    theta, _, train_set = solved(pp, family, args.train, 0)
    test_theta, test_data, test_set = solved(pp, family, args.test, 12345)
    s, test_s = train_set.s, test_set.s
    zero = test_data.cones.zero
    labels, truth = active(s, zero), active(test_s, zero)
    distinct = len({tuple(r.int().tolist()) for r in labels})
    print(f"{args.family} {args.size}: n = {pp.n}, m = {pp.m} ({zero} zero rows); {args.train} training and "
          f"{args.test} test instances solved by SCS at {SETTINGS['eps_abs']:g} in {time.perf_counter() - start:.0f} s;"
          f" active rows per instance {float(labels.sum(1).mean()):.1f}, {distinct} distinct splits; test instances "
          f"with exactly n active rows {float((truth.sum(1) == pp.n).double().mean()):.2f}")
    mu, sd = theta.mean(0), theta.std(0).clamp_min(1e-12)
    u, test_u = (theta - mu) / sd, (test_theta - mu) / sd
    neighbour_splits(pp, train_set, test_set, labels, truth, args.choices)
    if args.epochs:
        classifier(pp, test_data, labels, truth, u, test_u, args)


def neighbour_splits(pp, train_set, test_set, labels, truth, choices) -> None:
    """Step 5: the K nearest training instances' splits, as candidates and through ``NeighborActiveSet``."""
    eps = {"eps_abs": 1e-4, "eps_rel": 1e-4}
    cold = c_iterations(pp, "scs", None, test_set, solver_settings=eps)
    print(f"neighbour splits (NeighborActiveSet): cold median {np.median(cold):g} SCS iterations at 1e-4")
    for k in [c for c in choices if c <= len(train_set)]:
        start = time.perf_counter()
        model = uncorrected_model(Candidate(kind="neighbor_active_set", correction=False, choices=k), pp, "scs",
                                  None, train_set)
        near, _ = model.core.distinct_neighbors(model._normalized(test_set.theta.to(torch.float64)), k)
        match = (labels[near] == truth[:, None]).all(dim=2).any(dim=1)
        its = c_iterations(pp, "scs", model, test_set, solver_settings=eps)
        print(f"  {k:5d} distinct nearest: own split among them {float(match.double().mean()):.2f}; median "
              f"{np.median(its):g} (mean {its.mean():.1f}) SCS iterations from the prediction, at most 1 on "
              f"{float((its <= 1).mean()):.2f}; {time.perf_counter() - start:.1f} s with the C solves")


def classifier(pp, test_data, labels, truth, u, test_u, args) -> None:
    """Steps 2 to 4: the classifier of the split and the candidates around its prediction."""
    zero = test_data.cones.zero
    net = torch.nn.Sequential(torch.nn.Linear(u.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, labels.shape[1])).double()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    held = args.train // 10
    for _ in range(args.epochs):
        perm = torch.randperm(args.train - held) + held
        for i in range(0, perm.numel(), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(u[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        val = ((net(u[:held]) > 0).double() == labels[:held])
        logit = net(test_u)
    base = (logit > 0).double()
    print(f"classifier ({args.epochs} epochs): validation row accuracy {float(val.double().mean()):.3f}, exact "
          f"{float(val.all(1).double().mean()):.3f}; test row accuracy {float((base == truth).double().mean()):.3f}")

    def report(name: str, cands: list[torch.Tensor]) -> None:
        match = torch.stack([(c == truth).all(1) for c in cands]).any(0)
        done = torch.stack([certified(test_data, c, zero, pp.n) for c in cands]).any(0)
        print(f"  {name:44s} {len(cands):4d} candidates: exact split {float(match.double().mean()):.2f}, "
              f"certified by Newton {float(done.double().mean()):.2f}")

    report("the true split", [truth])
    report("signs of the logits", [base])
    for r in (4, 6):
        report(f"flips of up to 3 of the {r} least certain rows", flips(base, logit, r))
    for r in (3, 4):
        cands = candidate_active_sets(logit, torch.zeros(logit.shape[1], dtype=torch.bool), pp.n, r).double()
        report(f"n largest logits, swaps within {r} of the cut", list(cands))


if __name__ == "__main__":
    main()
