"""CvxpyLayer: answers against CVXPY + Clarabel, gradients against finite differences and cvxpylayers."""

from __future__ import annotations

import importlib.util
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sps
import torch

from amortcvx.layers import CvxpyLayer, SolverFailure

TIGHT = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}


# ---------------------------------------------------------------------------------------------- problems
def qp(n=6, m=10, seed=0):
    """minimize 1/2 ||F x||^2 + q'x  s.t.  G x <= h (parameters q, h)."""
    rng = np.random.default_rng(seed)
    F, G = rng.normal(size=(n, n)), rng.normal(size=(m, n))
    q, h, x = cp.Parameter(n, name="q"), cp.Parameter(m, name="h"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + q @ x), [G @ x <= h])

    def sample(B, rng):
        return [torch.tensor(rng.normal(size=(B, n))), torch.tensor(rng.uniform(0.2, 1.0, size=(B, m)))]
    return prob, [q, h], [x], sample


def lp_param_a(n=4, m=8, seed=1):
    """minimize c'x  s.t.  A x <= 1, -1 <= x <= 1 (parameters c and A)."""
    c, A, x = cp.Parameter(n, name="c"), cp.Parameter((m, n), name="A"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(c @ x), [A @ x <= 1, x >= -1, x <= 1])
    A0 = np.random.default_rng(seed).normal(size=(m, n))

    def sample(B, rng):
        return [torch.tensor(rng.normal(size=(B, n))), torch.tensor(A0 + 0.1 * rng.normal(size=(B, m, n)))]
    return prob, [c, A], [x], sample


def qp_param_p(n=5, seed=2):
    """minimize sum(d * x^2) + q'x  s.t.  sum(x) == 1, x >= 0 (parameters d >= 0 in P, and q)."""
    d, q, x = cp.Parameter(n, name="d", nonneg=True), cp.Parameter(n, name="q"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(d, cp.square(x))) + q @ x), [cp.sum(x) == 1, x >= 0])

    def sample(B, rng):
        return [torch.tensor(rng.uniform(0.5, 2.0, size=(B, n))), torch.tensor(0.3 * rng.normal(size=(B, n)))]
    return prob, [d, q], [x], sample


def socp(m=12, n=5, seed=3):
    """minimize ||A x - b||_2 + 0.1 ||x||_1  s.t.  ||x||_inf <= 1 (parameters A, b)."""
    A, b, x = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + 0.1 * cp.norm1(x)), [cp.norm(x, "inf") <= 1])
    A0 = np.random.default_rng(seed).normal(size=(m, n))

    def sample(B, rng):
        return [torch.tensor(A0 + 0.1 * rng.normal(size=(B, m, n))), torch.tensor(rng.normal(size=(B, m)))]
    return prob, [A, b], [x], sample


def sdp(k=3, seed=4):
    """minimize <C, X> + 1/2 ||X||_F^2  s.t.  trace(X) == 1, X PSD (parameter C)."""
    C, X = cp.Parameter((k, k), name="C"), cp.Variable((k, k), name="X", symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)), [cp.trace(X) == 1, X >> 0])

    def sample(B, rng):
        M = rng.normal(size=(B, k, k))
        return [torch.tensor(M + M.transpose(0, 2, 1))]
    return prob, [C], [X], sample


def expcone(n=4, seed=5):
    """minimize c'x - sum(log x)  s.t.  sum(x) <= t (parameters c > 0, t)."""
    c, t, x = cp.Parameter(n, name="c"), cp.Parameter(name="t"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(c @ x - cp.sum(cp.log(x))), [cp.sum(x) <= t])

    def sample(B, rng):
        return [torch.tensor(rng.uniform(0.5, 2.0, size=(B, n))), torch.tensor(rng.uniform(1.0, 3.0, size=B))]
    return prob, [c, t], [x], sample


# ---------------------------------------------------------------------------------------------- helpers
def clarabel(prob, params, variables, values, i=None):
    """Variable values (and duals) by CVXPY + Clarabel at tight tolerance for instance ``i`` of ``values``."""
    for p, v in zip(params, values):
        arr = v.detach().numpy()
        p.value = arr if i is None or arr.ndim == len(p.shape) else arr[i]
    prob.solve(solver=cp.CLARABEL, **TIGHT)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)  # the values are compared at 1e-6 below
    return [np.array(v.value) for v in variables], [np.array(c.dual_value) for c in prob.constraints]


