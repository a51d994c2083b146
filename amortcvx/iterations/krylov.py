"""Matrix-free Krylov solves of the normal-map Jacobian systems, for large sparse problems.

:mod:`amortcvx.iterations.kkt` writes the optimality conditions of a canonical problem as ``F(x, w) = 0`` with the
Jacobian

    J = [[P, A' D], [A, D - I]],        D = dy/dw (a :class:`~amortcvx.iterations.kkt.DualJacobian`),

and solves ``J z = r`` (Newton refinement) and ``J' z = r`` (the backward pass) with dense batched linear
algebra: ``(B, m, n)`` copies of ``A`` and one ``(B, n, n)`` Cholesky per solve. This module solves the same
systems without forming any dense matrix:

* :func:`kkt_operator`: ``z -> J z`` (or ``J' z``) from sparse products with the canonical data
  (:class:`~amortcvx.iterations.linalg.SparseOperator`, built once per operator, gives both ``A v`` and
  ``A' v``) and ``D`` (a diagonal on the first ``D.lin`` rows, ``O(k)`` structured products on the
  second-order cones, a batched product with the dense PSD / exp block on the rest).
* :func:`gmres`: restarted GMRES, batched: every instance of the batch advances together (one batched product
  per iteration), each with its own Krylov basis, Hessenberg matrix and convergence test. Arnoldi uses
  classical Gram-Schmidt applied twice (four batched GEMVs per step instead of a loop over the basis); the
  Givens rotations of each instance are accumulated into one small orthogonal matrix, so that the new column
  of the Hessenberg matrix is rotated with a single batched product. Preconditioning is on the right, so the
  residual the iteration tracks is the true one.
* :func:`solve_kkt_krylov`: GMRES on the regularized ``J_delta = J + delta diag(I_n, -I_m)`` (as
  :func:`~amortcvx.iterations.kkt.solve_dense` does), right-preconditioned by the diagonal
  :func:`kkt_preconditioner` (a Jacobi approximation of the block-diagonal Schur-complement preconditioner of a
  saddle-point matrix), inside a few passes of iterative refinement against the *unregularized* ``J``.

Cost: each GMRES iteration is one product with ``J`` per instance, i.e. one product with ``A`` and one with
``A'`` (``2 nnz(A)`` multiply-adds), one with ``P`` (``nnz(P)``), ``O(m)`` for a diagonal ``D`` and the
second-order cones (plus a ``k x k`` product per PSD / exp block), and ``O(j (n + m))`` for the orthogonalization of
the ``j``-th basis vector (``restart`` bounds ``j``). Memory is ``O(B restart (n + m))`` for the basis.

When to prefer it to the dense path: large ``n + m`` with a sparse ``A`` (a few thousand rows and columns and
up): the dense path stores ``(B, m, n)`` and factors ``(B, n, n)`` Schur complements (``O(n^2 m + n^3)`` per
instance), while a preconditioned Krylov solve usually needs a few tens to a few hundreds of sparse products.
For small problems (``n + m`` in the hundreds) the dense factorization is
faster and more robust: it does not depend on the conditioning of ``J``, and it handles singular ``J``
(CVXPY's non-unique auxiliary variables) by construction; GMRES on a singular but consistent system usually
still finds a solution, but an ill-conditioned ``J`` can need many iterations. Everything runs on any device
and in float32 or float64 (float32 cannot reach tolerances far below ``1e-6``); no step moves data between host
and device except the Python-level convergence tests (one scalar per restart / iteration).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from amortcvx.canon.data import ConeData, QPData, SparseBatch
from amortcvx.iterations.linalg import SparseOperator, matvec, rmatvec, sparse_operator

if TYPE_CHECKING:
    from amortcvx.iterations.kkt import DualJacobian

Data = ConeData | QPData
Operator = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["GmresResult", "KrylovResult", "gmres", "kkt_operator", "kkt_preconditioner", "solve_kkt_krylov"]


# ---------------------------------------------------------------------------------------------- the operator
def _canonical(data) -> Data:
    """The canonical data of ``data``: a :class:`ConeData` / :class:`QPData`, or the ``.data`` of a ``kkt.Batch``."""
    inner = data if isinstance(data, (ConeData, QPData)) else getattr(data, "data", None)
    if not isinstance(inner, (ConeData, QPData)):
        raise TypeError(f"expected ConeData, QPData or kkt.Batch; got {type(data).__name__}")
    return inner


class _Products(NamedTuple):
    """The sparse operators of one batch (built once) and the block sizes."""

    A: SparseOperator
    P: SparseOperator | None
    n: int
    m: int


def _products(data: Data, dtype: torch.dtype) -> _Products:
    A = sparse_operator(data.A, dtype)
    P = None if data.P is None else sparse_operator(data.P, dtype)
    m, n = data.A.shape
    return _Products(A, P, int(n), int(m))


def _apply(ops: _Products, jac: DualJacobian, z: torch.Tensor, transpose: bool, delta: float) -> torch.Tensor:
    """``J_delta z`` or ``J_delta' z`` (see :func:`kkt_operator`)."""
    n = ops.n
    zx, zw = z[:, :n], z[:, n:]
    if transpose:  # J' = [[P', A'], [D' A, D' - I]]
        top = ops.A.rmatvec(zw)
        bottom = jac.rmatvec(ops.A.matvec(zx) + zw) - zw
        if ops.P is not None:
            top = top + ops.P.rmatvec(zx)
    else:
        dw = jac.matvec(zw)
        top = ops.A.rmatvec(dw)
        bottom = ops.A.matvec(zx) + dw - zw
        if ops.P is not None:
            top = top + ops.P.matvec(zx)
    if delta:
        top = top + delta * zx
        bottom = bottom - delta * zw
    return torch.cat([top, bottom], dim=1)


