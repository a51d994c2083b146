"""A predictor trained for a few seconds beats the cold start and nearest neighbour on held-out instances.

Tiny instances of a QP family (portfolio, OSQP) and an SOCP (a risk-constrained portfolio, SCS). The learned
warm start includes k torch refinement steps (as deployed); the C iteration counts are exact, at eps 1e-4.
"""

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import Status, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver
from amortcvx.evaluation.baselines import NearestNeighbor
from amortcvx.iterations import AndersonSettings
from amortcvx.solvers import FORMS
from amortcvx.training import LossWeights, SolvedSet, TrainConfig, train

TOL = {"eps_abs": 1e-4, "eps_rel": 1e-4}


class _Family:
    """A minimal family: a problem and a seeded sampler."""

    def __init__(self, problem, sample):
        self.problem, self.sample = problem, sample


def socp_portfolio() -> _Family:
    rng = np.random.default_rng(0)
    n = 8
    F = rng.normal(size=(n, 3)) / np.sqrt(n)
    mu = cp.Parameter(n, name="mu")
    w = cp.Variable(n, name="w")
    prob = cp.Problem(cp.Maximize(mu @ w - 0.05 * cp.sum_squares(w)),
                      [cp.sum(w) == 1, w >= 0, cp.norm(F.T @ w) <= 0.3])
    base = rng.uniform(0.05, 0.15, size=n)
    return _Family(prob, lambda num, seed: {"mu": base + 0.05 * np.random.default_rng(seed).normal(size=(num, n))})


def solved(pp, params, backend, eps: float = 1e-9) -> SolvedSet:
    res = solve_batch(pp.canonicalize(params).instances(), backend, settings={"eps_abs": eps, "eps_rel": eps},
                      exact_iterations=False, workers=1)
    assert all(r.status == Status.OPTIMAL for r in res)
    stack = lambda f: torch.tensor(np.stack([getattr(r, f) for r in res]))  # noqa: E731
    return SolvedSet(pp.parameter_vector(params), stack("x"), stack("y"), stack("s") if backend == "scs" else None)


@pytest.mark.parametrize("family,algorithm", [("portfolio", "osqp"), ("socp", "scs")])
def test_learned_beats_cold_and_nearest_neighbour(family, algorithm):
    torch.manual_seed(0)
    fam = problems.make("portfolio") if family == "portfolio" else socp_portfolio()
    pp = ParametricProblem(fam.problem, FORMS[algorithm])
    tr, va = solved(pp, fam.sample(300, 0), algorithm), solved(pp, fam.sample(50, 1), algorithm)
    test = fam.sample(60, 2)
    k = 10
    cfg = TrainConfig(k=k, weights=LossWeights(regression=1.0, residual=1.0), epochs=40, batch_size=64,
                      patience=40, progress=False)
    model = train(pp, algorithm, tr, va, cfg).model

    inst = pp.canonicalize(test).instances()
    cold = solve_batch(inst, algorithm, settings=TOL, workers=1)
    near = NearestNeighbor(tr.theta.numpy(), tr.x.numpy(), tr.y.numpy(), None if tr.s is None else tr.s.numpy())
    nn = solve_batch(inst, algorithm, warm_starts=near.warm_starts(pp.parameter_vector(test).numpy()),
                     settings=TOL, workers=1)
    solver = AmortizedSolver(pp, model, k=k, solver_settings=TOL, workers=1)
    assert solver.calibrate(fam.sample(30, 3), timed=False).enabled  # a useful predictor survives calibration
    learned = solver.solve(test, exact_iterations=True)

    med = {name: float(np.median([r.iterations for r in rs]))
           for name, rs in (("cold", cold), ("nn", nn), ("learned", learned.results))}
    assert med["learned"] <= 0.85 * med["cold"], med
    assert med["learned"] <= 0.9 * med["nn"], med
    assert all(r.status == Status.OPTIMAL for r in learned.results)  # every answer meets the tolerance
    for r, c in zip(learned.results, cold):  # and it is the same answer (eps 1e-4)
        assert abs(r.objective - pp.objective_sign * c.objective) <= 1e-2 * (1 + abs(c.objective))  # CVXPY sign


def test_prediction_plus_accelerated_refinement_beats_the_same_refinement_from_cold():
    # kalman (SOCP): the C solver needs ~60 iterations cold; 30 Anderson-accelerated torch steps from the
    # cold start leave it ~20; from a learned prediction far fewer. Every answer is the C solver's, optimal.
    torch.manual_seed(0)
    fam = problems.make("kalman")
    pp = ParametricProblem(fam.problem, "cone")
    tr, va = solved(pp, fam.sample(400, 0), "scs", 1e-8), solved(pp, fam.sample(50, 1), "scs", 1e-8)
    cfg = TrainConfig(epochs=60, batch_size=64, patience=60, progress=False)
    model = train(pp, "scs", tr, va, cfg).model
    test = fam.sample(40, 2)
    cold = solve_batch(pp.canonicalize(test).instances(), "scs", settings=TOL, workers=1)
    runs = {}
    for name, m in (("learned", model), ("control", None)):
        solver = AmortizedSolver(pp, m, algorithm="scs", k=30, anderson=AndersonSettings(), solver_settings=TOL,
                                 workers=1)
        out = solver.solve(test, exact_iterations=True)
        assert all(r.status == Status.OPTIMAL for r in out.results)
        for r, c in zip(out.results, cold):
            assert abs(r.objective - c.objective) <= 1e-2 * (1 + abs(c.objective))
        runs[name] = float(np.median([r.iterations for r in out.results]))
    runs["cold"] = float(np.median([r.iterations for r in cold]))
    assert runs["control"] <= 0.7 * runs["cold"], runs
    assert runs["learned"] <= 0.5 * runs["control"], runs
    with pytest.raises(TypeError, match="AndersonSettings"):
        AmortizedSolver(pp, model, k=3, anderson=10)