def finite_difference(fn, values, k, h=1e-6):
    """Central differences of the scalar ``fn(*values)`` with respect to ``values[k]``."""
    base = [v.detach().clone() for v in values]
    grad = torch.zeros_like(base[k])
    flat = grad.view(-1)
    for j in range(flat.numel()):
        plus, minus = [v.clone() for v in base], [v.clone() for v in base]
        plus[k].view(-1)[j] += h
        minus[k].view(-1)[j] -= h
        with torch.no_grad():
            flat[j] = (fn(*plus) - fn(*minus)) / (2 * h)
    return grad


def linear_loss(layer, weights):
    def fn(*values):
        return sum((o * w).sum() for o, w in zip(layer(*values), weights))
    return fn


CASES = {"qp": (qp, None), "lp_param_A": (lp_param_a, None), "lp_param_A_scs": (lp_param_a, "scs"),
         "qp_param_P": (qp_param_p, None), "socp": (socp, None), "sdp": (sdp, None), "exp": (expcone, None)}
CLARABEL_ATOL = {"exp": 1e-5}  # Clarabel's exp-cone answers are accurate to ~1e-6 here; see the closed form below


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_clarabel_and_gradients_match_finite_differences(case):
    make, solver = CASES[case]
    prob, params, variables, sample = make()
    layer = CvxpyLayer(prob, params, variables, solver=solver, eps=1e-8)
    rng = np.random.default_rng(10)
    values = sample(3, rng)
    outs = layer(*values)
    for i in range(3):
        ref, _ = clarabel(prob, params, variables, values, i)
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(o[i].detach().numpy(), r, atol=CLARABEL_ATOL.get(case, 1e-6))
    weights = [torch.tensor(rng.normal(size=tuple(o.shape))) for o in outs]
    fn = linear_loss(layer, weights)
    values = [v.clone().requires_grad_(True) for v in values]
    fn(*values).backward()
    for k, v in enumerate(values):
        fd = finite_difference(fn, values, k)
        scale = max(1.0, float(fd.abs().max()))
        assert float((v.grad - fd).abs().max()) < 1e-5 * scale, (case, params[k].name())


def test_exp_cone_matches_the_closed_form():
    """x_i = 1 / (c_i + lam) with lam >= 0 the root of sum_i x_i = t (or 0 when the constraint is slack)."""
    from scipy.optimize import brentq

    prob, params, variables, sample = expcone()
    c, t = sample(5, np.random.default_rng(16))
    (x,) = CvxpyLayer(prob, params, variables, eps=1e-8)(c, t)
    for i in range(5):
        ci, ti = c[i].numpy(), float(t[i])
        def excess(lam, ci=ci, ti=ti):
            return (1 / (ci + lam)).sum() - ti
        lam = brentq(excess, 0.0, 1e3) if excess(0.0) > 0 else 0.0
        np.testing.assert_allclose(x[i].numpy(), 1 / (ci + lam), atol=1e-10)


def test_solver_choice_follows_the_problem():
    assert CvxpyLayer(*qp()[:3]).solver == "osqp"
    assert CvxpyLayer(*socp()[:3]).solver == "scs"
    with pytest.raises(ValueError, match="not a QP"):
        CvxpyLayer(*socp()[:3], solver="osqp")


def test_gradcheck_float64():
    prob, params, variables, sample = lp_param_a(n=3, m=5)
    layer = CvxpyLayer(prob, params, variables, eps=1e-9)
    values = [v.requires_grad_(True) for v in sample(2, np.random.default_rng(0))]
    assert torch.autograd.gradcheck(lambda *v: layer(*v), values, eps=1e-6, atol=1e-5, rtol=1e-4)
    prob, params, variables, sample = socp(m=6, n=3)
    layer = CvxpyLayer(prob, params, variables, eps=1e-9)
    values = [v.requires_grad_(True) for v in sample(2, np.random.default_rng(1))]
    assert torch.autograd.gradcheck(lambda *v: layer(*v), values, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [qp, socp])
def test_gradients_match_cvxpylayers(make):
    from cvxpylayers.torch import CvxpyLayer as Reference

    prob, params, variables, sample = make()
    values = sample(4, np.random.default_rng(3))
    ours = [v.clone().requires_grad_(True) for v in values]
    theirs = [v.clone().requires_grad_(True) for v in values]
    (x,) = CvxpyLayer(prob, params, variables, eps=1e-9)(*ours)
    (xr,) = Reference(prob, params, variables)(*theirs, solver_args={"eps": 1e-10, "max_iters": 100000})
    np.testing.assert_allclose(x.detach().numpy(), xr.detach().numpy(), atol=1e-6)
    w = torch.tensor(np.random.default_rng(4).normal(size=tuple(x.shape)))
    (x * w).sum().backward()
    (xr * w).sum().backward()
    for a, b in zip(ours, theirs):  # diffcp's derivative solve is itself accurate to about 1e-4
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), atol=1e-3 * max(1.0, float(b.grad.abs().max())))


