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
Dense, batched: ``(B, n + m, n + m)`` systems (small and medium problems).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from amortcvx.canon.data import ConeData, QPData
from amortcvx.iterations.cones import project_dual_cone
from amortcvx.iterations.linalg import dense_batch, matvec, rmatvec

Data = ConeData | QPData


class Point(NamedTuple):
    """A primal-dual point in the normal-map variables: ``x`` (B, n), ``w`` (B, m)."""

    x: torch.Tensor
    w: torch.Tensor


class Dense(NamedTuple):
    """The data of a batch as dense float64 tensors (leading dimension 1 when shared by the batch).

    ``lin`` is ``c`` (cone form) or ``q`` (QP form); ``b`` is set in the cone form, ``l``/``u`` in the QP form.
    """

    P: torch.Tensor | None
    A: torch.Tensor
    lin: torch.Tensor
    b: torch.Tensor | None
    l: torch.Tensor | None
    u: torch.Tensor | None
    data: Data


def dense(data: Data, dtype: torch.dtype = torch.float64) -> Dense:
    """Dense copies of a batch (differentiable with respect to the data)."""
    P = None if data.P is None else dense_batch(data.P, dtype=dtype)
    A = dense_batch(data.A, dtype=dtype)
    if isinstance(data, ConeData):
        return Dense(P, A, data.c.to(dtype), data.b.to(dtype), None, None, data)
    return Dense(P, A, data.q.to(dtype), None, data.l.to(dtype), data.u.to(dtype), data)


def dual_of(d: Dense, w: torch.Tensor) -> torch.Tensor:
    """``y(w)``: ``Pi_K*(w)`` (cone form) or ``w - clip(w, l, u)`` (QP form)."""
    if d.b is not None:
        return project_dual_cone(w, d.data.cones)
    return w - torch.minimum(torch.maximum(w, d.l), d.u)


