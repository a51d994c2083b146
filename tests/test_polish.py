"""Active-set polishing of warm starts (``amortcvx.iterations.polish``, ``AmortizedSolver(polish=True)``)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import Status, WarmStart, get_backend, solve_batch
from amortcvx.canon import ParametricProblem, SparseBatch
from amortcvx.datasets import DEFAULT_SETTINGS as DATASET_SETTINGS
from amortcvx.deploy import AmortizedSolver
from amortcvx.deploy.solver import start_residual
from amortcvx.iterations import KKTSolver, check_polishable, equality_qp, make_algorithm, run
from amortcvx.iterations.polish import candidate_active_sets, guess_active, scs_polish
from amortcvx.predictors import output_space
from amortcvx.solvers import FORMS

EPS = {"eps_abs": 1e-4, "eps_rel": 1e-4}


def dense_to_batch(mats: torch.Tensor) -> SparseBatch:
    """A (B, r, c) dense tensor as a per-instance SparseBatch with the full pattern (column-major CSC)."""
    _, r, c = mats.shape
    indices = torch.arange(r).repeat(c)
    indptr = torch.arange(0, r * c + 1, r)
    values = mats.transpose(1, 2).reshape(mats.shape[0], -1)  # column-major
    return SparseBatch(indices.numpy(), indptr.numpy(), (r, c), values, False)


def test_equality_qp_solves_the_reduced_kkt_system():
    gen = torch.Generator().manual_seed(0)
    B, n, m = 3, 5, 7
    A = torch.randn(B, m, n, dtype=torch.float64, generator=gen)
    L = torch.randn(B, n, n, dtype=torch.float64, generator=gen)
    P = L @ L.mT * 0.1  # positive definite
    q = torch.randn(B, n, dtype=torch.float64, generator=gen)
    rhs = torch.randn(B, m, dtype=torch.float64, generator=gen)
    rhs[0, 6] = torch.inf  # an infinite bound off the active set must not leak in
    active = torch.zeros(B, m, dtype=torch.bool)
    active[0, :3] = True
    active[1, 2:6] = True  # a different active set per instance; instance 2 has none (unconstrained)
    x, y = equality_qp(dense_to_batch(A), dense_to_batch(P), q, rhs, active)
    for i in range(B):
        act = active[i].nonzero().flatten()
        a = A[i, act]
        kkt = torch.cat([torch.cat([P[i], a.T], 1), torch.cat([a, torch.zeros(len(act), len(act),
                                                                             dtype=torch.float64)], 1)])
        sol = torch.linalg.solve(kkt, torch.cat([-q[i], rhs[i, act]]))
        torch.testing.assert_close(x[i], sol[:n], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(y[i, act], sol[n:], rtol=1e-8, atol=1e-8)
        assert torch.all(y[i, ~active[i]] == 0)


def test_equality_qp_with_rows_always_active_keeps_their_part_and_gives_the_same_solution(monkeypatch):
    """``always``: the rows active in every instance are summed into the Schur complement once per data (kept for
    the next split on the same data) and the others added per call; the solutions equal those formed whole, with a
    shared and a per-instance ``A``, with and without ``P``; splits with many other rows fall back to the whole
    product; ``always`` rows must be active."""
    from amortcvx.iterations import polish

    gen = torch.Generator().manual_seed(1)
    B, n, m = 4, 6, 16
    always = torch.zeros(m, dtype=torch.bool)
    always[:3] = True
    q = torch.randn(B, n, dtype=torch.float64, generator=gen)
    rhs = torch.randn(B, m, dtype=torch.float64, generator=gen)
    L = torch.randn(B, n, n, dtype=torch.float64, generator=gen)
    P = dense_to_batch(L @ L.mT * 0.1)
    builds = []
    real = polish.dense_batch
    monkeypatch.setattr(polish, "dense_batch", lambda *a, **k: builds.append(1) or real(*a, **k))
    for shared in (False, True):
        dense = torch.randn(1 if shared else B, m, n, dtype=torch.float64, generator=gen)
        A = dense_to_batch(dense)
        A = SparseBatch(A.indices, A.indptr, A.shape, A.values, shared)
        for p in (None, P):
            builds.clear()
            # the splits of a predictor's candidates, one call each; without P, a vertex (n active rows or more)
            splits = [[3, 4, 5], [6, 7, 8], [4, 6, 8, 10]] + ([[]] if p is not None else [])
            for extra in splits:
                active = always.expand(B, m).clone()
                active[:, extra] = True
                active[1, 12] = True  # instances differ
                x0, y0 = equality_qp(A, p, q, rhs, active)
                x1, y1 = equality_qp(A, p, q, rhs, active, always=always)
                torch.testing.assert_close(x1, x0, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
            assert len(builds) == 1 + (p is not None)  # dense A (and P) once for the splits
    many = always.expand(B, m).clone()
    many[:, 3:10] = True  # 7 of the 13 other rows: formed whole
    assert polish._active_schur(A, None, many, always, 1e-6, torch.float64) is None
    with pytest.raises(ValueError, match="inactive in some instance"):
        equality_qp(A, None, q, rhs, torch.zeros(B, m, dtype=torch.bool), always=always)


def test_kkt_solver_marks_failed_factorizations_instead_of_raising():
    # an indefinite P makes instance 1's Schur complement fail: strict raises, strict=False gives NaN there only
    A = dense_to_batch(torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
    P = dense_to_batch(torch.stack([torch.eye(2), -10.0 * torch.eye(2)]).double())
    with pytest.raises(ValueError, match="instance 1 is not positive definite"):
        KKTSolver(A, P, 1e-6, 1.0, dtype=torch.float64, method="cholesky")
    solver = KKTSolver(A, P, 1e-6, 1.0, dtype=torch.float64, method="cholesky", strict=False)
    assert solver.failed.tolist() == [False, True]
    u, w = solver.solve(torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.isfinite(u[0]).all() and torch.isfinite(w[0]).all() and torch.isnan(u[1]).all()


def test_guess_active_counts_a_vertex_for_lps_and_signs_for_qps():
    score = torch.tensor([[3.0, -1.0, 2.0, 0.5, -2.0], [-1.0, -3.0, 1.0, -0.5, 4.0]])
    forced = torch.tensor([False, True, False, False, False])
    qp = guess_active(score, forced, None)
    assert qp.tolist() == [[True, True, True, True, False], [False, True, True, False, True]]
    lp = guess_active(score, forced, 3)  # the forced row and the two best others
    assert lp.tolist() == [[True, True, True, False, False], [False, True, True, False, True]]


@functools.cache
def _solved(name: str, form: str, batch: int = 12):
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, form)
    params = fam.sample(batch, seed=5)
    data = pp.canonicalize(params, dtype=torch.float64)
    algo = "scs" if form == "cone" else "osqp"
    opt = solve_batch(data.instances(), algo, settings=DATASET_SETTINGS[algo], workers=1)  # high accuracy
    return pp, params, data, opt


@pytest.mark.parametrize("algo, name", [("scs", "transport"), ("osqp", "transport"), ("scs", "lasso"),
                                        ("osqp", "portfolio")])
def test_polish_near_the_optimum_recovers_it(algo, name):
    # a perturbed optimum (relative 1e-5: the active set is still readable) polishes back to the optimum, and
    # the C solver started there stops at once
    pp, params, data, opt = _solved(name, FORMS[algo])
    assert all(r.status == Status.OPTIMAL for r in opt)
    alg = make_algorithm(algo, data)
    gen = torch.Generator().manual_seed(1)
    keys = ("x", "y", "s") if algo == "scs" else ("x", "y")
    exact = {k: torch.tensor(np.stack([getattr(r, k) for r in opt])) for k in keys}
    noisy = {k: v + 1e-5 * v.abs().mean() * torch.randn(v.shape, dtype=v.dtype, generator=gen)
             for k, v in exact.items()}
    pol = alg.polish(**noisy)
    scale = 1.0 + exact["x"].abs().max()
    assert float((pol["x"] - exact["x"]).abs().max()) < 1e-6 * scale
    assert float(start_residual(alg, pol).max()) < 1e-3 * float(start_residual(alg, noisy).min())
    warm = [WarmStart(**{k: v[i].numpy() for k, v in pol.items()}) for i in range(data.batch_size)]
    res = solve_batch(data.instances(), algo, warm_starts=warm, settings=EPS, exact_iterations=True, workers=1)
    assert all(r.status == Status.OPTIMAL for r in res)
    assert max(r.iterations for r in res) <= 2


def test_candidate_active_sets_are_the_guess_and_its_swaps_near_the_cut():
    gen = torch.Generator().manual_seed(2)
    B, m, n, band = 4, 9, 4, 2
    score = torch.randn(B, m, dtype=torch.float64, generator=gen)
    forced = torch.zeros(m, dtype=torch.bool)
    forced[0] = True  # an equality row: in every candidate
    cands = candidate_active_sets(score, forced, n, band)
    assert cands.shape == (1 + band ** 2 + 1, B, m)  # the guess, 1 swap (band^2), 2 swaps (1 way each)
    assert torch.equal(cands[0], guess_active(score, forced, n))
    assert cands[:, :, 0].all() and (cands.sum(dim=2) == n).all()  # forced row in, always n active rows
    ranked = torch.where(forced, -torch.inf, score).argsort(dim=1, descending=True)
    taken = n - 1  # free rows in the guess
    band_rows = ranked[:, taken - band:taken + band]
    for c in cands[1:]:
        changed = c ^ cands[0]
        assert changed.sum(dim=1).tolist() in ([2] * B, [4] * B)  # one or two swaps
        for i in range(B):  # only rows within the band of the cut move
            assert set(changed[i].nonzero().flatten().tolist()) <= set(band_rows[i].tolist())
    assert len({tuple(c.flatten().tolist()) for c in cands}) == cands.shape[0]  # all different
    assert candidate_active_sets(score, forced, None, band).shape == (1, B, m)  # a QP: the guess alone
    assert candidate_active_sets(score, forced, n, 0).shape == (1, B, m)


def test_a_swap_away_from_the_guess_polishes_to_the_vertex():
    # the optimum's scores with the weakest active row pushed just below the strongest inactive one: the one
    # guess misses the vertex, the candidates one swap away contain it and polishing picks it
    pp, params, data, opt = _solved("transport", "cone")
    alg = make_algorithm("scs", data)
    exact = {k: torch.tensor(np.stack([getattr(r, k) for r in opt])) for k in ("x", "y", "s")}
    y, s = exact["y"].clone(), exact["s"].clone()
    n = pp.n
    for i in range(y.shape[0]):
        order = (y[i] - s[i]).argsort(descending=True)
        weakest_in, strongest_out = order[n - 1], order[n]
        # now it scores just below the strongest inactive row: the guess swaps the two
        y[i, weakest_in], s[i, weakest_in] = 0.0, s[i, strongest_out] * (1 + 1e-6) + 1e-9
    one = scs_polish(alg.work, exact["x"], y, s, band=0)
    many = scs_polish(alg.work, exact["x"], y, s, band=3)
    scale = 1.0 + exact["x"].abs().max()
    assert float((one["x"] - exact["x"]).abs().amax(dim=1).min()) > 1e-6 * scale  # every single guess is off
    # an optimal vertex (optima need not be unique: compare objectives), and the duals pass with it: SCS's own test
    c = alg.work.c.expand_as(exact["x"])
    torch.testing.assert_close((c * many["x"]).sum(dim=1), (c * exact["x"]).sum(dim=1), rtol=1e-8, atol=1e-8 * scale)
    def certified(point, eps):  # SCS's test on the point projected onto the cones (nonnegative rows only here)
        return get_backend("scs").certify(data, x=point["x"].numpy(), y=point["y"].clamp_min(0).numpy(),
                                          s=point["s"].clamp_min(0).numpy(), eps_abs=eps, eps_rel=eps)
    assert certified(many, 1e-8).all()
    assert not certified(one, 1e-4).any()


def test_polished_refinement_of_an_lp_needs_fewer_c_iterations():
    # transport: 60 torch steps from cold leave SCS most of its work; polishing them finds the optimal vertex
    # on most instances (measured: median 1 vs 76 over 200 instances)
    pp, params, data, opt = _solved("transport", "cone", 24)
    assert all(r.status == Status.OPTIMAL for r in opt)
    counts = {}
    for polish in (False, True):
        solver = AmortizedSolver(pp, None, algorithm="scs", k=60, polish=polish, solver_settings=EPS, finish="c")
        out = solver.solve(params, exact_iterations=True)
        assert all(r.status == Status.OPTIMAL for r in out.results)
        obj = np.array([r.objective for r in out.results])
        np.testing.assert_allclose(obj, [r.objective for r in opt], rtol=1e-3)
        counts[polish] = float(np.median([r.iterations for r in out.results]))
    assert counts[True] <= 0.5 * counts[False]


@pytest.mark.parametrize("algo", ["scs", "osqp"])
def test_polish_keeps_the_better_point_per_instance(algo):
    # each instance keeps whichever of the refined and the polished point starts the C solver with the smaller
    # residual: polishing never makes the starting point worse, also where the active-set guesses are wrong
    pp, params, data, _ = _solved("transport", FORMS[algo], 24)
    alg = make_algorithm(algo, data)
    space = output_space(algo)
    plain_ws = space.warm_start(alg, run(alg, alg.init(), 10).state)
    plain = start_residual(alg, plain_ws)
    pred = AmortizedSolver(pp, None, algorithm=algo, k=10, polish=True).predict_warm_start(params)
    assert np.all(pred.residual <= plain.numpy() * (1 + 1e-9))
    kept = np.array([np.array_equal(w.x, plain_ws["x"][i].numpy()) and np.array_equal(w.y, plain_ws["y"][i].numpy())
                     for i, w in enumerate(pred.warm_starts)])
    np.testing.assert_array_equal(~kept, pred.residual < plain.numpy())
    assert 0 < kept.sum() < len(kept)  # some guesses right, some wrong after 10 steps: both paths are used


def test_polish_is_refused_for_other_cones():
    fam = problems.make("kalman", "small", seed=0)  # SOC constraints
    pp = ParametricProblem(fam.problem, "cone")
    with pytest.raises(ValueError, match="soc"):
        check_polishable(pp.cones)
    with pytest.raises(ValueError, match="polishing needs an LP or QP"):
        AmortizedSolver(pp, None, algorithm="scs", k=5, polish=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algo", ["scs", "osqp"])
def test_cuda_polish_matches_cpu(algo):
    fam = problems.make("transport", "small", seed=0)
    pp = ParametricProblem(fam.problem, FORMS[algo])
    theta = fam.sample(4, seed=1)
    outs = []
    for device in ("cpu", "cuda"):
        data = pp.canonicalize({k: torch.tensor(v, device=device) for k, v in theta.items()})
        alg = make_algorithm(algo, data)
        ws = output_space(algo).warm_start(alg, run(alg, alg.init(), 60).state)
        outs.append(alg.polish(**ws)["x"])
    assert outs[1].is_cuda
    assert float((outs[1].cpu() - outs[0]).abs().max()) < 1e-6