@pytest.mark.skipif(importlib.util.find_spec("moreau") is None, reason="moreau is not installed (pip install moreau)")
def test_matches_cvxpylayers_moreau():
    from cvxpylayers.torch import CvxpyLayer as Reference

    prob, params, variables, sample = qp()
    values = sample(4, np.random.default_rng(5))
    (x,) = CvxpyLayer(prob, params, variables, eps=1e-9)(*values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (xr,) = Reference(prob, params, variables, solver="MOREAU")(*values)
    np.testing.assert_allclose(x.numpy(), xr.detach().numpy(), atol=1e-4)


def test_broadcasting_and_unbatched_inputs():
    prob, params, variables, sample = qp()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8)
    q, h = sample(3, np.random.default_rng(6))
    (xb,) = layer(q, h[0])                       # h broadcast to the batch
    for i in range(3):
        (xi,) = layer(q[i], h[0])                # every input unbatched: no batch dimension
        assert xi.shape == (6,)
        np.testing.assert_allclose(xi.numpy(), xb[i].numpy(), atol=1e-7)
    hh = h[0].clone().requires_grad_(True)
    (x,) = layer(q, hh)
    x.sum().backward()
    assert hh.grad.shape == hh.shape and torch.isfinite(hh.grad).all()


def test_float32_inputs_give_float32_outputs():
    prob, params, variables, sample = socp()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8)
    values = sample(3, np.random.default_rng(7))
    (x64,) = layer(*values)
    v32 = [v.float().requires_grad_(True) for v in values]
    (x32,) = layer(*v32)
    assert x32.dtype == torch.float32
    np.testing.assert_allclose(x32.detach().numpy(), x64.numpy(), atol=1e-5)
    x32.sum().backward()
    assert all(v.grad.dtype == torch.float32 and torch.isfinite(v.grad).all() for v in v32)


@pytest.mark.parametrize("solver", ["osqp", "scs"])
def test_infeasible_instance_is_nan_with_a_warning(solver):
    n = 3
    lo, x = cp.Parameter(n, name="lo"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, cp.sum(x) <= 1])
    layer = CvxpyLayer(prob, [lo], [x], solver=solver)
    lo_val = torch.tensor([[0.1, 0.2, 0.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 0.3]], requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"instance\(s\) of the batch have no solution: 1 \(infeasible"):
        (out,) = layer(lo_val)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[0].detach().numpy(), [0.1, 0.2, 0.0], atol=1e-5)
    out[[0, 2]].sum().backward()
    assert torch.isnan(lo_val.grad[1]).all() and torch.isfinite(lo_val.grad[[0, 2]]).all()
    strict = CvxpyLayer(prob, [lo], [x], solver=solver, on_failure="raise")
    with pytest.raises(SolverFailure, match="1 \\(infeasible"):
        strict(lo_val)


def test_clear_errors():
    prob, params, variables, sample = qp()
    q, h = sample(2, np.random.default_rng(8))
    layer = CvxpyLayer(prob, params, variables)
    with pytest.raises(ValueError, match="takes 2 parameter value"):
        layer(q)
    with pytest.raises(ValueError, match=r"parameter 'h' expects shape \(10,\) or \(batch, 10\); got \(2, 4\)"):
        layer(q, h[:, :4])
    with pytest.raises(ValueError, match=r"parameter 'h' \(value 2 of 2\) expects shape \(10,\) or "
                                         r"\(batch, 10\); got \(2, 10, 1\)"):
        layer(q, h[:, :, None])
    with pytest.raises(ValueError, match="'h' has batch size 3"):
        layer(q, torch.cat([h, h[:1]]))
    with pytest.raises(ValueError, match="variable 'y' is not a variable of the problem"):
        CvxpyLayer(prob, params, [cp.Variable(2, name="y")])
    with pytest.raises(ValueError, match="missing \\['h'\\]"):
        CvxpyLayer(prob, params[:1], variables)
    with pytest.raises(ValueError, match="not DPP"):
        a, z = cp.Parameter(name="a"), cp.Variable(name="z")
        CvxpyLayer(cp.Problem(cp.Minimize(a * a * z), [z >= 0, z <= 1]), [a], [z])
    prob_p, params_p, variables_p, sample_p = qp_param_p()
    d, qv = sample_p(2, np.random.default_rng(9))
    d[1, 0] = -1.0
    with pytest.raises(ValueError, match="parameter 'd' is declared nonneg=True.*position\\(s\\) \\[1\\]"):
        CvxpyLayer(prob_p, params_p, variables_p)(d, qv)