def kkt_operator(data, jac: DualJacobian, *, transpose: bool = False, delta: float = 0.0) -> Operator:
    """The matrix-free ``z -> J z`` (or ``z -> J' z``) of ``J = [[P, A' D], [A, D - I]]``, batched.

    Only sparse products with the canonical data and products with ``D`` are used; no dense ``(B, m, n)`` or
    ``(B, n + m, n + m)`` matrix is formed. The sparse operators (with their transposes) are built once, here.

    Args:
        data: the batch: :class:`~amortcvx.canon.data.ConeData` / :class:`~amortcvx.canon.data.QPData` (or a
            ``kkt.Batch``, whose canonical ``.data`` is used). ``A`` and ``P`` may be shared by the batch.
        jac: ``D = dy/dw`` per instance (:func:`amortcvx.iterations.kkt.dual_jacobian`); its dtype is the working
            dtype of the products.
        transpose: apply ``J'`` instead of ``J``.
        delta: adds ``delta diag(I_n, -I_m)`` (the regularization of :func:`amortcvx.iterations.kkt.solve_dense`).

    Returns:
        A callable mapping ``z`` (B, n + m) to ``J z`` (B, n + m); differentiable in ``z`` and in the data.
    """
    ops = _products(_canonical(data), jac.diag.dtype)
    return lambda z: _apply(ops, jac, z, transpose, float(delta))


# ---------------------------------------------------------------------------------------------- preconditioner
def _matrix_diagonal(mat: SparseBatch, dtype: torch.dtype) -> torch.Tensor:
    """The diagonal of a square :class:`SparseBatch`, (B or 1, n), from its stored entries."""
    rows, cols = mat.coo()
    on = torch.as_tensor(rows == cols, device=mat.values.device)
    values = (mat.values[:1] if mat.shared else mat.values).to(dtype)
    index = torch.as_tensor(cols, device=mat.values.device)[on]
    out = values.new_zeros(values.shape[0], mat.shape[1])
    return out.index_add(1, index, values[:, on])


