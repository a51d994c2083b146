"""The solver descriptions (amortcvx.solvers) and the tables derived from them agree with what each layer does."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest

from amortcvx.backends import BACKENDS, WarmStart, solve
from amortcvx.canon import ParametricProblem
from amortcvx.canon.parametric import FORMS as CANON_FORMS
from amortcvx.datasets import BACKEND_FORMS
from amortcvx.iterations.registry import ALGORITHMS, DATA_FORMS, ITERATIONS, make_algorithm
from amortcvx.predictors.model import SETTINGS as PREDICTOR_SETTINGS
from amortcvx.solvers import FORMS, NAMES, SOLVERS, SolverDescription, get_solver, solver_for_form


def _qp():
    a = cp.Parameter(3, name="a")
    x = cp.Variable(3, name="x")
    return cp.Problem(cp.Minimize(cp.sum_squares(x) + a @ x), [x >= -1, cp.sum(x) == 0.5]), {"a": np.ones((2, 3))}


def _socp():
    a = cp.Parameter(3, name="a")
    x = cp.Variable(3, name="x")
    return cp.Problem(cp.Minimize(cp.norm(x - a, 2)), [cp.sum(x) == 1])


def test_every_solver_is_described_once_with_its_layers_registrations():
    assert NAMES == tuple(SOLVERS) == tuple(BACKENDS) == tuple(ITERATIONS)
    for name, d in SOLVERS.items():
        assert d.name == d.backend.name == d.iteration.name == name
        assert d.form == d.backend.form == DATA_FORMS[name] == FORMS[name] == BACKEND_FORMS[name]
        assert d.cones == d.backend.cones and d.warm_start_fields == tuple(d.backend.warm_start_fields)
        assert d.settings_class is d.iteration.settings and ALGORITHMS[name] is d.iteration.factory
        assert d.default_settings == d.backend.default_settings
        # CVXPY compiles the form with the solver the description names
        assert CANON_FORMS[d.form] == d.cvxpy_name
        # the tables of the upper layers that still spell these facts out must agree (until they derive them)
        assert PREDICTOR_SETTINGS[name] is d.settings_class
        assert solver_for_form(d.form).form == d.form


@pytest.mark.parametrize("name", NAMES)
def test_description_builds_a_working_pipeline(name):
    """form -> ParametricProblem, iteration factory + settings class -> torch steps, backend -> C solve with a
    warm start in the described coordinates; CVXPY with the described name gives the same optimum."""
    d = get_solver(name)
    prob, params = _qp()
    pp = ParametricProblem(prob, form=d.form)
    data = pp.canonicalize(params)
    alg = make_algorithm(name, data, d.settings_class())
    state = alg.init()
    assert alg.step(state) is not None
    inst = data.instances()[0]
    cold = solve(inst, d.backend.name, settings={"eps_abs": 1e-9, "eps_rel": 1e-9})
    warm = WarmStart(**{f: getattr(cold, f) for f in d.warm_start_fields})
    again = solve(inst, d.backend.name, warm_start=warm, settings={"eps_abs": 1e-9, "eps_rel": 1e-9})
    assert again.iterations <= cold.iterations
    for p in prob.parameters():
        p.value = params[p.name()][0]
    ref = prob.solve(solver=d.cvxpy_name, eps_abs=1e-9, eps_rel=1e-9)
    assert abs(cold.objective - ref) < 1e-5 * max(1.0, abs(ref))


def test_unknown_solver_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'ecos'; known solvers: scs, osqp"):
        get_solver("ecos")
    with pytest.raises(ValueError, match=r"unknown backend 'x'"):
        get_solver("x", what="backend")
    with pytest.raises(ValueError, match="no solver takes form 'lp'"):
        solver_for_form("lp")


def test_problem_check_follows_the_cones():
    prob, _ = _qp()
    socp = _socp()
    assert get_solver("osqp").accepts(prob) and get_solver("scs").accepts(socp)
    assert not get_solver("osqp").accepts(socp)
    with pytest.raises(ValueError, match=r"solver 'osqp' takes QPs and LPs only .* my problem is not a QP.*'scs'"):
        get_solver("osqp").check_problem(socp, what="my problem")
    get_solver("scs").check_problem(socp)


def test_a_description_whose_iteration_and_backend_disagree_is_refused():
    scs, osqp = SOLVERS["scs"], SOLVERS["osqp"]
    with pytest.raises(ValueError, match="torch iteration takes form 'qp' but its C backend form 'cone'"):
        SolverDescription(name="bad", cvxpy_name="SCS", backend=scs.backend, iteration=osqp.iteration)