def slack_of(d: Dense, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cone form's slack ``s = y - w``, or the QP form's ``z = w - y``."""
    return y - w if d.b is not None else w - y


def residual(d: Dense, pt: Point) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F1, F2)`` of the module docstring, batched; differentiable in the data and the point."""
    y = dual_of(d, pt.w)
    f1 = matvec(d.A.mT, y) + d.lin
    if d.P is not None:
        f1 = f1 + matvec(d.P, pt.x)
    ax = matvec(d.A, pt.x)
    f2 = ax - (d.b - (y - pt.w)) if d.b is not None else ax - (pt.w - y)
    return f1, f2


def residual_norm(d: Dense, pt: Point) -> torch.Tensor:
    """``||F||_inf`` per instance (B,)."""
    f1, f2 = residual(d, pt)
    return torch.cat([f1, f2], dim=1).abs().amax(dim=1)


def dual_jacobian(d: Dense, w: torch.Tensor) -> torch.Tensor:
    """``D = dy/dw`` per instance, dense ``(B, m, m)`` (block diagonal by cone).

    Zero-cone rows: 1; nonnegative rows: ``[w > 0]``; QP form: 1 where the box projection is clipped (an
    active bound), else 0. SOC / PSD / exp blocks: the Jacobian of their projection, by one batched
    vector-Jacobian product per row of the nonlinear blocks.
    """
    B, m = w.shape
    if d.b is None:
        inside = (w > d.l) & (w < d.u)
        return torch.diag_embed((~inside).to(w.dtype))
    cones = d.data.cones
    lin = cones.zero + cones.nonneg
    diag = torch.cat([torch.ones(B, cones.zero, dtype=w.dtype, device=w.device),
                      (w[:, cones.zero:lin] > 0).to(w.dtype),
                      torch.zeros(B, m - lin, dtype=w.dtype, device=w.device)], dim=1)
    jac = torch.diag_embed(diag)
    if lin < m:
        rows = m - lin
        with torch.enable_grad():
            wv = w.detach().requires_grad_(True)
            out = project_dual_cone(wv, cones)[:, lin:]
            eye = torch.eye(rows, dtype=w.dtype, device=w.device)
            seeds = eye[:, None, :].expand(rows, B, rows)
            try:
                (grads,) = torch.autograd.grad(out, wv, seeds, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):  # a projection without a batching rule
                grads = torch.stack([torch.autograd.grad(out, wv, seeds[j], retain_graph=True)[0]
                                     for j in range(rows)])
        jac[:, lin:, :] = grads.permute(1, 0, 2)  # grads[j, b, :] = d out[b, j] / d w[b, :]
    return jac


def kkt_matrix(d: Dense, jac_y: torch.Tensor) -> torch.Tensor:
    """``J = [[P, A' D], [A, D - I]]``, dense ``(B, n + m, n + m)``."""
    B, m, _ = jac_y.shape
    A = d.A.expand(B, -1, -1)
    n = A.shape[2]
    top_left = torch.zeros(B, n, n, dtype=A.dtype, device=A.device) if d.P is None else d.P.expand(B, -1, -1)
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    top = torch.cat([top_left, A.mT @ jac_y], dim=2)
    bottom = torch.cat([A, jac_y - eye], dim=2)
    return torch.cat([top, bottom], dim=1)


def solve_dense(J: torch.Tensor, rhs: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``J^-1 rhs`` (or ``J'^-1 rhs``) per instance; singular instances by least squares (minimum norm)."""
    mat = J.mT if transpose else J
    sol, info = torch.linalg.solve_ex(mat, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        sol[idx] = (torch.linalg.pinv(mat[idx]) @ rhs[idx].unsqueeze(-1)).squeeze(-1)
    return sol


def newton_refine(d: Dense, pt: Point, *, steps: int = 4, tol: float = 1e-13) -> tuple[Point, torch.Tensor]:
    """Semismooth Newton steps on ``F`` from ``pt``, accepted per instance only where ``||F||`` decreases.

    Stops early once every instance has ``||F||_inf <= tol (1 + scale)``. Returns the point and ``||F||_inf``.
    """
    with torch.no_grad():
        norm = residual_norm(d, pt)
        scale = 1.0 + d.lin.abs().amax(dim=1) + (d.b.abs().amax(dim=1) if d.b is not None else 0.0)
        for _ in range(steps):
            todo = torch.isfinite(norm) & (norm > tol * scale)
            if not bool(todo.any()):
                break
            f1, f2 = residual(d, pt)
            J = kkt_matrix(d, dual_jacobian(d, pt.w))
            delta = solve_dense(J, torch.cat([f1, f2], dim=1))
            n = pt.x.shape[1]
            cand = Point(pt.x - delta[:, :n], pt.w - delta[:, n:])
            cnorm = residual_norm(d, cand)
            take = todo & torch.isfinite(cnorm) & (cnorm < norm)
            if not bool(take.any()):
                break
            pt = Point(torch.where(take[:, None], cand.x, pt.x), torch.where(take[:, None], cand.w, pt.w))
            norm = torch.where(take, cnorm, norm)
    return pt, norm


class ImplicitSolution(torch.autograd.Function):
    """``theta -> (x, y, slack)`` at a given solution, differentiated implicitly through ``F = 0``.

    Forward returns the solution given to it (computed without autograd). Backward, for output gradients
    ``(gx, gy, gs)``: ``g_w = D' gy + (dslack/dw)' gs``, ``lam = J'^-1 [gx; g_w]``, and the parameter gradient
    ``-(dF/dtheta)' lam`` by autograd through ``canonicalize(theta)`` and ``F`` at the fixed point. Failed
    instances (``failed``) get NaN gradients.
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                canonicalize: Callable[[torch.Tensor], Data], failed: torch.Tensor):  # noqa: D102
        ctx.canonicalize = canonicalize
        ctx.save_for_backward(theta, x, w, failed)
        with torch.no_grad():
            d = dense(canonicalize(theta.detach()))
            y = dual_of(d, w)
            slack = slack_of(d, w, y)
        nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
        mask = failed[:, None]
        return (torch.where(mask, nan, x), torch.where(mask, nan, y), torch.where(mask, nan, slack))

    @staticmethod
    def backward(ctx, gx: torch.Tensor, gy: torch.Tensor, gs: torch.Tensor):  # noqa: D102
        theta, x, w, failed = ctx.saved_tensors
        x0 = torch.where(failed[:, None], torch.zeros_like(x), x)
        w0 = torch.where(failed[:, None], torch.zeros_like(w), w)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            d = dense(ctx.canonicalize(th))
            with torch.no_grad():
                jac_y = dual_jacobian(d, w0)
                J = kkt_matrix(_detached(d), jac_y)
                sign = 1.0 if d.b is not None else -1.0  # slack = y - w (cone) or w - y (QP)
                eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
                jac_s = sign * (jac_y - eye)
                gx0, gy0, gs0 = (torch.nan_to_num(g) if g is not None else None for g in (gx, gy, gs))
                gw = torch.zeros_like(w0)
                if gy0 is not None:
                    gw = gw + rmatvec(jac_y, gy0)
                if gs0 is not None:
                    gw = gw + rmatvec(jac_s, gs0)
                rhs = torch.cat([gx0 if gx0 is not None else torch.zeros_like(x0), gw], dim=1)
                lam = solve_dense(J, rhs, transpose=True)
            f1, f2 = residual(d, Point(x0, w0))
            n = x.shape[1]
            pairs = [(f, -g) for f, g in ((f1, lam[:, :n]), (f2, lam[:, n:])) if f.requires_grad]
            grad = None
            if pairs:
                (grad,) = torch.autograd.grad([f for f, _ in pairs], th, [g for _, g in pairs], allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(theta)
        grad = torch.where(failed[:, None], torch.full_like(grad, float("nan")), grad)
        return grad, None, None, None, None


def _detached(d: Dense) -> Dense:
    return Dense(*(t.detach() if isinstance(t, torch.Tensor) else t for t in d))
