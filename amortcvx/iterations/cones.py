"""Batched, differentiable Euclidean projections onto the cones of SCS 3, in torch.

Every function here is pure (never writes into its input), works on any device and floating dtype, is batched
over arbitrary leading dimensions, and runs without host-device synchronisation (no ``.item()``, no boolean
indexing, fixed iteration counts). Gradients are exact almost everywhere:

* nonneg, SOC: closed forms written with guarded ``torch.where`` (no NaN gradients at the kinks).
* PSD: a custom autograd function with the Daleckii-Krein (Loewner) derivative, so repeated eigenvalues
  (the zero matrix, the identity) give finite, correct gradients.
* exp: the root of Friberg's univariate function is found without autograd; its gradient comes from the
  implicit function theorem (one Newton correction that keeps the value and carries the derivative).

Row conventions follow SCS 3 / CVXPY (see :class:`amortcvx.canon.data.ConeDims`): rows ordered zero, nonneg,
SOC, PSD, exp; SOC blocks are ``(t, x)`` with ``||x||_2 <= t``; a PSD block of order ``n`` is SCS's scaled
``svec`` (lower triangle, column by column, off-diagonal entries times ``sqrt(2)``); exp blocks are triples
``(x, y, z)`` of ``cl{y exp(x / y) <= z, y > 0}``. See ``docs/cones.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from amortcvx.canon.data import ConeDims

__all__ = [
    "ConeLayout",
    "cone_layout",
    "dual_cone_distance",
    "eigh",
    "in_cone_distance",
    "project_cone",
    "project_dual_cone",
    "project_exp",
    "project_exp_dual",
    "project_nonneg",
    "project_psd",
    "project_soc",
    "smat",
    "svec",
]

_SQRT2 = math.sqrt(2.0)
# Finite stand-in for +-infinity in the exp-cone root bracket (as in SCS).
_EXP_BIG = 1e15
# Default number of safeguarded Newton steps of the exp-cone root search (enough for float64, see docs).
EXP_NEWTON_ITERS = 6


def _check_floating(z: Tensor, name: str) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


# ----------------------------------------------------------------------------------------------------------
# nonneg, SOC


def project_nonneg(z: Tensor) -> Tensor:
    """Projection onto the nonnegative orthant, ``max(z, 0)`` elementwise.

    Args:
        z: tensor of any shape.

    Returns:
        Tensor of the same shape.
    """
    _check_floating(z, "z")
    return z.clamp_min(0)


def project_soc(z: Tensor) -> Tensor:
    """Projection onto the second-order cone ``{(t, x) : ||x||_2 <= t}`` (``t`` first), batched.

    With ``r = ||x||_2``::

        Pi(t, x) = (t, x)                                  if r <= t
                 = 0                                       if r <= -t
                 = (t + r) / 2 * (1, x / r)                otherwise.

    Args:
        z: tensor ``(..., k)`` with ``k >= 1``; each trailing vector is one cone.

    Returns:
        Tensor ``(..., k)``. Differentiable away from the two boundaries ``r = |t|``; no NaN gradients at
        ``x = 0``.
    """
    _check_floating(z, "z")
    if z.shape[-1] < 1:
        raise ValueError(f"project_soc: the last dimension of z (the cone size) must be >= 1, got shape "
                         f"{tuple(z.shape)}")
    t = z[..., :1]
    x = z[..., 1:]
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # its gradient at x = 0 is 0
    # alpha = (t + r) / 2 is <= 0 exactly in the polar cone (relu: 0 there, gradient 0 on its boundary too); x's
    # factor alpha / r is finite at x = 0 through r's floor (and any factor gives 0 there)
    alpha = torch.relu(0.5 * (t + r))
    mixed = torch.cat([alpha, x * (alpha / r.clamp_min(torch.finfo(r.dtype).tiny))], dim=-1)
    return torch.where(r <= t, z, mixed)


# ----------------------------------------------------------------------------------------------------------
# PSD (scaled svec, SCS convention)


def svec_size(order: int) -> int:
    """Length ``n (n + 1) / 2`` of the svec of an ``n x n`` symmetric matrix."""
    return order * (order + 1) // 2


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"PSD order must be a positive int, got {order!r}")
    return int(order)


@functools.cache
def _svec_indices(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index tables of the scaled svec of order ``n`` (cached, host side).

    Returns:
        ``(lower, full, offdiag)``: ``lower[p]`` is the row-major flat index ``i * n + j`` (``i >= j``) of
        svec entry ``p`` (lower triangle, column by column); ``full[i * n + j]`` is the svec position of the
        matrix entry ``(i, j)`` (both triangles); ``offdiag[p]`` says whether svec entry ``p`` is off the
        diagonal.
    """
    n = order
    lower, offdiag = [], []
    full = np.empty(n * n, dtype=np.int64)
    p = 0
    for j in range(n):
        for i in range(j, n):
            lower.append(i * n + j)
            offdiag.append(i != j)
            full[i * n + j] = p
            full[j * n + i] = p
            p += 1
    return np.asarray(lower, dtype=np.int64), full, np.asarray(offdiag, dtype=bool)


