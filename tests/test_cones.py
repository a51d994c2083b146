"""Tests of amortcvx.iterations.cones: batched torch projections onto the SCS cones.

References are independent: CVXPY projection problems solved by Clarabel, the SCS C solver itself (for the
row / svec conventions), CVXPY's own SCS data, and the Moreau decomposition.
"""

from __future__ import annotations

import functools
import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from amortcvx.canon.data import ConeDims
from amortcvx.iterations import cones
from amortcvx.iterations.cones import (
    cone_layout,
    dual_cone_distance,
    in_cone_distance,
    project_cone,
    project_dual_cone,
    project_exp,
    project_exp_dual,
    project_nonneg,
    project_psd,
    project_soc,
    smat,
    svec,
)

F64 = torch.float64
MIXED = ConeDims(zero=2, nonneg=3, soc=(3, 4, 3, 1), psd=(2, 3, 2, 1), exp=3)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------
# references: CVXPY projection problems solved by Clarabel (compiled once per shape, DPP)


@functools.cache
def _ref_problem(kind: str, size: int):
    if kind == "psd":
        v = cp.Parameter((size, size), symmetric=True)
        p = cp.Variable((size, size), symmetric=True)
        cons = [p >> 0]
    else:
        v = cp.Parameter(size)
        p = cp.Variable(size)
        if kind == "soc":
            cons = [cp.SOC(p[0], p[1:])] if size > 1 else [p[0] >= 0]
        elif kind == "exp":
            cons = [cp.constraints.ExpCone(p[0], p[1], p[2])]
        elif kind == "exp_dual":
            # K*_exp = {(u, v, w): u < 0, -u e^(v/u) <= e w}  <=>  (-v, -u, e w) in K_exp.
            cons = [cp.constraints.ExpCone(-p[1], -p[0], math.e * p[2])]
        else:
            raise AssertionError(kind)
    return cp.Problem(cp.Minimize(cp.sum_squares(p - v)), cons), v, p


def _reference(kind: str, point: np.ndarray, size: int) -> np.ndarray:
    prob, v, p = _ref_problem(kind, size)
    v.value = point
    with warnings.catch_warnings():
        # Clarabel may flag "inaccurate" at these tight tolerances; the status is checked below and the
        # comparison in _assert_projection allows for it.
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), prob.status
    return np.asarray(p.value)


def _violation(kind: str, p: np.ndarray, n: int = 0) -> float:
    """Independent membership check: how far ``p`` is from satisfying the cone's inequalities."""
    if kind == "soc":
        return max(0.0, float(np.linalg.norm(p[1:]) - p[0]))
    if kind == "psd":
        return max(0.0, -float(np.linalg.eigvalsh(smat(_t(p), n).numpy()).min()))
    if kind == "exp_dual":  # (u, v, w) in K*  <=>  (-v, -u, e w) in K
        p = np.array([-p[1], -p[0], math.e * p[2]])
    x, y, z = p
    if y > 0 and z > 0:  # y exp(x / y) <= z  <=>  x <= y log(z / y)
        return max(0.0, x - y * math.log(z / y))
    return max(0.0, -y) + max(0.0, -z) + (max(0.0, x) if y <= 0 else x)


def _assert_projection(kind: str, ours: torch.Tensor, point: np.ndarray, n: int = 0) -> None:
    """``ours`` is in the cone and is the nearest point: it matches Clarabel's projection, and is no farther
    from ``point`` than Clarabel's (interior-point answers are least accurate at degenerate points)."""
    ours = ours.detach().numpy()
    if kind == "psd":
        ref = svec(_t(_reference(kind, smat(_t(point), n).numpy(), n))).numpy()
    else:
        ref = _reference(kind, point, point.shape[0])
    scale = max(1.0, float(np.linalg.norm(point)))
    msg = f"point {point}: ours {ours} vs reference {ref}"
    assert _violation(kind, ours, n) <= 1e-9 * scale, msg
    assert np.linalg.norm(ours - point) <= np.linalg.norm(ref - point) + 1e-7 * scale, msg
    assert np.linalg.norm(ours - ref) <= 2e-5 * scale, msg


# ----------------------------------------------------------------------------------------------------------
# test points