def test_warm_starts_agree_with_cold_and_previous_follows_a_moving_parameter():
    prob, params, variables, sample = socp()
    values = sample(4, np.random.default_rng(11))
    cold = CvxpyLayer(prob, params, variables, eps=1e-8)
    prev = CvxpyLayer(prob, params, variables, eps=1e-8, warm_start="previous")
    A, b = values
    last = None
    for step in range(3):
        moved = [A, b + 0.01 * step]
        (xc,) = cold(*moved)
        (xp,) = prev(*moved)
        np.testing.assert_allclose(xp.numpy(), xc.numpy(), atol=1e-7)
        if last is not None:  # the answer moved with the parameter (it is not the previous solution)
            assert float((xp - last).abs().max()) > 1e-4
        last = xp
    assert prev._previous_fields() is not None and prev._previous_fields()["x"].shape[0] == 4


@pytest.mark.parametrize("make", [qp, socp])
def test_previous_solution_is_refined_without_a_solver_run_when_the_parameters_barely_move(make, monkeypatch):
    prob, params, variables, sample = make()
    values = sample(6, np.random.default_rng(13))
    layer = CvxpyLayer(prob, params, variables, eps=1e-8, warm_start="previous")
    layer(*values)
    calls = []
    original = layer._c_solve
    monkeypatch.setattr(layer, "_c_solve", lambda *a, **k: calls.append(a[0].batch_size) or original(*a, **k))
    moved = [v + 1e-4 * torch.ones_like(v) for v in values]
    (xp,) = layer(*moved)
    (xc,) = CvxpyLayer(prob, params, variables, eps=1e-8)(*moved)
    np.testing.assert_allclose(xp.numpy(), xc.numpy(), atol=1e-7)
    assert calls == [] and bool(layer.last_solution.certified.all())
    far = [3.0 * v for v in values]  # far away: Newton from the old point may fail; the solver answers the rest
    (xf,) = layer(*far)
    np.testing.assert_allclose(xf.numpy(), CvxpyLayer(prob, params, variables, eps=1e-8)(*far)[0].numpy(), atol=1e-6)


def test_previous_solution_stage_pauses_when_consecutive_batches_are_unrelated(monkeypatch):
    from amortcvx.layers import layer as layer_module

    prob, params, variables, sample = socp()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8, warm_start="previous")
    kinds = []
    original = layer._refined
    monkeypatch.setattr(layer, "_refined", lambda *a: kinds.append(len(kinds)) or original(*a))
    for seed in range(3):  # unrelated batches: the previous solution is far from the new ones
        values = sample(16, np.random.default_rng(100 + seed))
        (x,) = layer(*values)
        np.testing.assert_allclose(x.numpy(), CvxpyLayer(prob, params, variables, eps=1e-8)(*values)[0].numpy(),
                                   atol=1e-7)
    # call 1: cold (loose stage only); call 2: previous-solution stage tried, fails, then the loose stage;
    # call 3: the previous-solution stage is skipped
    assert len(kinds) == 1 + 2 + 1
    assert layer._previous_skip == layer_module.PREVIOUS_RETRY - 2


@pytest.mark.parametrize("case", ["qp", "socp", "sdp", "exp", "lp_param_A_scs"])
def test_krylov_linear_algebra_agrees_with_dense(case):
    make, solver = CASES[case]
    prob, params, variables, sample = make()
    values = [v.requires_grad_(True) for v in sample(4, np.random.default_rng(14))]
    got = {}
    for algebra in ("dense", "krylov"):
        layer = CvxpyLayer(prob, params, variables, solver=solver, eps=1e-8, linear_algebra=algebra)
        (x,) = layer(*values)
        weights = torch.linspace(-1.0, 1.0, x[0].numel(), dtype=torch.float64).reshape(x.shape[1:])
        got[algebra] = (x.detach(), torch.autograd.grad((x * weights).sum(), values))
    np.testing.assert_allclose(got["krylov"][0].numpy(), got["dense"][0].numpy(), atol=1e-8)
    for gk, gd in zip(got["krylov"][1], got["dense"][1]):
        np.testing.assert_allclose(gk.numpy(), gd.numpy(), atol=1e-6, rtol=1e-6)


