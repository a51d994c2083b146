"""The user-facing entry point: ``import amortcvx as ac``; ``ac.AmortizedSolver.fit / solve / save / load``."""

from __future__ import annotations

import json

import cvxpy as cp
import numpy as np
import pytest
import torch

import amortcvx as ac
from amortcvx.deploy.fit import draw, params_digest
from amortcvx.deploy.solver import REPORTED_BATCHES

N = 8


def _portfolio():
    mu = cp.Parameter(N, name="mu")
    w = cp.Variable(N, name="w")
    t = cp.Variable(nonneg=True, name="t")  # replaced by CVXPY during compilation: the per-instance inverse path
    prob = cp.Problem(cp.Maximize(mu @ w - cp.sum_squares(w) - t), [cp.sum(w) == 1, w >= 0, t >= cp.norm1(w) - 2])
    return prob, mu, w, t


def _sampler(n, rng):
    return {"mu": rng.normal(size=(n, N))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    prob, mu, w, t = _portfolio()
    root = tmp_path_factory.mktemp("fit")
    solver = ac.AmortizedSolver.fit(prob, _sampler, solver="scs", num=60, k=2, epochs=3, root=root, progress=False)
    return solver, prob, (mu, w, t), root


def test_exports_are_lazy_and_listed():
    assert "AmortizedSolver" in dir(ac) and "AmortizedSolver" in ac.__all__
    assert ac.AmortizedSolver.__module__ == "amortcvx.deploy.solver"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ac.nope  # noqa: B018


def test_fit_solves_and_reports_in_cvxpy_terms(fitted):
    solver, prob, (mu, w, t), _ = fitted
    assert solver.calibration is not None and solver.algorithm == "scs"
    assert solver.solver_settings["eps_abs"] == 1e-4
    theta = np.random.default_rng(7).normal(size=(5, N))
    out = solver.solve({"mu": theta})
    assert len(out) == 5 and out.optimal.all()
    assert out.variables["w"].shape == (5, N) and out.variables[w] is out.variables["w"]
    assert out.variables[t].shape == (5,)
    assert out.duals[0].shape == (5,) and out.duals[prob.constraints[1]].shape == (5, N)
    for i in range(5):
        mu.value = theta[i]
        prob.solve(solver=cp.CLARABEL)
        assert out.objective[i] == pytest.approx(prob.value, abs=2e-3)  # CVXPY's sign (a maximization)
        np.testing.assert_allclose(out.variables["w"][i], w.value, atol=5e-3)
        ref = solver.pp.recover(out.results[i].x, out.results[i].y)
        np.testing.assert_allclose(out.duals[1][i], ref.duals[1])
        np.testing.assert_allclose(out.variables["t"][i], ref.variables["t"])
    assert out.solutions[0].status == cp.OPTIMAL
    with pytest.raises(KeyError, match="unknown variable 'v'.*'w'"):
        out.variables["v"]
    with pytest.raises(KeyError, match="not a variable of this problem"):
        out.variables[cp.Variable(2)]
    assert "5/5 optimal" in out.summary()


def test_summary_says_when_the_predictor_is_off(fitted):
    solver = fitted[0]
    saved = solver.enabled
    try:
        solver.enabled = False
        out = solver.solve({"mu": np.ones((2, N))})
        assert not out.predictor_enabled and out.summary().startswith("PREDICTOR OFF")
    finally:
        solver.enabled = saved


def test_fit_reuses_its_dataset_and_checkpoint(fitted):
    solver, prob, _, root = fitted
    folders = sorted(p.name for p in root.iterdir())
    assert len(folders) == 1 and folders[0].endswith(params_digest(draw(solver.pp, _sampler, 60, 0)))
    assert list((root / folders[0]).glob("model-*.pt"))
    again = ac.AmortizedSolver.fit(prob, _sampler, solver="scs", num=60, k=2, epochs=3, root=root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == folders  # same samples: the same folder, nothing solved twice
    theta = {"mu": np.random.default_rng(3).normal(size=(3, N))}
    vec = solver.pp.parameter_vector(theta)
    torch.testing.assert_close(again.model(vec), solver.model(vec))  # the checkpoint, not a new training
    again.use_strategy(solver.strategy)  # (the strategy is chosen by wall time, which varies from run to run)
    again.c_setup = dict(solver.c_setup)  # (so is SCS's normalize, which fresh C objects get too)
    np.testing.assert_allclose(again.solve(theta, exact_iterations=True).x,  # fresh C objects: no other timed choice
                               solver.solve(theta, exact_iterations=True).x, atol=1e-9)
    ac.AmortizedSolver.fit(prob, _sampler, solver="scs", num=60, k=2, epochs=3, root=root, seed=1, progress=False,
                           calibrate=False)
    assert len(list(root.iterdir())) == 2  # other samples: another folder


def test_save_load_round_trip(fitted, tmp_path):
    solver, prob, _, _ = fitted
    solver.save(tmp_path / "s")
    loaded = ac.AmortizedSolver.load(tmp_path / "s", prob)
    assert loaded.calibration == solver.calibration and loaded.c_modes == solver.c_modes
    assert (loaded.enabled, loaded.k, loaded.anderson, loaded.scs_scale) == (
        solver.enabled, solver.k, solver.anderson, solver.scs_scale)
    theta = {"mu": np.random.default_rng(4).normal(size=(4, N))}
    a, b = solver.solve(theta), loaded.solve(theta)
    np.testing.assert_allclose(a.x, b.x, atol=1e-12)
    assert list(a.iterations) == list(b.iterations)
    other = cp.Problem(cp.Minimize(cp.sum_squares(cp.Variable(N) - cp.Parameter(N, name="mu"))))
    with pytest.raises(ValueError, match="not for this problem"):
        ac.AmortizedSolver.load(tmp_path / "s", other)
    with pytest.raises(FileNotFoundError, match="solver.json"):
        ac.AmortizedSolver.load(tmp_path, prob)
    (tmp_path / "s" / "solver.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        ac.AmortizedSolver.load(tmp_path / "s", prob)
    (tmp_path / "s" / "solver.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not an AmortizedSolver file"):
        ac.AmortizedSolver.load(tmp_path / "s", prob)


def test_solve_cvxpy_fills_the_problem(fitted):
    solver, prob, (mu, w, _), _ = fitted
    mu.value = np.linspace(-1, 1, N)
    value = solver.solve_cvxpy()
    assert prob.status == cp.OPTIMAL and value == pytest.approx(prob.value)
    got = w.value.copy()
    prob.solve(solver=cp.CLARABEL)
    np.testing.assert_allclose(got, w.value, atol=5e-3)


def test_fit_osqp_from_arrays(tmp_path):
    q = cp.Parameter(4, name="q")
    x = cp.Variable(4, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [x >= -1, x <= 1])
    data = {"q": np.random.default_rng(0).normal(size=(40, 4))}
    solver = ac.AmortizedSolver.fit(prob, data, solver="osqp", k=1, epochs=2, root=tmp_path, progress=False)
    out = solver.solve({q: np.array([[3.0, -3.0, 0.5, 0.0]])})
    np.testing.assert_allclose(out.variables[x][0], [-1.0, 1.0, -0.25, 0.0], atol=1e-3)


def test_fit_names_what_is_wrong_with_the_data(tmp_path):
    prob, *_ = _portfolio()
    kwargs = dict(num=10, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown solver 'ecos'"):
        ac.AmortizedSolver.fit(prob, _sampler, solver="ecos", **kwargs)
    with pytest.raises(ValueError, match=r"missing \['mu'\], unknown \['m'\]"):
        ac.AmortizedSolver.fit(prob, lambda n, rng: {"m": np.zeros((n, N))}, **kwargs)
    with pytest.raises(ValueError, match=r"parameter 'mu' must have shape \(N, \*\(8,\)\)"):
        ac.AmortizedSolver.fit(prob, lambda n, rng: {"mu": np.zeros((n, N + 1))}, **kwargs)
    with pytest.raises(TypeError, match="must return a dict"):
        ac.AmortizedSolver.fit(prob, lambda n, rng: np.zeros((n, N)), **kwargs)
    with pytest.raises(ValueError, match="returned 3 instances; 10 were asked for"):
        ac.AmortizedSolver.fit(prob, lambda n, rng: {"mu": np.zeros((3, N))}, **kwargs)
    with pytest.raises(TypeError, match="data must be a sampler"):
        ac.AmortizedSolver.fit(prob, [1, 2], **kwargs)


def test_calibration_chooses_the_strategy_by_wall_time(fitted):
    solver = fitted[0]
    cal = solver.calibration
    assert cal.strategy == solver.strategy and cal.strategy in cal.seconds
    assert set(cal.seconds) <= {"learned", "refined_cold", "cold"} and "cold" in cal.seconds
    assert all(a > 0 and b > 0 for a, b in cal.seconds.values())
    fastest = [min(t[j] for t in cal.seconds.values()) for j in range(2)]
    worst = {k: max(v[j] / fastest[j] for j in range(2)) for k, v in cal.seconds.items()}
    assert worst[cal.strategy] == min(worst.values())
    text = cal.describe()
    used = {cal.strategy_for(b) for b in REPORTED_BATCHES} if cal.cost_model() else {cal.strategy}
    assert ("PREDICTOR OFF" in text) == ("learned" not in used) and f"{cal.learned_median:g}" in text
    saved = solver.strategy
    try:
        solver.use_strategy("cold")  # the plain cold start: no torch work at all
        assert not solver.enabled and not solver.cold_refine
        pred = solver.predict_warm_start({"mu": np.ones((3, N))})
        assert all(w is None for w in pred.warm_starts) and np.isnan(pred.residual).all()
        solver.use_strategy("refined_cold")
        pred = solver.predict_warm_start({"mu": np.ones((3, N))})
        assert all(w is not None for w in pred.warm_starts) and pred.fallback.all()
        with pytest.raises(ValueError, match="strategy must be one of"):
            solver.use_strategy("fast")
    finally:
        solver.use_strategy(saved)


def test_plain_cold_starts_take_the_direct_path_with_the_general_paths_answers(fitted):
    solver, prob, (mu, w, t), _ = fitted
    theta = np.random.default_rng(11).normal(size=(4, N))
    saved = solver.strategy
    try:
        solver.use_strategy("cold")  # every batch size: the persistent cold object alone
        fast = solver.solve({"mu": theta})
        general = solver.solve({"mu": theta}, exact_iterations=True)  # the general path, fresh objects
    finally:
        solver.use_strategy(saved)
    assert fast.optimal.all() and not fast.certified.any() and not fast.warm_started.any()
    assert not fast.retried.any() and not fast.predictor_enabled and fast.fallback.all()  # a model, switched off
    assert fast.predict_seconds > 0 and fast.solve_seconds > 0
    np.testing.assert_allclose(fast.objective, general.objective, atol=2e-3)
    for i in range(4):
        mu.value = theta[i]
        prob.solve(solver=cp.CLARABEL)
        assert fast.objective[i] == pytest.approx(prob.value, abs=2e-3)  # CVXPY's sign (a maximization)
        np.testing.assert_allclose(fast.variables["w"][i], w.value, atol=5e-3)


def test_fitted_osqp_rho_saves_iterations():
    from amortcvx import problems

    fam = problems.make("lasso")
    pp = ac.ParametricProblem(fam.problem, form="qp")
    tol = {"eps_abs": 1e-4, "eps_rel": 1e-4}
    solver = ac.AmortizedSolver(pp, algorithm="osqp", solver_settings=tol, reference_params={
        k: v.mean(0) for k, v in fam.sample(20, seed=0).items()})
    rho = solver.choose_osqp_rho(fam.sample(30, seed=1))
    assert rho is not None and rho > 0 and solver.c_settings() == tol  # chosen, not set
    test = fam.sample(40, seed=2)
    default = solver.solve(test, exact_iterations=True).iterations
    solver.osqp_rho = rho
    fitted = solver.solve(test, exact_iterations=True)
    assert fitted.optimal.all() and np.median(fitted.iterations) < np.median(default)
    user = ac.AmortizedSolver(pp, algorithm="osqp", solver_settings={**tol, "rho": 0.5})
    user.osqp_rho = rho
    assert user.c_settings()["rho"] == 0.5  # the user's setting wins


def _sdp():
    C = cp.Parameter((3, 3), symmetric=True, name="C")
    X = cp.Variable((3, 3), PSD=True, name="X")
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), [cp.trace(X) == 1])

    def sampler(n, rng):
        G = rng.normal(size=(n, 3, 3))
        return {"C": G + G.transpose(0, 2, 1)}

    return prob, sampler


def _entropy():
    a = cp.Parameter(4, name="a")
    p = cp.Variable(4, name="p")
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(p)) + a @ p), [cp.sum(p) == 1])
    return prob, lambda n, rng: {"a": rng.normal(size=(n, 4))}