def _soc_points(k: int, rng: np.random.Generator) -> np.ndarray:
    pts = [rng.standard_normal(k) * s for s in (0.1, 1.0, 10.0) for _ in range(3)]
    x = rng.standard_normal(k - 1)
    nx = float(np.linalg.norm(x))
    pts += [
        np.zeros(k),
        np.r_[nx + 0.5, x],          # inside
        np.r_[-nx - 0.5, x],         # in the polar
        np.r_[nx, x],                # on the boundary
        np.r_[-nx, x],               # on the polar boundary
        np.r_[0.3 * nx, x],          # outside, mixed
        np.r_[-1.0, np.zeros(k - 1)],
        np.r_[1.0, np.zeros(k - 1)],
    ]
    return np.stack(pts)


def _sym(n: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((n, n))
    return (a + a.T) / 2


def _psd_points(n: int, rng: np.random.Generator) -> np.ndarray:
    mats = [_sym(n, rng) * s for s in (0.1, 1.0, 10.0) for _ in range(2)]
    b = rng.standard_normal((n, n))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    rank_one = np.r_[2.0, np.zeros(n - 1)]
    mixed_repeated = np.r_[1.0, 1.0, -np.ones(max(n - 2, 0))][:n] if n > 1 else np.array([-1.0])
    mats += [
        np.zeros((n, n)),
        np.eye(n),
        b @ b.T,                                    # inside
        -(b @ b.T),                                 # in the polar
        (q * rank_one) @ q.T,                       # rank one: boundary
        (q * mixed_repeated) @ q.T,                 # repeated eigenvalues of both signs
    ]
    return np.stack([svec(_t(m)).numpy() for m in mats])


def _exp_points(rng: np.random.Generator) -> np.ndarray:
    pts = list(rng.standard_normal((12, 3)) * rng.choice([0.1, 1.0, 10.0], size=(12, 1)))
    for _ in range(3):
        x, y = rng.standard_normal(), abs(rng.standard_normal()) + 0.1
        pts.append([x, y, y * math.exp(x / y) + 0.3])          # interior of K
        pts.append([x, y, y * math.exp(x / y)])                # on the boundary of K
        u, w = -abs(rng.standard_normal()) - 0.1, rng.standard_normal()
        pts.append([-u, -w, u * math.exp(w / u) / math.e - 0.3])  # -z in K* (z in the polar)
        pts.append([-abs(rng.standard_normal()), -abs(rng.standard_normal()), rng.standard_normal()])  # x, y <= 0
    pts += [
        [0.0, 0.0, 0.0],
        [-1.0, 0.0, 1.0],        # boundary edge y = 0
        [-1.0, 0.0, -1.0],       # x <= 0, y = 0
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [1.0, 1.0, -1.0],
        [0.02475, -0.66678, 0.74484],        # near-edge, cancellation-prone region
        [-0.24405462, 0.00285669, -0.00911246],  # projection on the near-flat part y > 0, z ~ 0
        [2.7e-05, 2.3e-03, -3.3e03],         # root far in the exponential tail (rho ~ -17)
        [1.0e-04, 1.3e-02, -1.7e04],
    ]
    return np.asarray(pts, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# conventions (svec) against CVXPY and the SCS C solver


def test_svec_convention_and_isometry():
    rng = np.random.default_rng(0)
    n = 4
    a = _sym(n, rng)
    v = svec(_t(a)).numpy()
    expected = [a[i, j] * (1.0 if i == j else math.sqrt(2)) for j in range(n) for i in range(j, n)]
    np.testing.assert_allclose(v, expected, rtol=1e-14)
    b = _sym(n, rng)
    assert np.dot(v, svec(_t(b)).numpy()) == pytest.approx(np.trace(a @ b), rel=1e-12)
    np.testing.assert_allclose(smat(_t(v), n).numpy(), a, rtol=1e-14, atol=1e-15)
    batch = torch.randn(5, 2, 6, dtype=F64)
    assert torch.allclose(svec(smat(batch, 3)), batch)
    # svec reads the lower triangle only.
    lower = np.tril(a)
    np.testing.assert_allclose(svec(_t(lower)).numpy(), v, rtol=1e-14)


def test_svec_matches_cvxpy_scs_data():
    c = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    t = cp.Variable()
    prob = cp.Problem(cp.Minimize(t), [c + t * np.eye(3) >> 0])
    data, _, _ = prob.get_problem_data(cp.SCS)
    assert list(data["dims"].psd) == [3]
    np.testing.assert_allclose(data["b"], svec(_t(c)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(data["A"].toarray().ravel(), -svec(_t(np.eye(3))).numpy(), rtol=1e-12)


def test_project_cone_matches_scs_c_solver():
    """SCS solves min 1/2 |x|^2 - z'x s.t. -x + s = 0, s in K, i.e. x = Pi_K(z), with its own cone code."""
    import scs
    rng = np.random.default_rng(1)
    m = MIXED.size
    z = rng.standard_normal(m)
    eye = sp.identity(m, format="csc")
    data = {"P": eye, "A": -eye, "b": np.zeros(m), "c": -z}
    sol = scs.SCS(data, MIXED.to_scs(), eps_abs=1e-10, eps_rel=1e-10, max_iters=200000,
                  verbose=False).solve()
    assert sol["info"]["status"] == "solved"
    ours = project_cone(_t(z)[None], MIXED)[0].numpy()
    np.testing.assert_allclose(ours, sol["x"], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# each projection against Clarabel


def test_nonneg():
    z = _t([-1.0, 0.0, 2.0, -0.0, 3.5])
    np.testing.assert_array_equal(project_nonneg(z).numpy(), [0.0, 0.0, 2.0, 0.0, 3.5])


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_soc_against_clarabel(k):
    rng = np.random.default_rng(10 + k)
    pts = _soc_points(k, rng)
    ours = project_soc(_t(pts))
    for p, o in zip(pts, ours, strict=True):
        _assert_projection("soc", o, p)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_psd_against_clarabel(n):
    rng = np.random.default_rng(20 + n)
    pts = _psd_points(n, rng)
    ours = project_psd(_t(pts), n)
    for p, o in zip(pts, ours, strict=True):
        _assert_projection("psd", o, p, n)


def test_exp_against_clarabel():
    pts = _exp_points(np.random.default_rng(30))
    ours = project_exp(_t(pts))
    for p, o in zip(pts, ours, strict=True):
        _assert_projection("exp", o, p)


def test_exp_dual_against_clarabel():
    pts = _exp_points(np.random.default_rng(31))
    ours = project_exp_dual(_t(pts))
    for p, o in zip(pts, ours, strict=True):
        _assert_projection("exp_dual", o, p)


def test_exp_special_regions_exact():
    # z in K: unchanged; -z in K* (z in the polar): 0; x <= 0 and y <= 0: (x, 0, max(z, 0)).
    inside = _t([[0.5, 1.0, math.exp(0.5) + 1.0], [-1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [-3.0, 2.0, 1.0]])
    torch.testing.assert_close(project_exp(inside), inside, rtol=0, atol=0)
    polar = _t([[1.0, 0.5, -math.exp(-0.5) - 1.0], [0.0, -1.0, -1.0], [2.0, -1.0, -1.0]])
    torch.testing.assert_close(project_exp(polar), torch.zeros_like(polar), rtol=0, atol=0)
    neg = _t([[-1.0, -2.0, 3.0], [-1.0, -2.0, -3.0], [0.0, -1.0, 0.5]])
    torch.testing.assert_close(project_exp(neg), _t([[-1.0, 0.0, 3.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Moreau decomposition, idempotence, product cone


def _random_cone_points(cones: ConeDims, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(4 * torch.rand(batch, 1, generator=g, dtype=F64) - 2)
    return torch.randn(batch, cones.size, generator=g, dtype=F64) * scale


@pytest.mark.parametrize("cones", [
    ConeDims(nonneg=7), ConeDims(soc=(5, 1, 2)), ConeDims(psd=(4, 2, 1)), ConeDims(exp=40), MIXED,
], ids=["nonneg", "soc", "psd", "exp", "mixed"])
def test_moreau_decomposition(cones):
    z = _random_cone_points(cones, 64, seed=cones.size)
    p = project_cone(z, cones)
    d = project_dual_cone(-z, cones)
    scale = z.norm(dim=-1)
    # z = Pi_K(z) - Pi_{K*}(-z), with Pi_K(z) orthogonal to Pi_{K*}(-z).
    assert ((z - (p - d)).norm(dim=-1) <= 1e-12 * scale).all()
    assert ((p * d).sum(-1).abs() <= 1e-12 * scale**2).all()
    # Both parts lie in their cones (distance ~ rounding).
    assert (in_cone_distance(p, cones) <= 1e-12 * scale).all()
    assert (dual_cone_distance(d, cones) <= 1e-12 * scale).all()
    # Distance to K is the norm of the polar part.
    torch.testing.assert_close(in_cone_distance(z, cones), d.norm(dim=-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cones", [ConeDims(soc=(4,)), ConeDims(psd=(3,)), ConeDims(exp=30), MIXED],
                         ids=["soc", "psd", "exp", "mixed"])
def test_idempotent(cones):
    z = _random_cone_points(cones, 32, seed=7)
    for proj in (project_cone, project_dual_cone):
        p = proj(z, cones)
        torch.testing.assert_close(proj(p, cones), p, rtol=1e-10, atol=1e-12)


def test_product_matches_per_cone_calls():
    z = _random_cone_points(MIXED, 8, seed=3)
    z_copy = z.clone()
    p = project_cone(z, MIXED)
    d = project_dual_cone(z, MIXED)
    torch.testing.assert_close(z, z_copy, rtol=0, atol=0)  # not modified
    pe, de, row = [], [], 0
    pe.append(torch.zeros(8, 2, dtype=F64))
    de.append(z[:, 0:2])
    row = 2
    pe.append(project_nonneg(z[:, row:row + 3]))
    de.append(project_nonneg(z[:, row:row + 3]))
    row += 3
    for k in MIXED.soc:
        pe.append(project_soc(z[:, row:row + k]))
        de.append(project_soc(z[:, row:row + k]))
        row += k
    for n in MIXED.psd:
        w = n * (n + 1) // 2
        pe.append(project_psd(z[:, row:row + w], n))
        de.append(project_psd(z[:, row:row + w], n))
        row += w
    for _ in range(MIXED.exp):
        pe.append(project_exp(z[:, row:row + 3]))
        de.append(project_exp_dual(z[:, row:row + 3]))
        row += 3
    assert row == MIXED.size
    torch.testing.assert_close(p, torch.cat(pe, -1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(d, torch.cat(de, -1), rtol=1e-14, atol=1e-15)


def test_leading_dims_and_empty():
    z = _random_cone_points(MIXED, 6, seed=5)
    out = project_cone(z.reshape(2, 3, -1), MIXED)
    torch.testing.assert_close(out.reshape(6, -1), project_cone(z, MIXED), rtol=0, atol=0)
    empty = torch.zeros(4, 0, dtype=F64)
    assert project_cone(empty, ConeDims()).shape == (4, 0)


def test_layout_groups_and_permutation():
    lay = cone_layout(ConeDims(soc=(3, 3, 4)))
    assert lay.perm is None
    assert [(b.size, b.count) for b in lay.soc] == [(3, 2), (4, 1)]
    lay = cone_layout(MIXED)
    assert lay.perm is not None
    assert sorted(lay.perm.tolist()) == list(range(MIXED.size))
    assert cone_layout(MIXED) is lay  # cached


# ----------------------------------------------------------------------------------------------------------
# dtypes, errors


@pytest.mark.parametrize("cones", [ConeDims(soc=(5,)), ConeDims(psd=(4,)), ConeDims(exp=50), MIXED],
                         ids=["soc", "psd", "exp", "mixed"])
def test_float32_close_to_float64(cones):
    z64 = _random_cone_points(cones, 32, seed=11).to(torch.float32).to(F64)
    z32 = z64.to(torch.float32)
    for proj in (project_cone, project_dual_cone):
        out32 = proj(z32, cones)
        assert out32.dtype == torch.float32
        err = (out32.to(F64) - proj(z64, cones)).norm(dim=-1)
        assert (err <= 2e-5 * z64.norm(dim=-1)).all(), err.max()


def test_errors():
    with pytest.raises(ValueError, match=r"12 rows.*cover 38 rows"):
        project_cone(torch.zeros(2, 12, dtype=F64), MIXED)
    with pytest.raises(ValueError, match="39 rows.*38 rows"):
        project_dual_cone(torch.zeros(2, 39, dtype=F64), MIXED)
    with pytest.raises(ValueError, match="order 3 needs 6"):
        project_psd(torch.zeros(2, 5, dtype=F64), 3)
    with pytest.raises(ValueError, match="order"):
        project_psd(torch.zeros(2, 1, dtype=F64), 0)
    with pytest.raises(ValueError, match="must be 3"):
        project_exp(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="6 svec entries"):
        smat(torch.zeros(5, dtype=F64), 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        svec(torch.zeros(2, 3, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        project_cone(torch.zeros(2, MIXED.size, dtype=torch.int64), MIXED)
    with pytest.raises(ValueError, match="nonnegative"):
        cone_layout(ConeDims(zero=-1))


# ----------------------------------------------------------------------------------------------------------
# gradients


def test_gradcheck_soc():
    # Points in the mixed region (|t| < ||x||), away from the kinks.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    t = 0.5 * x.norm(dim=-1, keepdim=True) * (2 * torch.rand(6, 1, generator=g, dtype=F64) - 1)
    z = torch.cat([t, x], -1).requires_grad_()
    assert torch.autograd.gradcheck(project_soc, (z,))


def test_gradcheck_psd_distinct_and_repeated_eigenvalues():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(3, 4, 4, generator=g, dtype=F64))
    eig = torch.tensor([[2.0, 1.0, -0.5, -1.5], [3.0, 3.0, -1.0, 0.7], [-2.0, -2.0, 1.0, 1.0]], dtype=F64)
    x = (q * eig.unsqueeze(-2)) @ q.mT
    v = svec(x).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda u: project_psd(u, 4), (v,))


def test_psd_gradient_at_identity_and_zero_is_finite():
    v = svec(torch.eye(3, dtype=F64)).requires_grad_()
    (jac,) = torch.autograd.functional.jacobian(lambda u: project_psd(u, 3), (v,))
    torch.testing.assert_close(jac, torch.eye(6, dtype=F64))
    v0 = torch.zeros(6, dtype=F64, requires_grad=True)
    project_psd(v0, 3).sum().backward()
    assert torch.isfinite(v0.grad).all()


def test_gradcheck_exp():
    # Generic points (projection by the root of Friberg's function), away from the region boundaries.
    pts = _t([[1.0, 1.0, 1.0], [0.5, -1.0, 2.0], [2.0, 0.3, -0.5], [-1.0, 2.0, 0.1], [3.0, 1.0, 5.0],
              [0.2, 0.5, -1.0], [0.1, -1.0, 0.8], [-0.5, 0.05, -0.3]])
    z = pts.clone().requires_grad_()
    assert torch.autograd.gradcheck(project_exp, (z,))
    assert torch.autograd.gradcheck(project_exp_dual, (z,))
    # Interior of K: identity; interior of the polar: zero.
    inside = _t([[0.5, 1.0, 4.0]]).requires_grad_()
    (jac,) = torch.autograd.functional.jacobian(project_exp, (inside,))
    torch.testing.assert_close(jac.reshape(3, 3), torch.eye(3, dtype=F64))
    polar = _t([[1.0, 0.5, -3.0]])
    (jac,) = torch.autograd.functional.jacobian(project_exp, (polar,))
    torch.testing.assert_close(jac.reshape(3, 3), torch.zeros(3, 3, dtype=F64))
    # x < 0, y < 0, z > 0: Pi = (x, 0, z).
    neg = _t([[-1.0, -2.0, 3.0]])
    (jac,) = torch.autograd.functional.jacobian(project_exp, (neg,))
    torch.testing.assert_close(jac.reshape(3, 3), torch.diag(_t([1.0, 0.0, 1.0])))


def test_gradcheck_product_cone():
    z = _random_cone_points(MIXED, 3, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: project_cone(u, MIXED), (z,))
    assert torch.autograd.gradcheck(lambda u: project_dual_cone(u, MIXED), (z,))


def test_gradients_finite_at_special_points():
    soc = _t([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]).requires_grad_()
    project_soc(soc).sum().backward()
    assert torch.isfinite(soc.grad).all()
    exp = _t([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0],
              [1e-30, 1e-30, 1e-30], [1e300, 1e300, 1e300], [50.0, 1e-3, 1.0]]).requires_grad_()
    for f in (project_exp, project_exp_dual):
        out = f(exp)
        (grad,) = torch.autograd.grad(out.sum(), exp)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------------
# device


def test_eigh_in_chunks_matches_one_call(monkeypatch):
    """Batches beyond EIGH_CHUNK matrices are cut (one cuSOLVER call on 65,536 matrices failed on a GPU): the
    projection and its gradient are those of one call."""
    rng = np.random.default_rng(23)
    M = torch.tensor(rng.normal(size=(5, 2, 4, 4)))
    X = (M + M.mT).requires_grad_()
    whole = cones.project_psd(cones.svec(X), 4)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), X)
    monkeypatch.setattr(cones, "EIGH_CHUNK", 3)  # 10 matrices -> calls of 3, 3, 3 and 1
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: calls.append(A.shape[0]) or real(A))
    cut = cones.project_psd(cones.svec(X), 4)
    (g_cut,) = torch.autograd.grad(cut.square().sum(), X)
    assert calls == [3, 3, 3, 1]
    torch.testing.assert_close(cut, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_cut, g_whole, rtol=0, atol=1e-12)
    w, V = cones.eigh(X.detach())
    assert w.shape == (5, 2, 4) and V.shape == (5, 2, 4, 4)
    torch.testing.assert_close(V @ torch.diag_embed(w) @ V.mT, X.detach(), rtol=0, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_matches_cpu():
    z = _random_cone_points(MIXED, 16, seed=9)
    for dtype in (F64, torch.float32):
        zc = z.to("cuda", dtype).requires_grad_()
        for proj in (project_cone, project_dual_cone):
            out = proj(zc, MIXED)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), proj(z.to(dtype), MIXED), rtol=1e-4, atol=1e-5)
            out.sum().backward()
            assert torch.isfinite(zc.grad).all()
            zc.grad = None


# ----------------------------------------------------------------------------------------------------------
# exp cone: the default (few, fixed) Newton steps against a high-accuracy reference, incl. hard cases


def _exp_hard_points(num: int, seed: int) -> np.ndarray:
    """Random triples of magnitudes e^U(-10, 10), and points within e^-30 .. 1 (relative) of the boundaries of
    K and of its polar (where the root sits next to a bracket end and a, b cancel)."""
    rng = np.random.default_rng(seed)
    wide = rng.standard_normal((num, 3)) * np.exp(rng.uniform(-10, 10, (num, 3)))
    rho = rng.uniform(-20, 20, num)
    a = np.exp(rng.uniform(-5, 5, num))
    on_k = np.stack([a * rho, a, a * np.exp(rho)], 1)
    normal = np.stack([np.ones(num), 1 - rho, -np.exp(-rho)], 1) * np.exp(rng.uniform(-5, 5, num))[:, None]
    tiny = np.exp(rng.uniform(-30, 0, (num, 1)))
    return np.concatenate([wide, on_k + normal * tiny, normal + on_k * tiny, on_k, normal])


def test_exp_default_steps_match_high_accuracy_reference():
    """The default number of Newton steps reaches the 60-step answer to rounding on hard points, for both the
    projection and the dual projection; two steps do not (so the comparison can fail)."""
    from amortcvx.iterations.cones import EXP_NEWTON_ITERS

    assert EXP_NEWTON_ITERS <= 6
    x = _t(_exp_hard_points(4000, seed=3))
    scale = x.norm(dim=1).clamp_min(1)
    for fn in (project_exp, project_exp_dual):
        ref = fn(x, newton_iters=60)
        err = ((fn(x) - ref).norm(dim=1) / scale).max()
        assert err < 1e-13, (fn.__name__, float(err))
        rough = ((fn(x, newton_iters=2) - ref).norm(dim=1) / scale).max()
        assert rough > 1e-8, (fn.__name__, float(rough))


def test_exp_default_steps_satisfy_optimality_conditions():
    """Reference-free: p = Pi_K(v) lies in K, v - p in the polar (p - v in K*), and <p, p - v> = 0, to rounding,
    on hard points (Moreau's characterization of the projection)."""
    v = _t(_exp_hard_points(2000, seed=4))
    p = project_exp(v)
    d = p - v
    scale = v.norm(dim=1).clamp_min(1)
    assert ((p - project_exp(p, newton_iters=60)).norm(dim=1) / scale).max() < 1e-12
    assert ((d - project_exp_dual(d, newton_iters=60)).norm(dim=1) / scale).max() < 1e-12
    assert ((p * d).sum(1).abs() / scale**2).max() < 1e-12


def test_exp_projection_without_grad_equals_with_grad():
    """The inference path (no implicit-gradient correction built) gives the same values as the autograd path."""
    v = _t(_exp_hard_points(200, seed=5))
    with torch.no_grad():
        plain = project_exp_dual(v)
    tracked = project_exp_dual(v.clone().requires_grad_(True))
    assert torch.equal(plain, tracked.detach())