def kkt_preconditioner(data, jac: DualJacobian, *, delta: float = 0.0, floor: float = 1e-8) -> Operator:
    """A diagonal right preconditioner ``v -> M^-1 v`` for ``J`` (and ``J'``), built from sparse data.

    ``M = diag(d_x, d_w)`` is a Jacobi approximation of the block-diagonal Schur-complement preconditioner
    ``diag(P + A' D A, -(S + I - D))`` of a saddle-point matrix (``S`` the Schur complement of the first block)::

        d_x = diag(P) + sum_i D_ii A_ij^2 + delta
        d_w = (D_ii - 1) - D_ii sum_j A_ij^2 / d_x_j - delta

    with ``D_ii`` the diagonal of ``D`` (the off-diagonal entries of nonlinear-cone blocks are ignored). On an
    LP / QP the rows of the active set get the (diagonal of the) Schur complement ``-A_S diag(d_x)^-1 A_S'``,
    the others ``-1``. ``d_x`` is floored at ``floor * max(d_x)`` (a variable that appears in no active
    constraint and not in ``P`` has ``d_x = 0``), ``d_w`` at ``-floor``; the same ``M`` serves ``J'``.

    Args:
        data: the batch (see :func:`kkt_operator`).
        jac: ``D`` per instance.
        delta: the regularization of the operator being preconditioned.
        floor: relative floor of the diagonals.

    Returns:
        A callable mapping ``v`` (B, n + m) to ``M^-1 v``.
    """
    data = _canonical(data)
    dtype = jac.diag.dtype
    dd = jac.diagonal()
    sq = data.A.values[:1] if data.A.shared else data.A.values
    squares = SparseOperator(SparseBatch(data.A.indices, data.A.indptr, data.A.shape, sq.to(dtype) ** 2,
                                         data.A.shared), dtype)
    dx = squares.rmatvec(dd)  # sum_i D_ii A_ij^2
    if data.P is not None:
        dx = dx + _matrix_diagonal(data.P, dtype)
    dx = dx.abs() + delta
    dx = torch.maximum(dx, (floor * dx.amax(dim=1, keepdim=True)).clamp_min(torch.finfo(dtype).tiny))
    schur = squares.matvec((1.0 / dx).expand(dd.shape[0], -1))
    dw = (dd - 1.0) - dd * schur - delta
    dw = torch.minimum(dw, torch.full_like(dw, -floor))
    inv = torch.cat([1.0 / dx.expand(dd.shape[0], -1), 1.0 / dw], dim=1)
    return lambda v: v * inv


# ---------------------------------------------------------------------------------------------- GMRES
class GmresResult(NamedTuple):
    """The answer of :func:`gmres`.

    Attributes:
        z: (B, N) the iterate with the smallest true residual found (zero where ``rhs`` is zero).
        residual: (B,) ``||rhs - apply(z)|| / ||rhs||`` (the absolute residual where ``rhs`` is zero).
        iterations: (B,) int64, the Arnoldi steps each instance took part in (products with ``apply``, not
            counting one residual product per restart).
    """

    z: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor


def _relative(rnorm: torch.Tensor, bnorm: torch.Tensor) -> torch.Tensor:
    rel = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), rnorm)
    return torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("inf")))