def test_scs_presolve_keeps_one_object_for_every_instance():
    prob, params, variables, sample = qp()  # no parameter in A or P: nothing forces a new setup
    values = sample(6, np.random.default_rng(16))
    layer = CvxpyLayer(prob, params, variables, solver="scs", eps=1e-8)
    (x,) = layer(*values)
    loose = [s for s in layer._solvers.values() if s.settings["eps_abs"] == layer.loose_eps("c")]
    assert len(loose) == 1 and loose[0].settings["adaptive_scale"] is False and loose[0].builds == 1
    for i in range(6):
        (want,), _ = clarabel(prob, params, variables, values, i)
        np.testing.assert_allclose(x[i].numpy(), want, atol=1e-6)


def test_osqp_presolve_runs_on_one_stateless_object_at_a_walked_rho():
    """OSQP's loose solve keeps one object without rho adaptation, at the rho of fewest iterations on the first
    batch (fitted there, kept for the next calls), and the answers stay the exact solutions."""
    from amortcvx.backends.persistent import stateless_rho

    prob, params, variables, sample = qp()
    values = sample(6, np.random.default_rng(17))
    layer = CvxpyLayer(prob, params, variables, solver="osqp", eps=1e-8, method="c")
    (x,) = layer(*values)
    loose = [s for s in layer._solvers.values() if s.settings["eps_abs"] == layer.loose_eps("c")]
    assert len(loose) == 1 and loose[0].settings["adaptive_rho"] is False
    data = layer.pp.canonicalize_vector(layer.pp.parameter_vector(dict(zip([p.name() for p in params], values))))
    exact = {"eps_abs": layer.loose_eps("c"), "eps_rel": layer.loose_eps("c"), "adaptive_rho": False,
             "check_termination": 1}
    want_rho, tried, _ = stateless_rho(data.instance(0), data, exact)
    assert loose[0].settings["rho"] == want_rho and tried[want_rho] < tried[0.1]  # 0.1, OSQP's default, is worse
    layer(*sample(6, np.random.default_rng(18)))
    assert loose[0].builds == 1 and loose[0].settings["rho"] == want_rho  # kept: no new setup, no new walk
    for i in range(6):
        (want,), _ = clarabel(prob, params, variables, values, i)
        np.testing.assert_allclose(x[i].numpy(), want, atol=1e-6)


def test_without_refinement_scs_answers_at_eps_on_one_stateless_object():
    prob, params, variables, sample = sdp()  # no parameter in A or P
    values = sample(6, np.random.default_rng(18))
    layer = CvxpyLayer(prob, params, variables, eps=1e-7, refine_steps=0)
    (x,) = layer(*values)
    assert not bool(layer.last_solution.certified.any())  # every answer is the C solver's own
    (solver,) = layer._solvers.values()
    assert solver.settings["adaptive_scale"] is False and solver.settings["eps_abs"] == 1e-7
    layer(*sample(6, np.random.default_rng(19)))
    assert solver.builds == 1  # the next call reuses the object: no new setup
    for i in range(6):
        (want,), _ = clarabel(prob, params, variables, values, i)
        np.testing.assert_allclose(x[i].numpy(), want, atol=1e-5)
    # per call: the same layer refines unless told not to
    refined = CvxpyLayer(prob, params, variables, eps=1e-7)
    (xr,) = refined(*values)
    assert bool(refined.last_solution.certified.any())
    (xd,) = refined(*values, solver_args={"refine_steps": 0})
    assert not bool(refined.last_solution.certified.any())
    np.testing.assert_allclose(xd.numpy(), xr.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="refine_steps"):
        refined(*values, solver_args={"refine_steps": -1})