@functools.cache
def _svec_tensors(order: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Device copies of :func:`_svec_indices` plus the scale vectors (cached per device and dtype)."""
    lower, full, offdiag = _svec_indices(order)
    up = np.where(offdiag, _SQRT2, 1.0)
    down = 1.0 / up[full]
    return (torch.as_tensor(lower, device=device), torch.as_tensor(full, device=device),
            torch.as_tensor(up, device=device, dtype=dtype),
            torch.as_tensor(down, device=device, dtype=dtype))


def svec(X: Tensor) -> Tensor:
    """Scaled lower-triangular vectorization of symmetric matrices (SCS 3 / CVXPY convention).

    ``svec(X) = (X_00, sqrt2 X_10, ..., sqrt2 X_{n-1,0}, X_11, sqrt2 X_21, ..., X_{n-1,n-1})``: the lower
    triangle taken column by column, off-diagonal entries times ``sqrt(2)``, so that
    ``svec(X) . svec(Y) = trace(X Y)`` for symmetric ``X, Y``. Only the lower triangle of ``X`` is read.

    Args:
        X: tensor ``(..., n, n)``.

    Returns:
        Tensor ``(..., n (n + 1) / 2)``.
    """
    _check_floating(X, "X")
    if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"svec: X must have shape (..., n, n), got {tuple(X.shape)}")
    n = X.shape[-1]
    if n == 0:
        raise ValueError("svec: X must be at least 1 x 1, got an empty matrix")
    lower, _, up, _ = _svec_tensors(n, X.device, X.dtype)
    return X.reshape(*X.shape[:-2], n * n).index_select(-1, lower) * up


def smat(v: Tensor, order: int) -> Tensor:
    """Inverse of :func:`svec`: the symmetric matrices of order ``n`` whose scaled svec is ``v``.

    ``X_ii = v_p``, ``X_ij = X_ji = v_p / sqrt(2)`` for the svec position ``p`` of ``(i, j)``.

    Args:
        v: tensor ``(..., n (n + 1) / 2)``.
        order: the matrix order ``n``.

    Returns:
        Tensor ``(..., n, n)``, symmetric.
    """
    _check_floating(v, "v")
    n = _check_order(order)
    if v.shape[-1] != svec_size(n):
        raise ValueError(f"smat: a PSD cone of order {n} needs {svec_size(n)} svec entries, got last "
                         f"dimension {v.shape[-1]} (shape {tuple(v.shape)})")
    _, full, _, down = _svec_tensors(n, v.device, v.dtype)
    return (v.index_select(-1, full) * down).reshape(*v.shape[:-1], n, n)


EIGH_CHUNK = 16384
"""Most matrices per call of ``torch.linalg.eigh`` (:func:`eigh` cuts larger batches): on an H200 (torch 2.11,
CUDA 13) one call on 65,536 matrices of order 8 in float64 failed with ``CUSOLVER_STATUS_INTERNAL_ERROR``; 16,384
ran. The cut applies on every device (the CPU tests check it)."""


def eigh(X: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of the symmetric matrices ``X`` (..., n, n), at most :data:`EIGH_CHUNK` per call.

    Returns:
        Eigenvalues (..., n) in ascending order and eigenvectors (..., n, n), as ``torch.linalg.eigh``.
    """
    flat = X.reshape(-1, *X.shape[-2:])
    if flat.shape[0] <= EIGH_CHUNK:
        return torch.linalg.eigh(X)
    parts = [torch.linalg.eigh(chunk) for chunk in flat.split(EIGH_CHUNK)]
    w = torch.cat([p[0] for p in parts]).reshape(*X.shape[:-1])
    return w, torch.cat([p[1] for p in parts]).reshape(X.shape)


class _PsdMatrixProjection(torch.autograd.Function):
    """``X -> V max(L, 0) V'`` for symmetric ``X = V L V'``, with the Loewner derivative as backward.

    The derivative of the projection at ``X`` applied to a symmetric ``H`` is
    ``V (Gamma o (V' H V)) V'`` with ``Gamma_ij = (f(l_i) - f(l_j)) / (l_i - l_j)``, ``f = max(., 0)``,
    i.e. 1 if both eigenvalues are positive, 0 if both are ``<= 0``, and the divided difference otherwise
    (its denominator is then nonzero). The map is self-adjoint, so the backward applies it to the symmetric
    part of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, X: Tensor) -> Tensor:  # noqa: D102
        w, V = eigh(X)
        P = (V * w.clamp_min(0).unsqueeze(-2)) @ V.mT
        ctx.save_for_backward(w, V)
        return P

    @staticmethod
    @once_differentiable
    def backward(ctx, G: Tensor) -> Tensor:  # noqa: D102
        w, V = ctx.saved_tensors
        Gt = V.mT @ (0.5 * (G + G.mT)) @ V
        wi = w.unsqueeze(-1)
        wj = w.unsqueeze(-2)
        pi = wi > 0
        pj = wj > 0
        mixed_mask = pi ^ pj
        denom = torch.where(mixed_mask, wi - wj, torch.ones_like(wi - wj))
        mixed = (wi.clamp_min(0) - wj.clamp_min(0)) / denom
        gamma = torch.where(pi & pj, torch.ones_like(mixed), torch.where(mixed_mask, mixed,
                                                                         torch.zeros_like(mixed)))
        return V @ (gamma * Gt) @ V.mT


def project_psd(z: Tensor, order: int) -> Tensor:
    """Projection onto the PSD cone of order ``n``, in SCS's scaled svec coordinates.

    ``Pi(z) = svec(V max(L, 0) V')`` where ``smat(z) = V L V'`` (eigendecomposition). Because the scaled svec
    is an isometry (``||svec(X)||_2 = ||X||_F``), this is the Euclidean projection in svec coordinates, the
    one SCS applies to the rows of a PSD cone.

    Args:
        z: tensor ``(..., n (n + 1) / 2)``.
        order: the matrix order ``n``.

    Returns:
        Tensor of the same shape. Differentiable wherever no eigenvalue is zero, including at repeated
        eigenvalues (custom Loewner backward; no NaN gradients).
    """
    _check_floating(z, "z")
    n = _check_order(order)
    if z.shape[-1] != svec_size(n):
        raise ValueError(f"project_psd: a PSD cone of order {n} needs {svec_size(n)} svec entries, got last "
                         f"dimension {z.shape[-1]} (shape {tuple(z.shape)})")
    if n == 1:
        return z.clamp_min(0)
    return svec(_PsdMatrixProjection.apply(smat(z, n)))


# ----------------------------------------------------------------------------------------------------------
# exponential cone (Friberg 2021)


def _exp_scaled_h(r0: Tensor, s0: Tensor, t0: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """Friberg's function ``h(rho)`` and ``h'(rho)``, both multiplied by ``exp(-|rho|)`` (no overflow).

    ``h(rho) = ((rho-1) r0 + s0) e^rho - (r0 - rho s0) e^-rho - (rho^2 - rho + 1) t0``. The common positive
    factor leaves the sign of ``h`` and the Newton step ``h / h'`` unchanged.
    """
    a = torch.abs(rho)
    ep = torch.exp(rho - a)
    em = torch.exp(-rho - a)
    e0 = torch.exp(-a)
    f = ((rho - 1) * r0 + s0) * ep - (r0 - rho * s0) * em - (rho * (rho - 1) + 1) * t0 * e0
    df = (rho * r0 + s0) * ep + (r0 - (rho - 1) * s0) * em - (2 * rho - 1) * t0 * e0
    return f, df


def _exp_bracket(r0: Tensor, s0: Tensor, t0: Tensor, pdist: Tensor, ddist: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper bound on the root ``rho`` of ``h`` (Friberg 2021, Section 4; no autograd).

    Only meaningful where not both ``r0 <= 0`` and ``s0 <= 0`` (that case is solved in closed form); other
    entries get some finite bracket that is never used.
    """
    big = torch.full_like(r0, _EXP_BIG)
    low, upr = -big, big
    baselow, baseupr = -big, big
    tiny = 1e-12
    disc = torch.sqrt(r0 * r0 + s0 * s0 - r0 * s0)
    one = torch.ones_like(r0)

    dp = torch.sqrt(torch.clamp_min(pdist * pdist - torch.clamp_max(s0, 0) ** 2, 0))
    dd = torch.sqrt(torch.clamp_min(ddist * ddist - torch.clamp_max(r0, 0) ** 2, 0))

    # t0 > 0: rho >= log(t0 / ppsi); t0 < 0: rho <= -log(-t0 / dpsi). fmax/fmin drop NaN candidates.
    psi_p = torch.where(r0 > s0, (r0 - s0 + disc) / torch.where(r0 > s0, r0, one),
                        -s0 / torch.where(r0 > s0, -one, r0 - s0 - disc))
    ppsi = ((psi_p - 1) * r0 + s0) / (psi_p * (psi_p - 1) + 1)
    cand = torch.log(t0 / ppsi)
    low = torch.where((t0 > 0) & torch.isfinite(cand), torch.fmax(low, cand), low)
    psi_d = torch.where(s0 > r0, (r0 - disc) / torch.where(s0 > r0, s0, one),
                        (r0 - s0) / torch.where(s0 > r0, one, r0 + disc))
    dpsi = (r0 - psi_d * s0) / (psi_d * (psi_d - 1) + 1)
    cand = -torch.log(-t0 / dpsi)
    upr = torch.where((t0 < 0) & torch.isfinite(cand), torch.fmin(upr, cand), upr)

    # r0 > 0: rho > 1 - s0 / r0 (positive primal multiplier), plus a distance-based upper bound.
    rpos = r0 > 0
    r_safe = torch.where(rpos, r0, one)
    bl = 1 - s0 / r_safe
    baselow = torch.where(rpos, bl, baselow)
    low = torch.where(rpos, torch.maximum(low, bl), low)
    tpu = torch.clamp_min(torch.minimum(dd, dp + t0), tiny)
    omega = torch.exp(low) / (low * (low - 1) + 1)
    omega = torch.where(low < 2, torch.clamp_max(omega, math.exp(2.0) / 3.0), omega)
    val = r0 * omega
    sgn = torch.where(val < 0, -one, one)
    cand = torch.maximum(low, bl + tpu / torch.clamp_min(torch.abs(val), tiny) * sgn)
    upr = torch.where(rpos & ~torch.isnan(cand), torch.fmin(upr, cand), upr)

    # s0 > 0: rho < r0 / s0 (positive polar multiplier), plus a distance-based lower bound.
    spos = s0 > 0
    s_safe = torch.where(spos, s0, one)
    bu = r0 / s_safe
    baseupr = torch.where(spos, bu, baseupr)
    upr = torch.where(spos, torch.minimum(upr, bu), upr)
    tdl = -torch.clamp_min(torch.minimum(dp, dd - t0), tiny)
    omega = -torch.exp(-upr) / (upr * (upr - 1) + 1)
    omega = torch.where(upr > -1, torch.clamp_min(omega, -math.e / 3.0), omega)
    val = s0 * omega
    sgn = torch.where(val < 0, -one, one)
    cand = torch.minimum(upr, bu - tdl / torch.clamp_min(torch.abs(val), tiny) * sgn)
    low = torch.where(spos & ~torch.isnan(cand), torch.fmax(low, cand), low)

    # A valid, ordered bracket inside the base interval, despite rounding.
    low2 = torch.minimum(torch.maximum(torch.minimum(low, upr), baselow), baseupr)
    upr2 = torch.minimum(torch.maximum(torch.maximum(low, upr), baselow), baseupr)
    # (Where rounding leaves h with one sign at both ends, the root search moves toward the end where |g| is
    # smaller by its damped steps, and the final comparison with the closed-form candidates catches a miss.)
    return low2, upr2


def _exp_log_g(r0: Tensor, s0: Tensor, log_tn: Tensor, log_tp: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """``g = log P - log N`` and ``g'``, where ``h = P - N`` splits Friberg's ``h`` into positive terms.

    ``h(rho) = A - B - q t0`` with ``A = ((rho-1) r0 + s0) e^rho > 0``, ``B = (r0 - rho s0) e^-rho > 0``
    inside the bracket and ``q = rho^2 - rho + 1 > 0``; ``P = A + q max(-t0, 0)``, ``N = B + q max(t0, 0)``.
    ``g`` has the sign of ``h`` but is nearly linear in ``rho`` in the exponential tails, where Newton on ``h``
    itself would crawl by about one unit per step. Computed in log scale (no overflow), without autograd, in
    few elementwise kernels (this runs once per Newton step): ``log_tn = log max(-t0, 0)`` and
    ``log_tp = log max(t0, 0)`` are ``-inf`` where that part of ``t0`` is absent, so ``logaddexp`` drops it
    without a branch.
    """
    rm1 = rho - 1
    q = torch.addcmul(torch.ones_like(rho), rho, rm1)
    log_q = torch.log(q)
    # log(max(x, 0)) is -inf where x <= 0: the sign of g stays right at (and beyond) the bracket ends.
    log_a = torch.log(torch.addcmul(s0, rm1, r0).clamp_min_(0)).add_(rho)
    log_b = torch.log(torch.addcmul(r0, rho, s0, value=-1).clamp_min_(0)).sub_(rho)
    log_tqn = log_q + log_tn
    log_tqp = log_q + log_tp
    log_p = torch.logaddexp(log_a, log_tqn)
    log_n = torch.logaddexp(log_b, log_tqp)
    # P'/P = (rho r0 + s0) e^(rho - log P) + (2 rho - 1) / q * e^(log(q |t0|) - log P); N'/N likewise with
    # -(r0 - (rho - 1) s0) e^(-rho - log N).
    dlog_q = (2 * rho - 1) / q
    dp = torch.addcmul(s0, rho, r0).mul_(torch.exp(rho - log_p)).addcmul_(dlog_q, torch.exp(log_tqn - log_p))
    dn = torch.addcmul(r0, rm1, s0, value=-1).mul_(torch.exp(-(rho + log_n)))
    dn = dn.neg_().addcmul_(dlog_q, torch.exp(log_tqp - log_n))
    return log_p - log_n, dp.sub_(dn)


def _exp_root(r0: Tensor, s0: Tensor, t0: Tensor, low: Tensor, upr: Tensor, iters: int) -> Tensor:
    """Root of ``h`` in ``[low, upr]``: Newton on ``g = log P - log N`` (see :func:`_exp_log_g`), kept in the
    bracket (damped toward the end it overshoots, bisection where the step is undefined), the bracket updated
    with the sign of ``g`` at every iterate. A fixed number of steps (no data-dependent loop, no host sync)."""
    log_tn = torch.log(torch.clamp_min(-t0, 0))
    log_tp = torch.log(torch.clamp_min(t0, 0))
    x = 0.5 * (low + upr)
    xl, xu = low, upr
    for _ in range(iters):
        f, df = _exp_log_g(r0, s0, log_tn, log_tp, x)
        xl = torch.where(f < 0, x, xl)
        xu = torch.where(f > 0, x, xu)
        xn = x - f / df
        # A step past a bracket end moves 95% of the way to that end (as SCS does): the root can sit within
        # rounding of an end (z next to the boundary of K), where bisection would need ~50 halvings.
        xn = torch.where(xn > xu, torch.lerp(x, xu, 0.95), torch.where(xn < xl, torch.lerp(x, xl, 0.95), xn))
        # Bisection where the step is undefined (g' <= 0 or not finite: xn is NaN or was not moved by a
        # comparison above), and no move at an exact root.
        good = (df > 0) & torch.isfinite(xn)
        x = torch.where(f == 0, x, torch.where(good, xn, torch.lerp(xl, xu, 0.5)))
    return x


def _safe_exp(arg: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(arg)`` where ``valid`` and finite; elsewhere 1. Also returns where the value is usable."""
    limit = math.log(torch.finfo(arg.dtype).max) - 1.0
    ok = valid & (arg < limit)
    return torch.exp(torch.where(ok, arg, torch.zeros_like(arg))), ok


def _norm3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b + c * c)


def _exp_project(v: Tensor, iters: int, polar: bool) -> Tensor:
    """Projection of triples ``v = (r0, s0, t0)`` (shape ``(N, 3)``) onto ``K_exp`` or its polar ``-K_exp^*``.

    Friberg (2021): the projections onto ``K`` and ``K° = -K*`` are
    ``vp = a (rho, 1, e^rho)``, ``vd = b (1, 1 - rho, -e^-rho)`` with
    ``a = ((rho-1) r0 + s0) / (rho^2 - rho + 1) > 0``, ``b = (r0 - rho s0) / (rho^2 - rho + 1) > 0``
    and ``rho`` the root of ``h`` (which expresses ``t0 = vp_3 + vd_3``), unless a closed-form case
    applies; the answer is the best of the closed-form candidates and the root-based one.
    """
    r0, s0, t0 = v.unbind(-1)
    dt = v.dtype
    eps = torch.finfo(dt).eps
    zero = torch.zeros_like(r0)
    one = torch.ones_like(r0)
    inf = torch.full_like(r0, math.inf)

    # Closed-form candidates, with autograd (guarded: unused branches stay finite).
    # Primal: perspective boundary (min(r0, 0), 0, max(t0, 0)) and interior (r0, s0, max(t0, s0 e^(r0/s0))).
    spos = s0 > 0
    s_safe = torch.where(spos, s0, one)
    e_p, ok_p = _safe_exp(r0 / s_safe + torch.log(s_safe), spos)
    tp = torch.maximum(t0, e_p)
    # Polar: boundary (0, min(s0, 0), min(t0, 0)) and interior (r0, s0, min(t0, -r0 e^(s0/r0 - 1))).
    rpos = r0 > 0
    r_safe = torch.where(rpos, r0, one)
    e_d, ok_d = _safe_exp(s0 / r_safe - 1 + torch.log(r_safe), rpos)
    td = torch.minimum(t0, -e_d)

    with torch.no_grad():
        r, s, t = r0.detach(), s0.detach(), t0.detach()
        scale = _norm3(r, s, t)
        tol = eps * scale
        pdist_b = _norm3(torch.clamp_min(r, 0), s, torch.clamp_max(t, 0))
        pdist_i = torch.where(ok_p, tp.detach() - t, inf)
        p_int = pdist_i < pdist_b
        pdist = torch.where(p_int, pdist_i, pdist_b)
        ddist_b = _norm3(r, torch.clamp_min(s, 0), torch.clamp_min(t, 0))
        ddist_i = torch.where(ok_d, t - td.detach(), inf)
        d_int = ddist_i < ddist_b
        ddist = torch.where(d_int, ddist_i, ddist_b)
        # Closed forms that are exact: x <= 0 and y <= 0, or z (numerically) in K or in the polar. (SCS also
        # accepts the heuristic pair when it satisfies the optimality conditions to a tolerance; that test is
        # blind to first-order errors near the y = 0 edge, so here the root-based point is preferred.)
        closed = ((r <= 0) & (s <= 0)) | (torch.minimum(pdist, ddist) <= tol)
        closed = closed | ~torch.isfinite(scale)

        low, upr = _exp_bracket(r, s, t, pdist, ddist)
        rho_d = _exp_root(r, s, t, low, upr, iters)
        rho_d = torch.where(closed | ~torch.isfinite(rho_d), zero, rho_d)

    # Implicit-function gradient: value rho_d, derivative -(dh/dv0) / h'(rho_d). Only built when a gradient
    # can flow (a property of the graph, not of the data): inference skips its kernels.
    rho = rho_d
    if torch.is_grad_enabled() and v.requires_grad:
        f, df = _exp_scaled_h(r0, s0, t0, rho_d)
        good = (df.detach() > 0) & ~closed
        step = f / torch.where(good, df, one)
        step = torch.where(good, step, zero)
        rho = rho_d - (step - step.detach())
    q = rho * (rho - 1) + 1

    # Both root-based points: vp = a (rho, 1, e^rho), vd = b (1, 1 - rho, -e^-rho). Each can also be had as
    # the Moreau complement v0 - (other one); per entry, use the formula whose multiplier suffers less
    # cancellation (rounding error ~ eps * (|terms| / q) * ||direction||, compared in log scale).
    lin_a = (rho - 1) * r0 + s0
    lin_b = r0 - rho * s0
    ok_a = lin_a.detach() > 0
    ok_b = lin_b.detach() > 0
    a_safe = torch.where(ok_a, lin_a / q, one)
    b_safe = torch.where(ok_b, lin_b / q, one)
    ea, ok_ea = _safe_exp(rho + torch.log(a_safe), ok_a)
    eb, ok_eb = _safe_exp(-rho + torch.log(b_safe), ok_b)
    vp_f = (a_safe * rho, a_safe, ea)
    vd_f = (b_safe, (1 - rho) * b_safe, -eb)
    with torch.no_grad():
        rd = rho.detach()
        log_q = torch.log(q.detach())
        two = torch.stack([torch.log(rd * rd + 1), 2 * rd])
        err_a = (torch.log(torch.abs((rd - 1) * r) + torch.abs(s)) - log_q
                 + 0.5 * torch.logsumexp(two, dim=0))
        two = torch.stack([torch.log(1 + (1 - rd) ** 2), -2 * rd])
        err_b = (torch.log(torch.abs(r) + torch.abs(rd * s)) - log_q + 0.5 * torch.logsumexp(two, dim=0))
        prefer_a = err_a <= err_b
        use_pf = ok_ea & (prefer_a | ~ok_eb)
        use_df = ok_eb & (~prefer_a | ~ok_ea)
    v0 = (r0, s0, t0)
    if not polar:
        hat = tuple(torch.where(use_pf, pf, x - df) for pf, x, df in zip(vp_f, v0, vd_f, strict=True))
        ok_hat = ok_ea | ok_eb
        ref_dist = pdist
        heur = (torch.where(p_int, r0, torch.clamp_max(r0, 0)), torch.where(p_int, s0, zero),
                torch.where(p_int, tp, torch.clamp_min(t0, 0)))
    else:
        hat = tuple(torch.where(use_df, df, x - pf) for df, x, pf in zip(vd_f, v0, vp_f, strict=True))
        ok_hat = ok_ea | ok_eb
        ref_dist = ddist
        heur = (torch.where(d_int, r0, zero), torch.where(d_int, s0, torch.clamp_max(s0, 0)),
                torch.where(d_int, td, torch.clamp_max(t0, 0)))
    with torch.no_grad():
        dist_hat = _norm3(hat[0].detach() - r, hat[1].detach() - s, hat[2].detach() - t)
        dist_hat = torch.where(ok_hat & torch.isfinite(dist_hat), dist_hat, inf)
        # The root-based point satisfies the optimality conditions up to rounding, while distances only tell
        # points apart to second order: keep it unless it is clearly farther than the closed-form candidate
        # (a failed root search).
        use_hat = ~closed & (dist_hat <= ref_dist + math.sqrt(eps) * scale)
    out = [torch.where(use_hat, h, c) for h, c in zip(hat, heur, strict=True)]
    return torch.stack(out, dim=-1)


def _check_exp(z: Tensor, fn: str, iters: int) -> None:
    _check_floating(z, "z")
    if z.shape[-1] != 3:
        raise ValueError(f"{fn}: exp-cone blocks are triples, the last dimension of z must be 3, got shape "
                         f"{tuple(z.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{fn}: newton_iters must be a nonnegative int, got {iters!r}")


def project_exp(z: Tensor, *, newton_iters: int = EXP_NEWTON_ITERS) -> Tensor:
    """Projection onto the exponential cone ``K_exp = cl{(x, y, z) : y > 0, y exp(x / y) <= z}``.

    Friberg's method (as in SCS 3.3): closed forms when ``(x, y, z)`` is in ``K_exp``, in the polar
    ``-K_exp^*``, or has ``x <= 0, y <= 0`` (then ``Pi = (x, 0, max(z, 0))``); otherwise the projection is
    ``a (rho, 1, e^rho)`` with ``rho`` the root of a univariate function, found by safeguarded Newton inside
    Friberg's bracket for a fixed number of steps (no host sync). Gradients by the implicit function theorem.

    Args:
        z: tensor ``(..., 3)`` of triples in SCS order ``(x, y, z)``.
        newton_iters: number of safeguarded Newton / bisection steps.

    Returns:
        Tensor ``(..., 3)``.
    """
    _check_exp(z, "project_exp", newton_iters)
    flat = z.reshape(-1, 3)
    return _exp_project(flat, newton_iters, polar=False).reshape(z.shape)


def project_exp_dual(z: Tensor, *, newton_iters: int = EXP_NEWTON_ITERS) -> Tensor:
    """Projection onto the dual exponential cone ``K_exp^* = cl{(u, v, w) : u < 0, -u exp(v / u) <= e w}``.

    Computed as ``Pi_{K*}(z) = -Pi_{K°}(-z)`` with the polar projection taken directly from the same root
    (Friberg 2021), which equals ``z + Pi_K(-z)`` (Moreau) without its cancellation.

    Args:
        z: tensor ``(..., 3)``.
        newton_iters: number of safeguarded Newton / bisection steps.

    Returns:
        Tensor ``(..., 3)``.
    """
    _check_exp(z, "project_exp_dual", newton_iters)
    flat = z.reshape(-1, 3)
    return (-_exp_project(-flat, newton_iters, polar=True)).reshape(z.shape)


# ----------------------------------------------------------------------------------------------------------
# product cones


@dataclass(frozen=True)
class _Block:
    """A group of equal cones: ``count`` cones of ``width`` rows each.

    ``start`` is the first row when the group's rows are contiguous; otherwise ``rows`` (``(count, width)``)
    lists them.
    """

    size: int
    count: int
    width: int
    start: int | None
    rows: np.ndarray


@dataclass(frozen=True)
class ConeLayout:
    """Row layout of a :class:`ConeDims`, computed once per ``ConeDims`` (see :func:`cone_layout`).

    Attributes:
        cones: the cone sizes.
        m: total number of rows.
        zero: ``(start, stop)`` of the zero-cone rows.
        nonneg: ``(start, stop)`` of the nonnegative rows.
        soc: one block per distinct SOC size (all SOCs of that size, in row order).
        psd: one block per distinct PSD order (``size`` is the order, ``width`` the svec length).
        exp: ``(start, stop)`` of the exp-cone rows.
        perm: ``perm[j]`` is the row of the ``j``-th entry of the grouped concatenation (zero, nonneg, SOC
            blocks, PSD blocks, exp), or None when that order is already the row order.
    """

    cones: ConeDims
    m: int
    zero: tuple[int, int]
    nonneg: tuple[int, int]
    soc: tuple[_Block, ...]
    psd: tuple[_Block, ...]
    exp: tuple[int, int]
    perm: np.ndarray | None

    @property
    def inverse_perm(self) -> np.ndarray | None:
        """``inv[row]`` = position of ``row`` in the grouped concatenation (None when no reordering)."""
        if self.perm is None:
            return None
        inv = np.empty_like(self.perm)
        inv[self.perm] = np.arange(self.perm.shape[0])
        return inv


def _blocks(sizes: tuple[int, ...], widths: tuple[int, ...], start: int) -> tuple[tuple[_Block, ...], int]:
    offsets = np.cumsum((0,) + widths)[:-1] + start
    groups: dict[int, list[int]] = {}
    for idx, size in enumerate(sizes):
        groups.setdefault(size, []).append(idx)
    blocks = []
    for size, members in groups.items():
        width = widths[members[0]]
        rows = np.stack([np.arange(offsets[i], offsets[i] + width) for i in members]).astype(np.int64)
        flat = rows.reshape(-1)
        contiguous = bool(np.all(np.diff(flat) == 1)) if flat.size > 1 else True
        blocks.append(_Block(size=size, count=len(members), width=width,
                             start=int(flat[0]) if contiguous and flat.size else None, rows=rows))
    return tuple(blocks), start + int(sum(widths))


def _validate_dims(cones: ConeDims) -> None:
    if not isinstance(cones, ConeDims):
        raise TypeError(f"cones must be a ConeDims, got {type(cones).__name__}")
    for name in ("zero", "nonneg", "exp"):
        val = getattr(cones, name)
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"ConeDims.{name} must be a nonnegative int, got {val!r}")
    for name in ("soc", "psd"):
        for k in getattr(cones, name):
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"ConeDims.{name} sizes must be positive ints, got {getattr(cones, name)!r}")


@functools.lru_cache(maxsize=256)
def cone_layout(cones: ConeDims) -> ConeLayout:
    """The row layout of ``cones`` (cached: computed once per distinct ``ConeDims``).

    SOCs of equal size and PSD cones of equal order are grouped so that each group is projected by one
    batched call.
    """
    _validate_dims(cones)
    z0, z1 = 0, int(cones.zero)
    l0, l1 = z1, z1 + int(cones.nonneg)
    soc_sizes = tuple(int(k) for k in cones.soc)
    soc, pos = _blocks(soc_sizes, soc_sizes, l1)
    psd_orders = tuple(int(k) for k in cones.psd)
    psd, pos = _blocks(psd_orders, tuple(svec_size(k) for k in psd_orders), pos)
    e0, e1 = pos, pos + 3 * int(cones.exp)
    parts = [np.arange(z0, l1, dtype=np.int64)]
    parts += [b.rows.reshape(-1) for b in soc + psd]
    parts.append(np.arange(e0, e1, dtype=np.int64))
    perm = np.concatenate(parts)
    identity = bool(np.array_equal(perm, np.arange(e1)))
    return ConeLayout(cones=cones, m=e1, zero=(z0, z1), nonneg=(l0, l1), soc=soc, psd=psd, exp=(e0, e1),
                      perm=None if identity else perm)


@functools.lru_cache(maxsize=256)
def _layout_tensors(cones: ConeDims, device: torch.device) -> tuple[tuple[Tensor | None, ...], Tensor | None]:
    """Device copies of the gather indices of :func:`cone_layout` (cached per device)."""
    layout = cone_layout(cones)
    rows = tuple(None if b.start is not None else torch.as_tensor(b.rows.reshape(-1), device=device)
                 for b in layout.soc + layout.psd)
    inv = layout.inverse_perm
    return rows, None if inv is None else torch.as_tensor(inv, device=device)


def _check_rows(z: Tensor, cones: ConeDims, fn: str) -> ConeLayout:
    _check_floating(z, "z")
    layout = cone_layout(cones)
    if z.shape[-1] != layout.m:
        raise ValueError(f"{fn}: z has {z.shape[-1]} rows in its last dimension (shape {tuple(z.shape)}) but "
                         f"the cones {cones} cover {layout.m} rows")
    return layout


def _project_product(z: Tensor, cones: ConeDims, dual: bool, fn: str, newton_iters: int) -> Tensor:
    layout = _check_rows(z, cones, fn)
    if layout.m == 0:
        return z.clone()
    rows, inv = _layout_tensors(cones, z.device)
    lead = z.shape[:-1]
    pieces = []
    a, b = layout.zero
    if b > a:
        zpart = z[..., a:b]
        pieces.append(zpart if dual else torch.zeros_like(zpart))
    a, b = layout.nonneg
    if b > a:
        pieces.append(z[..., a:b].clamp_min(0))
    for i, block in enumerate(layout.soc + layout.psd):
        n_rows = block.count * block.width
        if block.start is not None:
            part = z[..., block.start:block.start + n_rows]
        else:
            part = z.index_select(-1, rows[i])
        part = part.reshape(*lead, block.count, block.width)
        if i < len(layout.soc):
            proj = project_soc(part)
        else:
            proj = project_psd(part, block.size)
        pieces.append(proj.reshape(*lead, n_rows))
    a, b = layout.exp
    if b > a:
        part = z[..., a:b].reshape(*lead, (b - a) // 3, 3)
        proj = (project_exp_dual(part, newton_iters=newton_iters) if dual
                else project_exp(part, newton_iters=newton_iters))
        pieces.append(proj.reshape(*lead, b - a))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    if inv is not None:
        out = out.index_select(-1, inv)
    return out


def project_cone(z: Tensor, cones: ConeDims, *, newton_iters: int = EXP_NEWTON_ITERS) -> Tensor:
    """Projection onto the product cone ``K = {0}^z x R_+^l x SOC x PSD x K_exp`` (SCS row order).

    Each block of rows is projected onto its cone: zero rows to 0, nonneg rows to ``max(., 0)``, SOC / PSD /
    exp blocks by :func:`project_soc` / :func:`project_psd` / :func:`project_exp` (equal SOC sizes and PSD
    orders batched together). ``z`` is not modified.

    Args:
        z: tensor ``(..., m)`` with ``m = cones.size`` (usually ``(B, m)``).
        cones: the cone sizes.
        newton_iters: Newton steps of the exp-cone projection.

    Returns:
        Tensor ``(..., m)``.

    Raises:
        ValueError: if ``z.shape[-1] != cones.size``.
    """
    return _project_product(z, cones, False, "project_cone", newton_iters)


def project_dual_cone(z: Tensor, cones: ConeDims, *, newton_iters: int = EXP_NEWTON_ITERS) -> Tensor:
    """Projection onto the dual cone ``K* = R^z x R_+^l x SOC x PSD x K_exp^*`` (SCS row order).

    The dual of the zero cone is the whole space (identity on those rows); nonneg, SOC and PSD are self-dual;
    exp blocks use :func:`project_exp_dual`. This is the projection in SCS's iteration (``u_y`` onto ``K*``).

    Args:
        z: tensor ``(..., m)`` with ``m = cones.size``.
        cones: the cone sizes.
        newton_iters: Newton steps of the exp-cone projection.

    Returns:
        Tensor ``(..., m)``.

    Raises:
        ValueError: if ``z.shape[-1] != cones.size``.
    """
    return _project_product(z, cones, True, "project_dual_cone", newton_iters)


def in_cone_distance(z: Tensor, cones: ConeDims) -> Tensor:
    """Euclidean distance from each ``z`` to ``K``: ``||z - Pi_K(z)||_2`` over the last dimension.

    Args:
        z: tensor ``(..., m)``.
        cones: the cone sizes.

    Returns:
        Tensor ``(...)``.
    """
    return torch.linalg.vector_norm(z - project_cone(z, cones), dim=-1)


def dual_cone_distance(z: Tensor, cones: ConeDims) -> Tensor:
    """Euclidean distance from each ``z`` to ``K*``: ``||z - Pi_{K*}(z)||_2`` over the last dimension."""
    return torch.linalg.vector_norm(z - project_dual_cone(z, cones), dim=-1)
