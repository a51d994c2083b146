"""Matrix-free Krylov solves of the KKT systems (amortcvx.iterations.krylov) against the dense path (iterations.kkt)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import osqp
import pytest
import scipy.sparse as sp
import scs
import torch

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations import kkt
from amortcvx.iterations.krylov import gmres, kkt_operator, kkt_preconditioner, solve_kkt_krylov


# ---------------------------------------------------------------------------------------------- problems
def lp(n=4, m=8, seed=1):
    """minimize c'x  s.t.  A x <= 1, -1 <= x <= 1 (parameters c and A)."""
    c, A, x = cp.Parameter(n, name="c"), cp.Parameter((m, n), name="A"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(c @ x), [A @ x <= 1, x >= -1, x <= 1])
    A0 = np.random.default_rng(seed).normal(size=(m, n))
    return prob, lambda B, rng: {"c": rng.normal(size=(B, n)), "A": A0 + 0.1 * rng.normal(size=(B, m, n))}


def qp(n=6, m=10, seed=0):
    """minimize 1/2 ||F x||^2 + q'x  s.t.  G x <= h (parameters q, h)."""
    rng = np.random.default_rng(seed)
    F, G = rng.normal(size=(n, n)), rng.normal(size=(m, n))
    q, h, x = cp.Parameter(n, name="q"), cp.Parameter(m, name="h"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + q @ x), [G @ x <= h])
    return prob, lambda B, rng: {"q": rng.normal(size=(B, n)), "h": rng.uniform(0.2, 1.0, size=(B, m))}


def socp(m=12, n=5, seed=3):
    """minimize ||A x - b||_2 + 0.1 ||x||_1  s.t.  ||x||_inf <= 1 (parameters A, b); J is singular on some
    instances (CVXPY's auxiliary variables)."""
    A, b, x = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + 0.1 * cp.norm1(x)), [cp.norm(x, "inf") <= 1])
    A0 = np.random.default_rng(seed).normal(size=(m, n))
    return prob, lambda B, rng: {"A": A0 + 0.1 * rng.normal(size=(B, m, n)), "b": rng.normal(size=(B, m))}


def solution_point(data, form: str, eps: float = 1e-9) -> kkt.Point:
    """A solution of every instance by SCS (cone form) or OSQP (QP form), in the normal-map variables."""
    xs, ws = [], []
    for i in range(data.batch_size):
        inst = data.instance(i)
        P = None if inst.P is None else sp.csc_matrix(sp.triu(inst.P))
        if form == "cone":
            arrays = {"A": sp.csc_matrix(inst.A), "b": inst.b, "c": inst.c} | ({} if P is None else {"P": P})
            sol = scs.SCS(arrays, inst.cones.to_scs(), eps_abs=eps, eps_rel=eps, verbose=False,
                          max_iters=50_000).solve()
            xs.append(sol["x"])
            ws.append(sol["y"] - sol["s"])
        else:
            solver = osqp.OSQP()
            solver.setup(P=P, q=inst.q, A=sp.csc_matrix(inst.A), l=inst.l, u=inst.u, eps_abs=eps, eps_rel=eps,
                         verbose=False, polishing=True, max_iter=50_000)
            res = solver.solve()
            xs.append(res.x)
            ws.append(np.clip(inst.A @ res.x, inst.l, inst.u) + res.y)
    return kkt.Point(torch.tensor(np.array(xs)), torch.tensor(np.array(ws)))


CASES = {"lp_qp": (lp, "qp"), "lp_cone": (lp, "cone"), "qp_qp": (qp, "qp"), "qp_cone": (qp, "cone"),
         "socp": (socp, "cone")}
_BUILT: dict[str, tuple] = {}