def gmres(apply: Operator, rhs: torch.Tensor, *, tol: float = 1e-10, restart: int = 50, max_iters: int = 500,
          precond: Operator | None = None, z0: torch.Tensor | None = None) -> GmresResult:
    """Batched restarted GMRES for ``apply(z) = rhs``, one independent system per row.

    All instances advance together (one call of ``apply`` on the whole batch per iteration); each has its own
    basis, rotations and convergence test: an instance stops contributing to a restart cycle once its residual
    estimate is below ``tol ||rhs||`` (or its Hessenberg column degenerates), and its answer is not affected by
    the others. At the end of every cycle the true residual is recomputed and an instance keeps the new iterate
    only where the residual decreased, so the returned iterate is the best one seen. The whole call stops when
    every instance has ``||rhs - apply(z)|| <= tol ||rhs||`` or after ``max_iters`` iterations. An instance
    with ``rhs = 0`` (and no ``z0``) returns 0 without iterating.

    Args:
        apply: ``z`` (B, N) -> ``A z`` (B, N), batched.
        rhs: (B, N).
        tol: relative tolerance on the true residual.
        restart: Krylov dimension of a cycle.
        max_iters: total iterations (products with ``apply`` inside the cycles).
        precond: optional right preconditioner ``v -> M^-1 v``: GMRES runs on ``A M^-1`` and returns
            ``z = M^-1 u``, so the residuals are those of the original system.
        z0: optional starting point (B, N); zero by default.

    Returns:
        A :class:`GmresResult` ``(z, residual, iterations)``.
    """
    if rhs.ndim != 2:
        raise ValueError(f"rhs must have shape (B, N); got {tuple(rhs.shape)}")
    if restart < 1:
        raise ValueError(f"restart must be positive; got {restart}")
    B, N = rhs.shape
    dtype, device = rhs.dtype, rhs.device
    info = torch.finfo(dtype)
    z = torch.zeros_like(rhs) if z0 is None else z0.clone()
    r = rhs.clone() if z0 is None else rhs - apply(z)
    bnorm = torch.linalg.vector_norm(rhs, dim=1)
    rnorm = torch.linalg.vector_norm(r, dim=1)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    target = tol * bnorm
    used = 0
    while used < max_iters:
        todo = torch.isfinite(rnorm) & (rnorm > target) & (rnorm > 0)
        if not bool(todo.any()):
            break
        k_max = min(restart, max_iters - used)
        beta = torch.where(todo, rnorm, torch.zeros_like(rnorm))
        V = rhs.new_zeros(B, k_max + 1, N)
        V[:, 0] = r * torch.where(todo, 1.0 / torch.where(todo, rnorm, 1.0), 0.0)[:, None]
        G = torch.eye(k_max + 1, dtype=dtype, device=device).repeat(B, 1, 1)  # accumulated Givens rotations
        R = rhs.new_zeros(B, k_max, k_max)  # the rotated (upper-triangular) Hessenberg matrix
        steps = torch.zeros(B, dtype=torch.int64, device=device)  # columns of R that count, per instance
        running = todo.clone()
        for j in range(k_max):
            v = V[:, j]
            w = apply(v if precond is None else precond(v))
            basis = V[:, :j + 1]
            h = matvec(basis, w)  # classical Gram-Schmidt, twice
            w = w - rmatvec(basis, h)
            h2 = matvec(basis, w)
            w = w - rmatvec(basis, h2)
            h = h + h2
            hn = torch.linalg.vector_norm(w, dim=1)
            col = torch.cat([h, hn.unsqueeze(1)], dim=1)  # (B, j + 2)
            scale = torch.linalg.vector_norm(col, dim=1)
            rot = matvec(G[:, :j + 2, :j + 2], col)
            a, b = rot[:, j], rot[:, j + 1]
            rho = torch.hypot(a, b)
            ok = rho > 100 * info.eps * scale  # else: a dependent column (singular Hessenberg), not used
            safe = torch.where(ok, rho, torch.ones_like(rho))
            c = torch.where(ok, a / safe, torch.ones_like(a))
            s = torch.where(ok, b / safe, torch.zeros_like(b))
            R[:, :j, j] = rot[:, :j]
            R[:, j, j] = torch.where(ok, rho, torch.ones_like(rho))
            gj, gj1 = G[:, j].clone(), G[:, j + 1].clone()
            G[:, j] = c[:, None] * gj + s[:, None] * gj1
            G[:, j + 1] = c[:, None] * gj1 - s[:, None] * gj
            V[:, j + 1] = w * torch.where(hn > info.tiny / info.eps, 1.0 / torch.where(hn > 0, hn, 1.0), 0.0)[:, None]
            iterations += running.to(torch.int64)
            take = running & ok
            steps = torch.where(take, j + 1, steps)
            estimate = beta * G[:, j + 1, 0].abs()
            running = take & (estimate > target) & (hn > info.tiny / info.eps)
            if not bool(running.any()):
                k_max = j + 1
                break
        used += k_max
        keep = torch.arange(k_max, device=device)[None, :] < steps[:, None]  # (B, k)
        eye = torch.eye(k_max, dtype=dtype, device=device)
        Rk = torch.where(keep[:, None, :], R[:, :k_max, :k_max], eye)
        g = torch.where(keep, beta[:, None] * G[:, :k_max, 0], 0.0)
        y = torch.linalg.solve_triangular(Rk, g.unsqueeze(-1), upper=True).squeeze(-1)
        u = rmatvec(V[:, :k_max], y)
        cand = z + (u if precond is None else precond(u))
        r_new = rhs - apply(cand)
        n_new = torch.linalg.vector_norm(r_new, dim=1)
        better = todo & torch.isfinite(n_new) & (n_new < rnorm)
        z = torch.where(better[:, None], cand, z)
        r = torch.where(better[:, None], r_new, r)
        progress = better & (n_new < (1 - 1e-3) * rnorm)
        rnorm = torch.where(better, n_new, rnorm)
        if not bool(progress.any()):
            break  # no instance moved: restarting from the same point would repeat the same cycle
    return GmresResult(z, _relative(rnorm, bnorm), iterations)


# ---------------------------------------------------------------------------------------------- the solve
class KrylovResult(NamedTuple):
    """The answer of :func:`solve_kkt_krylov`.

    Attributes:
        z: (B, n + m) the solution (the best iterate where an instance did not converge).
        residual: (B,) ``||rhs - J z|| / ||rhs||`` with the unregularized ``J`` (``||rhs - J z||`` where
            ``rhs = 0``); larger than ``tol`` where an instance did not converge, e.g. an inconsistent singular
            system.
        iterations: (B,) int64 GMRES iterations per instance, over all refinement passes.
        converged: (B,) bool, ``residual <= tol``.
    """

    z: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


