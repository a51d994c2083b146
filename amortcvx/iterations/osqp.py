"""OSQP 1's ADMM iteration in torch, batched.

Problem (QP form, see :class:`amortcvx.canon.QPData`)::

    minimize 1/2 x'Px + q'x   subject to   l <= Ax <= u.

State ``(x, z, y)``. Per-row step sizes ``rho_i``: ``rho_min = 1e-6`` on free rows (``l < -1e26`` and
``u > 1e26``), ``1e3 rho`` on equality rows (``u - l < 1e-4``), ``rho`` otherwise (OSQP's ``set_rho_vec``).
With ``K = [[P + sigma I, A'], [A, -diag(1/rho)]]`` factored once, one step is (OSQP 1.1 ``auxil.c``, no
scaling, no adaptive rho)::

    (x~, nu) = K^-1 [sigma x - q;  z - y / rho]
    z~ = z + (nu - y) / rho
    x  <- alpha x~ + (1 - alpha) x
    z^ = alpha z~ + (1 - alpha) z
    z  <- clip(z^ + y / rho, l, u)
    y  <- y + rho (z^ - z)

After the first step the state is a function of ``(x, w)`` with ``w = z + y / rho`` (``z = clip(w, l, u)``,
``y = rho (w - z)``); ``[x; w]`` is the fixed-point variable. The residual of a step is
``sqrt(||dx||^2 + ||dz||^2 + ||dy / rho||^2)`` (see :func:`osqp_residual`). A warm start ``(x, y)`` sets
``z = A x``, as ``osqp.OSQP.warm_start(x=, y=)`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from amortcvx.canon.data import QPData, SparseBatch
from amortcvx.iterations.linalg import METHODS, FactorCache, KKTSolver, batch_rows, check_matrices, spmv

RHO_MAX = 1e6


@dataclass(frozen=True)
class OsqpSettings:
    """Settings of the OSQP iteration (defaults are OSQP 1.1's C defaults and constants).

    Attributes:
        rho: ADMM step size on inequality rows (clipped to ``[rho_min, 1e6]`` as in C).
        sigma: primal regularization.
        alpha: relaxation, in (0, 2).
        rho_min: step size of free rows (``OSQP_RHO_MIN``).
        rho_eq_over_rho_ineq: factor of equality rows (``OSQP_RHO_EQ_OVER_RHO_INEQ``).
        rho_tol: rows with ``u - l < rho_tol`` are equalities (``OSQP_RHO_TOL``).
        infinity: bounds beyond ``+-infinity`` count as infinite (``OSQP_INFTY * OSQP_MIN_SCALING``).
        linsys: linear-system method of :class:`amortcvx.iterations.linalg.KKTSolver`.
    """

    rho: float = 0.1
    sigma: float = 1e-6
    alpha: float = 1.6
    rho_min: float = 1e-6
    rho_eq_over_rho_ineq: float = 1e3
    rho_tol: float = 1e-4
    infinity: float = 1e26
    linsys: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 2.0:
            raise ValueError(f"OsqpSettings.alpha must be in (0, 2); got {self.alpha}")
        for name in ("rho", "sigma", "rho_min", "rho_eq_over_rho_ineq", "rho_tol", "infinity"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"OsqpSettings.{name} must be positive; got {getattr(self, name)}")
        if self.linsys not in METHODS:
            raise ValueError(f"OsqpSettings.linsys must be one of {METHODS}; got {self.linsys!r}")

    def c_settings(self) -> dict:
        """Keyword settings for ``osqp.OSQP().setup`` that make C OSQP run exactly this iteration.

        Turns off scaling, adaptive rho and polishing; add ``max_iter``, ``eps_abs``, ``check_termination``...
        as needed. The ``rho_min``/``rho_eq_over_rho_ineq``/``rho_tol``/``infinity`` constants are compiled
        into C OSQP, so they must keep their defaults for the two to agree.
        """
        return {"rho": self.rho, "sigma": self.sigma, "alpha": self.alpha, "scaling": 0, "adaptive_rho": 0,
                "polishing": 0}


class OsqpState(NamedTuple):
    """State of the batched OSQP iteration: ``x`` (B, n), ``z`` (B, m), ``y`` (B, m), ``k`` steps taken."""

    x: torch.Tensor
    z: torch.Tensor
    y: torch.Tensor
    k: int


class OsqpSolution(NamedTuple):
    """Primal-dual iterate of a state (OSQP's ``x`` and ``y``; ``z`` approximates ``A x``)."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor


class OsqpWork(NamedTuple):
    """Per-problem quantities of the iteration, computed once by :func:`osqp_setup`.

    Attributes:
        n, m: sizes.
        settings: the settings used.
        q, l, u: the data (``(B, n)``, ``(B, m)``, ``(B, m)``).
        rho: per-row step sizes, ``(1, m)`` when the row types agree across the batch, else ``(B, m)``.
        rho_inv: ``1 / rho``.
        A: the constraint matrices (for ``z = A x`` of warm starts).
        P: the quadratic terms, or None (for polishing, :mod:`.polish`).
        solver: the factored ``K``.
        Wx, Wz: for ``linsys="kkt"``, ``(sigma K^-1[:, :n])'`` and ``(K^-1[:, n:])'``
            (``(1 or B, ., n + m)``); None otherwise.
        c0: for ``linsys="kkt"``, ``K^-1 [-q; 0]`` (``(B, n + m)``); None otherwise.
        batch_size: ``B``.
    """

    n: int
    m: int
    settings: OsqpSettings
    q: torch.Tensor
    l: torch.Tensor
    u: torch.Tensor
    rho: torch.Tensor
    rho_inv: torch.Tensor
    A: SparseBatch
    P: SparseBatch | None
    solver: KKTSolver
    Wx: torch.Tensor | None
    Wz: torch.Tensor | None
    c0: torch.Tensor | None
    batch_size: int


def osqp_rho(l: torch.Tensor, u: torch.Tensor, settings: OsqpSettings | None = None) -> torch.Tensor:
    """Per-row step sizes of OSQP (``set_rho_vec``) for bounds ``l``, ``u`` of shape ``(B, m)``.

    Free rows (``l < -infinity`` and ``u > infinity``) get ``rho_min``, equality rows (``u - l < rho_tol``)
    ``rho_eq_over_rho_ineq * rho``, the others ``rho`` (``rho`` clipped to ``[rho_min, 1e6]``). Returns a
    ``(1, m)`` tensor when every instance has the same row types, else ``(B, m)``.
    """
    settings = OsqpSettings() if settings is None else settings
    rho = min(max(settings.rho, settings.rho_min), RHO_MAX)
    loose = (l < -settings.infinity) & (u > settings.infinity)
    eq = (u - l) < settings.rho_tol
    kind = torch.where(loose, -1, torch.where(eq, 1, 0))
    if bool((kind == kind[:1]).all()):
        kind = kind[:1]
    out = torch.full(kind.shape, rho, dtype=l.dtype, device=l.device)
    out = torch.where(kind == 1, settings.rho_eq_over_rho_ineq * rho, out)
    return torch.where(kind == -1, settings.rho_min, out)


def osqp_setup(data: QPData, settings: OsqpSettings | None = None, cache: FactorCache | None = None) -> OsqpWork:
    """Factor ``K`` for a batch of QPs.

    Args:
        data: the batch (its dtype and device are the iteration's; ``A``/``P`` shared by the batch are
            factored once, and so are the row types when they agree across the batch).
        settings: iteration settings (default :class:`OsqpSettings`).
        cache: keeps the factorization of ``K`` across calls when ``A``/``P`` are shared and constant and the
            row types (hence ``rho``) agree across the batch (see
            :class:`~amortcvx.iterations.linalg.FactorCache`).

    Raises:
        TypeError / ValueError: naming the field of ``data`` at fault.
    """
    settings = OsqpSettings() if settings is None else settings
    if not isinstance(data, QPData):
        raise TypeError(f"osqp_setup expects QPData, got {type(data).__name__}")
    q, l, u = data.q, data.l, data.u
    if q.ndim != 2 or l.ndim != 2 or u.ndim != 2 or not (q.shape[0] == l.shape[0] == u.shape[0]):
        raise ValueError(f"QPData.q, .l, .u must have shapes (B, n), (B, m), (B, m); got {tuple(q.shape)}, "
                         f"{tuple(l.shape)}, {tuple(u.shape)}")
    if l.shape != u.shape:
        raise ValueError(f"QPData.l and .u must have the same shape; got {tuple(l.shape)}, {tuple(u.shape)}")
    if not q.is_floating_point() or not (q.dtype == l.dtype == u.dtype):
        raise ValueError(f"QPData.q, .l, .u must share one floating dtype; got {q.dtype}, {l.dtype}, "
                         f"{u.dtype}")
    batch, n = q.shape
    m = l.shape[1]
    check_matrices("QPData", data.A, data.P, m, n, batch)
    if bool((l > u).any()):
        raise ValueError("QPData has rows with l > u (infeasible bounds)")
    rho = osqp_rho(l, u, settings)
    rho_inv = 1.0 / rho

    def factor() -> tuple[KKTSolver, torch.Tensor | None, torch.Tensor | None]:
        solver = KKTSolver(data.A, data.P, settings.sigma, rho_inv, dtype=q.dtype, method=settings.linsys)
        wx = wz = None
        if solver.method == "kkt":
            kinv_t = solver.kinv.mT  # K^-1 is symmetric up to rounding; rows of the transpose act on row vectors
            wx = (settings.sigma * kinv_t[:, :n]).contiguous()
            wz = kinv_t[:, n:].contiguous()
        return solver, wx, wz

    if cache is not None and rho.shape[0] == 1 and FactorCache.cacheable(data.A, data.P):
        key = ("osqp", settings, rho.detach().cpu().numpy().tobytes(), q.dtype, str(q.device))
        solver, wx, wz = cache.get(key, data.A, data.P, factor)
    else:
        solver, wx, wz = factor()
    c0 = None
    if solver.method == "kkt":
        c0 = solver.solve_packed(torch.cat([-q, torch.zeros_like(l)], dim=1))
    return OsqpWork(n=n, m=m, settings=settings, q=q, l=l, u=u, rho=rho, rho_inv=rho_inv, A=data.A, P=data.P,
                    solver=solver, Wx=wx, Wz=wz, c0=c0, batch_size=batch)


def osqp_init(work: OsqpWork, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
              z: torch.Tensor | None = None) -> OsqpState:
    """Initial state: cold (zeros) or warm from ``(x, y)`` with ``z = A x`` (or ``z`` when given)."""
    n, m, batch = work.n, work.m, work.batch_size
    like = work.q
    x = batch_rows(x, n, batch, "x", like)
    y = batch_rows(y, m, batch, "y", like)
    z = spmv(work.A, x) if z is None else batch_rows(z, m, batch, "z", like)
    return OsqpState(x=x, z=z, y=y, k=0)


def osqp_step(work: OsqpWork, state: OsqpState) -> OsqpState:
    """One OSQP ADMM step (see the module docstring) for the whole batch."""
    s = work.settings
    x, z, y = state.x, state.z, state.y
    y_rho = y * work.rho_inv
    ry = z - y_rho
    if work.Wx is not None:  # explicit K^-1: [x~; nu] = c0 + (sigma x) Kx' + ry Kz'
        out = _kkt_apply(work, x, ry)
        xt, nu = out[:, : work.n], out[:, work.n:]
    else:
        xt, nu = work.solver.solve(s.sigma * x - work.q, ry)
    zt = torch.addcmul(ry, nu, work.rho_inv)  # z + (nu - y) / rho
    x_new = torch.lerp(x, xt, s.alpha)
    zh = torch.lerp(z, zt, s.alpha)
    z_new = torch.clamp(zh + y_rho, min=work.l, max=work.u)
    y_new = torch.addcmul(y, work.rho, zh - z_new)
    return OsqpState(x=x_new, z=z_new, y=y_new, k=state.k + 1)


def _kkt_apply(work: OsqpWork, x: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """``K^-1 [sigma x - q; ry] = c0 + x Wx + ry Wz`` with the explicit inverse (``linsys="kkt"``)."""
    if work.Wx.shape[0] == 1:
        return torch.addmm(torch.addmm(work.c0, x, work.Wx[0]), ry, work.Wz[0])
    out = torch.baddbmm(work.c0.unsqueeze(1), x.unsqueeze(1), work.Wx)
    return torch.baddbmm(out, ry.unsqueeze(1), work.Wz).squeeze(1)


def osqp_fixed_point(work: OsqpWork, state: OsqpState) -> torch.Tensor:
    """The fixed-point variable ``[x; w]`` with ``w = z + y / rho``, ``(B, n + m)``."""
    return torch.cat([state.x, state.z + state.y / work.rho], dim=1)


def osqp_residual(work: OsqpWork, old: OsqpState, new: OsqpState) -> torch.Tensor:
    """Fixed-point residual of a step, per instance: ``sqrt(||dx||^2 + ||dz||^2 + ||dy / rho||^2)``.

    For states produced by a step (``z = clip(w)``, ``y / rho = w - z``) this lies between ``1/sqrt(2)`` and 1
    times ``||d[x; w]||`` (the projection and its complement are firmly nonexpansive); unlike ``||d[x; w]||``
    it is also nonzero on a first step that only moves ``z`` and ``y`` (e.g. a cold start with ``q = 0``).
    """
    dx = new.x - old.x
    dz = new.z - old.z
    dy = (new.y - old.y) / work.rho
    return torch.sqrt((dx * dx).sum(dim=1) + (dz * dz).sum(dim=1) + (dy * dy).sum(dim=1))


def osqp_solution(work: OsqpWork, state: OsqpState) -> OsqpSolution:
    """The iterate ``(x, y, z)`` (what C OSQP returns after ``max_iter`` steps)."""
    return OsqpSolution(x=state.x, y=state.y, z=state.z)
