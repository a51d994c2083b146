"""Optimality conditions as a normal map, its Jacobian, Newton refinement and implicit differentiation.

Both canonical forms are written as one nonsmooth equation ``F(x, w; data) = 0`` in a primal ``x`` (length n)
and a combined dual-slack variable ``w`` (length m), with ``y(w)`` the dual and ``t(w)`` the constraint
target:

    F1 = P x + A' y(w) + c          (dual residual)
    F2 = A x - t(w)                 (primal residual)

* cone form (``min 1/2 x'Px + c'x  s.t.  Ax + s = b, s in K``): ``y = Pi_K*(w)``, ``s = y - w = Pi_K(-w)``
  (Moreau), ``t = b - s``; a solution ``(x, y, s)`` gives ``w = y - s``.
* QP form (``min 1/2 x'Px + q'x  s.t.  l <= Ax <= u``): ``z = Pi_[l,u](w)``, ``y = w - z``, ``t = z``; a
  solution ``(x, y)`` gives ``z = clip(Ax, l, u)``, ``w = z + y``.

``F = 0`` holds exactly at the primal-dual solutions (``y in K*``, ``s in K``, ``y's = 0`` follow from the
projection). With ``D = dy/dw`` (``dt/dw = I - D`` in both forms) the Jacobian is

    J = [[P, A' D], [A, D - I]].

Newton's method on ``F`` (semismooth; on LPs and QPs one step is an exact solve on the active set given by
``w``) refines a solver's point to machine accuracy, and the implicit function theorem at the refined point
gives the derivative of the solution: ``d(x, w) = -J^-1 dF/d data``. :class:`ImplicitSolution` is the autograd
function that returns a solution and back-propagates through it with one batched ``J'`` solve per backward.
Batched. A :func:`dense` batch eliminates ``w`` and factors one ``(B, k, k)`` matrix per solve, ``k`` the
dimension left free by the equality constraints (:func:`solve_kkt`, :class:`NullSpace`; small and medium
problems); a :func:`sparse` batch keeps the canonical sparse matrices and solves matrix-free by preconditioned
GMRES (:mod:`amortcvx.iterations.krylov`; large sparse problems).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from amortcvx.canon.data import ConeData, QPData, SharedMemo, SparseBatch
from amortcvx.iterations.cones import cone_layout, eigh, project_dual_cone, smat
from amortcvx.iterations.krylov import solve_kkt_krylov
from amortcvx.iterations.linalg import (
    ConstantMatrix,
    cholesky_solve,
    dense_batch,
    flagged_rows,
    matvec,
    rmatvec,
    sparse_operator,
)

Data = ConeData | QPData


class Point(NamedTuple):
    """A primal-dual point in the normal-map variables: ``x`` (B, n), ``w`` (B, m)."""

    x: torch.Tensor
    w: torch.Tensor


class Batch(NamedTuple):
    """The data of a batch as the functions of this module use it (float64).

    ``P`` and ``A`` are dense tensors (leading dimension 1 when shared by the batch; built by :func:`dense`:
    factorized solves) or the canonical :class:`~amortcvx.canon.data.SparseBatch` es (built by :func:`sparse`:
    matrix-free Krylov solves, for large problems). ``lin`` is ``c`` (cone form) or ``q`` (QP form); ``b`` is set
    in the cone form, ``l``/``u`` in the QP form.
    """

    P: torch.Tensor | SparseBatch | None
    A: torch.Tensor | SparseBatch
    lin: torch.Tensor
    b: torch.Tensor | None
    l: torch.Tensor | None
    u: torch.Tensor | None
    data: Data

    @property
    def n(self) -> int:
        """Number of primal variables."""
        return int(self.A.shape[-1])


def _vectors(data: Data, dtype: torch.dtype) -> tuple:
    if isinstance(data, ConeData):
        return data.c.to(dtype), data.b.to(dtype), None, None
    return data.q.to(dtype), None, data.l.to(dtype), data.u.to(dtype)


KRYLOV_SIZE = 2000
""":func:`linear_algebra` chooses matrix-free solves when ``n + m`` of the canonical problem exceeds this (unless
its shared equality rows allow the reduced dense path, :data:`REDUCED_LIMITS`): the dense path stores ``(B, m,
n)`` copies of a parameter-dependent ``A`` and factors ``(B, k, k)`` matrices."""

REDUCED_LIMITS = (2000, 4_000_000)
"""Beyond :data:`KRYLOV_SIZE`, a problem whose ``A`` is shared and has equality rows keeps the dense path while
``n`` and ``m n`` are at most these: its factored size is ``n - rank(A_e)`` (:class:`NullSpace`, one SVD of at
most ``2000`` columns per problem), its products are CSR (:class:`Rows`), and a single dense copy of ``A`` is
kept (MPC large, ``n = 624``, ``m = 1704``: 120 free dimensions; a Newton step about 1 ms per instance at batch
32 against 0.15 s matrix-free)."""


def linear_algebra(n: int, m: int, *, equalities: int = 0, shared: bool = False) -> str:
    """The key of :data:`BATCHES` that ``"auto"`` (the layer's ``linear_algebra``, :func:`auto`) means for a
    problem of this size: ``"dense"`` up to :data:`KRYLOV_SIZE` (``n + m``), or beyond it for a shared ``A``
    with ``equalities`` rows within :data:`REDUCED_LIMITS`; else ``"krylov"``."""
    if n + m <= KRYLOV_SIZE:
        return "dense"
    reducible = shared and equalities > 0 and n <= REDUCED_LIMITS[0] and m * n <= REDUCED_LIMITS[1]
    return "dense" if reducible else "krylov"


def problem_linear_algebra(pp) -> str:
    """:func:`linear_algebra` of a compiled problem (a :class:`~amortcvx.canon.parametric.ParametricProblem`): its
    sizes, its equality rows and whether its ``A`` depends on the parameters."""
    return linear_algebra(pp.n, pp.m, equalities=pp.cones.zero, shared=not pp.dependent["A"])


def auto(data: Data, dtype: torch.dtype = torch.float64) -> Batch:
    """The :data:`BATCHES` builder :func:`linear_algebra` chooses for ``data``."""
    choice = linear_algebra(data.n, data.m, equalities=equality_rows(data), shared=data.A.shared)
    return BATCHES[choice](data, dtype)


def dense(data: Data, dtype: torch.dtype = torch.float64) -> Batch:
    """A batch with dense copies of ``P`` and ``A`` (differentiable with respect to the data)."""
    P = None if data.P is None else dense_batch(data.P, dtype=dtype)
    return Batch(P, dense_batch(data.A, dtype=dtype), *_vectors(data, dtype), data)


def sparse(data: Data, dtype: torch.dtype = torch.float64) -> Batch:
    """A batch that keeps the sparse ``P`` and ``A``: every product is sparse and every solve matrix-free
    (:mod:`amortcvx.iterations.krylov`); nothing of size ``(B, m, n)`` is formed."""
    return Batch(data.P, data.A, *_vectors(data, dtype), data)


BATCHES = {"dense": dense, "krylov": sparse}
"""How refinement and backward solve with the Jacobian: batched factorizations, or matrix-free Krylov solves."""


SPARSE_DENSITY = 0.1
"""A shared constant ``A`` of a dense batch is multiplied as a CSR matrix when at most this share of its entries
is nonzero (:class:`Rows`; MPC large, 0.015: 0.27 against 1.9 ms per product at batch 32)."""


class Rows(NamedTuple):
    """Products with the rows ``start:`` of a dense batch's ``A`` (``start`` 0: all of it): a
    :class:`~amortcvx.iterations.linalg.ConstantMatrix` of a shared, constant, sparse ``A`` (memoized per
    problem), else the dense tensor (the same numbers; the dense path keeps products differentiable)."""

    mat: torch.Tensor
    constant: ConstantMatrix | None

    def _fast(self, v: torch.Tensor) -> bool:
        return self.constant is not None and not v.requires_grad and v.dtype == self.constant.dtype

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """``A_rows x`` for ``x`` (B, n)."""
        return self.constant.mv(x) if self._fast(x) else matvec(self.mat, x)

    def rmv(self, y: torch.Tensor) -> torch.Tensor:
        """``A_rows' y`` for ``y`` (B, rows)."""
        return self.constant.rmv(y) if self._fast(y) else rmatvec(self.mat, y)


def _sparse_shared(dense: torch.Tensor, mat: SparseBatch) -> bool:
    """Whether products with a dense batch's matrix ``dense`` (built from ``mat``) go through CSR: shared by the
    batch, constant (no gradient) and at most :data:`SPARSE_DENSITY` nonzero."""
    return (dense.shape[0] == 1 and not dense.requires_grad and mat.shared
            and mat.values.shape[-1] <= SPARSE_DENSITY * dense.shape[1] * dense.shape[2])


def rows(d: Batch, start: int = 0) -> Rows:
    """:class:`Rows` of ``d.A[start:]`` (a dense batch)."""
    A = d.A[:, start:] if start else d.A
    if not _sparse_shared(d.A, d.data.A):  # the whole A's density
        return Rows(A, None)

    def build() -> Rows:
        return Rows(A, ConstantMatrix(A[0].detach()))
    return _CSR.get(d.data.A, ("csr", start, A.dtype, str(A.device)), build)


def p_rows(d: Batch) -> Rows:
    """:class:`Rows` of a dense batch's ``P`` (symmetric: its products with ``P'`` are those with ``P``), CSR under
    the same rule as ``A`` in :func:`rows` (:func:`_sparse_shared`). MPC large's diagonal ``P`` (624 entries of
    389,376): the dense product is a ``624 x 624`` matrix read per instance."""
    P = d.P
    if not _sparse_shared(P, d.data.P):
        return Rows(P, None)

    def build() -> Rows:
        return Rows(P, ConstantMatrix(P[0].detach()))
    return _CSR.get(d.data.P, ("csr P", P.dtype, str(P.device)), build)


_CSR = SharedMemo()


def _p_mv(d: Batch, x: torch.Tensor) -> torch.Tensor:
    """``P_i x_i`` for a dense batch (:func:`p_rows`) or a sparse one."""
    return sparse_operator(d.P, x.dtype).matvec(x) if isinstance(d.P, SparseBatch) else p_rows(d).mv(x)


def _a_mv(d: Batch, x: torch.Tensor) -> torch.Tensor:
    return sparse_operator(d.A, x.dtype).matvec(x) if isinstance(d.A, SparseBatch) else rows(d).mv(x)


def _a_rmv(d: Batch, y: torch.Tensor) -> torch.Tensor:
    return sparse_operator(d.A, y.dtype).rmatvec(y) if isinstance(d.A, SparseBatch) else rows(d).rmv(y)


def dual_of(d: Batch, w: torch.Tensor) -> torch.Tensor:
    """``y(w)``: ``Pi_K*(w)`` (cone form) or ``w - clip(w, l, u)`` (QP form)."""
    if d.b is not None:
        return project_dual_cone(w, d.data.cones)
    return w - torch.minimum(torch.maximum(w, d.l), d.u)


def slack_of(d: Batch, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cone form's slack ``s = y - w``, or the QP form's ``z = clip(w, l, u)`` (``= w - y``; computed as the
    projection so that ``l <= z <= u`` holds exactly and ``z`` sits exactly on the bound where ``y != 0``)."""
    return y - w if d.b is not None else torch.minimum(torch.maximum(w, d.l), d.u)


def warm_start_fields(d: Batch, pt: Point) -> dict[str, torch.Tensor]:
    """A point as a solver's warm-start fields: ``x``, ``y = y(w)`` and, in the cone form, ``s = y - w``
    (the inverse of :func:`point_from_solution`)."""
    y = dual_of(d, pt.w)
    if d.b is None:
        return {"x": pt.x, "y": y}
    return {"x": pt.x, "y": y, "s": slack_of(d, pt.w, y)}


def point_from_solution(d: Batch, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None) -> Point:
    """The normal-map point of a solver's answer: ``w = y - s`` (cone form), ``w = clip(Ax, l, u) + y`` (QP form;
    ``s`` unused)."""
    if d.b is not None:
        return Point(x, y - s)
    return Point(x, torch.minimum(torch.maximum(_a_mv(d, x), d.l), d.u) + y)


def residual(d: Batch, pt: Point) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F1, F2)`` of the module docstring, batched; differentiable in the data and the point."""
    y = dual_of(d, pt.w)
    f1 = _a_rmv(d, y) + d.lin
    if d.P is not None:
        f1 = f1 + _p_mv(d, pt.x)
    ax = _a_mv(d, pt.x)
    f2 = ax - (d.b - (y - pt.w)) if d.b is not None else ax - (pt.w - y)
    return f1, f2


def residual_norm(d: Batch, pt: Point) -> torch.Tensor:
    """``||F||_inf`` per instance (B,)."""
    f1, f2 = residual(d, pt)
    return torch.cat([f1, f2], dim=1).abs().amax(dim=1)


def _gather(start: int | None, index: torch.Tensor, g: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A cone group's rows of ``g`` along ``dim`` (rows counted from ``lin``; :class:`SocGroup`), that dimension
    split into (count, k): (B, count, k) for vectors (B, rows), (., count, k, c) for matrices (., rows, c) with
    ``dim=-2``."""
    count, k = index.shape
    part = g.narrow(dim, start, count * k) if start is not None else g.index_select(dim, index.reshape(-1))
    return part.unflatten(dim, (count, k))


def _scatter_(start: int | None, index: torch.Tensor, out: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` (B, count, k) into a cone group's entries of ``out`` (B, rows from ``lin`` on)."""
    if start is not None:
        out[:, start:start + index.numel()] = value.reshape(value.shape[0], -1)
    else:
        out[:, index] = value


class SocGroup(NamedTuple):
    """``D`` on the second-order cones of one size ``k``: per cone ``alpha I + V C V'`` with ``V = [e_0, (0, u)]``
    (``k x 2``), the closed form of the projection's Jacobian (:func:`soc_parts`).

    Attributes:
        start: the group's first row, counted from the first row after the diagonal ones (``lin``), when its
            cones are contiguous, else None.
        index: (count, k) int64: each cone's rows, counted from ``lin``.
        alpha: (B, count).
        u: (B, count, k), ``u[..., 0] = 0``: ``(0, x / ||x||)`` of each cone's ``z = (t, x)`` (0 where ``x = 0``).
        C: (B, count, 2, 2).
    """

    start: int | None
    index: torch.Tensor
    alpha: torch.Tensor
    u: torch.Tensor
    C: torch.Tensor

    def apply(self, g: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``(alpha I + V C V') g`` per cone (``C'`` with ``transpose``) for ``g`` (B, count, k): O(k) per cone."""
        p0, p1 = g[..., :1], (self.u * g).sum(dim=-1, keepdim=True)  # V' g
        C = self.C.mT if transpose else self.C
        q = C[..., 0] * p0 + C[..., 1] * p1  # C V' g, (B, count, 2), without a batched 2 x 2 product
        out = torch.addcmul(self.alpha.unsqueeze(-1) * g, q[..., 1:], self.u)
        out[..., 0] += q[..., 0]
        return out

    def dense(self) -> torch.Tensor:
        """Each cone's ``alpha I + V C V'`` as a dense (B, count, k, k) tensor."""
        V = torch.stack([torch.zeros_like(self.u), self.u], dim=-1)
        V[..., 0, 0] = 1.0
        eye = torch.eye(self.u.shape[-1], dtype=self.u.dtype, device=self.u.device)
        return self.alpha[..., None, None] * eye + V @ self.C @ V.mT

    def gram11(self) -> torch.Tensor:
        """``||u||^2`` per cone (1, or 0 where ``x = 0``): ``V'V = diag(1, ||u||^2)``."""
        return (self.u * self.u).sum(dim=-1)

    def diagonal(self) -> torch.Tensor:
        """Each cone's diagonal, (B, count, k)."""
        out = self.alpha.unsqueeze(-1) + self.C[..., 1, 1].unsqueeze(-1) * self.u * self.u
        out[..., 0] = self.alpha + self.C[..., 0, 0]
        return out

    def transposed(self) -> SocGroup:
        return self._replace(C=self.C.mT)

    def weights(self, delta: float) -> tuple[SocGroup, SocGroup]:
        """``R = ((1 + delta) I - D)^-1`` and ``M = D R`` on these cones, of the same form: with ``a = 1 + delta -
        alpha``, ``(a I - V C V')^-1 = (I + V C X V') / a`` for ``X = (a I - V'V C)^-1`` (Woodbury; ``2 x 2``), and
        ``D R = alpha / a I + V (alpha C_r + C / a + C V'V C_r) V'``."""
        a = 1.0 + delta - self.alpha
        C, g11 = self.C, self.gram11()

        def gram_times(X: torch.Tensor) -> torch.Tensor:  # V'V X, V'V = diag(1, g11)
            return torch.stack([X[..., 0, :], g11.unsqueeze(-1) * X[..., 1, :]], dim=-2)
        X = _inverse2(a[..., None, None] * torch.eye(2, dtype=C.dtype, device=C.device) - gram_times(C))
        C_r = (C @ X) / a[..., None, None]
        C_m = self.alpha[..., None, None] * C_r + C / a[..., None, None] + C @ gram_times(C_r)
        return self._replace(alpha=1.0 / a, C=C_r), self._replace(alpha=self.alpha / a, C=C_m)

    def schur(self, Ag: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """``A_g' (alpha I + V C V') A_g`` summed over the cones, for their rows ``Ag`` (1 or B, count, k, dim) of a
        matrix: ``sum alpha_i a_i a_i'`` over the rows plus, per cone, the rank-two ``W' C W``, ``W = V' A_cone``.
        ``gram``: for a matrix shared by the batch, each cone's ``A_cone' A_cone`` flattened, (count, dim * dim)
        (:func:`_soc_grams`); the first sum is then one product ``alpha @ gram`` instead of a batched one with ``k``
        times the work."""
        count, k = self.index.shape
        if gram is not None:
            dim = Ag.shape[-1]
            out = (self.alpha @ gram).reshape(self.alpha.shape[0], dim, dim)
        else:
            flat = Ag.reshape(Ag.shape[0], count * k, -1)
            out = (flat.mT * self.alpha.repeat_interleave(k, dim=1)[:, None, :]) @ flat
        W = torch.stack([Ag[..., 0, :].expand(self.u.shape[0], -1, -1), (self.u.unsqueeze(-2) @ Ag).squeeze(-2)],
                        dim=2)  # (B, count, 2, dim)
        return out + W.reshape(W.shape[0], 2 * count, -1).mT @ (self.C @ W).reshape(W.shape[0], 2 * count, -1)


class PsdGroup(NamedTuple):
    """``D`` on the PSD cones of one order: per cone ``Q diag(gamma) Q'`` in svec coordinates, ``Q`` orthogonal
    (:func:`psd_parts`), so that ``(c I - D)^-1`` is ``Q diag(1 / (c - gamma)) Q'``: no inverse to compute.

    Attributes:
        start, index: the cones' rows (see :class:`SocGroup`), ``k = order (order + 1) / 2`` each.
        Q: (B, count, k, k).
        gamma: (B, count, k).
    """

    start: int | None
    index: torch.Tensor
    Q: torch.Tensor
    gamma: torch.Tensor

    def apply(self, g: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``Q (gamma * (Q' g))`` per cone for ``g`` (B, count, k) (``D`` is symmetric)."""
        # row vectors times matrices: see :func:`~amortcvx.iterations.linalg.matvec`
        return ((self.gamma * (g.unsqueeze(-2) @ self.Q).squeeze(-2)).unsqueeze(-2) @ self.Q.mT).squeeze(-2)

    def dense(self) -> torch.Tensor:
        """Each cone's ``D`` as a dense (B, count, k, k) tensor."""
        return (self.Q * self.gamma.unsqueeze(-2)) @ self.Q.mT

    def diagonal(self) -> torch.Tensor:
        """Each cone's diagonal, (B, count, k)."""
        return (self.Q * self.Q * self.gamma.unsqueeze(-2)).sum(dim=-1)

    def transposed(self) -> PsdGroup:
        return self

    def weights(self, delta: float) -> tuple[PsdGroup, PsdGroup]:
        """``R = ((1 + delta) I - D)^-1`` and ``M = D R``: the same ``Q``, eigenvalues ``1 / (1 + delta - gamma)``
        and ``gamma / (1 + delta - gamma)``."""
        r = 1.0 / (1.0 + delta - self.gamma)
        return self._replace(gamma=r), self._replace(gamma=self.gamma * r)

    def schur(self, Ag: torch.Tensor) -> torch.Tensor:
        """``A_g' D A_g`` summed over the cones (see :meth:`SocGroup.schur`): ``W' diag(gamma) W`` with
        ``W = Q' A_cone``."""
        count, k = self.index.shape
        W = (self.Q.mT @ Ag).reshape(self.Q.shape[0], count * k, -1)
        return (W.mT * self.gamma.reshape(self.Q.shape[0], 1, count * k)) @ W


@functools.lru_cache(maxsize=32)
def _psd_pairs(order: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The svec entries' rows and columns ``(r, c)`` (lower triangle, column by column), the coefficients ``w_p w_q /
    2`` (``w = sqrt 2`` off the diagonal, 1 on it) flattened over ``(p, q)``, and the positions in a flattened ``V``
    of ``V[r_p, r_q]``, ``V[c_p, c_q]``, ``V[r_p, c_q]`` and ``V[c_p, r_q]`` (:func:`psd_parts`; cached per order,
    device and dtype)."""
    pairs = [(i, j) for j in range(order) for i in range(j, order)]
    r = torch.tensor([i for i, _ in pairs], device=device)
    c = torch.tensor([j for _, j in pairs], device=device)
    w = torch.where(r == c, torch.ones((), dtype=dtype), torch.full((), 2.0, dtype=dtype).sqrt()).to(device)
    flat = tuple((a[:, None] * order + b[None, :]).reshape(-1) for a, b in ((r, r), (c, c), (r, c), (c, r)))
    return r, c, (w[:, None] * w[None, :] / 2).reshape(-1), flat


def soc_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Jacobian of :func:`~amortcvx.iterations.cones.project_soc` at ``z`` (..., k) as ``alpha I + V C V'``,
    ``V = [e_0, (0, u)]``: returns ``alpha`` (...), ``u`` (..., k) and ``C`` (..., 2, 2).

    With ``z = (t, x)``, ``r = ||x||``, ``u = x / r``, ``rho = t / r``: the identity where ``r <= t``
    (``alpha = 1``, ``C = 0``), zero where ``r <= -t``, else ``1/2 [[1, u'], [u, (1 + rho) I - rho u u']]``:
    ``alpha = (1 + rho) / 2`` and ``C = [[-rho, 1], [1, -rho]] / 2`` (the one-sided choices of ``project_soc``
    on the boundaries).
    """
    t = z[..., 0]
    r = torch.linalg.vector_norm(z[..., 1:], dim=-1)
    safe_r = torch.where(r > 0, r, 1.0)
    u = z / safe_r.unsqueeze(-1)
    u[..., 0] = 0.0
    rho = t / safe_r
    inside = r <= t
    half = 0.5 * (~(inside | (r <= -t))).to(z.dtype)  # 1/2 between the cones, else 0
    # (1 + rho) / 2 is in [0, 1] between the cones and <= 0 in the polar cone
    alpha = torch.where(inside, 1.0, (0.5 * (1.0 + rho)).clamp(0.0, 1.0))
    diag = -half * rho
    C = torch.stack([diag, half, half, diag], dim=-1).unflatten(-1, (2, 2))
    return alpha, u, C


def psd_parts(z: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Jacobian of :func:`~amortcvx.iterations.cones.project_psd` at ``z`` (..., k(k+1)/2) as ``Q diag(gamma)
    Q'`` in svec coordinates: returns ``Q`` (..., N, N), orthogonal, and ``gamma`` (..., N).

    With ``smat(z) = V diag(l) V'``, the derivative applied to a symmetric ``H`` is ``V (Gamma o (V' H V)) V'``
    with ``Gamma_ij = 1`` where both eigenvalues are positive, 0 where both are ``<= 0`` and the divided
    difference ``(l_i^+ - l_j^+) / (l_i - l_j)`` otherwise (the one-sided choices of the projection's own
    backward): diagonal in the orthonormal basis ``v_i v_i'``, ``(v_i v_j' + v_j v_i') / sqrt 2`` of the symmetric
    matrices, whose svec vectors are the columns of ``Q``: ``Q[(a, b), (i, j)] = w_ab w_ij / 2 (V_ai V_bj +
    V_aj V_bi)`` (``w = sqrt 2`` off the diagonal, 1 on it).
    """
    eig, V = eigh(smat(z, order))
    wi, wj = eig.unsqueeze(-1), eig.unsqueeze(-2)
    pi, pj = wi > 0, wj > 0
    mixed = pi ^ pj
    divided = (wi.clamp_min(0) - wj.clamp_min(0)) / torch.where(mixed, wi - wj, torch.ones_like(wi - wj))
    Gamma = torch.where(pi & pj, torch.ones_like(divided), torch.where(mixed, divided, torch.zeros_like(divided)))
    r, c, coef, flat = _psd_pairs(order, z.device, z.dtype)
    # Q[p, q] for the svec entries p = (a, b), q = (i, j): V_ai V_bj + V_aj V_bi, gathered from V's entries as rows
    # of an (order^2, instances) matrix (a gather along the first dimension: about 5x faster than along the last here)
    N = r.shape[0]
    rows = V.reshape(-1, order * order).t().contiguous()
    v_ai, v_bj, v_aj, v_bi = (rows.index_select(0, i) for i in flat)
    Q = torch.addcmul(v_ai * v_bj, v_aj, v_bi).mul_(coef[:, None])
    return Q.t().reshape(*V.shape[:-2], N, N).contiguous(), Gamma[..., r, c]


class DualJacobian(NamedTuple):
    """``D = dy/dw`` per instance: a diagonal on the first ``lin`` rows, the second-order and PSD cones'
    structured blocks on the next rows, a dense block on the rest.

    Attributes:
        diag: (B, m): the diagonal on rows ``< lin`` (0 beyond).
        block: (B, r, r) Jacobian of the projection onto the last ``r`` rows (with exp cones: every nonlinear
            row), or None.
        lin: the number of rows with a diagonal Jacobian (zero and nonnegative cones; all rows of a QP).
        soc: the second-order cones' rows, one :class:`SocGroup` per cone size: products cost O(k) per cone, not
            O(k^2) (the SOCP layer's forward+backward 2.4x faster than with a dense block: docs/layers.md).
        psd: the PSD cones' rows, one :class:`PsdGroup` per order (its eigenbasis: the elimination weights
            without an inverse).
    """

    diag: torch.Tensor
    block: torch.Tensor | None
    lin: int
    soc: tuple[SocGroup, ...] = ()
    psd: tuple[PsdGroup, ...] = ()

    @property
    def groups(self) -> tuple[SocGroup | PsdGroup, ...]:
        return self.soc + self.psd

    @property
    def block_start(self) -> int:
        """The first row of the dense block."""
        return self.lin + sum(int(g.index.numel()) for g in self.groups)

    def _tensors(self) -> list[torch.Tensor]:
        """The per-instance tensors (leading dimension B), in a fixed order (see :meth:`_rebuild`)."""
        out = [self.diag] + ([] if self.block is None else [self.block])
        for g in self.groups:
            out += list(g[2:])
        return out

    def _rebuild(self, tensors: list[torch.Tensor]) -> DualJacobian:
        it = iter(tensors)
        diag = next(it)
        block = None if self.block is None else next(it)
        soc, psd = (tuple(type(g)(g.start, g.index, *(next(it) for _ in g[2:])) for g in part)
                    for part in (self.soc, self.psd))
        return DualJacobian(diag, block, self.lin, soc, psd)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DualJacobian:
        """``fn`` applied to every per-instance tensor (e.g. ``lambda t: t[idx]``, ``lambda t: t.float()``)."""
        return self._rebuild([fn(t) for t in self._tensors()])

    def same_as(self, other: DualJacobian) -> torch.Tensor:
        """(B,) bool: the instances where ``other`` is exactly this Jacobian."""
        mine, theirs = self._tensors(), other._tensors()
        if len(mine) != len(theirs) or self.lin != other.lin or any(a.shape != b.shape for a, b in zip(mine, theirs)):
            return torch.zeros(self.diag.shape[0], dtype=torch.bool, device=self.diag.device)
        same = torch.ones(self.diag.shape[0], dtype=torch.bool, device=self.diag.device)
        for a, b in zip(mine, theirs):
            same = same & (a == b).flatten(1).all(dim=1)
        return same

    def same_diagonal(self, other: DualJacobian) -> torch.Tensor:
        """(B,) bool: the instances where ``other`` has this Jacobian's diagonal rows (on the zero and nonnegative
        rows of a cone program, and every row of a QP: the same active set); the cones' blocks may differ."""
        if self.lin != other.lin or self.diag.shape != other.diag.shape:
            return torch.zeros(self.diag.shape[0], dtype=torch.bool, device=self.diag.device)
        return (self.diag[:, :self.lin] == other.diag[:, :self.lin]).all(dim=1)

    def put_(self, idx: torch.Tensor, part: DualJacobian) -> None:
        """Write ``part`` into the instances ``idx``, in place."""
        for a, b in zip(self._tensors(), part._tensors()):
            a.index_copy_(0, idx, b)

    def _nonlinear(self, g: torch.Tensor, transpose: bool, out: torch.Tensor) -> None:
        """``D g`` (``D' g``) on the rows from ``lin`` on, for ``g`` (B, m), written into ``out`` (B, m - lin)."""
        seg = g[:, self.lin:]
        for grp in self.groups:
            _scatter_(grp.start, grp.index, out, grp.apply(_gather(grp.start, grp.index, seg), transpose))
        if self.block is not None:
            start = self.block_start - self.lin
            rest = seg[:, start:]
            out[:, start:] = rmatvec(self.block, rest) if transpose else matvec(self.block, rest)

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        """``D g`` for ``g`` (B, m)."""
        out = self.diag * g
        if self.lin < g.shape[1]:
            self._nonlinear(g, False, out[:, self.lin:])
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """``D' g`` for ``g`` (B, m)."""
        out = self.diag * g
        if self.lin < g.shape[1]:
            self._nonlinear(g, True, out[:, self.lin:])
        return out

    def nonlinear_matrix(self) -> torch.Tensor | None:
        """The rows and columns from ``lin`` on as a dense (B, m - lin, m - lin) tensor (None when there are none)."""
        B, m = self.diag.shape
        if self.lin == m:
            return None
        out = self.diag.new_zeros(B, m - self.lin, m - self.lin)
        for grp in self.groups:
            dense = grp.dense()
            k = grp.index.shape[1]
            for j, first in enumerate(grp.index[:, 0].tolist()):  # a cone's rows are consecutive
                out[:, first:first + k, first:first + k] = dense[:, j]
        if self.block is not None:
            start = self.block_start - self.lin
            out[:, start:, start:] = self.block
        return out

    def matrix(self) -> torch.Tensor:
        """Dense ``(B, m, m)``."""
        out = torch.diag_embed(self.diag)
        nonlinear = self.nonlinear_matrix()
        if nonlinear is not None:
            out[:, self.lin:, self.lin:] = nonlinear
        return out

    def diagonal(self) -> torch.Tensor:
        """The diagonal of ``D``, (B, m)."""
        out = self.diag.clone()
        if self.groups:
            seg = out[:, self.lin:]
            for grp in self.groups:
                _scatter_(grp.start, grp.index, seg, grp.diagonal())
        if self.block is not None:
            out[:, self.block_start:] = self.block.diagonal(dim1=-2, dim2=-1)
        return out

    def transposed(self) -> DualJacobian:
        """``D'`` (the same diagonal, the transposed blocks; the PSD groups are symmetric)."""
        if self.block is None and not self.soc:
            return self
        return DualJacobian(self.diag, None if self.block is None else self.block.mT, self.lin,
                            tuple(g.transposed() for g in self.soc), tuple(g.transposed() for g in self.psd))


def dual_jacobian(d: Batch, w: torch.Tensor) -> DualJacobian:
    """``D = dy/dw`` at ``w`` (block diagonal by cone).

    Zero-cone rows: 1; nonnegative rows: ``[w > 0]``; QP form: 1 where the box projection is clipped (an
    active bound), else 0. Without exp cones, the SOC and PSD rows in closed form, structured
    (:class:`SocGroup`, :func:`soc_parts`; :class:`PsdGroup`, :func:`psd_parts`); with exp cones, the Jacobian
    of the projection on every nonlinear row by one batched vector-Jacobian product per row, dense.
    """
    B, m = w.shape
    if d.b is None:
        inside = (w > d.l) & (w < d.u)
        return DualJacobian((~inside).to(w.dtype), None, m)
    cones = d.data.cones
    lin = cones.zero + cones.nonneg
    diag = torch.cat([torch.ones(B, cones.zero, dtype=w.dtype, device=w.device),
                      (w[:, cones.zero:lin] > 0).to(w.dtype),
                      torch.zeros(B, m - lin, dtype=w.dtype, device=w.device)], dim=1)
    if lin == m:
        return DualJacobian(diag, None, lin)
    rows = m - lin
    if not cones.exp:  # SOC and PSD cones in closed form, structured
        soc_groups, psd_groups = _cone_groups(cones, w.device)
        rest = w[:, lin:]
        soc = tuple(SocGroup(start, index, *soc_parts(_gather(start, index, rest))) for start, index in soc_groups)
        psd = tuple(PsdGroup(start, index, *psd_parts(_gather(start, index, rest), order))
                    for start, index, order in psd_groups)
        return DualJacobian(diag, None, lin, soc, psd)
    with torch.enable_grad():
        wv = w.detach().requires_grad_(True)
        out = project_dual_cone(wv, cones)[:, lin:]
        eye = torch.eye(rows, dtype=w.dtype, device=w.device)
        seeds = eye[:, None, :].expand(rows, B, rows)
        try:
            (grads,) = torch.autograd.grad(out, wv, seeds, is_grads_batched=True)
        except (RuntimeError, NotImplementedError):  # a projection without a batching rule
            grads = torch.stack([torch.autograd.grad(out, wv, seeds[j], retain_graph=True)[0] for j in range(rows)])
    block = grads[:, :, lin:].permute(1, 0, 2).contiguous()  # block[b, j, :] = d out[b, j] / d w[b, lin:]
    return DualJacobian(diag, block, lin)


@functools.lru_cache(maxsize=64)
def _cone_groups(cones, device: torch.device) -> tuple[tuple, tuple]:
    """Per SOC size and per PSD order of ``cones``: the group's first row (when contiguous) and its (count, k)
    rows, counted from the first row after the zero and nonnegative cones; PSD groups also their order (cached per
    cones and device)."""
    lin = cones.zero + cones.nonneg
    layout = cone_layout(cones)

    def group(b) -> tuple:
        return None if b.start is None else b.start - lin, torch.as_tensor(b.rows - lin, device=device)
    return tuple(group(b) for b in layout.soc), tuple((*group(b), b.size) for b in layout.psd)


def kkt_matrix(d: Batch, jac: DualJacobian) -> torch.Tensor:
    """``J = [[P, A' D], [A, D - I]]``, dense ``(B, n + m, n + m)``."""
    B, m = jac.diag.shape
    A = d.A
    n = A.shape[2]
    J = A.new_zeros(B, n + m, n + m)
    if d.P is not None:
        J[:, :n, :n] = d.P
    At = A.mT
    J[:, :n, n:] = At * jac.diag[:, None, :]
    J[:, n:, :n] = A
    lin = jac.lin
    idx = torch.arange(n, n + m, device=A.device)
    J[:, idx, idx] = jac.diag - 1.0
    nonlinear = jac.nonlinear_matrix()
    if nonlinear is not None:
        J[:, :n, n + lin:] = At[..., lin:] @ nonlinear
        eye = torch.eye(m - lin, dtype=A.dtype, device=A.device)
        J[:, n + lin:, n + lin:] = nonlinear - eye
    return J


def solve_dense(J: torch.Tensor, rhs: torch.Tensor, n: int, *, transpose: bool = False, delta: float = 1e-9,
                passes: int = 2) -> torch.Tensor:
    """``J^-1 rhs`` (or ``J'^-1 rhs``) per instance: one LU of a regularized ``J`` and iterative refinement.

    ``J`` is often singular: CVXPY's reformulations leave auxiliary variables that are not unique at the
    optimum (e.g. the epigraph variable of an inactive norm bound). The LU is of ``J + delta diag(I_n, -I_m)``
    (nonsingular for small ``delta``), and ``passes`` refinement steps ``z += J_delta^-1 (rhs - J z)`` remove the
    regularization on the range of ``J``. For the backward pass any solution gives the same gradient when the
    output gradient is orthogonal to the null space of ``J``, which holds when the returned CVXPY variables are
    unique. Instances whose factorization fails get least-squares solutions (:func:`_least_squares`).
    """
    N = J.shape[-1]
    reg = torch.full((N,), delta, dtype=J.dtype, device=J.device)
    reg[n:] = -delta
    LU, piv, info = torch.linalg.lu_factor_ex(J + torch.diag(reg))
    mat = J.mT if transpose else J
    rhs3 = rhs.unsqueeze(-1)
    z = torch.linalg.lu_solve(LU, piv, rhs3, adjoint=transpose)
    for _ in range(passes):
        z = z + torch.linalg.lu_solve(LU, piv, rhs3 - mat @ z, adjoint=transpose)
    z = z.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        z[idx] = _least_squares(mat[idx], rhs[idx])
    return z


def _least_squares(mat: torch.Tensor, rhs: torch.Tensor, *, rel: float = 1e-10, passes: int = 3) -> torch.Tensor:
    """Least-squares solutions of ``mat z = rhs`` (batched, any device): regularized normal equations
    ``(mat'mat + eps I) z = mat' rhs`` (``eps = rel * max diag(mat'mat)``, one Cholesky) with ``passes`` steps of
    refinement, which approach the minimum-norm solution on the range of ``mat'``."""
    gram = mat.mT @ mat
    eps = rel * gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1).clamp_min(1e-300)
    reg = gram + eps[:, None, None] * torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    L = torch.linalg.cholesky_ex(reg)[0]
    z = torch.zeros_like(rhs)
    for _ in range(passes):
        z = z + cholesky_solve(L, rmatvec(mat, rhs - matvec(mat, z)))
    return z


class NullSpace(NamedTuple):
    """The equality rows of a dense batch whose ``A`` is shared, computed once per problem (memoized on ``A``).

    The first ``rows`` rows of ``A`` are equalities in both forms (the cone form's zero cone; the QP form's rows
    with ``l == u``, :attr:`~amortcvx.canon.data.QPData.eq`), where ``D = 1`` at every point. :func:`solve_kkt`
    keeps them exact, as constraints ``A_e z_x = r_e``, instead of penalizing them: ``z_x = A_e^+ r_e + Z u``
    with ``u`` from the reduced system ``Z' H Z``, of size ``n - rank(A_e)`` rather than ``n`` (CVXPY's
    canonical problems have many equalities: the MPC family's 88 variables reduce to 16).

    Attributes:
        rows: the number of equality rows ``e``.
        Z: (n, k) an orthonormal basis of the null space of ``A_e`` (``k = n - rank(A_e)``).
        pinv: (n, e) ``A_e^+`` (its transpose is ``(A_e')^+``, which gives the equality rows' multipliers).
        AoZ: (m - e, k) ``A_o Z`` for the other rows ``A_o``.
    """

    rows: int
    Z: torch.Tensor
    pinv: torch.Tensor
    AoZ: torch.Tensor


def equality_rows(data: Data) -> int:
    """The number of leading equality rows of the canonical data (zero cone / ``l == u`` rows)."""
    return data.cones.zero if isinstance(data, ConeData) else data.eq


def null_space(d: Batch) -> NullSpace | None:
    """The :class:`NullSpace` of a dense batch whose ``A`` is shared and has equality rows (memoized on the
    canonical ``A``), else None (the equality rows are then penalized like active inequalities). Whether ``A`` is
    shared is the canonical data's fact (``d.data.A.shared``), not the dense batch's leading dimension: a
    one-instance part of a batch with per-instance ``A`` (a later Newton step's unconverged instances) must get
    the factor shape of the whole batch."""
    e = equality_rows(d.data)
    if e == 0 or isinstance(d.A, SparseBatch) or not d.data.A.shared:
        return None
    A = d.A.detach()[0]

    def build() -> NullSpace:
        U, sig, Vh = torch.linalg.svd(A[:e], full_matrices=True)
        tol = max(A.shape) * torch.finfo(A.dtype).eps * (float(sig[0]) if sig.numel() else 0.0)
        rank = int((sig > tol).sum())
        Z = Vh[rank:].mT.contiguous()
        pinv = (Vh[:rank].mT / sig[:rank]) @ U[:, :rank].mT
        return NullSpace(e, Z, pinv.contiguous(), (A[e:] @ Z).contiguous())
    return _NULL_SPACES.get(d.data.A, ("null-space", e, A.dtype, str(A.device)), build)


_NULL_SPACES = SharedMemo()


class Factor(NamedTuple):
    """The factorized regularized system of :func:`solve_kkt` for a dense batch, reusable by later solves.

    Attributes:
        L: (B, k, k) the Cholesky factor of the reduced Schur complement ``Z'(P + delta I + A_o' M_o A_o) Z``
            (see :func:`solve_kkt`; ``k = n`` and ``Z = I`` without a :class:`NullSpace`).
        jac: the ``D`` it was built from (for a transposed solve, ``D'``).
        R, M: ``((1 + delta) I - D)^-1`` and ``D R``.
        ok: (B,) bool: the Cholesky factorization succeeded.
        delta: the regularization.
    """

    L: torch.Tensor
    jac: DualJacobian
    R: DualJacobian
    M: DualJacobian
    ok: torch.Tensor
    delta: float

    def tensors(self) -> list[torch.Tensor]:
        """Every per-instance tensor, in the order :meth:`rebuild` reads them (what autograd saves)."""
        return [self.L, self.ok, *self.jac._tensors(), *self.R._tensors(), *self.M._tensors()]

    def skeleton(self) -> Factor:
        """This factor with every per-instance tensor replaced by an empty one: the structure :meth:`rebuild`
        needs, holding none of the memory."""
        def empty(t: torch.Tensor) -> torch.Tensor:
            return t.new_empty((0, *t.shape[1:]))
        return Factor(empty(self.L), *(j.map(empty) for j in self[1:4]), empty(self.ok), self.delta)

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Factor:
        """The factor of this structure (e.g. a :meth:`skeleton`) holding ``tensors`` (from :meth:`tensors`)."""
        counts = [len(j._tensors()) for j in self[1:4]]
        L, ok, rest = tensors[0], tensors[1], list(tensors[2:])
        parts, start = [], 0
        for j, c in zip(self[1:4], counts):
            parts.append(j._rebuild(rest[start:start + c]))
            start += c
        return Factor(L, *parts, ok, self.delta)


def factorize(d: Batch, jac: DualJacobian, *, delta: float | None = None) -> Factor:
    """The :class:`Factor` of ``J = [[P, A' D], [A, D - I]]`` for a dense batch: one Cholesky of the reduced
    Schur complement per instance (see :func:`solve_kkt`)."""
    delta = DELTA if delta is None else delta
    ns = null_space(d)
    R, M = _elimination_weights(jac, delta)
    K = _reduced_schur(d, ns, M, delta)
    # M, and so K, is symmetric up to rounding; the Cholesky reads the lower triangle and the refinement passes
    # absorb the difference
    L, info = torch.linalg.cholesky_ex(K)
    return Factor(L, jac, R, M, info == 0, delta)


def _reduced_schur(d: Batch, ns: NullSpace | None, M: DualJacobian, delta: float) -> torch.Tensor:
    """``Z'(P + delta I + A_o' M_o A_o) Z`` (without a null space: ``P + delta I + A' M A``), a new (B, k, k)
    tensor.

    On the diagonal rows ``M`` is zero wherever ``D`` is (inactive bounds): with a shared ``A`` only the rows
    where some instance has ``M != 0`` are multiplied, gathered per instance (zero-padded to the largest count of
    the batch) when that is at most half of them: at a solution few bounds are active (MPC: none for the median
    instance, against 1200 rows of the large size)."""
    if ns is None:
        AZ, Mo = d.A.detach(), M
    else:
        AZ, Mo = ns.AoZ.unsqueeze(0), _jacobian_rows(M, ns.rows)
    lin = Mo.lin
    if AZ.shape[0] == 1 and lin > 0:
        weights = Mo.diag[:, :lin]
        nonzero = weights != 0
        count = int(nonzero.sum(dim=1).max())
        if 2 * count <= lin:  # gather each instance's rows with M != 0 (padding rows get weight 0)
            G, order = flagged_rows(AZ[:, :lin], nonzero, count)  # (B, count, k)
            K = (G.mT * weights.gather(1, order)[:, None, :]) @ G
        else:
            K = (AZ[0, :lin].mT * weights[:, None, :]) @ AZ[0, :lin]
    else:
        K = (AZ[..., :lin, :].mT * Mo.diag[:, None, :lin]) @ AZ[..., :lin, :]
    if Mo.groups:
        K = K + _structured_schur(AZ[..., lin:, :], Mo.groups, _soc_grams(d, ns, AZ, lin, Mo.groups))
    if Mo.block is not None:
        Ab = AZ[..., Mo.block_start:, :]
        K = K + (Ab.mT @ Mo.block) @ Ab
    K.diagonal(dim1=-2, dim2=-1).add_(delta)  # Z'Z = I
    if d.P is not None:
        K.add_(_reduced_p(d, ns))
    return K


def _reduced_p(d: Batch, ns: NullSpace | None) -> torch.Tensor:
    """``Z' P Z`` (``P`` without a null space), memoized per problem where ``P`` is shared (kalman large:
    ``252 x 548`` times ``548 x 548``, 4 ms per factorization at batch 1)."""
    P = d.P.detach()
    if ns is None:
        return P
    if P.shape[0] != 1 or not d.data.P.shared:
        return ns.Z.mT @ P @ ns.Z
    A = d.data.A.values
    return _NULL_SPACES.get(d.data.P, ("ZPZ", A.data_ptr(), ns.rows, P.dtype, str(P.device)),
                            lambda: ns.Z.mT @ P @ ns.Z)


def _structured_schur(As: torch.Tensor, groups: tuple[SocGroup | PsdGroup, ...],
                      grams: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """``As' M_g As`` over the structured cones' rows (``As``: (1 or B, rows from ``lin`` on, k) of ``A Z``; ``M_g``
    their part of ``M``), each group by its own :meth:`SocGroup.schur` / :meth:`PsdGroup.schur` (with its Gram
    matrices where ``grams`` has them)."""
    K = None
    for grp, gram in zip(groups, grams):
        Ag = _gather(grp.start, grp.index, As, dim=-2)
        part = grp.schur(Ag) if gram is None else grp.schur(Ag, gram)
        K = part if K is None else K + part
    return K


GRAM_BUDGET = 1 << 20
"""The most entries (``count * dim^2``; float64: 8 MB) of the memoized Gram matrices of one SOC group
(:func:`_soc_grams`; the memo keeps at most 32 such entries)."""


def _soc_grams(d: Batch, ns: NullSpace | None, AZ: torch.Tensor, lin: int,
               groups: tuple[SocGroup | PsdGroup, ...]) -> tuple[torch.Tensor | None, ...]:
    """Per structured group: where ``A`` is shared by the batch and the group is of second-order cones with
    contiguous rows, each cone's Gram matrix ``A_cone' A_cone`` of ``AZ``'s rows, (count, dim * dim), memoized per
    problem (within :data:`GRAM_BUDGET`); None elsewhere. The Schur complement's ``sum alpha_i a_i a_i'`` over a
    cone's rows is then ``alpha`` times its Gram matrix (measured: the SOCP of the layer benchmark, batch 64, one
    cone of 31 rows, 230 -> 10 us per factorization)."""
    if AZ.shape[0] != 1 or not d.data.A.shared:
        return (None,) * len(groups)
    dim = AZ.shape[-1]
    out = []
    for grp in groups:
        count, k = grp.index.shape
        if not isinstance(grp, SocGroup) or grp.start is None or count * dim * dim > GRAM_BUDGET:
            out.append(None)
            continue

        def build(grp: SocGroup = grp, count: int = count) -> torch.Tensor:
            Ag = _gather(grp.start, grp.index, AZ[0, lin:].detach(), dim=-2)  # (count, k, dim)
            return (Ag.mT @ Ag).reshape(count, dim * dim)
        key = ("soc gram", 0 if ns is None else ns.rows, lin, grp.start, count, k, AZ.dtype, str(AZ.device))
        out.append(_GRAMS.get(d.data.A, key, build))
    return tuple(out)


_GRAMS = SharedMemo()


def _jacobian_rows(jac: DualJacobian, start: int) -> DualJacobian:
    """The rows (and columns) from ``start`` on of a block-diagonal ``D`` (``start <= jac.lin``)."""
    return jac._replace(diag=jac.diag[:, start:], lin=jac.lin - start)


def reusable(factor: Factor, jac: DualJacobian) -> torch.Tensor:
    """(B,) bool: where ``factor`` was built from exactly ``jac`` (so that it is the factorization a new one would
    give). On LPs and QPs ``D`` is a 0/1 diagonal that stays the same from the last Newton step to the refined
    point, so the backward solve reuses the forward's factorization there."""
    if factor.jac is jac:  # built from this very Jacobian (e.g. by the Newton step that solves with it)
        return factor.ok
    return _serves(factor.jac, factor.ok, jac, False)


def _serves(built: DualJacobian, ok: torch.Tensor, jac: DualJacobian, nearby: torch.Tensor | bool) -> torch.Tensor:
    """(B,) bool: where factors built from ``built`` (factored where ``ok``) serve solves with ``jac``: the same
    ``D``, or, where ``nearby``, the same diagonal rows (:func:`reusable`, :func:`near_reuse`)."""
    if nearby is True:  # the same D has the same diagonal rows: one comparison serves both
        return ok & built.same_diagonal(jac)
    out = ok & built.same_as(jac)
    if isinstance(nearby, torch.Tensor) and bool(nearby.any()):
        out = out | (ok & nearby & built.same_diagonal(jac))
    return out


NEAR_PASSES = 2
"""Refinement passes a nearby factor gets beyond the caller's (:func:`solve_kkt` with ``near``)."""

NEWTON_NEAR = 1e-6
"""The relative accuracy asked of a Newton step's linear solve from the previous step's factor (an inexact Newton
step: the next step's residual is ``~NEWTON_NEAR`` times this one's, plus the quadratic term)."""

FORCING_MAX = 1e-2
"""The loosest relative accuracy of a Newton step's linear solve on a problem with nonlinear cones
(:func:`newton_refine`: the forcing term is the relative residual ``||F||_inf / scale``, at most this)."""

NEAR_RESIDUAL = 1e-5
"""A Newton step keeps the previous step's factor of a nearby ``D`` only where ``||F||_inf`` is at most this
(relative, as the step's tolerance): Newton's local phase, where a step moves the point, and so ``D``, little.
From farther, such factors mostly missed the accuracy and were factored anew after all (robust_ls, batch 64,
four steps from points 1% off the solution with one refinement pass: 14.1 ms without this threshold, 9.9 ms
with it, 9.0 ms with new factors only)."""

BACKWARD_NEAR = 1e-10
"""The relative accuracy asked of the backward solve from the forward's last factor (``1e-12`` before: on the SOCP
of the layer benchmark, batch 64, forward+backward 2% slower, gradients that differ by ``7e-11``, and gradient
errors against central differences of ``1e-10`` either way)."""

DELTA = 1e-4
"""The regularization ``delta`` of :func:`factorize` and :func:`solve_kkt` (see there). Tried: ``1e-8``, with which
one refinement pass reaches rounding level on the SOCP of the layer benchmark (3% faster there, and 20-40% faster
Newton finishes on mpc, kalman, lasso, portfolio and huber_fit), but the Cholesky factorization failed on instances
of degenerate_lp (dense fallbacks: 1.7x slower) and Newton no longer converged on sparse_pca's PSD cones (59% -> 0%
from points 0.1% off the solution)."""


def near_reuse(factor: Factor, jac: DualJacobian) -> torch.Tensor:
    """(B,) bool: where ``factor`` may precondition solves with ``jac`` (:func:`solve_kkt` with ``near``): it
    factored, and its ``D`` has the same diagonal rows. A changed active set (a 0/1 entry that flipped) makes a
    poor preconditioner, so those instances are factored anew at once; the cones' blocks change continuously
    with the point, and the refinement absorbs a small change."""
    return _serves(factor.jac, factor.ok, jac, True)


def take_factor(factor: Factor, idx: torch.Tensor) -> Factor:
    """The instances ``idx`` of a factor."""
    return Factor(factor.L[idx], *(j.map(lambda t: t[idx]) for j in factor[1:4]), factor.ok[idx], factor.delta)


def put_factor_(factor: Factor, idx: torch.Tensor, part: Factor) -> Factor:
    """Write ``part`` into the instances ``idx`` of ``factor``, in place (the caller owns ``factor``); returns it."""
    factor.L.index_copy_(0, idx, part.L)
    for j, p in zip(factor[1:4], part[1:4]):
        j.put_(idx, p)
    factor.ok.index_copy_(0, idx, part.ok)
    return factor


def solve_kkt(d: Batch, jac: DualJacobian, rhs: torch.Tensor, *, transpose: bool = False, delta: float | None = None,
              passes: int = 4, factor: Factor | None = None, near: float | None = None,
              accuracy: torch.Tensor | None = None) -> torch.Tensor:
    """``J^-1 rhs`` (or ``J'^-1 rhs``) for ``J = [[P, A' D], [A, D - I]]``, per instance, by one Cholesky of
    size ``k <= n``.

    The ``w`` block is eliminated. With ``D`` replaced by ``D'`` for the transposed system, the regularized
    system ``J + delta diag(I_n, -I_m)`` has, for ``R = ((1 + delta) I - D)^-1`` and ``M = D R`` (block diagonal
    like ``D``; ``R`` exists because the eigenvalues of a projection's Jacobian lie in ``[0, 1]``, and ``M`` is
    positive semidefinite), the Schur complement ``S = P + delta I + A' M A`` (positive definite) and::

        J z = r:    S z_x = r_x + A' M r_w,   z_w = R (A z_x - r_w)
        J' z = r:   S z_x = r_x + A' R r_w,   z_w = M A z_x - R r_w

    On the zero / nonnegative rows of a cone program and all rows of a QP ``D`` is 0 or 1, so ``M`` is ``1 /
    delta`` on the active rows and 0 on the others: the active set's equality-constrained KKT system. ``passes``
    steps of iterative refinement against the unregularized ``J`` remove the regularization (exact for a
    nonsingular ``J``; they stop once every residual is at rounding level). ``J`` is often singular: CVXPY's
    reformulations leave auxiliary variables that are not unique at the optimum (e.g. the epigraph variable of
    an inactive norm bound); refinement then approaches a solution on the range of ``J``, and for the backward
    pass any solution gives the same gradient when the output gradient is orthogonal to the null space of
    ``J``, which holds when the returned CVXPY variables are unique. Instances whose ``S`` cannot be factored
    are solved densely (:func:`solve_dense`).

    Equality rows (the first :func:`equality_rows`; ``D = 1`` there at every point) are kept exact rather than
    penalized when ``A`` is shared (:class:`NullSpace`): with ``H = P + delta I + A_o' M_o A_o`` over the other
    rows ``o`` and ``g = r_x + A_o' M_o r_o`` (``A_o' R_o r_o`` transposed), ``z_x = A_e^+ r_e + Z u`` with
    ``Z'HZ u = Z'(g - H A_e^+ r_e)``, and the equality rows' ``z_w = (A_e')^+ (g - H z_x)``: the factored matrix
    is ``(n - rank A_e)``-square (the MPC family: 16 instead of 88), and the rest of the solve is products with
    constant matrices.

    ``factor`` (from :func:`factorize`, e.g. a Newton step's) is used on the instances where it was built from
    the same ``D`` (:func:`reusable`; the answer is then the same as with a new factorization); the others are
    factored anew. With ``near`` (a relative tolerance), ``factor`` is also used where it was built from a nearby
    ``D``: the same diagonal rows (active set), the cones' blocks at a point close by, such as the last Newton
    step's (:func:`near_reuse`). It is then a preconditioner of the refinement, which runs against the exact
    ``J`` with :data:`NEAR_PASSES` more passes; an instance whose residual stays above ``near * ||rhs||_inf``
    (plus rounding) is factored anew and its solution corrected with the new factor, so the accuracy is the
    one asked for. ``accuracy`` (B,): a relative accuracy per instance at which the refinement may stop (an
    inexact Newton step's forcing term, :func:`newton_refine`); without it and ``near``, it stops at rounding level.
    Cost per new factorization: one ``k x k`` Cholesky, the product ``(A_o Z)' M_o (A_o Z)``, and (with SOC /
    PSD / exp rows) one inverse of the nonlinear cones' ``(m - lin)``-square block of ``D``.

    For a :func:`sparse` batch the solve is matrix-free (:func:`~amortcvx.iterations.krylov.solve_kkt_krylov`); an
    instance it does not solve keeps its best iterate (a Newton step from it is then rejected, and a gradient
    from it is that of the least residual the iteration found).
    """
    if isinstance(d.A, SparseBatch):
        return solve_kkt_krylov(d.data, jac, rhs, transpose=transpose).z
    delta = DELTA if delta is None else delta
    A = d.A.detach()
    P = None if d.P is None else p_rows(d)._replace(mat=d.P.detach())  # CSR where sparse (p_rows)
    n = A.shape[2]
    D = jac.transposed() if transpose else jac
    same = reusable(factor, D) if factor is not None and factor.delta == delta else None
    stale = None  # where a nearby factor, not the exact one, serves (None: nowhere)
    if near is not None and same is not None and not bool(same.all()):
        stale = near_reuse(factor, D) & ~same
        if bool(stale.any()):
            same = same | stale
            passes += NEAR_PASSES
        else:
            stale = None
    if same is None or not bool(same.any()):
        factor = factorize(d, D, delta=delta)
    elif not bool(same.all()):  # into a copy: the caller's factor is not changed
        fresh = torch.nonzero(~same).flatten()
        factor = put_factor_(take_factor(factor, torch.arange(same.shape[0], device=same.device)), fresh,
                             factorize(take(d, fresh), D.map(lambda t: t[fresh]), delta=delta))
    ns = null_space(d)
    e = 0 if ns is None else ns.rows
    L, R, M = factor.L, _jacobian_rows(factor.R, e), _jacobian_rows(factor.M, e)
    full, Ao = rows(d), rows(d, e)
    to_x = R if transpose else M
    delta_ = factor.delta

    def reg_solve(r: torch.Tensor) -> torch.Tensor:
        rx, re, ro = r[:, :n], r[:, n:n + e], r[:, n + e:]
        wo = to_x.matvec(ro)  # M r_o, or R r_o for J' (then also the -R r_o of z_w)
        if ns is None:
            zx = cholesky_solve(L, rx + Ao.rmv(wo))
            ax, ze = Ao.mv(zx), re[:, :0]
            m_ax = M.matvec(ax) if transpose else None
        else:
            # z_x = xp + Z u with xp = A_e^+ r_e; Z'HZ u = Z'(g - H xp) for H = P + delta I + A_o' M_o A_o and
            # g = r_x + A_o' (M or R) r_o; the equality rows' multipliers (A_e')^+ (g - H z_x)
            xp = re @ ns.pinv.mT
            ax = Ao.mv(xp)
            m_xp = M.matvec(ax)
            top = rx - delta_ * xp + Ao.rmv(wo - m_xp)  # g - H xp
            if P is not None:
                top = top - P.mv(xp)
            u = cholesky_solve(L, top @ ns.Z)
            zu = u @ ns.Z.mT
            azu = u @ ns.AoZ.mT
            m_zu = M.matvec(azu)
            h_zu = delta_ * zu + Ao.rmv(m_zu)
            if P is not None:
                h_zu = h_zu + P.mv(zu)
            zx, ax, ze = xp + zu, ax + azu, (top - h_zu) @ ns.pinv
            m_ax = m_xp + m_zu if transpose else None  # M A_o z_x by linearity: no third product with M
        zo = m_ax - wo if transpose else R.matvec(ax - ro)
        return torch.cat([zx, ze, zo], dim=1)

    def apply(z: torch.Tensor) -> torch.Tensor:  # the unregularized J z (or J' z)
        zx, zw = z[:, :n], z[:, n:]
        dzw = None if transpose else D.matvec(zw)  # D zw, used twice
        top = full.rmv(zw if transpose else dzw)
        if P is not None:
            top = top + P.mv(zx)
        ax = full.mv(zx)
        bottom = D.matvec(ax + zw) - zw if transpose else ax + dzw - zw
        return torch.cat([top, bottom], dim=1)

    z = reg_solve(rhs)
    size = rhs.abs().amax(dim=1)
    tol = 1e-14 * (1.0 + size)
    if stale is not None:  # the accuracy asked for, not rounding level
        tol = tol + near * size
    if accuracy is not None:
        tol = torch.maximum(tol, 1e-14 + accuracy * size)
    reached = False
    for _ in range(passes):
        r = rhs - apply(z)
        reached = bool((r.abs().amax(dim=1) <= tol).all())
        if reached:
            break
        z = z + reg_solve(r)
    if stale is not None and not reached:  # stale factors that did not reach ``near``: a new factor
        r = rhs - apply(z)
        redo = stale & ~(r.abs().amax(dim=1) <= tol)
        if bool(redo.any()):
            idx = torch.nonzero(redo).flatten()
            z[idx] = z[idx] + solve_kkt(take(d, idx), jac.map(lambda t: t[idx]), r[idx], transpose=transpose,
                                        delta=delta, passes=passes)
    if not (bool(factor.ok.all()) and bool(torch.isfinite(z).all())):
        bad = ~factor.ok | ~torch.isfinite(z).all(dim=1)
        idx = torch.nonzero(bad).flatten()
        sub = take(d, idx)
        z[idx] = solve_dense(kkt_matrix(sub, jac.map(lambda t: t[idx])), rhs[idx], n, transpose=transpose)
    return z


def _elimination_weights(D: DualJacobian, delta: float) -> tuple[DualJacobian, DualJacobian]:
    """``R = ((1 + delta) I - D)^-1`` and ``M = D R``, block diagonal like ``D``."""
    r_diag = 1.0 / (1.0 + delta - D.diag)

    def weights(groups: tuple) -> tuple[tuple, tuple]:  # each group's (R, M), as the R groups and the M groups
        pairs = [g.weights(delta) for g in groups]
        return tuple(r for r, _ in pairs), tuple(m for _, m in pairs)
    (r_soc, m_soc), (r_psd, m_psd) = weights(D.soc), weights(D.psd)
    r_block = m_block = None
    if D.block is not None:
        eye = torch.eye(D.block.shape[-1], dtype=D.block.dtype, device=D.block.device)
        r_block = torch.linalg.inv_ex((1.0 + delta) * eye - D.block)[0]
        m_block = D.block @ r_block
    return (DualJacobian(r_diag, r_block, D.lin, r_soc, r_psd),
            DualJacobian(D.diag * r_diag, m_block, D.lin, m_soc, m_psd))


def _inverse2(X: torch.Tensor) -> torch.Tensor:
    """The inverses of (..., 2, 2) matrices, in closed form."""
    a, b, c, d = X[..., 0, 0], X[..., 0, 1], X[..., 1, 0], X[..., 1, 1]
    det = a * d - b * c
    return torch.stack([torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)], dim=-2) / det[..., None, None]


def take(d: Batch, idx: torch.Tensor) -> Batch:
    """The instances ``idx`` of a batch (tensors shared by the batch stay shared)."""
    def pick(t):
        if isinstance(t, SparseBatch):
            return t.take(idx)
        return t if not isinstance(t, torch.Tensor) or t.shape[0] == 1 else t[idx]
    return Batch(*(pick(t) for t in d[:-1]), d.data.take(idx.cpu().numpy()))




REFINED = 1e-9
"""A refinement has converged when ``||F||_inf <= REFINED * residual_scale`` (:func:`converged`)."""


def residual_scale(d: Batch) -> torch.Tensor:
    """(B,) ``1 + ||c||_inf + ||b||_inf``: what the tolerances on ``||F||_inf`` are relative to (:func:`converged`,
    :func:`newton_refine`)."""
    return 1.0 + d.lin.abs().amax(dim=1) + (d.b.abs().amax(dim=1) if d.b is not None else 0.0)


def converged(d: Batch, norm: torch.Tensor, tol: float = REFINED) -> torch.Tensor:
    """(B,) bool: ``||F||_inf`` (``norm``, from :func:`newton_refine`) is at most ``tol`` relative to
    :func:`residual_scale` (default: the level of a refined solution)."""
    return norm <= tol * residual_scale(d)


class Refined(NamedTuple):
    """The result of :func:`newton_refine`.

    Attributes:
        point: the refined point.
        norm: (B,) ``||F||_inf`` there.
        factor: for a dense batch, each instance's factorization from its last Newton step (None for a sparse
            batch or when no step was taken); instances without a step are marked not ``ok``.
    """

    point: Point
    norm: torch.Tensor
    factor: Factor | None


def blank_factor(like: Factor, batch: int) -> Factor:
    """A factor for ``batch`` instances, none of them usable (``ok`` False, ``D`` NaN), shaped like ``like``."""
    def blank(j: DualJacobian) -> DualJacobian:
        return j.map(lambda t: t.new_full((batch, *t.shape[1:]), float("nan")))
    return Factor(like.L.new_zeros(batch, *like.L.shape[1:]), *(blank(j) for j in like[1:4]),
                  like.ok.new_zeros(batch), like.delta)


def newton_refine(d: Batch, pt: Point, *, steps: int = 4, tol: float = 1e-12,
                  damping: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625), decrease: float = 0.5,
                  passes: int = 4, near: float | None = NEWTON_NEAR) -> Refined:
    """Semismooth Newton steps on ``F`` from ``pt``, accepted per instance only where ``||F||`` decreases.

    Each step works on the instances not yet converged (``||F||_inf > tol`` relative to :func:`residual_scale`, the
    test of :func:`converged`) and tries the step lengths in ``damping`` in turn, each on the instances where no
    longer one has yet converged or cut the merit ``||F||_2`` by the factor ``decrease``; each instance keeps the
    step with the smallest merit (a full step is exact on the active set of an LP / QP; shorter ones help from
    looser points). The Newton direction descends on ``||F||_2^2`` but not always on ``||F||_inf``: judged by the
    max norm, points with a few wrongly active rows made no progress at any step length (MPC, from learned starts:
    101 of 200 converged in 4 steps against 125 with the 2-norm; the SOCP and SDP layer benchmarks got 10-20%
    faster).
    ``passes``: the iterative-refinement passes of each step's linear solve (:func:`solve_kkt`); fewer make a
    step cheaper and less exact (one pass leaves an error of about ``delta^2`` relative to the step, which later
    steps correct; the last point is then less accurate than with more). A step on every instance (the first,
    mostly) works on the batch itself, without copies of its rows. Returns the point, ``||F||_inf`` and the
    last factorization of each instance (which the backward solve reuses where ``D`` has not changed, see
    :func:`reusable`, and where it changed a little, :func:`near_reuse`). A step after the first factors only
    the instances whose ``D`` changed: on LPs and QPs, whose active set changed. With ``near`` (a relative
    accuracy, :data:`NEWTON_NEAR` unless None), also the instances of cone programs whose ``D`` moved a little
    since their last factorization (:data:`NEAR_RESIDUAL`) keep it, as a preconditioner of a solve to that
    accuracy (the SOCP layer benchmark: one factorization per call instead of about three). With one refinement
    pass (``passes=1``: the certified finish of ``AmortizedSolver``) such solves took longer than new factors on
    robust_ls and sparse_pca, so that finish sets ``near=None``. On problems with nonlinear cones (second-order,
    PSD, exponential), where no step is exact, each step's solve stops at the relative residual ``||F||_inf /
    scale`` (at most :data:`FORCING_MAX`; ``solve_kkt``'s ``accuracy``): an inexact Newton step whose forcing term
    keeps the convergence quadratic (the SOCP layer benchmark at batch 64: one refinement pass fewer in the first
    step, 0.97x forward+backward, the same answers to 4e-16). LPs and QPs, where a full step lands on the
    solution, solve every step to rounding level.
    """
    factor = None
    with torch.no_grad():
        f = torch.cat(residual(d, pt), dim=1)
        norm = f.abs().amax(dim=1)
        scale = residual_scale(d)
        n = pt.x.shape[1]
        for _ in range(steps):
            idx = torch.nonzero(torch.isfinite(norm) & (norm > tol * scale)).flatten()
            if idx.numel() == 0:
                break
            whole = idx.numel() == norm.shape[0]  # every instance (the first step, mostly): no copies
            sub = d if whole else take(d, idx)
            start, start_norm = (pt, norm) if whole else (Point(pt.x[idx], pt.w[idx]), norm[idx])
            jac = dual_jacobian(sub, start.w)
            fs = f if whole else f[idx]
            local = (start_norm <= NEAR_RESIDUAL * scale[idx]) & (near is not None)
            part, factor = _step_factor(sub, jac, factor, idx, norm.shape[0], local)
            # with nonlinear cones, where no step is exact, each step's solve may stop at the relative residual
            # (an inexact Newton step whose forcing term keeps the convergence quadratic)
            forcing = (start_norm / scale[idx]).clamp(max=FORCING_MAX) if jac.block is not None or jac.groups else None
            delta = solve_kkt(sub, jac, fs, factor=part, passes=passes, near=near, accuracy=forcing)
            best_x, best_w, best_f, best_norm = start.x.clone(), start.w.clone(), fs.clone(), start_norm.clone()
            start_merit = fs.norm(dim=1)
            best_merit = start_merit.clone()
            goal = tol * scale[idx]
            todo = torch.arange(idx.numel(), device=idx.device)
            for t in damping:
                part_d = sub if todo.numel() == idx.numel() else take(sub, todo)
                cand = Point(start.x[todo] - t * delta[todo, :n], start.w[todo] - t * delta[todo, n:])
                cf = torch.cat(residual(part_d, cand), dim=1)
                cnorm, cmerit = cf.abs().amax(dim=1), cf.norm(dim=1)
                better = torch.isfinite(cmerit) & (cmerit < best_merit[todo])
                won = todo[better]
                best_x[won], best_w[won], best_f[won], best_norm[won], best_merit[won] = (
                    cand.x[better], cand.w[better], cf[better], cnorm[better], cmerit[better])
                todo = todo[(best_merit[todo] > decrease * start_merit[todo]) & (best_norm[todo] > goal[todo])]
                if todo.numel() == 0:
                    break
            if not bool((best_merit < start_merit).any()):
                break
            if whole:
                pt, f, norm = Point(best_x, best_w), best_f, best_norm
            else:
                pt = Point(pt.x.index_copy(0, idx, best_x), pt.w.index_copy(0, idx, best_w))
                f = f.index_copy(0, idx, best_f)
                norm = norm.index_copy(0, idx, best_norm)
    return Refined(pt, norm, factor)


def _step_factor(sub: Batch, jac: DualJacobian, factor: Factor | None, idx: torch.Tensor, batch: int,
                 local: torch.Tensor) -> tuple[Factor | None, Factor | None]:
    """The factor of a Newton step on the instances ``idx`` (``sub``, at ``D = jac``), and the batch's factor of
    ``batch`` instances updated with what was factored anew. The previous step's factor is kept where it was built
    from the same ``D`` (:func:`reusable`: on LPs and QPs, the same active set), and where ``local`` (the residual
    is small, so the last step moved little) and the cones' ``D`` is nearby (:func:`near_reuse`; it then
    preconditions the step's solve); the other instances are factored. Matrix-free batches: none."""
    if isinstance(sub.A, SparseBatch):
        return None, None
    if factor is None:
        part = factorize(sub, jac)
        # the first step ran on every instance: its factorization is the base (no copy)
        return part, part if idx.numel() == batch else put_factor_(blank_factor(part, batch), idx, part)
    whole = idx.numel() == batch  # a step on every instance: the batch's factor itself, no copies
    keep = _serves(factor.jac if whole else factor.jac.map(lambda t: t[idx]), factor.ok if whole else factor.ok[idx],
                   jac, local)
    if not bool(keep.any()):  # every instance anew (cone programs from afar): no copy of the old factors
        part = factorize(sub, jac)
        return part, part if whole else put_factor_(factor, idx, part)
    part = factor if whole else take_factor(factor, idx)
    new = torch.nonzero(~keep).flatten()
    if new.numel():
        fresh = factorize(take(sub, new), jac.map(lambda t: t[new]))
        put_factor_(part, new, fresh)
        if not whole:
            put_factor_(factor, idx[new], fresh)
    return part, factor


class ImplicitSolution(torch.autograd.Function):
    """``theta -> (x, y, slack)`` at a given solution, differentiated implicitly through ``F = 0``.

    Forward returns the solution given to it (computed without autograd); ``build`` (:func:`dense` or
    :func:`sparse`) chooses the linear algebra of the backward. Backward, for output gradients
    ``(gx, gy, gs)``: ``g_w = D' gy + (dslack/dw)' gs``, ``lam = J'^-1 [gx; g_w]``, and the parameter gradient
    ``-(dF/dtheta)' lam``: ``-(dF/d data)' lam`` in closed form at the fixed point (:func:`_data_vjp`), then autograd
    through ``canonicalize(theta)``. Failed
    instances (``failed``) get NaN gradients. ``data``: ``canonicalize(theta)``, where the caller has it already.
    ``factor`` (the forward's Newton factorizations, see
    :class:`Refined`) is reused where ``D`` at the solution is the one it was built from, and preconditions the
    solve where it is close (:func:`near_reuse`, to :data:`BACKWARD_NEAR`); it is saved for the backward like
    any tensor.
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                canonicalize: Callable[[torch.Tensor], Data], failed: torch.Tensor,
                build: Callable[[Data], Batch] = dense, factor: Factor | None = None,
                data: Data | None = None):  # noqa: D102
        # the factorizations are saved like any tensor: freed after the backward, kept with retain_graph (so that a
        # second backward gives the same gradient)
        ctx.canonicalize, ctx.build = canonicalize, build
        ctx.factor = None if factor is None else factor.skeleton()
        ctx.save_for_backward(theta, x, w, failed, *([] if factor is None else factor.tensors()))
        with torch.no_grad():
            # only the vectors and cones are read: no dense copy of A
            d = sparse(canonicalize(theta.detach()) if data is None else data)
            y = dual_of(d, w)
            slack = slack_of(d, w, y)
        nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
        mask = failed[:, None]
        return (torch.where(mask, nan, x), torch.where(mask, nan, y), torch.where(mask, nan, slack))

    @staticmethod
    def backward(ctx, gx: torch.Tensor, gy: torch.Tensor, gs: torch.Tensor):  # noqa: D102
        theta, x, w, failed, *saved = ctx.saved_tensors
        x0 = torch.where(failed[:, None], torch.zeros_like(x), x)
        w0 = torch.where(failed[:, None], torch.zeros_like(w), w)
        with torch.enable_grad():  # the canonical data, differentiable in theta
            th = theta.detach().requires_grad_(True)
            data = ctx.canonicalize(th)
        with torch.no_grad():
            d = _detached(ctx.build(data))
            jac = dual_jacobian(d, w0)
            sign = 1.0 if d.b is not None else -1.0  # slack = y - w (cone) or w - y (QP): ds = sign (D - I) dw
            gx0, gy0, gs0 = (torch.nan_to_num(g) if g is not None else None for g in (gx, gy, gs))
            gw = torch.zeros_like(w0)
            if gy0 is not None:
                gw = gw + jac.rmatvec(gy0)
            if gs0 is not None:
                gw = gw + sign * (jac.rmatvec(gs0) - gs0)
            rhs = torch.cat([gx0 if gx0 is not None else torch.zeros_like(x0), gw], dim=1)
            factor = None if ctx.factor is None else ctx.factor.rebuild(saved)
            lam = solve_kkt(d, jac, rhs, transpose=True, factor=factor, near=BACKWARD_NEAR)
        with torch.enable_grad():  # -(dF/dtheta)' lam: closed form in the data, autograd through canonicalize
            pairs = _data_vjp(data, d, x0, w0, lam)
            grad = None
            if pairs:
                (grad,) = torch.autograd.grad([t for t, _ in pairs], th, [g for _, g in pairs], allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(theta)
        grad = torch.where(failed[:, None], torch.full_like(grad, float("nan")), grad)
        return grad, None, None, None, None, None, None, None


def _data_vjp(data: Data, d: Batch, x: torch.Tensor, w: torch.Tensor, lam: torch.Tensor
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``-(dF/d data)' lam`` at ``(x, w)``, in closed form, as (data tensor, its gradient) pairs for the canonical
    data that depend on the parameters (``data``, with autograd to ``theta``; ``d``, its batch without).

    ``F1 = A' y + lin + P x`` and ``F2 = A x - b + y - w`` (cone form; ``y = Pi_K*(w)``, independent of the data) or
    ``F2 = A x - w + y`` (QP form; ``y = w - clip(w, l, u)``): ``lin`` gets ``-lam_1``, ``b`` gets ``lam_2``, each
    stored entry ``(i, j)`` of ``A`` gets ``-(y_i lam_1j + lam_2i x_j)`` and of ``P`` gets ``-lam_1i x_j``; in the QP
    form ``l`` and ``u`` act through ``y`` (its pair: ``y`` as a function of them, and ``-(A lam_1 + lam_2)``)."""
    n = x.shape[1]
    lam1, lam2 = lam[:, :n], lam[:, n:]
    cone = isinstance(data, ConeData)
    pairs = [(data.c if cone else data.q, -lam1)]
    if cone:
        pairs.append((data.b, lam2))
        y = dual_of(d, w)
    else:
        y = dual_of(d._replace(l=data.l, u=data.u), w)  # with autograd to l, u where they depend on theta
        if y.requires_grad:
            pairs.append((y, -(_a_mv(d, lam1) + lam2)))
        y = y.detach()
    for mat, left, right in ((data.A, (y, lam2), (lam1, x)), (data.P, (lam1,), (x,))):
        if mat is None or not mat.values.requires_grad:
            continue
        rows, cols = (torch.as_tensor(i, device=x.device) for i in mat.coo())
        grad = -sum(a[:, rows] * b[:, cols] for a, b in zip(left, right))
        if mat.values.shape[0] != grad.shape[0]:  # one matrix for the batch (a batch of one parameter value)
            grad = grad.sum(dim=0, keepdim=True)
        pairs.append((mat.values, grad))
    return [(t, g.to(t.dtype)) for t, g in pairs if t.requires_grad]


def _detached(d: Batch) -> Batch:
    def cut(t):
        if isinstance(t, SparseBatch):
            return SparseBatch(t.indices, t.indptr, t.shape, t.values.detach(), t.shared)
        return t.detach() if isinstance(t, torch.Tensor) else t
    return Batch(*(cut(t) for t in d))