def test_without_refinement_a_stateless_failure_is_solved_again_with_the_callers_settings(monkeypatch):
    from amortcvx.backends.scs import STATELESS_SETTINGS
    from amortcvx.layers import layer as layer_module

    prob, params, variables, sample = sdp()
    values = sample(4, np.random.default_rng(20))
    # the stateless object stops after 3 iterations: nothing ends optimal there
    monkeypatch.setitem(layer_module.PRESOLVE_SETTINGS, "scs", {**STATELESS_SETTINGS, "max_iters": 3})
    layer = CvxpyLayer(prob, params, variables, eps=1e-7, refine_steps=0)
    (x,) = layer(*values)
    assert all(s == "optimal" for s in layer.last_solution.status)
    assert sorted(s.settings.get("adaptive_scale", True) for s in layer._solvers.values()) == [False, True]
    for i in range(4):
        (want,), _ = clarabel(prob, params, variables, values, i)
        np.testing.assert_allclose(x[i].numpy(), want, atol=1e-5)


def test_without_refinement_parameters_in_a_keep_the_callers_settings():
    prob, params, variables, sample = socp()  # A is a parameter: SCS needs a new setup per instance anyway
    layer = CvxpyLayer(prob, params, variables, eps=1e-7, refine_steps=0)
    layer(*sample(3, np.random.default_rng(21)))
    assert all("adaptive_scale" not in s.settings for s in layer._solvers.values())


def test_threads_give_the_same_outputs_and_gradients():
    prob, params, variables, sample = socp()
    values = sample(40, np.random.default_rng(17))  # cut into parts on 2 threads (16 and more)
    got = {}
    for threads in (1, 2):
        layer = CvxpyLayer(prob, params, variables, eps=1e-8, threads=threads)
        inputs = [v.clone().requires_grad_(True) for v in values]
        (x,) = layer(*inputs)
        got[threads] = (x.detach(), torch.autograd.grad(x.sum(), inputs))
        assert all(s.threads == threads for s in layer._solvers.values())
    torch.testing.assert_close(got[2][0], got[1][0], rtol=0, atol=1e-12)
    for a, b in zip(got[2][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="threads"):
        CvxpyLayer(prob, params, variables, threads=0)


def test_a_large_sparse_problem_is_solved_and_differentiated_matrix_free():
    N = 700  # n + m = 3500 after CVXPY's lifting
    D = sps.diags([np.ones(N), -np.ones(N - 1)], [0, 1], shape=(N, N)).tocsc()
    b, q, x = cp.Parameter(N, name="b"), cp.Parameter(N, name="q"), cp.Variable(N, name="x")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(D @ x - b) + q @ x), [x >= -1, x <= 1])
    # "auto" keeps the reduced dense path here (a shared A with 700 equality rows); the matrix-free one is asked for
    assert CvxpyLayer(prob, [b, q], [x]).linear_algebra == "dense"
    layer = CvxpyLayer(prob, [b, q], [x], eps=1e-8, linear_algebra="krylov")
    rng = np.random.default_rng(15)
    vb = torch.tensor(rng.normal(size=(1, N)), requires_grad=True)
    vq = torch.tensor(0.5 * rng.normal(size=(1, N)))
    weights = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    (xs,) = layer(vb, vq)
    (xs * weights).sum().backward()
    (xstar,), _ = clarabel(prob, [b, q], [x], [vb, vq], 0)
    np.testing.assert_allclose(xs[0].detach().numpy(), xstar, atol=1e-6)
    direction = torch.tensor(rng.normal(size=(1, N)))
    fd = finite_difference_along(lambda v: (layer(v, vq)[0] * weights).sum(), vb.detach(), direction)
    assert abs(float((vb.grad * direction).sum()) - fd) <= 1e-5 * (1 + abs(fd))


def finite_difference_along(fn, value, direction, h=1e-6):
    with torch.no_grad():
        return float((fn(value + h * direction) - fn(value - h * direction)) / (2 * h))


@pytest.mark.parametrize("make", [qp, socp])
def test_torch_iterations_agree_with_c(make):
    prob, params, variables, sample = make()
    values = sample(8, np.random.default_rng(12))
    (xc,) = CvxpyLayer(prob, params, variables, eps=1e-7, method="c")(*values)
    layer = CvxpyLayer(prob, params, variables, eps=1e-7, method="torch")
    (xt,) = layer(*values)
    np.testing.assert_allclose(xt.numpy(), xc.numpy(), atol=1e-6)
    assert bool(layer.last_solution.certified.any())  # answered without a C solve


