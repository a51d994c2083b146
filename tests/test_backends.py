"""Tests of the C solver backends (amortcvx.backends): answers, warm-start contracts, exact counts, batches.

Instances are built here from small CVXPY problems with ``get_problem_data`` (independent of
amortcvx.canon.parametric), so these tests only exercise the backends.
"""

from __future__ import annotations

import math
import os

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp

from amortcvx.backends import (
    BACKENDS,
    SolveResult,
    Status,
    WarmStart,
    get_backend,
    map_chunks,
    solve,
    solve_batch,
)
from amortcvx.backends.scs import converged
from amortcvx.canon.data import ConeDims, ConeInstance, QPInstance

# ----------------------------------------------------------------------------------------------------------
# helpers: CVXPY problem -> canonical instance, canonical x -> the CVXPY variable


def cone_instance(prob: cp.Problem, offset: float = 0.0) -> ConeInstance:
    data, _, _ = prob.get_problem_data(cp.SCS)
    d = data["dims"]
    cones = ConeDims(zero=d.zero, nonneg=d.nonneg, soc=tuple(d.soc), psd=tuple(d.psd), exp=d.exp)
    P = data.get("P")
    P = sp.csc_array(P) if P is not None and P.nnz else None
    b, c = np.asarray(data["b"], float), np.asarray(data["c"], float)
    return ConeInstance(P, sp.csc_array(data["A"]), b, c, cones, offset)


def qp_instance(prob: cp.Problem, offset: float = 0.0) -> QPInstance:
    data, _, _ = prob.get_problem_data(cp.OSQP)
    A = sp.vstack([data["A"], data["F"]]).tocsc()
    lo = np.concatenate([data["b"], -np.inf * np.ones(data["G"].shape[0])])
    hi = np.concatenate([data["b"], data["G"]])
    P = data["P"]
    P = sp.csc_array(P) if P is not None and P.nnz else None
    return QPInstance(P, np.asarray(data["q"], float), sp.csc_array(A), lo, hi, offset)


def variable_value(prob: cp.Problem, solver: str, x_canon: np.ndarray, var: cp.Variable) -> np.ndarray:
    """The entries of ``var`` inside the canonical primal vector (plain variables only)."""
    _, _, inv = prob.get_problem_data(solver)
    offsets = [d for d in inv if type(d).__name__ == "InverseData"][-1].var_offsets
    start = offsets[var.id]
    return x_canon[start:start + var.size]


def rel_err(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    return float(np.linalg.norm(a - b) / max(1.0, np.linalg.norm(b)))


# ----------------------------------------------------------------------------------------------------------
# reference problems (small, unique solutions except where noted)


def lp(seed: int = 0, n: int = 10, m: int = 20) -> tuple[cp.Problem, cp.Variable]:
    """min c'x s.t. Ax <= b, -1 <= x <= 1 (feasible at x = 0, bounded by the box).

    Random LPs are slow for OSQP (ADMM); the OSQP tests use seeds 3, 5, 6, 7, which take < 2000 iterations
    at eps 1e-6 (seeds 0 and 4 need more than 10000).
    """
    rng = np.random.default_rng(seed)
    x = cp.Variable(n)
    A = rng.standard_normal((m, n))
    cons = [A @ x <= rng.random(m) + 0.1, x >= -1, x <= 1]
    return cp.Problem(cp.Minimize(rng.standard_normal(n) @ x), cons), x


def qp(seed: int = 0, n: int = 10, m: int = 20) -> tuple[cp.Problem, cp.Variable]:
    """min 1/2 x'Qx + c'x s.t. Ax <= b, sum(x) == 1 with Q positive definite."""
    rng = np.random.default_rng(seed)
    x = cp.Variable(n)
    F = rng.standard_normal((n, n))
    Q = F @ F.T / n + 0.1 * np.eye(n)
    A = rng.standard_normal((m, n))
    b = rng.random(m) + A @ np.full(n, 1.0 / n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + rng.standard_normal(n) @ x),
                      [A @ x <= b, cp.sum(x) == 1])
    return prob, x