def build(case: str):
    """``(data, d, jac, J)`` at a (Newton-refined) solution of a batch of 4 instances of ``case``."""
    if case not in _BUILT:
        make, form = CASES[case]
        prob, sample = make()
        pp = ParametricProblem(prob, form)
        theta = pp.parameter_vector(sample(4, np.random.default_rng(0)), dtype=torch.float64)
        data = pp.canonicalize_vector(theta)
        d = kkt.dense(data)
        pt = kkt.newton_refine(d, solution_point(data, form)).point
        jac = kkt.dual_jacobian(d, pt.w)
        _BUILT[case] = (data, d, jac, kkt.kkt_matrix(d, jac))
    return _BUILT[case]


def apply_dense(J: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (J @ z.unsqueeze(-1)).squeeze(-1)


def relres(J: torch.Tensor, z: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rhs - apply_dense(J, z), dim=1) / torch.linalg.vector_norm(rhs, dim=1)


# ---------------------------------------------------------------------------------------------- the operator
@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_equals_the_dense_kkt_matrix(case):
    data, d, jac, J = build(case)
    N = J.shape[-1]
    z = torch.randn(4, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sign = torch.ones(N, dtype=torch.float64)
    sign[data.n:] = -1.0
    for transpose in (False, True):
        mat = J.mT if transpose else J
        for delta in (0.0, 0.25):
            got = kkt_operator(data, jac, transpose=transpose, delta=delta)(z)
            want = apply_dense(mat + delta * torch.diag(sign), z)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kkt_operator(d, jac)(z), apply_dense(J, z), rtol=1e-12, atol=1e-12)  # a kkt.Batch works


def test_operator_with_a_nonlinear_cone_block_differs_from_its_transpose():
    """The SOC block makes ``A' D`` differ from ``(D A)'`` only through ``D``'s off-diagonal entries; a test that
    would pass with the block ignored must fail here."""
    data, _, jac, J = build("socp")
    D = jac.matrix()
    assert jac.soc and bool((D - torch.diag_embed(D.diagonal(0, 1, 2))).abs().max() > 0)
    z = torch.randn(4, J.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    no_block = jac._replace(soc=tuple(g._replace(C=torch.zeros_like(g.C)) for g in jac.soc))  # the cones' alpha I only
    assert float((kkt_operator(data, no_block)(z) - apply_dense(J, z)).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_solve_agrees_with_the_dense_solve(case, transpose):
    data, d, jac, J = build(case)
    mat = J.mT if transpose else J
    N = J.shape[-1]
    gen = torch.Generator().manual_seed(2)
    sv = torch.linalg.svdvals(J)
    nonsingular = sv[:, -1] > 1e-8 * sv[:, 0]
    if case != "socp":
        assert bool(nonsingular.all())
    # consistent right-hand sides (in the range of J): every instance has a solution
    rhs = apply_dense(mat, torch.randn(4, N, dtype=torch.float64, generator=gen))
    ref = kkt.solve_kkt(d, jac, rhs, transpose=transpose)
    out = solve_kkt_krylov(data, jac, rhs, transpose=transpose)
    assert bool(out.converged.all()), out.residual
    assert float(relres(mat, out.z, rhs).max()) < 1e-9
    torch.testing.assert_close(out.residual, relres(mat, out.z, rhs), rtol=1e-3, atol=1e-14)
    err = torch.linalg.vector_norm(out.z - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)
    assert float(torch.where(nonsingular, err, 0.0).max()) < 1e-7
    assert float(out.z.norm(dim=1).max()) < 100 * float(ref.norm(dim=1).max())  # no blown-up null-space part
    # random right-hand sides: small residual wherever the dense solve's residual is small
    rhs = torch.randn(4, N, dtype=torch.float64, generator=gen)
    ref = kkt.solve_kkt(d, jac, rhs, transpose=transpose)
    out = solve_kkt_krylov(data, jac, rhs, transpose=transpose)
    good = relres(mat, ref, rhs) < 1e-9
    assert bool((good | ~nonsingular).all())
    assert float(torch.where(good, relres(mat, out.z, rhs), 0.0).max()) < 1e-9
    assert bool((out.converged | ~good).all())
    err = torch.linalg.vector_norm(out.z - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)
    assert float(torch.where(nonsingular, err, 0.0).max()) < 1e-7
    if not bool(good.all()):  # an inconsistent singular system: reported, with the best iterate's residual
        assert not bool(out.converged[~good].any())
        torch.testing.assert_close(out.residual, relres(mat, out.z, rhs), rtol=1e-6, atol=1e-14)


def test_socp_has_singular_instances():
    """The SOCP case above covers singular ``J`` (else the consistent-rhs checks there are weaker than they look)."""
    *_, J = build("socp")
    sv = torch.linalg.svdvals(J)
    assert bool((sv[:, -1] < 1e-10 * sv[:, 0]).any())


def test_zero_rhs_and_float32():
    data, _, jac, J = build("qp_cone")
    rhs = torch.randn(4, J.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rhs[1] = 0.0
    out = solve_kkt_krylov(data, jac, rhs)
    assert bool((out.z[1] == 0).all()) and int(out.iterations[1]) == 0 and bool(out.converged.all())
    jac32 = jac.map(lambda t: t.float())
    out32 = solve_kkt_krylov(data, jac32, rhs.float(), tol=1e-5)
    assert out32.z.dtype == torch.float32 and bool(out32.converged.all())
    assert float(relres(J, out32.z.double(), rhs)[[0, 2, 3]].max()) < 1e-4


# ---------------------------------------------------------------------------------------------- GMRES
def _random_system(B=4, N=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = 4.0 * torch.eye(N, dtype=torch.float64) + torch.randn(B, N, N, dtype=torch.float64, generator=gen) / N ** 0.5
    return M, torch.randn(B, N, dtype=torch.float64, generator=gen)


def test_gmres_solves_a_batched_nonsymmetric_system():
    M, b = _random_system()
    assert float((M - M.mT).abs().max()) > 0.1
    out = gmres(lambda z: apply_dense(M, z), b, tol=1e-12, restart=10)
    torch.testing.assert_close(out.z, torch.linalg.solve(M, b), rtol=1e-10, atol=1e-10)
    assert bool((out.residual <= 1e-12).all())
    assert 10 < int(out.iterations.max()) < 60  # restarted, and converged before N steps


def test_gmres_rhs_zero_and_per_instance_convergence():
    M, b = _random_system()
    M[2] = torch.diag(torch.logspace(-6, 0, M.shape[-1], dtype=torch.float64)) + 1e-3 * M[2]  # hard instance
    b[1] = 0.0
    out = gmres(lambda z: apply_dense(M, z), b, tol=1e-12, restart=8, max_iters=40)
    assert bool((out.z[1] == 0).all()) and float(out.residual[1]) == 0.0 and int(out.iterations[1]) == 0
    assert float(out.residual[2]) > 1e-6  # not converged, reported
    torch.testing.assert_close(out.residual[2], relres(M[2:3], out.z[2:3], b[2:3])[0], rtol=1e-8, atol=0)
    easy = [0, 3]
    alone = gmres(lambda z: apply_dense(M[easy], z), b[easy], tol=1e-12, restart=8, max_iters=40)
    torch.testing.assert_close(out.z[easy], alone.z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.z[easy], torch.linalg.solve(M[easy], b[easy]), rtol=1e-10, atol=1e-10)
    assert bool((out.iterations[easy] == alone.iterations).all())


def test_gmres_stops_counting_a_converged_instance():
    """``I + u v'`` has a Krylov space of dimension 2: GMRES solves it in 2 steps, even next to a hard instance."""
    gen = torch.Generator().manual_seed(4)
    N = 50
    u, v = torch.randn(2, N, dtype=torch.float64, generator=gen)
    M = torch.stack([torch.eye(N, dtype=torch.float64) + torch.outer(u, v) / N,
                     torch.diag(torch.logspace(-8, 0, N, dtype=torch.float64))])
    b = torch.randn(2, N, dtype=torch.float64, generator=gen)
    out = gmres(lambda z: apply_dense(M, z), b, tol=1e-12, restart=50, max_iters=30)
    assert int(out.iterations[0]) == 2 and int(out.iterations[1]) == 30
    torch.testing.assert_close(out.z[0], torch.linalg.solve(M[0], b[0]), rtol=1e-12, atol=1e-12)
    assert float(out.residual[0]) < 1e-12 < float(out.residual[1])


def test_gmres_right_preconditioning_returns_the_unpreconditioned_solution():
    M, b = _random_system(B=2)
    scale = torch.logspace(-3, 3, M.shape[-1], dtype=torch.float64)
    Ms = M * scale  # badly scaled columns; a Jacobi preconditioner undoes it
    plain = gmres(lambda z: apply_dense(Ms, z), b, tol=1e-11, restart=30, max_iters=120)
    pre = gmres(lambda z: apply_dense(Ms, z), b, tol=1e-11, restart=30, max_iters=120, precond=lambda v: v / scale)
    torch.testing.assert_close(pre.z, torch.linalg.solve(Ms, b), rtol=1e-8, atol=1e-12)
    assert int(pre.iterations.max()) < int(plain.iterations.max())


# ---------------------------------------------------------------------------------------------- large and sparse
def sparse_qp(n=3000, m=2000, seed=0):
    """minimize 1/2 sum(d x^2) + q'x  s.t.  A x <= h, A sparse (about 5 entries per row) with full row rank."""
    rng = np.random.default_rng(seed)
    R = sp.random(m, n, density=4.0 / n, random_state=seed, data_rvs=rng.standard_normal)
    A = (sp.hstack([sp.diags(rng.uniform(1, 2, m)), sp.csr_matrix((m, n - m))]) + R).tocsc()
    x, q, h = cp.Variable(n, name="x"), cp.Parameter(n, name="q"), cp.Parameter(m, name="h")
    d = rng.uniform(0.1, 1.0, n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(d, cp.square(x))) + q @ x), [A @ x <= h])
    return prob, lambda B, rng: {"q": rng.normal(size=(B, n)), "h": rng.uniform(0.0, 1.0, size=(B, m))}


def test_large_sparse_qp_converges_without_dense_matrices():
    prob, sample = sparse_qp()
    pp = ParametricProblem(prob, "qp")
    data = pp.canonicalize_vector(pp.parameter_vector(sample(2, np.random.default_rng(0)), dtype=torch.float64))
    n, m = data.n, data.m
    assert (n, m) == (3000, 2000) and data.A.nnz < 20_000
    pt = solution_point(data, "qp", eps=1e-6)
    lo, hi = torch.minimum(pt.w, data.l), torch.maximum(pt.w, data.u)  # D from the point, without dense data
    jac = kkt.DualJacobian(((pt.w <= lo) | (pt.w >= hi)).to(torch.float64), None, m)
    assert 100 < int(jac.diag.sum(1).min()) < m  # a real active set
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine may be shared: a fair time
    try:
        for transpose in (False, True):
            rhs = torch.randn(2, n + m, dtype=torch.float64, generator=gen)
            out = solve_kkt_krylov(data, jac, rhs, transpose=transpose, max_iters=1500)
            assert bool(out.converged.all()), out.residual
            # work, not wall time: about 470 iterations with the preconditioner, about 900 without it
            assert int(out.iterations.max()) <= 700, out.iterations
            # memory: every allocation of a short run (operator, preconditioner, a GMRES cycle, the refinement
            # residuals; the later iterations allocate the same) is small; a dense (2, m, n) alone is 96 MB
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                solve_kkt_krylov(data, jac, rhs, transpose=transpose, max_iters=20, restart=10)
            largest = max(e.cpu_memory_usage for e in prof.events())
            assert 0 < largest < 16 * 2 ** 20, largest
            # an independent check of the residual: scipy's sparse J per instance
            for i in range(2):
                inst = data.instance(i)
                A = sp.csr_matrix(inst.A)
                Dg = sp.diags(jac.diag[i].numpy())
                mat = sp.block_array([[inst.P, A.T @ Dg], [A, Dg - sp.eye(m)]]).tocsr()
                mat = mat.T if transpose else mat
                r = rhs[i].numpy() - mat @ out.z[i].numpy()
                assert np.linalg.norm(r) <= 1e-9 * np.linalg.norm(rhs[i].numpy())
    finally:
        torch.set_num_threads(threads)


def test_preconditioner_is_diagonal_and_helps_on_the_sparse_qp():
    """Fewer iterations with the Jacobi/Schur preconditioner (a measurement that can regress)."""
    prob, sample = sparse_qp(n=600, m=400, seed=1)
    pp = ParametricProblem(prob, "qp")
    data = pp.canonicalize_vector(pp.parameter_vector(sample(1, np.random.default_rng(1)), dtype=torch.float64))
    pt = solution_point(data, "qp", eps=1e-6)
    jac = kkt.DualJacobian(((pt.w <= data.l) | (pt.w >= data.u)).to(torch.float64), None, data.m)
    rhs = torch.randn(1, data.n + data.m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pre = kkt_preconditioner(data, jac)
    e = torch.zeros_like(rhs)
    e[0, 0] = 1.0
    assert float((pre(e) * (1 - e)).abs().max()) == 0.0  # diagonal
    with_pc = solve_kkt_krylov(data, jac, rhs, max_iters=2000)
    without = solve_kkt_krylov(data, jac, rhs, max_iters=2000, precondition=False)
    assert bool(with_pc.converged.all()) and bool(without.converged.all())
    assert int(with_pc.iterations[0]) < 0.8 * int(without.iterations[0])


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_constant_matrix_products_with_dense_rows_match_the_dense_matrix(batch, monkeypatch):
    from amortcvx.iterations import linalg
    from amortcvx.iterations.linalg import DENSE_ROW_MIN, ConstantMatrix

    monkeypatch.setattr(linalg, "SMALL_DENSE_ENTRIES", -1)  # the split (small matrices: the test below)
    monkeypatch.setattr(linalg, "SMALL_DENSE_PER_NONZERO", 0)
    rng = np.random.default_rng(5)
    r, c = 60, 2 * DENSE_ROW_MIN + 10
    mat = sp.random(r, c, density=0.02, random_state=4, format="lil")
    for i in (0, 7, 8, 59):  # rows dense enough for the dense block, at the ends and together
        mat[i] = rng.normal(size=c) * (rng.random(c) < 0.7)
    dense = torch.tensor(mat.toarray())
    product = ConstantMatrix(dense.to_sparse())
    assert product.rows.tolist() == [0, 7, 8, 59]  # the rest multiplied as CSR
    assert ConstantMatrix(dense[1:7].to_sparse()).rows.numel() == 0  # no dense row: CSR alone
    x = torch.tensor(rng.normal(size=(batch, c)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(batch, r)), requires_grad=True)
    torch.testing.assert_close(product.mv(x), x @ dense.mT)
    torch.testing.assert_close(product.rmv(y), y @ dense)
    (product.mv(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x @ dense.mT) @ dense)
    with monkeypatch.context() as patch:  # a block of at most two rows: the densest two
        patch.setattr(linalg, "DENSE_BLOCK_ENTRIES", 2 * c + 1)
        capped = ConstantMatrix(dense.to_sparse())
    half = dense.clone()
    half[[0, 7, 8, 59]] = 0  # dense rows using half the columns: the block holds only those
    half[[0, 7, 8, 59], : c // 2 + 1] = torch.tensor(rng.normal(size=(4, c // 2 + 1)))
    narrow = ConstantMatrix(torch.cat([half, half[:8]]).to_sparse())
    assert narrow.rows.tolist() == [0, 7, 8, 59, 60, 67] and narrow.block.shape[1] < c
    torch.testing.assert_close(narrow.mv(x.detach()), x.detach() @ torch.cat([half, half[:8]]).mT)
    y2 = torch.cat([y.detach(), y.detach()[:, :8]], dim=1)
    torch.testing.assert_close(narrow.rmv(y2), y2 @ torch.cat([half, half[:8]]))
    densest = torch.argsort((dense != 0).sum(1), descending=True, stable=True)[:2]
    assert sorted(capped.rows.tolist()) == sorted(densest.tolist())
    torch.testing.assert_close(capped.mv(x.detach()), x.detach() @ dense.mT)
    torch.testing.assert_close(capped.rmv(y.detach()), y.detach() @ dense)


@pytest.mark.parametrize("batch", [1, 40])
def test_small_constant_matrices_are_multiplied_densely_and_large_sparse_ones_as_csr(batch):
    from amortcvx.iterations.linalg import SMALL_DENSE_ENTRIES, SMALL_DENSE_PER_NONZERO, ConstantMatrix

    rng = np.random.default_rng(6)
    small = torch.tensor(sp.random(72, 22, density=0.2, random_state=1).toarray())  # the SOCP layer's size
    small[:, 3] = 0  # a column no row uses stays in the block: the product is the plain dense one
    product = ConstantMatrix(small.to_sparse())
    assert product.dense and product.rows.numel() == 72 and product.block.shape == (72, 22)
    x = torch.tensor(rng.normal(size=(batch, 22)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(batch, 72)))
    torch.testing.assert_close(product.mv(x), x @ small.mT)
    torch.testing.assert_close(product.rmv(y), y @ small)
    assert product.mv(x).is_contiguous() and product.rmv(y).is_contiguous()
    (product.mv(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x @ small.mT) @ small)
    r = c = 400  # 160,000 entries, 800 nonzeros: over the rule's bound, CSR
    large = torch.tensor(sp.random(r, c, density=0.005, random_state=2).toarray())
    nnz = int((large != 0).sum())
    assert r * c > SMALL_DENSE_ENTRIES + SMALL_DENSE_PER_NONZERO * nnz
    sparse_product = ConstantMatrix(large.to_sparse())
    assert not sparse_product.dense and sparse_product.rows.numel() == 0
    xl = torch.tensor(rng.normal(size=(batch, c)))
    torch.testing.assert_close(sparse_product.mv(xl), xl @ large.mT)
    torch.testing.assert_close(sparse_product.rmv(xl), xl @ large)


@pytest.mark.parametrize("shared", [True, False])
def test_sparse_operator_products_and_their_gradients_match_the_dense_matrix(shared):
    from amortcvx.canon.data import SparseBatch
    from amortcvx.iterations.linalg import SparseOperator

    rng = np.random.default_rng(21)
    B, r, c = 4, 7, 5
    pattern = sp.random(r, c, density=0.4, random_state=3, format="csc")
    values = torch.tensor(rng.normal(size=(1 if shared else B, pattern.nnz)))
    mat = SparseBatch(pattern.indices.astype(np.int64), pattern.indptr.astype(np.int64), (r, c), values, shared)
    op = SparseOperator(mat, torch.float64)
    assert (op.constant is not None) == shared  # one constant matrix: the CSR products
    dense = mat.to_dense().expand(B, r, c)
    x = torch.tensor(rng.normal(size=(B, c)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(B, r)), requires_grad=True)
    torch.testing.assert_close(op.matvec(x), (dense @ x.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(op.rmatvec(y), (dense.mT @ y.unsqueeze(-1)).squeeze(-1))
    (op.matvec(x).sum() + op.rmatvec(y).sum()).backward()
    torch.testing.assert_close(x.grad, dense.sum(dim=1))
    torch.testing.assert_close(y.grad, dense.sum(dim=2))
    # other values on the same pattern (rows masked, as for an active set): the pattern's parts are shared, the
    # products are those of the new values
    masked = SparseBatch(mat.indices, mat.indptr, (r, c), values * torch.tensor(rng.random(pattern.nnz) < 0.5), shared)
    other = SparseOperator(masked, torch.float64)
    assert other.sum_rows is op.sum_rows and other.cols is op.cols
    with torch.no_grad():
        torch.testing.assert_close(other.matvec(x), (masked.to_dense().expand(B, r, c) @ x.unsqueeze(-1)).squeeze(-1))