@pytest.mark.parametrize("make, expected", [(qp, "torch"), (qp_param_p, "c"), (socp, "c")])
def test_auto_method_on_the_cpu_takes_torch_steps_only_for_qps_with_fixed_matrices(make, expected, monkeypatch):
    from amortcvx.layers import layer as layer_module

    prob, params, variables, sample = make()
    values = sample(8, np.random.default_rng(13))
    layer = CvxpyLayer(prob, params, variables, eps=1e-7)
    seen = []
    real = layer._solve
    monkeypatch.setattr(layer, "_solve", lambda data, theta, eps, method, *rest: seen.append((method, rest[1]))
                        or real(data, theta, eps, method, *rest))
    (xa,) = layer(*values)
    assert seen[0][0] == expected
    if expected == "torch":
        assert seen[0][1] == layer_module.CPU_TORCH_STEPS
    (xc,) = CvxpyLayer(prob, params, variables, eps=1e-7, method="c")(*values)
    np.testing.assert_allclose(xa.numpy(), xc.numpy(), atol=1e-6)


def test_auto_race_takes_the_faster_method_and_probes_the_other():
    from amortcvx.backends.race import Race
    from amortcvx.layers.layer import AUTO_PROBE

    race = Race(("torch", "c"), AUTO_PROBE, share=None)  # as the layer makes it: a fixed probe interval
    picks = []
    for _ in range(2 + 2 * AUTO_PROBE):
        method = race.pick()
        picks.append(method)
        race.record(method, 1.0 if method == "c" else 3.0)
    assert picks[:2] == ["torch", "c"]  # each timed once
    assert [i for i, m in enumerate(picks) if m == "torch"] == [0, 1 + AUTO_PROBE, 1 + 2 * AUTO_PROBE]


def untrained_predictor(pp, algorithm):
    from amortcvx.predictors.model import PredictorMeta, WarmStartPredictor

    meta = PredictorMeta(fingerprint=pp.fingerprint, algorithm=algorithm, settings={}, num_params=pp.num_params,
                         out_dim=pp.n + pp.m)
    return WarmStartPredictor(meta, hidden=(16,)).double()