def solve_kkt_krylov(data, jac: DualJacobian, rhs: torch.Tensor, *, transpose: bool = False, tol: float = 1e-10,
                     max_iters: int = 500, restart: int = 50, delta: float = 1e-8, passes: int = 4,
                     precondition: bool = True) -> KrylovResult:
    """``J^-1 rhs`` (or ``J'^-1 rhs``) per instance, matrix-free: the sparse counterpart of ``kkt.solve_kkt``.

    Iterative refinement against the unregularized ``J``: ``z = 0``, then up to ``passes`` times
    ``z += J_delta^-1 (rhs - J z)``, each inner solve by right-preconditioned :func:`gmres` on the regularized
    ``J_delta = J + delta diag(I_n, -I_m)`` (:func:`kkt_preconditioner`). The regularization keeps the inner
    systems nonsingular where ``J`` is singular (CVXPY's non-unique auxiliary variables); the refinement
    removes its effect on the range of ``J``. For a nonsingular ``J`` the result is the exact solution (to
    ``tol`` relative residual); for a consistent singular system, a solution. An instance that does not reach
    ``tol`` (an inconsistent system, or the iteration budget) gets its best iterate, and its ``residual`` and
    ``converged`` say so: the caller decides (e.g. fall back to the dense path on those instances).

    Runs without autograd (the answer carries no graph). Works on any device, in the dtype of ``jac`` (data and
    ``rhs`` are cast to it).

    Args:
        data: the batch (:class:`ConeData` / :class:`QPData`, or a ``kkt.Batch``).
        jac: ``D = dy/dw`` per instance.
        rhs: (B, n + m).
        transpose: solve ``J' z = rhs``.
        tol: relative residual target ``||rhs - J z|| <= tol ||rhs||``.
        max_iters: GMRES iterations in all, over the refinement passes.
        restart: Krylov dimension of a GMRES cycle.
        delta: regularization of the inner solves (0: GMRES on ``J`` itself).
        passes: largest number of refinement passes (inner solves).
        precondition: use :func:`kkt_preconditioner` (else plain GMRES).

    Returns:
        A :class:`KrylovResult` ``(z, residual, iterations, converged)``.
    """
    dtype = jac.diag.dtype
    rhs = rhs.to(dtype)
    with torch.no_grad():
        ops = _products(_canonical(data), dtype)
        if rhs.shape[1] != ops.n + ops.m:
            raise ValueError(f"rhs must have shape (B, n + m) = (B, {ops.n + ops.m}); got {tuple(rhs.shape)}")
        exact = lambda v: _apply(ops, jac, v, transpose, 0.0)  # noqa: E731
        regularized = lambda v: _apply(ops, jac, v, transpose, float(delta))  # noqa: E731
        precond = kkt_preconditioner(data, jac, delta=float(delta)) if precondition else None
        B = rhs.shape[0]
        z = torch.zeros_like(rhs)
        bnorm = torch.linalg.vector_norm(rhs, dim=1)
        rnorm = bnorm.clone()
        r = rhs
        iterations = torch.zeros(B, dtype=torch.int64, device=rhs.device)
        used = 0
        for _ in range(max(1, passes)):
            todo = torch.isfinite(rnorm) & (rnorm > tol * bnorm) & (rnorm > 0)
            if not bool(todo.any()) or used >= max_iters:
                break
            # relative to the current residual, what is still missing (the regularization's error, of order
            # delta ||dz||, is what the next pass removes)
            need = tol * bnorm / torch.where(todo, rnorm, 1.0)
            inner_tol = max(float(need[todo].min()), 100 * torch.finfo(dtype).eps)
            out = gmres(regularized, torch.where(todo[:, None], r, 0.0), tol=inner_tol, restart=restart,
                        max_iters=max_iters - used, precond=precond)
            used += int(out.iterations.max())
            iterations += out.iterations
            cand = z + out.z
            r_new = rhs - exact(cand)
            n_new = torch.linalg.vector_norm(r_new, dim=1)
            better = todo & torch.isfinite(n_new) & (n_new < rnorm)
            z = torch.where(better[:, None], cand, z)
            r = torch.where(better[:, None], r_new, r)
            rnorm = torch.where(better, n_new, rnorm)
            if not bool(better.any()):
                break
        residual = _relative(rnorm, bnorm)
    return KrylovResult(z, residual, iterations, residual <= tol)