def _socp():
    b = cp.Parameter(5, name="b")
    x = cp.Variable(3, name="x")
    A = np.random.default_rng(0).normal(size=(5, 3))
    prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b) + 0.1 * cp.norm1(x)), [cp.norm(x, "inf") <= 1])
    return prob, lambda n, rng: {"b": rng.normal(size=(n, 5))}


@pytest.mark.parametrize("make", [_sdp, _entropy, _socp], ids=["sdp", "exp", "socp"])
def test_the_same_lines_work_on_other_cones(make, tmp_path):
    prob, sampler = make()
    solver = ac.AmortizedSolver.fit(prob, sampler, num=30, k=1, epochs=2, root=tmp_path, progress=False)
    theta = sampler(3, np.random.default_rng(9))
    out = solver.solve(theta)
    assert out.optimal.all()
    for i in range(3):
        for par in prob.parameters():
            par.value = theta[par.name()][i]
        prob.solve(solver=cp.CLARABEL)
        assert out.objective[i] == pytest.approx(prob.value, abs=5e-3, rel=5e-3)
        for var in prob.variables():
            np.testing.assert_allclose(out.variables[var][i], var.value, atol=5e-2)


def test_layer_uses_the_solvers_predictor(fitted):
    solver, prob, (mu, w, _), _ = fitted
    layer = solver.layer([mu], [w], eps=1e-8)
    assert layer.predictor is (solver.model if solver.enabled else None)
    theta = torch.tensor(np.random.default_rng(5).normal(size=(3, N)), requires_grad=True)
    (w_layer,) = layer(theta)
    for i in range(3):
        mu.value = theta[i].detach().numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        np.testing.assert_allclose(w_layer[i].detach().numpy(), w.value, atol=1e-5)
    w_layer.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    assert layer.eps == 1e-8 and solver.layer([mu], [w]).eps == solver.solver_settings["eps_abs"]