def test_learned_warm_start_agrees_with_cold():
    prob, params, variables, sample = qp()
    cold = CvxpyLayer(prob, params, variables, eps=1e-8)
    model = untrained_predictor(cold.pp, "osqp")
    learned = CvxpyLayer(prob, params, variables, eps=1e-8, predictor=model, warm_start="learned")
    values = sample(4, np.random.default_rng(13))
    np.testing.assert_allclose(learned(*values)[0].numpy(), cold(*values)[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="trained for problem"):
        CvxpyLayer(prob, params, variables, predictor=model, solver="scs")


def test_layer_from_an_amortized_solver_uses_its_predictor_and_tolerance():
    from amortcvx.deploy import AmortizedSolver

    prob, params, variables, sample = socp()
    cold = CvxpyLayer(prob, params, variables, eps=1e-8)
    solver = AmortizedSolver(cold.pp, untrained_predictor(cold.pp, "scs"), solver_settings={"eps_abs": 1e-7,
                                                                                          "eps_rel": 1e-7})
    layer = CvxpyLayer.from_solver(solver, params, variables)
    assert (layer.solver, layer.warm_start, layer.eps) == ("scs", "learned", 1e-7)
    assert layer.predictor is solver.model
    values = sample(4, np.random.default_rng(18))
    np.testing.assert_allclose(layer(*values)[0].numpy(), cold(*values)[0].numpy(), atol=1e-6)


def test_layer_from_a_solver_whose_calibration_switched_the_predictor_off_says_so_and_starts_cold():
    import warnings

    from amortcvx.deploy import AmortizedSolver
    from amortcvx.deploy.solver import Calibration

    prob, params, variables, sample = socp()
    cold = CvxpyLayer(prob, params, variables, eps=1e-8)
    solver = AmortizedSolver(cold.pp, untrained_predictor(cold.pp, "scs"))
    solver.use_strategy("cold")  # switched off by hand: no calibration to quote
    with pytest.warns(UserWarning, match=r"this layer starts cold: the solver's predictor is switched off \(no "
                                         r"calibration recorded\)"):
        solver.layer(params, variables)
    # as calibration leaves a predictor that does not pay: its numbers are quoted
    solver.configure(Calibration(learned_median=30.0, cold_median=20.0, enabled=False, strategy="cold"))
    with pytest.warns(UserWarning, match="this layer starts cold: the solver's calibration switched its predictor off "
                                         r"\(PREDICTOR OFF"):
        layer = solver.layer(params, variables)
    assert layer.warm_start == "cold" and layer.predictor is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # choosing the start: no warning
        forced = solver.layer(params, variables, predictor=solver.model, warm_start="learned")
    assert forced.warm_start == "learned" and forced.predictor is solver.model
    values = sample(3, np.random.default_rng(19))
    np.testing.assert_allclose(forced(*values)[0].numpy(), layer(*values)[0].numpy(), atol=1e-5)


def test_unrolled_gradients_approach_implicit():
    prob, params, variables, sample = qp()
    values = sample(2, np.random.default_rng(14))
    grads = []
    for mode in ("implicit", "unrolled"):
        vals = [v.clone().requires_grad_(True) for v in values]
        layer = CvxpyLayer(prob, params, variables, eps=1e-8, gradients=mode, unroll_steps=400)
        (x,) = layer(*vals)
        x.sum().backward()
        grads.append(vals[0].grad)
    err = float((grads[0] - grads[1]).abs().max())
    assert err < 0.05 * float(grads[0].abs().max()), err


@pytest.mark.parametrize("make,solver", [(qp, None), (socp, None), (lp_param_a, "scs")])
def test_duals_match_cvxpy(make, solver):
    prob, params, variables, sample = make()
    values = sample(2, np.random.default_rng(15))
    layer = CvxpyLayer(prob, params, variables, eps=1e-9, return_duals=True, solver=solver)
    outs = layer(*values)
    assert len(outs) == len(variables) + len(prob.constraints)
    for i in range(2):
        _, ref_duals = clarabel(prob, params, variables, values, i)
        for dual, ref in zip(outs[len(variables):], ref_duals):
            np.testing.assert_allclose(dual[i].numpy(), ref, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("make", [qp, lp_param_a, qp_param_p, socp, sdp, expcone])
def test_cuda_matches_cpu(make):
    prob, params, variables, sample = make()
    values = sample(16, np.random.default_rng(17))
    host = [v.clone().requires_grad_(True) for v in values]
    (x_cpu,) = CvxpyLayer(prob, params, variables, eps=1e-8)(*host)
    x_cpu.sum().backward()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8)  # method "auto": torch iterations on CUDA
    cuda = [v.cuda().requires_grad_(True) for v in values]
    (x,) = layer(*cuda)
    assert x.device.type == "cuda"
    np.testing.assert_allclose(x.detach().cpu().numpy(), x_cpu.detach().numpy(), atol=1e-6)
    x.sum().backward()
    for v, h in zip(cuda, host):
        assert v.grad.device.type == "cuda"
        np.testing.assert_allclose(v.grad.cpu().numpy(), h.grad.numpy(), atol=1e-5)


def test_symmetric_parameter():
    k = 3
    C, X = cp.Parameter((k, k), name="C", symmetric=True), cp.Variable((k, k), name="X", symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)), [cp.trace(X) == 1, X >> 0])
    layer = CvxpyLayer(prob, [C], [X], eps=1e-9)
    M = torch.tensor(np.random.default_rng(19).normal(size=(2, k, k)))
    values = [M + M.mT]
    (out,) = layer(*values)
    for i in range(2):
        ref, _ = clarabel(prob, [C], [X], values, i)
        np.testing.assert_allclose(out[i].numpy(), ref[0], atol=1e-6)
    # the gradient along a symmetric direction matches finite differences
    E = torch.zeros(k, k, dtype=torch.float64)
    E[0, 1] = E[1, 0] = 1.0
    c = values[0].clone().requires_grad_(True)
    layer(c)[0].sum().backward()
    with torch.no_grad():
        fd = (layer(values[0] + 1e-6 * E)[0].sum() - layer(values[0] - 1e-6 * E)[0].sum()) / 2e-6
    assert abs(float((c.grad * E).sum()) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))
    bad = values[0].clone()
    bad[1, 0, 2] += 1.0
    with pytest.raises(ValueError, match="parameter 'C' is declared symmetric.*position\\(s\\) \\[1\\]"):
        layer(bad)


def test_refine_passes_trade_speed_for_machine_precision():
    prob, params, variables, sample = qp()
    values = sample(8, np.random.default_rng(29))
    (fast,) = CvxpyLayer(prob, params, variables, eps=1e-8)(*values)
    (exact,) = CvxpyLayer(prob, params, variables, eps=1e-8, refine_passes=4)(*values)
    np.testing.assert_allclose(fast.numpy(), exact.numpy(), atol=1e-10)
    for i in range(2):
        (want,), _ = clarabel(prob, params, variables, values, i)
        np.testing.assert_allclose(exact[i].numpy(), want, atol=1e-6)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="refine_passes"):
            CvxpyLayer(prob, params, variables, refine_passes=bad)
