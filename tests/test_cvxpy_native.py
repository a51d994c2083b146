"""Injecting warm starts into a user's own problem.solve(solver=cp.SCS / cp.OSQP) calls."""

import cvxpy as cp
import numpy as np
import pytest

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver, inject_warm_start, solve_cvxpy


@pytest.mark.parametrize("algorithm,form,k", [("scs", "cone", 300), ("osqp", "qp", 300)])
def test_injected_warm_start_is_used_and_answer_unchanged(algorithm, form, k):
    fam = problems.make("portfolio")
    prob = fam.problem
    # A warm start from k torch steps (no predictor): close to the optimum, so the C solver must need fewer steps.
    amortized = AmortizedSolver(ParametricProblem(prob, form), algorithm=algorithm, k=k, workers=1)
    solver = {"scs": cp.SCS, "osqp": cp.OSQP}[algorithm]
    opts = {"eps_abs": 1e-6, "eps_rel": 1e-6}
    if algorithm == "osqp":
        opts["check_termination"] = 1  # exact counts (SCS's are multiples of 25 in CVXPY's solver_stats)
    ref = problems.make("portfolio")  # same constants; a separate object, so no cache is shared
    for i, row in enumerate(ref.sample(3, seed=11)["mu"]):
        fam.parameters["mu"].value = row
        ref.parameters["mu"].value = row
        cold_value = ref.problem.solve(solver=solver, **opts)
        cold_iters = ref.problem.solver_stats.num_iters
        cold_x = {v.name(): v.value.copy() for v in ref.problem.variables()}
        value = solve_cvxpy(prob, amortized, **opts)
        assert prob.status == cp.OPTIMAL
        assert prob.solver_stats.num_iters < cold_iters, (i, prob.solver_stats.num_iters, cold_iters)
        assert value == pytest.approx(cold_value, rel=1e-4, abs=1e-5)
        for v in prob.variables():
            np.testing.assert_allclose(v.value, cold_x[v.name()], atol=1e-3)


def test_inject_requires_the_same_problem_and_values():
    fam = problems.make("portfolio")
    amortized = AmortizedSolver(ParametricProblem(fam.problem, "cone"), algorithm="scs", k=5, workers=1)
    other = problems.make("portfolio").problem
    with pytest.raises(ValueError, match="another cp.Problem"):
        inject_warm_start(other, amortized)
    fam.parameters["mu"].value = None
    with pytest.raises(ValueError, match="parameter 'mu' has no value"):
        inject_warm_start(fam.problem, amortized)
    with pytest.raises(ValueError, match="warm-starts SCS"):
        solve_cvxpy(fam.problem, amortized, solver=cp.OSQP)