def test_calibrated_returns_a_configuration_and_leaves_the_solver_alone():
    from amortcvx import problems

    fam = problems.make("lasso")
    pp = ac.ParametricProblem(fam.problem, form="qp")
    solver = ac.AmortizedSolver(pp, algorithm="osqp", k=3, solver_settings={"eps_abs": 1e-4, "eps_rel": 1e-4})
    before = (solver.strategy, solver.osqp_rho, solver.check_termination, solver.cold_check_termination,
              solver.anderson, solver.calibration)
    cal = solver.calibrated(fam.sample(12, seed=1))  # without a predictor: rho, intervals and the cold strategy
    assert (solver.strategy, solver.osqp_rho, solver.check_termination, solver.cold_check_termination,
            solver.anderson, solver.calibration) == before
    assert cal.cold_check_termination >= 1
    assert cal.strategy in ("refined_cold", "cold") and not cal.enabled and np.isnan(cal.learned_median)
    assert cal.osqp_rho is not None and "no predictor" in cal.describe()
    assert solver.configure(cal) is cal and solver.calibration is cal
    assert (solver.strategy, solver.osqp_rho, solver.check_termination, solver.cold_check_termination) == (
        cal.strategy, cal.osqp_rho, cal.check_termination, cal.cold_check_termination)
    with pytest.raises(TypeError, match="Calibration"):
        solver.configure({"strategy": "cold"})