def socp(seed: int = 0, n: int = 8) -> tuple[cp.Problem, cp.Variable]:
    """min c'x s.t. ||x - x0||_2 <= 1, ||F x||_2 <= 2 + g'x."""
    rng = np.random.default_rng(seed)
    x = cp.Variable(n)
    F = rng.standard_normal((4, n))
    prob = cp.Problem(cp.Minimize(rng.standard_normal(n) @ x),
                      [cp.norm(x - 0.1 * rng.standard_normal(n), 2) <= 1,
                       cp.norm(F @ x, 2) <= 2 + 0.1 * rng.standard_normal(n) @ x])
    return prob, x


def sdp(seed: int = 0, k: int = 3) -> tuple[cp.Problem, cp.Variable]:
    """min tr(CX) s.t. tr(A_i X) = b_i, X PSD (objective checked only: X need not be unique)."""
    rng = np.random.default_rng(seed)
    X = cp.Variable((k, k), symmetric=True)
    C = rng.standard_normal((k, k))
    C = C @ C.T + np.eye(k)
    cons = [X >> 0, cp.trace(X) == 1]
    for _ in range(2):
        Ai = rng.standard_normal((k, k))
        Ai = Ai + Ai.T
        cons.append(cp.trace(Ai @ X) == float(np.trace(Ai)) / k)
    return cp.Problem(cp.Minimize(cp.trace(C @ X)), cons), X


def expcone(seed: int = 0, n: int = 5) -> tuple[cp.Problem, cp.Variable]:
    """max sum(w_i log x_i) s.t. sum(x) == 1 (x_i = w_i / sum(w))."""
    rng = np.random.default_rng(seed)
    x = cp.Variable(n)
    w = rng.random(n) + 0.5
    return cp.Problem(cp.Maximize(w @ cp.log(x)), [cp.sum(x) == 1]), x


def infeasible_lp(n: int = 4) -> cp.Problem:
    x = cp.Variable(n)
    return cp.Problem(cp.Minimize(cp.sum(x)), [x >= 1, cp.sum(x) <= 1])


def unbounded_lp(n: int = 4) -> cp.Problem:
    x = cp.Variable(n)
    return cp.Problem(cp.Minimize(-cp.sum(x)), [x >= 0, x[0] <= 3])


