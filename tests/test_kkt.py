"""The optimality-condition Jacobian solve of the layer (amortcvx.iterations.kkt) against the dense matrix."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx.iterations import kkt
from amortcvx.layers import CvxpyLayer
from tests.test_layer import expcone, lp_param_a, qp, qp_param_p, sdp, socp


def socp_shared_a(m=12, n=5, seed=3):
    """The SOCP of ``socp`` with ``A`` a constant (shared by the batch; parameter ``b``): its cones' Schur
    complement takes the memoized Gram matrices (``kkt._soc_grams``)."""
    b, x = cp.Parameter(m, name="b"), cp.Variable(n, name="x")
    A0 = np.random.default_rng(seed).normal(size=(m, n))
    prob = cp.Problem(cp.Minimize(cp.norm(A0 @ x - b, 2) + 0.1 * cp.norm1(x)), [cp.norm(x, "inf") <= 1])

    def sample(B, rng):
        return [torch.tensor(rng.normal(size=(B, m)))]
    return prob, [b], [x], sample


CASES = {"qp": (qp, None), "lp_scs": (lp_param_a, "scs"), "qp_param_P": (qp_param_p, None), "qp_scs": (qp, "scs"),
         "socp": (socp, None), "socp_shared_a": (socp_shared_a, None), "sdp": (sdp, None), "exp": (expcone, None)}


def _setup(case: str, point: str, B: int = 6):
    d, w = _setup_point(case, point, B)
    return d, kkt.dual_jacobian(d, w)


def _setup_point(case: str, point: str, B: int = 6):
    make, solver = CASES[case]
    prob, params, variables, sample = make()
    layer = CvxpyLayer(prob, params, variables, solver=solver, eps=1e-8)
    values = sample(B, np.random.default_rng(0))
    layer(*values)
    theta = layer._theta(values)[0]
    data = layer.pp.canonicalize_vector(theta)
    d = kkt.dense(data)
    w = layer.last_solution.w
    if point == "random":  # a generic point: D has fractional blocks and mixed 0/1 diagonals
        w = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    return d, w


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("point", ["solution", "random"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reduced_solve_matches_the_dense_system(case, point, transpose):
    d, jac = _setup(case, point)
    J = kkt.kkt_matrix(d, jac)
    mat = J.mT if transpose else J
    n = d.A.shape[2]
    # a right-hand side in the range of the matrix: singular systems (CVXPY's non-unique auxiliaries) stay solvable
    z_true = torch.randn(J.shape[:2], generator=torch.Generator().manual_seed(2), dtype=J.dtype)
    rhs = (mat @ z_true.unsqueeze(-1)).squeeze(-1)
    z = kkt.solve_kkt(d, jac, rhs, transpose=transpose)
    residual = (mat @ z.unsqueeze(-1)).squeeze(-1) - rhs
    scale = 1.0 + rhs.abs().amax(dim=1)
    assert (residual.abs().amax(dim=1) / scale).max() < 1e-8
    full_rank = torch.linalg.matrix_rank(J) == J.shape[-1]
    if bool(full_rank.any()):  # the solution is unique there: it must be z_true
        err = (z - z_true)[full_rank].abs().amax(dim=1) / (1.0 + z_true[full_rank].abs().amax(dim=1))
        assert err.max() < 1e-6
    dense = kkt.solve_dense(J, rhs, n, transpose=transpose)
    if bool(full_rank.any()):
        assert torch.allclose(z[full_rank], dense[full_rank], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("point", ["solution", "random"])
def test_soc_gram_matrices_give_the_batched_schur_complement(point):
    d, jac = _setup("socp_shared_a", point)
    assert d.A.shape[0] == 1 and d.data.A.shared and jac.soc
    _, M = kkt._elimination_weights(jac, kkt.DELTA)
    As = d.A[..., M.lin:, :]
    grams = kkt._soc_grams(d, None, d.A, M.lin, M.groups)
    assert all(g is not None for g in grams[:len(M.soc)])
    plain = kkt._structured_schur(As, M.groups, (None,) * len(M.groups))
    torch.testing.assert_close(kkt._structured_schur(As, M.groups, grams), plain, rtol=1e-12, atol=1e-10)
    # per instance A (the socp case): no Gram matrices
    d_a, jac_a = _setup("socp", point)
    _, M_a = kkt._elimination_weights(jac_a, kkt.DELTA)
    assert kkt._soc_grams(d_a, None, d_a.A, M_a.lin, M_a.groups) == (None,) * len(M_a.groups)


def test_dual_jacobian_products_match_its_matrix():
    d, jac = _setup("socp", "random")
    g = torch.randn(jac.diag.shape, dtype=torch.float64)
    D = jac.matrix()
    assert torch.allclose(jac.matvec(g), (D @ g.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(jac.rmatvec(g), (D.mT @ g.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(jac.transposed().matrix(), D.mT, rtol=0, atol=1e-15)
    torch.testing.assert_close(jac.diagonal(), D.diagonal(dim1=-2, dim2=-1), rtol=0, atol=1e-15)


def test_closed_form_cone_jacobians_match_autograd():
    from amortcvx.canon.data import ConeDims
    from amortcvx.iterations.cones import project_dual_cone

    cones = ConeDims(zero=2, nonneg=3, soc=(3, 4), psd=(3, 2))
    rng = torch.Generator().manual_seed(3)
    w = torch.randn(5, cones.size, generator=rng, dtype=torch.float64)
    lin = cones.zero + cones.nonneg
    data = type("Cones", (), {"cones": cones})()
    jac = kkt.dual_jacobian(kkt.Batch(None, None, None, torch.zeros(5, 1), None, None, data), w)
    for i in range(5):
        want = torch.autograd.functional.jacobian(lambda v: project_dual_cone(v, cones), w[i])
        torch.testing.assert_close(jac.matrix()[i], want, atol=1e-10, rtol=1e-10)
    for grp in jac.psd:  # the PSD cones: Q orthogonal, D symmetric
        eye = torch.eye(grp.Q.shape[-1], dtype=torch.float64)
        torch.testing.assert_close(grp.Q.mT @ grp.Q, eye.expand_as(grp.Q), atol=1e-13, rtol=0)
    assert jac.lin == lin and jac.block is None
    assert [g.index.shape for g in jac.soc] == [(1, 3), (1, 4)] and [g.index.shape for g in jac.psd] == [(1, 6), (1, 3)]


def test_structured_cone_jacobians_match_their_dense_matrices():
    """SOC and PSD cones of repeated sizes, interleaved (groups whose rows are not contiguous): products, the
    diagonal, the transpose and the elimination weights ``R = ((1 + delta) I - D)^-1``, ``M = D R`` of the
    structured form against the dense matrices."""
    from amortcvx.canon.data import ConeDims

    cones = ConeDims(zero=1, nonneg=2, soc=(3, 4, 3), psd=(2, 3, 2))
    w = torch.randn(6, cones.size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w[0, 3:6] = torch.tensor([5.0, 1.0, 1.0])  # one cone strictly inside, one in the polar cone
    w[1, 3:6] = torch.tensor([-5.0, 1.0, 1.0])
    data = type("Cones", (), {"cones": cones})()
    jac = kkt.dual_jacobian(kkt.Batch(None, None, None, torch.zeros(6, 1), None, None, data), w)
    assert [g.start for g in jac.soc] == [None, 3] and [g.start for g in jac.psd] == [None, 13]
    D = jac.matrix()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(jac.matvec(g), (D @ g.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-13)
    torch.testing.assert_close(jac.rmatvec(g), (D.mT @ g.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-13)
    torch.testing.assert_close(jac.diagonal(), D.diagonal(dim1=-2, dim2=-1), rtol=0, atol=1e-13)
    delta = 1e-3
    eye = torch.eye(cones.size, dtype=torch.float64)
    for jd, Dd in ((jac, D), (jac.transposed(), D.mT)):
        R, M = kkt._elimination_weights(jd, delta)
        want = torch.linalg.inv((1 + delta) * eye - Dd)
        scale = float(want.abs().max())  # up to 1 / delta: the dense inverse is accurate relative to it
        torch.testing.assert_close(R.matrix(), want, rtol=0, atol=1e-11 * scale)
        torch.testing.assert_close(M.matrix(), Dd @ want, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("case", ["qp", "socp"])
def test_a_given_factor_is_used_only_where_it_was_built_from_the_same_jacobian(case):
    d, jac = _setup(case, "random")
    other = kkt.dual_jacobian(d, torch.randn(jac.diag.shape, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(3)))
    mixed = other.map(torch.clone)
    mixed.put_(torch.arange(3), jac.map(lambda t: t[:3]))
    factor = kkt.factorize(d, mixed)
    assert kkt.reusable(factor, jac)[:3].all() and not kkt.reusable(factor, jac)[3:].any()
    rhs = torch.randn(jac.diag.shape[0], d.A.shape[2] + jac.diag.shape[1], dtype=torch.float64,
                      generator=torch.Generator().manual_seed(4))
    assert torch.allclose(kkt.solve_kkt(d, jac, rhs, factor=factor), kkt.solve_kkt(d, jac, rhs), atol=1e-9, rtol=1e-9)
    assert torch.equal(factor.L, kkt.factorize(d, mixed).L)  # the caller's factor is not changed


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("case", ["socp", "sdp", "exp", "qp"])
def test_a_nearby_factor_preconditions_the_solve_to_the_asked_accuracy(case, transpose, monkeypatch):
    d, w = _setup_point(case, "random")
    jac = kkt.dual_jacobian(d, w)
    _, far = _setup(case, "solution")  # another point (on the QP and the SOCP another active set)
    gen = torch.Generator().manual_seed(4)
    K = kkt.kkt_matrix(d, jac)
    K = K.mT if transpose else K
    # a right-hand side J z can reach (J is singular on the cone problems: CVXPY's auxiliary variables)
    rhs = (K @ torch.randn(K.shape[:2], dtype=torch.float64, generator=gen).unsqueeze(-1)).squeeze(-1)
    # D at a point close by (as from one Newton step to the next)
    near = kkt.dual_jacobian(d, w + 1e-7 * torch.randn(w.shape, dtype=w.dtype, generator=gen))
    calls = []
    real = kkt.factorize
    monkeypatch.setattr(kkt, "factorize", lambda *a, **k: calls.append(a[1].diag.shape[0]) or real(*a, **k))
    for other in (near, far):
        factor = real(d, other.transposed() if transpose else other)
        calls.clear()
        got = kkt.solve_kkt(d, jac, rhs, transpose=transpose, factor=factor, near=1e-10)
        residual = (rhs - (K @ got.unsqueeze(-1)).squeeze(-1)).abs().amax(dim=1)
        assert (residual <= 1e-10 * rhs.abs().amax(dim=1) + 1e-12).all()
        usable = kkt.near_reuse(factor, jac)
        assert sum(calls) <= jac.diag.shape[0]  # at most one new factorization per instance
        if other is near:  # the nearby factor was enough
            assert calls == []
        if not bool(usable.any()):
            assert sum(calls) == jac.diag.shape[0]


@pytest.mark.parametrize("case", ["socp", "sdp", "exp"])
def test_a_solve_stops_at_the_asked_accuracy_and_newton_steps_take_it_from_the_residual(case, monkeypatch):
    d, w = _setup_point(case, "random")
    jac = kkt.dual_jacobian(d, w)
    K = kkt.kkt_matrix(d, jac)
    gen = torch.Generator().manual_seed(5)
    rhs = (K @ torch.randn(K.shape[:2], dtype=torch.float64, generator=gen).unsqueeze(-1)).squeeze(-1)
    passes = []
    real = kkt.cholesky_solve
    monkeypatch.setattr(kkt, "cholesky_solve", lambda L, b: passes.append(1) or real(L, b))

    def solve(**kw):
        passes.clear()
        z = kkt.solve_kkt(d, jac, rhs, **kw)
        return (rhs - (K @ z.unsqueeze(-1)).squeeze(-1)).abs().amax(dim=1), len(passes)
    exact, exact_passes = solve()
    loose = torch.full((rhs.shape[0],), 1e-3, dtype=torch.float64)
    residual, loose_passes = solve(accuracy=loose)
    size = rhs.abs().amax(dim=1)
    assert (exact <= 1e-12 * (1 + size)).all()
    assert (residual <= 1e-3 * size + 1e-14).all() and loose_passes < exact_passes
    # Newton from a point near the solution: each step's solve asks for the relative residual (at most
    # FORCING_MAX), and the steps still reach the solution as with exact solves
    d0, w0 = _setup_point(case, "solution")
    x0 = torch.linalg.lstsq(d0.A.expand(w0.shape[0], -1, -1), (d0.b - kkt.slack_of(d0, w0, kkt.dual_of(d0, w0)))
                            .unsqueeze(-1)).solution.squeeze(-1)
    start = kkt.Point(x0 * (1 + 1e-3), w0 * (1 + 1e-3))
    asked = []
    real_solve = kkt.solve_kkt
    monkeypatch.setattr(kkt, "solve_kkt", lambda *a, **k: asked.append(k.get("accuracy")) or real_solve(*a, **k))
    ref = kkt.newton_refine(d0, start, steps=6)
    assert kkt.converged(d0, ref.norm).all()
    assert asked[0] is not None and float(asked[0].max()) <= kkt.FORCING_MAX and float(asked[0].min()) > 1e-10
    monkeypatch.setattr(kkt, "FORCING_MAX", 0.0)  # every step exact
    exact_ref = kkt.newton_refine(d0, start, steps=6)
    y, y_exact = kkt.dual_of(d0, ref.point.w), kkt.dual_of(d0, exact_ref.point.w)
    torch.testing.assert_close(ref.point.x, exact_ref.point.x, rtol=0, atol=1e-8)
    torch.testing.assert_close(y, y_exact, rtol=0, atol=1e-8)


def test_newton_steps_and_the_backward_reuse_a_nearby_factorization(monkeypatch):
    prob, params, variables, sample = socp()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8)
    values = [torch.as_tensor(v).requires_grad_(True) for v in sample(8, np.random.default_rng(0))]
    calls = []
    real = kkt.factorize
    monkeypatch.setattr(kkt, "factorize", lambda *a, **k: calls.append(a[1].diag.shape[0]) or real(*a, **k))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (x * torch.arange(1.0, x.shape[1] + 1, dtype=x.dtype)).sum()

    (x,) = layer(*values)
    forward = len(calls)
    loss(x).backward(retain_graph=True)
    assert len(calls) == forward  # the cones' D moved a little since the last factorization: reused
    first = [v.grad.clone() for v in values]
    for v in values:
        v.grad = None
    loss(x).backward()
    for a, v in zip(first, values):  # a second backward (retained graph) gives the same gradient
        assert torch.equal(a, v.grad)
    monkeypatch.setattr(kkt, "_serves", lambda b, ok, j, near: torch.zeros_like(ok))  # every solve factored anew
    fresh = [v.detach().requires_grad_(True) for v in values]
    calls.clear()
    (x,) = layer(*fresh)
    loss(x).backward()
    assert len(calls) > forward + 1  # more Newton factorizations, and one in the backward
    for a, v in zip(first, fresh):
        torch.testing.assert_close(a, v.grad, rtol=1e-8, atol=1e-9)


def test_the_backward_reuses_the_forward_refinement_factorization(monkeypatch):
    prob, params, variables, sample = qp()
    layer = CvxpyLayer(prob, params, variables, eps=1e-8)
    values = [torch.as_tensor(v).requires_grad_(True) for v in sample(8, np.random.default_rng(0))]
    out = layer(*values)
    calls = []
    real = kkt.factorize
    monkeypatch.setattr(kkt, "factorize", lambda *a, **k: calls.append(a[1].diag.shape[0]) or real(*a, **k))
    sum(o.sum() for o in out).backward()
    assert calls == []  # a QP's D is the same at the last Newton step and at the solution
    grads = [v.grad.clone() for v in values]
    for v in values:
        v.grad = None
    layer.last_solution = None
    sol = layer._solve(layer.pp.canonicalize_vector(layer._theta(values)[0].detach()),
                       layer._theta(values)[0].detach(), 1e-8, "c", "cold", 100, {}, layer.refine_steps)
    theta = layer._theta(values)[0]
    x, _, _ = kkt.ImplicitSolution.apply(theta, sol.x, sol.w, layer.pp.canonicalize_vector, sol.failed, kkt.dense)
    sum(m.apply(x).sum() for m in layer._var_maps).backward()  # a new factorization in the backward
    assert calls
    for g, v in zip(grads, values):
        assert torch.allclose(g, v.grad, atol=1e-8, rtol=1e-6)


def _equality_problem(form: str, B: int = 5):
    """A QP with equality rows, one of them redundant (rank-deficient ``A_e``), and inequalities; shared ``A``."""
    import cvxpy as cp

    from amortcvx.canon.parametric import ParametricProblem

    rng = np.random.default_rng(5)
    n = 6
    E = rng.normal(size=(2, n))
    c, t = cp.Parameter(n, name="c"), cp.Parameter(2, name="t")
    x = cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - c)),
                      [E @ x == t, 2 * (E[0] @ x) == 2 * t[0], x >= -0.3, cp.sum(x) <= 1])
    pp = ParametricProblem(prob, form)
    values = {"c": rng.normal(size=(B, n)), "t": rng.normal(scale=0.3, size=(B, 2))}
    return prob, pp, values, x


@pytest.mark.parametrize("form", ["cone", "qp"])
@pytest.mark.parametrize("transpose", [False, True])
def test_equality_rows_are_kept_exact_through_their_null_space(form, transpose):
    _, pp, values, _ = _equality_problem(form)
    data = pp.canonicalize(values)
    d = kkt.dense(data)
    ns = kkt.null_space(d)
    assert ns is not None and ns.rows == kkt.equality_rows(data) >= 3
    n = pp.n
    rank = int(np.linalg.matrix_rank(d.A[0, :ns.rows].numpy()))
    assert rank < ns.rows and ns.Z.shape[1] == n - rank  # the redundant equality row does not cut a dimension
    assert torch.allclose(d.A[0, :ns.rows] @ ns.Z, torch.zeros(ns.rows, ns.Z.shape[1], dtype=torch.float64),
                          atol=1e-12)
    w = torch.randn(data.batch_size, pp.m, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    jac = kkt.dual_jacobian(d, w)
    J = kkt.kkt_matrix(d, jac)
    mat = J.mT if transpose else J
    z_true = torch.randn(J.shape[:2], generator=torch.Generator().manual_seed(7), dtype=J.dtype)
    rhs = (mat @ z_true.unsqueeze(-1)).squeeze(-1)  # in the range: the redundant row keeps J singular
    z = kkt.solve_kkt(d, jac, rhs, transpose=transpose)
    residual = (mat @ z.unsqueeze(-1)).squeeze(-1) - rhs
    assert (residual.abs().amax(dim=1) / (1.0 + rhs.abs().amax(dim=1))).max() < 1e-9
    assert kkt.factorize(d, jac).L.shape[1:] == (n - rank, n - rank)


@pytest.mark.parametrize("form", ["cone", "qp"])
def test_newton_refinement_with_equality_rows_reaches_the_solution(form):
    import cvxpy as cp

    prob, pp, values, x = _equality_problem(form)
    data = pp.canonicalize(values)
    d = kkt.dense(data)
    start = kkt.Point(torch.zeros(data.batch_size, pp.n, dtype=torch.float64),
                      torch.zeros(data.batch_size, pp.m, dtype=torch.float64))
    ref = kkt.newton_refine(d, start, steps=20)
    assert kkt.converged(d, ref.norm).all()
    for i in range(data.batch_size):
        for name, p in prob.param_dict.items():
            p.value = values[name][i]
        prob.solve(solver=cp.CLARABEL)
        got = pp.recover(ref.point.x[i].numpy(), kkt.dual_of(d, ref.point.w)[i].numpy())
        assert np.allclose(got.variables["x"], x.value, atol=1e-6)


def test_sparse_products_and_the_gathered_schur_complement_match_the_dense_formulas():
    from amortcvx import problems
    from amortcvx.canon.parametric import ParametricProblem

    fam = problems.make("mpc", "small")
    pp = ParametricProblem(fam.problem, "cone")
    data = pp.canonicalize(fam.sample(6, seed=3))
    d = kkt.dense(data)
    e = kkt.equality_rows(data)
    for start in (0, e):
        r = kkt.rows(d, start)
        assert r.constant is not None  # MPC's A is about 4% nonzero: CSR products
        x = torch.randn(6, pp.n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        y = torch.randn(6, pp.m - start, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(r.mv(x), x @ d.A[0, start:].mT)
        torch.testing.assert_close(r.rmv(y), y @ d.A[0, start:])
    q = kkt.p_rows(d)
    assert q.constant is not None  # MPC's P is diagonal: CSR products too, the same numbers as the dense one
    torch.testing.assert_close(q.mv(x), x @ d.P[0].mT)
    # P's gradient: the dense product
    assert kkt.p_rows(d._replace(P=d.P.clone().requires_grad_(True))).constant is None
    S = np.eye(5) + 0.5  # a dense constant P: the dense product
    p = cp.Parameter(5, name="p")
    z = cp.Variable(5, name="z")
    dense_p = ParametricProblem(cp.Problem(cp.Minimize(cp.quad_form(z, S) + p @ z), [z >= -1]), "qp")
    assert kkt.p_rows(kkt.dense(dense_p.canonicalize({"p": np.ones((2, 5))}))).constant is None
    # few active bounds (the gathered rows) and many (the full product): both equal Z'(P + dI + A_o'M_o A_o)Z
    for scale in (0.1, 10.0):
        w = scale * torch.randn(6, pp.m, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) - 1.0
        jac = kkt.dual_jacobian(d, w)
        L = kkt.factorize(d, jac).L
        ns = kkt.null_space(d)
        _, M = kkt._elimination_weights(jac, kkt.DELTA)
        Ao = d.A[0, e:]
        H = Ao.mT @ (M.diag[:, e:, None] * Ao) + kkt.DELTA * torch.eye(pp.n, dtype=torch.float64) + d.P[0]
        torch.testing.assert_close(L @ L.mT, ns.Z.mT @ H @ ns.Z, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_flagged_rows_gathers_each_instances_flagged_rows_in_order(shared):
    from amortcvx.iterations.linalg import flagged_rows

    g = torch.Generator().manual_seed(4)
    M = torch.randn(1 if shared else 5, 12, 3, dtype=torch.float64, generator=g)
    flags = torch.rand(5, 12, generator=g) < 0.3
    flags[2] = False  # an instance with no flagged row
    count = int(flags.sum(dim=1).max())
    rows, order = flagged_rows(M, flags, count)
    assert rows.shape == (5, count, 3) and order.shape == (5, count)
    for b in range(5):
        mine = torch.nonzero(flags[b]).flatten()
        k = mine.numel()
        assert order[b, :k].tolist() == mine.tolist()  # its flagged rows first, in their order
        assert not bool(flags[b, order[b, k:]].any())  # the rest of its slots: unflagged rows
        torch.testing.assert_close(rows[b], M[0 if shared else b, order[b]])


def test_the_reduced_dense_path_is_chosen_beyond_the_krylov_size_only_for_shared_equalities():
    assert kkt.linear_algebra(100, 200) == "dense"
    assert kkt.linear_algebra(624, 1704) == "krylov"
    assert kkt.linear_algebra(624, 1704, equalities=504, shared=True) == "dense"
    assert kkt.linear_algebra(624, 1704, equalities=504, shared=False) == "krylov"
    assert kkt.linear_algebra(3030, 3031, equalities=1, shared=True) == "krylov"  # too large for one dense SVD


def test_a_part_of_a_batch_with_per_instance_a_is_factored_like_the_batch():
    # later Newton steps work on the unconverged instances only; one instance of a batch whose A depends on the
    # parameters must not be taken for a shared A (that gave a null-space factor of another size, which could
    # not be written back into the batch's factor)
    from amortcvx import problems
    from amortcvx.canon.parametric import ParametricProblem

    fam = problems.make("mpc_param_dyn", "small")
    pp = ParametricProblem(fam.problem, "cone")
    data = pp.canonicalize(fam.sample(3, seed=1))
    assert not data.A.shared and kkt.equality_rows(data) > 0
    d = kkt.dense(data)
    w = torch.randn(3, pp.m, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    jac = kkt.dual_jacobian(d, w)
    whole = kkt.factorize(d, jac)
    one = torch.tensor([1])
    part = kkt.factorize(kkt.take(d, one), jac.map(lambda t: t[one]))
    assert kkt.null_space(kkt.take(d, one)) is None
    assert part.L.shape[1:] == whole.L.shape[1:] == (pp.n, pp.n)
    merged = kkt.put_factor_(kkt.blank_factor(whole, 3), one, part)
    torch.testing.assert_close(merged.L[1], whole.L[1])


@pytest.mark.parametrize("case", ["qp", "lp_scs", "qp_param_P", "qp_scs", "socp", "exp"])
def test_the_closed_form_data_gradient_matches_autograd_through_the_residual(case):
    make, solver = CASES[case]
    prob, params, variables, sample = make()
    layer = CvxpyLayer(prob, params, variables, solver=solver, eps=1e-8)
    values = sample(5, np.random.default_rng(0))
    layer(*values)
    theta = layer._theta(values)[0].detach()
    sol = layer.last_solution
    gen = torch.Generator().manual_seed(6)
    lam = torch.randn(sol.x.shape[0], sol.x.shape[1] + sol.w.shape[1], dtype=torch.float64, generator=gen)
    # on the QP, points where some w sits exactly on its bound (the clip's ties)
    w = sol.w.clone()
    if layer.form == "qp":
        w[0, :3] = layer.pp.canonicalize_vector(theta).u[0, :3]

    def grad(closed_form: bool) -> torch.Tensor:
        th = theta.clone().requires_grad_(True)
        data = layer.pp.canonicalize_vector(th)
        d = kkt.dense(data)
        if closed_form:
            pairs = kkt._data_vjp(data, kkt._detached(d), sol.x, w, lam)
            outs, grads = [t for t, _ in pairs], [g for _, g in pairs]
        else:
            f1, f2 = kkt.residual(d, kkt.Point(sol.x, w))
            n = sol.x.shape[1]
            pairs = [(f, -g) for f, g in ((f1, lam[:, :n]), (f2, lam[:, n:])) if f.requires_grad]
            outs, grads = [f for f, _ in pairs], [g for _, g in pairs]
        (g,) = torch.autograd.grad(outs, th, grads, allow_unused=True)
        return torch.zeros_like(th) if g is None else g
    want = grad(False)
    assert want.abs().max() > 0
    torch.testing.assert_close(grad(True), want, rtol=1e-12, atol=1e-12)