def test_fit_with_a_budget_runs_the_recipe(tmp_path):
    prob, *_ = _portfolio()
    solver = ac.AmortizedSolver.fit(prob, _sampler, k=2, budget=8, root=tmp_path, progress=False)
    assert solver.recipe is not None and solver.recipe.curve and solver.recipe.budget_seconds == 8
    assert solver.model is solver.recipe.model or solver.model.meta == solver.recipe.model.meta
    assert solver.calibration is not None
    chunks = sorted(p.name for p in tmp_path.iterdir())
    assert len(chunks) >= 2  # drawn in chunks of the sampler, each a cached dataset
    out = solver.solve({"mu": np.ones((2, N))})
    assert out.optimal.all()


def test_each_call_gets_the_strategy_fastest_at_its_batch_size(fitted):
    solver = fitted[0]
    cal = solver.calibration._replace(seconds={"learned": (5.0, 0.1), "cold": (1.0, 0.5)}, timing_batch=100)
    saved = solver.calibration
    try:
        solver.configure(cal)
        model = cal.cost_model()  # c + f/B through (1, t1) and (100, t100)
        f = 4.9 / 0.99
        assert model["learned"] == pytest.approx((5.0 - f, f))
        assert model["cold"] == pytest.approx((1 - 0.5 / 0.99, 0.5 / 0.99))
        assert cal.strategy_for(1) == "cold" and cal.strategy_for(100) == "learned"
        assert solver.strategy_for(1) == "cold" and solver.strategy_for(64) == "learned"
        assert not solver.solve({"mu": np.ones((1, N))}).predictor_enabled
        assert solver.solve({"mu": np.ones((64, N))}).predictor_enabled
        assert "per call by batch size: 1: cold" in cal.describe()
        # the choice per batch size is remembered; a new calibration replaces it
        solver.configure(cal._replace(seconds={"learned": (0.5, 0.1), "cold": (1.0, 0.5)}))
        assert solver.strategy_for(1) == "learned" and solver.strategy_for(64) == "learned"
        solver.calibration = cal
        assert solver.strategy_for(1) == "cold"
        solver.use_strategy("cold")  # an explicit choice holds for every batch size
        assert solver.strategy_for(64) == "cold"
    finally:
        solver.configure(saved)