EPS6 = {"eps_abs": 1e-6, "eps_rel": 1e-6}
HIGH = {"scs": {"eps_abs": 1e-10, "eps_rel": 1e-10},
        "osqp": {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iter": 200_000, "polishing": True}}


def instance_for(backend: str, prob: cp.Problem) -> ConeInstance | QPInstance:
    return cone_instance(prob) if backend == "scs" else qp_instance(prob)


def zeros_like(res: SolveResult) -> WarmStart:
    s = None if res.s is None else np.zeros_like(res.s)
    return WarmStart(np.zeros_like(res.x), np.zeros_like(res.y), s)


# ----------------------------------------------------------------------------------------------------------
# registry


def test_registry_declares_capabilities():
    assert set(BACKENDS) == {"scs", "osqp"}
    scs_info, osqp_info = get_backend("scs"), get_backend("osqp")
    assert scs_info.form == "cone" and osqp_info.form == "qp"
    assert scs_info.cones == {"zero", "nonneg", "soc", "psd", "exp"}
    assert osqp_info.cones == {"zero", "nonneg"}
    assert scs_info.warm_start_fields == ("x", "y", "s") and osqp_info.warm_start_fields == ("x", "y")
    assert osqp_info.supports_derivatives and not scs_info.supports_derivatives
    assert scs_info.status_map[1] is Status.OPTIMAL and scs_info.status_map[-2] is Status.INFEASIBLE
    assert osqp_info.status_map[1] is Status.OPTIMAL and osqp_info.status_map[7] is Status.MAX_ITERATIONS
    for info in (scs_info, osqp_info):
        assert info.default_settings["eps_abs"] == 1e-5 and info.default_settings["eps_rel"] == 1e-5
        assert all(isinstance(s, Status) for s in info.status_map.values())
    with pytest.raises(ValueError, match="available: \\['osqp', 'scs'\\]"):
        get_backend("ecos")


def test_status_vocabulary():
    assert Status("optimal") is Status.OPTIMAL and str(Status.INFEASIBLE) == "infeasible"
    assert Status.OPTIMAL.has_solution and Status.OPTIMAL_INACCURATE.has_solution
    assert not Status.INFEASIBLE.has_solution and Status.INFEASIBLE.converged
    assert not Status.MAX_ITERATIONS.converged


# ----------------------------------------------------------------------------------------------------------
# answers equal CVXPY's


@pytest.mark.parametrize("family", [lp, qp, socp, sdp, expcone], ids=lambda f: f.__name__)
def test_scs_matches_cvxpy(family):
    prob, var = family()
    ref = prob.solve(solver=cp.SCS, eps_abs=1e-9, eps_rel=1e-9, max_iters=200_000)
    assert prob.status == cp.OPTIMAL
    res = solve(cone_instance(prob), "scs", settings=EPS6)
    assert res.status is Status.OPTIMAL
    assert res.s is not None and res.s.shape == res.y.shape
    assert res.iterations >= 1 and res.setup_time >= 0 and res.solve_time > 0
    sign = -1.0 if isinstance(prob.objective, cp.Maximize) else 1.0  # CVXPY minimizes -f for Maximize
    assert rel_err(sign * res.objective, ref) < 1e-4
    if family is not sdp:  # the SDP optimum need not be unique
        assert rel_err(variable_value(prob, cp.SCS, res.x, var), var.value) < 1e-4


@pytest.mark.parametrize("family", [lp, qp], ids=lambda f: f.__name__)
def test_osqp_matches_cvxpy(family):
    prob, var = family(seed=5)
    ref = prob.solve(solver=cp.OSQP, eps_abs=1e-9, eps_rel=1e-9, max_iter=200_000)
    assert prob.status == cp.OPTIMAL
    res = solve(qp_instance(prob), "osqp", settings=EPS6)
    assert res.status is Status.OPTIMAL and res.s is None
    assert rel_err(res.objective, ref) < 1e-4
    assert rel_err(variable_value(prob, cp.OSQP, res.x, var), var.value) < 1e-4


def test_objective_includes_offset():
    prob, _ = qp()
    for backend in ("scs", "osqp"):
        base = instance_for(backend, prob)
        r0 = solve(base, backend, settings=EPS6)
        r1 = solve(base._replace(offset=3.5), backend, settings=EPS6)
        assert r1.objective - r0.objective == pytest.approx(3.5, abs=1e-9)
        P = base.P.toarray() if base.P is not None else 0
        q = base.c if backend == "scs" else base.q
        assert r0.objective == pytest.approx(0.5 * r0.x @ (P @ r0.x) + q @ r0.x, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# warm-start contracts


CONTRACT_CASES = [("scs", f) for f in (lp, qp, socp, sdp, expcone)] + [("osqp", f) for f in (lp, qp)]


CONTRACT_IDS = [f"{b}-{f.__name__}" for b, f in CONTRACT_CASES]


@pytest.mark.parametrize(("backend", "family"), CONTRACT_CASES, ids=CONTRACT_IDS)
def test_warm_start_contracts(backend, family):
    prob, _ = family(seed=3)
    inst = instance_for(backend, prob)
    cold = solve(inst, backend)
    # zero warm start == cold start: same iterates, same count
    zero = solve(inst, backend, warm_start=zeros_like(cold))
    assert zero.iterations == cold.iterations
    np.testing.assert_allclose(zero.x, cold.x, rtol=0, atol=1e-12)
    # warm start at a high-accuracy optimum: SCS's first check (iteration 0) already passes, so exactly 1
    # iteration is executed (SCS cannot do fewer: max_iters >= 1); OSQP measured 1 too, allow a couple
    star = solve(inst, backend, settings=HIGH[backend])
    assert star.status is Status.OPTIMAL
    at_opt = solve(inst, backend, warm_start=WarmStart(star.x, star.y, star.s))
    assert at_opt.status is Status.OPTIMAL
    if backend == "scs":
        assert at_opt.iterations == 1
    else:
        assert at_opt.iterations <= 3
    assert cold.iterations >= 20
    # a perturbed optimum lands in between
    rng = np.random.default_rng(0)

    def perturb(v):
        if v is None:
            return None
        return v + 1e-2 * np.linalg.norm(v) / np.sqrt(v.size) * rng.standard_normal(v.size)

    near = solve(inst, backend, warm_start=WarmStart(perturb(star.x), perturb(star.y), perturb(star.s)))
    assert near.status is Status.OPTIMAL
    assert at_opt.iterations < near.iterations < cold.iterations
    assert rel_err(near.objective, star.objective) < 1e-3


def test_scs_needs_duals_in_the_warm_start():
    """With x* alone (y = s = 0) SCS needs about as many iterations as cold (DESIGN.md 3)."""
    prob, _ = lp(seed=3)
    inst = cone_instance(prob)
    cold = solve(inst, "scs")
    star = solve(inst, "scs", settings=HIGH["scs"])
    x_only = solve(inst, "scs", warm_start=WarmStart(star.x, None, None))
    assert x_only.iterations > cold.iterations // 2


# ----------------------------------------------------------------------------------------------------------
# exact iteration counts


@pytest.mark.parametrize("family", [lp, qp, socp, expcone], ids=lambda f: f.__name__)
def test_scs_exact_count_is_the_first_passing_iterate(family):
    prob, _ = family(seed=1)
    inst = cone_instance(prob)
    res = solve(inst, "scs", settings=EPS6)
    k = res.iterations
    assert res.status is Status.OPTIMAL and k >= 2
    # SCS checks at iterations 0, 25, 50, ... (executing i + 1): it stops at a check at or after k - 1 (not
    # always the next one: the residuals are not monotone)
    coarse = solve(inst, "scs", settings=EPS6, exact_iterations=False)
    assert (coarse.iterations - 1) % 25 == 0 and coarse.iterations >= k
    np.testing.assert_array_equal(coarse.x, res.x)  # logging does not change the run
    # re-run with max_iters = k: the returned iterate passes SCS's test; with k - 1 it does not
    at_k = solve(inst, "scs", settings={**EPS6, "max_iters": k}, exact_iterations=False)
    before = solve(inst, "scs", settings={**EPS6, "max_iters": k - 1}, exact_iterations=False)
    assert at_k.iterations == k and before.iterations == k - 1
    assert converged(inst, at_k.x, at_k.y, at_k.s, **EPS6)
    assert not converged(inst, before.x, before.y, before.s, **EPS6)


@pytest.mark.parametrize("family", [lp, qp], ids=lambda f: f.__name__)
def test_osqp_exact_count(family):
    prob, _ = family(seed=5)
    inst = qp_instance(prob)
    res = solve(inst, "osqp", settings=EPS6)
    k = res.iterations
    assert res.status is Status.OPTIMAL and k >= 2
    # checked every 25 on the same trajectory: stops at a check at or after k (not always the next one)
    coarse = solve(inst, "osqp", settings=EPS6, exact_iterations=False)
    assert coarse.iterations % 25 == 0 and coarse.iterations >= k
    never = {"max_iter": 60, "eps_abs": 1e-14, "eps_rel": 1e-14}
    same = [solve(inst, "osqp", settings=never, exact_iterations=e) for e in (True, False)]
    np.testing.assert_array_equal(same[0].x, same[1].x)
    assert solve(inst, "osqp", settings={**EPS6, "max_iter": k}).status is Status.OPTIMAL
    assert solve(inst, "osqp", settings={**EPS6, "max_iter": k - 1}).status is not Status.OPTIMAL


def test_settings_pass_through_and_are_not_mutated():
    prob, _ = lp()
    settings = {"max_iters": 7}
    res = solve(cone_instance(prob), "scs", settings=settings)
    assert settings == {"max_iters": 7}
    assert res.iterations == 7 and res.status is Status.OPTIMAL_INACCURATE
    settings = {"max_iter": 7}
    res = solve(qp_instance(prob), "osqp", settings=settings)
    assert settings == {"max_iter": 7}
    assert res.iterations == 7 and res.status in (Status.MAX_ITERATIONS, Status.OPTIMAL_INACCURATE)


# ----------------------------------------------------------------------------------------------------------
# batches: statuses, failures, order, workers


@pytest.mark.parametrize("backend", ["scs", "osqp"])
def test_batch_reports_infeasible_and_unbounded(backend):
    probs = [lp(5)[0], infeasible_lp(), lp(6)[0], unbounded_lp(), qp(2)[0]]
    insts = [instance_for(backend, p) for p in probs]
    results = solve_batch(insts, backend, workers=1)
    statuses = [r.status for r in results]
    assert statuses == [Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL, Status.UNBOUNDED, Status.OPTIMAL]
    for i in (0, 2, 4):
        assert np.isfinite(results[i].objective)
        assert rel_err(results[i].objective, probs[i].solve(solver=cp.CLARABEL)) < 1e-3
    for i in (1, 3):
        assert math.isnan(results[i].objective) and results[i].iterations >= 1
    coarse = solve_batch(insts, backend, workers=1, exact_iterations=False)
    assert [r.status for r in coarse] == statuses
    assert all(e.iterations <= c.iterations for e, c in zip(results, coarse, strict=True))


def test_solver_failure_is_a_status_not_an_exception():
    x = cp.Variable(2)
    good = cone_instance(cp.Problem(cp.Minimize(cp.sum_squares(x) + x[0]), [x >= -1]))
    bad = good._replace(P=sp.csc_array(-good.P.toarray()))  # negative definite: SCS's factorization fails
    results = solve_batch([good, bad, good], "scs", workers=1)
    assert [r.status for r in results] == [Status.OPTIMAL, Status.SOLVER_ERROR, Status.OPTIMAL]
    assert np.isnan(results[1].x).all() and "SCS" in results[1].message
    qgood = qp_instance(cp.Problem(cp.Minimize(cp.sum_squares(x) + x[0]), [x >= -1]))
    qbad = qgood._replace(P=sp.csc_array(-qgood.P.toarray()))
    results = solve_batch([qbad, qgood], "osqp", workers=1)
    assert [r.status for r in results] == [Status.NON_CONVEX, Status.OPTIMAL]


def test_two_workers_match_one_worker_in_order():
    probs = [lp(s)[0] for s in (3, 5, 6, 7)] + [qp(s)[0] for s in range(4)] + [infeasible_lp()]
    insts = [cone_instance(p) for p in probs]
    seq = solve_batch(insts, "scs", workers=1)
    warm = [WarmStart(r.x, r.y, r.s) if i % 2 == 0 and r.status.has_solution else None
            for i, r in enumerate(seq)]
    seq_warm = solve_batch(insts, "scs", warm_starts=warm, workers=1)
    par = solve_batch(insts, "scs", workers=2, chunksize=2)
    par_warm = solve_batch(insts, "scs", warm_starts=warm, workers=2, chunksize=3)
    for a, b in zip(seq + seq_warm, par + par_warm, strict=True):
        assert a.status is b.status and a.iterations == b.iterations
        np.testing.assert_allclose(a.x, b.x, rtol=1e-9, atol=1e-12)
    qinsts = [qp_instance(p) for p in probs]
    qseq = solve_batch(qinsts, "osqp", workers=1)
    qpar = solve_batch(qinsts, "osqp", workers=2)
    assert [(r.status, r.iterations) for r in qseq] == [(r.status, r.iterations) for r in qpar]


def _double_or_crash(chunk: list[int]) -> list[int]:
    """Top-level (picklable) task for map_chunks: a negative item kills its worker process."""
    for item in chunk:
        if item < 0:
            os._exit(3)
    return [2 * item for item in chunk]


def _double_or_raise(chunk: list[int]) -> list[int]:
    if any(item < 0 for item in chunk):
        raise RuntimeError("negative item")
    return [2 * item for item in chunk]


def test_a_failing_item_in_process_fails_only_itself():
    out = map_chunks(_double_or_raise, [1, -1, 3], workers=1, on_failure=lambda item, exc: str(exc))
    assert out == [2, "negative item", 6]


def test_a_crashing_worker_fails_only_its_item():
    items = [1, 2, 3, -1, 5, 6, 7, 8]
    out = map_chunks(_double_or_crash, items, workers=2, chunksize=2, on_failure=lambda item, exc: None)
    assert out == [2, 4, 6, None, 10, 12, 14, 16]


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors_name_the_fault():
    prob, _ = lp()
    cinst, qinst = cone_instance(prob), qp_instance(prob)
    n, m = cinst.c.size, cinst.b.size
    with pytest.raises(ValueError, match="takes a QPInstance.*ConeInstance"):
        solve(cinst, "osqp")
    with pytest.raises(ValueError, match="takes a ConeInstance.*QPInstance"):
        solve(qinst, "scs")
    soc = cone_instance(socp()[0])
    with pytest.raises(ValueError, match="soc"):
        solve(soc, "osqp")
    with pytest.raises(ValueError, match="unknown backend"):
        solve(cinst, "gurobi")
    with pytest.raises(ValueError, match=rf"warm_start\.y must have shape \({m},\)"):
        solve(cinst, "scs", warm_start=WarmStart(np.zeros(n), np.zeros(m + 1), np.zeros(m)))
    with pytest.raises(ValueError, match=r"warm_start\.x"):
        solve(qinst, "osqp", warm_start=WarmStart(np.zeros(n - 1), None))
    with pytest.raises(ValueError, match="no warm-start field 's'"):
        solve(qinst, "osqp", warm_start=WarmStart(None, None, np.zeros(qinst.l.size)))
    with pytest.raises(ValueError, match="non-finite"):
        solve(cinst, "scs", warm_start=WarmStart(np.full(n, np.nan), None, None))
    with pytest.raises(TypeError, match="WarmStart"):
        solve(cinst, "scs", warm_start=(np.zeros(n), np.zeros(m)))
    with pytest.raises(ValueError, match="A must have shape"):
        solve(cinst._replace(A=cinst.A[:, :-1]), "scs")
    with pytest.raises(ValueError, match="b has non-finite"):
        solve(cinst._replace(b=np.where(np.arange(m) == 2, np.nan, cinst.b)), "scs")
    with pytest.raises(ValueError, match="l > u in row 0"):
        solve(qinst._replace(l=qinst.u + 1), "osqp")
    pq, _ = qp()
    tri = cone_instance(pq)
    with pytest.raises(ValueError, match="full symmetric"):
        solve(tri._replace(P=sp.csc_array(sp.triu(tri.P))), "scs")
    with pytest.raises(ValueError, match="foo"):
        solve(cinst, "scs", settings={"foo": 1})
    with pytest.raises(ValueError, match="foo"):
        solve(qinst, "osqp", settings={"foo": 1})
    with pytest.raises(ValueError, match="max_iters must be positive"):
        solve(cinst, "scs", settings={"max_iters": 0})
    with pytest.raises(ValueError, match="invalid OSQP settings"):
        solve(qinst, "osqp", settings={"alpha": 3.0})
    with pytest.raises(ValueError, match="check_termination"):
        solve(qinst, "osqp", settings={"check_termination": 5})
    with pytest.raises(ValueError, match="log_csv_filename"):
        solve(cinst, "scs", settings={"log_csv_filename": "x.csv"})
    with pytest.raises(ValueError, match="warm_starts has 1 entries for 2"):
        solve_batch([cinst, cinst], "scs", warm_starts=[None], workers=1)
    with pytest.raises(ValueError, match="instance 1: .*warm_start.x"):
        solve_batch([cinst, cinst], "scs", warm_starts=[None, WarmStart(np.zeros(1), None)], workers=1)
    with pytest.raises(ValueError, match="workers"):
        solve_batch([cinst], "scs", workers=0)


@pytest.mark.parametrize("shared", [True, False])
def test_host_matrix_products_match_the_dense_matrices(shared):
    import torch

    from amortcvx.backends.batched import HostMatrix
    from amortcvx.canon.data import SparseBatch

    rng = np.random.default_rng(0)
    dense = [sp.random(7, 5, density=0.4, random_state=i, format="csc") for i in range(3)]
    pattern = sum(abs(d) for d in dense).tocsc()  # the union pattern, shared by every instance
    pattern.sort_indices()
    values = np.stack([np.asarray(d[pattern.nonzero()]).ravel() for d in dense])
    if shared:
        values = np.broadcast_to(values[:1], values.shape)
    mats = SparseBatch(indices=pattern.indices.astype(np.int64), indptr=pattern.indptr.astype(np.int64),
                       shape=(7, 5), values=torch.tensor(np.ascontiguousarray(values)), shared=shared)
    full = [mats.matrix(i).toarray() for i in range(3)]
    x, y = rng.normal(size=(3, 5)), rng.normal(size=(3, 7))
    host = HostMatrix(mats)
    np.testing.assert_allclose(host.matvec(x), np.stack([full[i] @ x[i] for i in range(3)]), atol=1e-12)
    np.testing.assert_allclose(host.rmatvec(y), np.stack([full[i].T @ y[i] for i in range(3)]), atol=1e-12)
