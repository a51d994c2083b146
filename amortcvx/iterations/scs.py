"""SCS 3's iteration in torch: Douglas-Rachford on the homogeneous self-dual embedding, batched.

Problem (cone form, see :class:`amortcvx.canon.ConeData`)::

    minimize 1/2 x'Px + c'x   subject to   Ax + s = b,  s in K.

State: the fixed-point variable ``v = [v_x; v_y; v_tau]`` of length ``l = n + m + 1`` (plus the last ``u`` and
``u~``, from which ``rsk`` and the solution estimates are read). With ``R = diag(rho_x 1_n, r_y, d)``,
``d = 10``, ``r_y = 1 / scale`` (``1 / (1000 scale)`` on zero-cone rows),
``M = [[P + rho_x I, A'], [A, -diag(r_y)]]`` and ``g = M^-1 [c; -b]``, step ``i = 0, 1, ...`` is (SCS 3.3
``scs.c``, no data normalization, no adaptive scale, no Anderson acceleration)::

    if i >= 1:  v <- v sqrt(l) / ||v||_2                      (the embedding is homogeneous)
    p = M^-1 [rho_x v_x; -r_y * v_y]
    tau = 1 if i = 0, else the largest root of  a t^2 + b t + c = 0  with
          a = d + g'R g,  b = mu'R g - 2 p'R g - d v_tau,  c = p'R p - p'R mu,  mu = v[:n+m]
          (R restricted to its first n + m entries in the inner products)
    u~ = [p - tau g; tau]
    u  = 2 u~ - v;   u_y <- Proj_{K*}(u_y);   u_tau <- 1 if i = 0 else max(u_tau, 0)
    rsk = R (v + u - 2 u~)
    v  <- v + alpha (u - u~)

Estimates after a step (what C SCS returns when it stops at ``max_iters`` with ``tau > kappa``):
``x = u_x / tau``, ``y = u_y / tau``, ``s = rsk_s / tau`` with ``tau = |u_tau|``, ``kappa = |rsk_tau|``.

A warm start ``(x, y, s)`` enters as ``v0 = [x; y + s / r_y; 1]`` (cold: ``x = y = s = 0``), exactly as
``scs.SCS(...).solve(warm_start=True, x=, y=, s=)`` does with ``normalize=False``.

Because ``r_y`` is constant on each cone, SCS's R-weighted dual projection ``z + R^-1 Proj_K(-R z)`` equals
the plain ``Proj_{K*}(z)`` used here (Moreau), with ``{0}* = R^m`` on the zero cone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from amortcvx.canon.data import ConeData, ConeDims, SparseBatch
from amortcvx.iterations.cones import project_cone, project_dual_cone
from amortcvx.iterations.linalg import METHODS, FactorCache, KKTSolver, batch_rows, check_matrices, spmv


@dataclass(frozen=True)
class ScsSettings:
    """Settings of the SCS iteration (defaults are SCS 3.3's C defaults).

    Attributes:
        alpha: Douglas-Rachford relaxation, in (0, 2).
        scale: dual scale; ``r_y = 1 / scale`` (``1 / (zero_cone_factor * scale)`` on zero-cone rows).
        rho_x: primal regularization ``R_x = rho_x I``.
        tau_factor: ``d``, the weight of ``tau`` in ``R`` (SCS's ``TAU_FACTOR``).
        zero_cone_factor: the factor (1000 in SCS) that makes ``r_y`` smaller on equality rows.
        linsys: linear-system method of :class:`amortcvx.iterations.linalg.KKTSolver`.
    """

    alpha: float = 1.5
    scale: float = 0.1
    rho_x: float = 1e-6
    tau_factor: float = 10.0
    zero_cone_factor: float = 1000.0
    linsys: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 2.0:
            raise ValueError(f"ScsSettings.alpha must be in (0, 2); got {self.alpha}")
        for name in ("scale", "rho_x", "tau_factor", "zero_cone_factor"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"ScsSettings.{name} must be positive; got {getattr(self, name)}")
        if self.linsys not in METHODS:
            raise ValueError(f"ScsSettings.linsys must be one of {METHODS}; got {self.linsys!r}")

    def c_settings(self) -> dict:
        """Keyword settings for ``scs.SCS`` that make C SCS run exactly this iteration.

        Turns off what the torch iteration does not implement (data normalization, adaptive scale, Anderson
        acceleration); add ``max_iters``, ``eps_abs``, ... as needed. ``tau_factor`` and ``zero_cone_factor``
        are compile-time constants of C SCS, so they must keep their defaults for the two to agree.
        """
        return {"alpha": self.alpha, "scale": self.scale, "rho_x": self.rho_x, "normalize": False,
                "adaptive_scale": False, "acceleration_lookback": 0}


class ScsState(NamedTuple):
    """State of the batched SCS iteration.

    Attributes:
        v: fixed-point variable, ``(B, n + m + 1)``.
        u: last cone-projection output ``[x; y; tau]`` (unnormalized), ``(B, n + m + 1)``.
        ut: last ``u~ = [p - tau g; tau]``, ``(B, n + m + 1)``. With ``u`` and ``v`` it gives
            ``[r; s; kappa] = R (v_in + u - 2 u~) = R (v + (1 - alpha) u + (alpha - 2) u~)`` (``v_in`` is the
            step's normalized input, ``v = v_in + alpha (u - u~)``), see :func:`scs_rsk`.
        k: number of steps taken (step ``k = 0`` fixes ``tau = 1`` and skips the normalization of ``v``).
    """

    v: torch.Tensor
    u: torch.Tensor
    ut: torch.Tensor
    k: int


class ScsSolution(NamedTuple):
    """Primal-dual estimates read from a state: ``x = u_x/tau``, ``y = u_y/tau``, ``s = rsk_s/tau``.

    ``tau`` and ``kappa`` are ``|u_tau|`` and ``|rsk_tau|``; when ``tau <= kappa`` C SCS would report an
    infeasibility / unboundedness certificate instead of these estimates.
    """

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor
    kappa: torch.Tensor


class ScsWork(NamedTuple):
    """Per-problem quantities of the iteration, computed once by :func:`scs_setup`.

    Attributes:
        n, m: sizes.
        cones: the cones of the rows.
        settings: the settings used.
        r: diagonal of ``R``, ``(n + m + 1,)``.
        r_signed: ``[rho_x 1_n; -r_y]``, the weights of the right-hand side of the linear solve.
        solver: the factored ``M``.
        W: for ``linsys="kkt"``, ``[[M^-1 diag(r_signed), 0], [0, 0]]`` transposed, ``(1 or B, l, l)``, so
            that ``[p; 0] = v @ W``; None otherwise.
        g: ``[M^-1 [c; -b]; -1]``, ``(B, l)`` (the ``-1`` makes ``u~ = [p; 0] - tau g`` carry ``tau``).
        qb: ``[R g - 2 diag(r_signed) M^-1 R g; -d]``, ``(B, l)``: the linear coefficient of the ``tau``
            equation is ``b = v_in . qb`` (because ``p'R g = v_in . (diag(r_signed) M^-1 R g)``).
        a: ``d + g'R g``, ``(B,)``, the quadratic coefficient of the ``tau`` equation.
        b, c: the data vectors, ``(B, m)`` and ``(B, n)``.
        A, P: the data matrices (for polishing, :mod:`.polish`).
        batch_size: ``B``.
    """

    n: int
    m: int
    cones: ConeDims
    settings: ScsSettings
    r: torch.Tensor
    r_signed: torch.Tensor
    solver: KKTSolver
    W: torch.Tensor | None
    g: torch.Tensor
    qb: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    A: SparseBatch
    P: SparseBatch | None
    batch_size: int


def scs_r_y(cones: ConeDims, settings: ScsSettings | None = None, *, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None) -> torch.Tensor:
    """The dual weights ``r_y`` (m,): ``1 / (zero_cone_factor * scale)`` on zero rows, else ``1 / scale``."""
    settings = ScsSettings() if settings is None else settings
    r_y = torch.full((cones.size,), 1.0 / settings.scale, dtype=dtype, device=device)
    r_y[: cones.zero] = 1.0 / (settings.zero_cone_factor * settings.scale)
    return r_y


def scs_setup(data: ConeData, settings: ScsSettings | None = None, cache: FactorCache | None = None) -> ScsWork:
    """Factor ``M`` and precompute ``g`` for a batch of cone programs.

    Args:
        data: the batch (its dtype and device are the iteration's; ``A``/``P`` shared by the batch are
            factored once, otherwise once per instance).
        settings: iteration settings (default :class:`ScsSettings`).
        cache: keeps the factorization of ``M`` (and ``W``) across calls when ``A``/``P`` are shared and
            constant (see :class:`~amortcvx.iterations.linalg.FactorCache`); only ``g`` and the ``tau``
            coefficients, which depend on ``b`` and ``c``, are then computed per call.

    Raises:
        TypeError / ValueError: naming the field of ``data`` at fault.
    """
    settings = ScsSettings() if settings is None else settings
    if not isinstance(data, ConeData):
        raise TypeError(f"scs_setup expects ConeData, got {type(data).__name__}")
    b, c = data.b, data.c
    if b.ndim != 2 or c.ndim != 2 or b.shape[0] != c.shape[0]:
        raise ValueError(f"ConeData.b and .c must have shapes (B, m) and (B, n); got {tuple(b.shape)} and "
                         f"{tuple(c.shape)}")
    if not b.is_floating_point() or b.dtype != c.dtype:
        raise ValueError(f"ConeData.b and .c must share one floating dtype; got {b.dtype} and {c.dtype}")
    batch, m = b.shape
    n = c.shape[1]
    if data.cones.size != m:
        raise ValueError(f"the cones {data.cones} cover {data.cones.size} rows, but b has m = {m} rows")
    check_matrices("ConeData", data.A, data.P, m, n, batch)
    dtype, device = b.dtype, b.device
    nm = n + m
    d = settings.tau_factor
    r_y = scs_r_y(data.cones, settings, dtype=dtype, device=device)
    r_x = torch.full((n,), settings.rho_x, dtype=dtype, device=device)
    r = torch.cat([r_x, r_y, torch.full((1,), d, dtype=dtype, device=device)])
    r_signed = torch.cat([r_x, -r_y])

    def factor() -> tuple[KKTSolver, torch.Tensor | None]:
        solver = KKTSolver(data.A, data.P, settings.rho_x, r_y, dtype=dtype, method=settings.linsys)
        W = None
        if solver.method == "kkt":
            w = solver.kinv * r_signed  # M^-1 diag(r_signed), (b, nm, nm)
            W = torch.nn.functional.pad(w.mT, (0, 1, 0, 1))  # [[w', 0], [0, 0]], (b, l, l)
        return solver, W

    if cache is not None and FactorCache.cacheable(data.A, data.P):
        solver, W = cache.get(("scs", settings, data.cones, dtype, str(device)), data.A, data.P, factor)
    else:
        solver, W = factor()
    g = solver.solve_packed(torch.cat([c, -b], dim=1))
    rg = g * r[:nm]
    h = r_signed * solver.solve_packed(rg)  # p'R g = mu . h
    a = d + (rg * g).sum(dim=1)
    minus_one = torch.full((batch, 1), -1.0, dtype=dtype, device=device)
    g_full = torch.cat([g, minus_one], dim=1)
    qb = torch.cat([rg - 2.0 * h, d * minus_one], dim=1)
    return ScsWork(n=n, m=m, cones=data.cones, settings=settings, r=r, r_signed=r_signed, solver=solver, W=W,
                   g=g_full, qb=qb, a=a, b=b, c=c, A=data.A, P=data.P, batch_size=batch)


def scs_init(work: ScsWork, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
             s: torch.Tensor | None = None, *, v: torch.Tensor | None = None) -> ScsState:
    """Initial state, cold (all None) or warm from ``(x, y, s)`` or from a fixed-point variable ``v``.

    ``v0 = [x; y + s / r_y; 1]``; missing parts of ``(x, y, s)`` are zero. The state's ``u = u~ = [x; y; 1]``
    make its estimates (:func:`scs_solution`) give back ``(x, y, s)``; started from ``v`` they are meaningless
    until the first step. Like C SCS, the first step takes ``tau = 1``, so ``v`` should have ``v_tau = 1``.
    """
    n, m, batch = work.n, work.m, work.batch_size
    like = work.g
    r_y = work.r[n: n + m]
    if v is not None:
        if x is not None or y is not None or s is not None:
            raise ValueError("pass either v or (x, y, s), not both")
        v = batch_rows(v, n + m + 1, batch, "v", like)
        return ScsState(v=v, u=v, ut=v, k=0)
    x = batch_rows(x, n, batch, "x", like)
    y = batch_rows(y, m, batch, "y", like)
    s = batch_rows(s, m, batch, "s", like)
    one = like.new_ones((batch, 1))
    u = torch.cat([x, y, one], dim=1)
    return ScsState(v=torch.cat([x, y + s / r_y, one], dim=1), u=u, ut=u, k=0)


def normalized_v(work: ScsWork, state: ScsState) -> torch.Tensor:
    """The input of the next Douglas-Rachford step: ``v sqrt(l) / ||v||`` (``v`` itself before step 1)."""
    if state.k < 1:
        return state.v
    l = work.n + work.m + 1
    return state.v * (math.sqrt(l) / torch.linalg.vector_norm(state.v, dim=1, keepdim=True))


def _linear_part(work: ScsWork, v: torch.Tensor) -> torch.Tensor:
    """``[p; 0]`` with ``p = M^-1 [rho_x v_x; -r_y v_y]``, ``(B, l)``."""
    if work.W is not None:
        return v @ work.W[0] if work.W.shape[0] == 1 else torch.bmm(v.unsqueeze(1), work.W).squeeze(1)
    nm = work.n + work.m
    p = work.solver.solve_packed(v[:, :nm] * work.r_signed)
    return torch.nn.functional.pad(p, (0, 1))


def scs_step(work: ScsWork, state: ScsState) -> ScsState:
    """One SCS step (see the module docstring) for the whole batch."""
    n, nm = work.n, work.n + work.m
    v = normalized_v(work, state)
    p = _linear_part(work, v)
    if state.k == 0:
        tau = torch.ones_like(work.a)
    else:
        bq = torch.linalg.vecdot(v, work.qb)
        rp = p * work.r  # its tau entry is 0 since p_tau = 0
        cq = torch.linalg.vecdot(rp, p - v)
        disc = (bq * bq - 4.0 * work.a * cq).clamp_min(torch.finfo(bq.dtype).tiny)
        tau = (torch.sqrt(disc) - bq) / (2.0 * work.a)
    ut = torch.addcmul(p, tau.unsqueeze(1), work.g, value=-1.0)  # [p - tau g; tau]
    w = 2.0 * ut - v
    uy = project_dual_cone(w[:, n:nm], work.cones)
    utau = torch.ones_like(tau) if state.k == 0 else torch.relu(w[:, nm])
    u = torch.cat([w[:, :n], uy, utau.unsqueeze(1)], dim=1)
    v_new = torch.add(v, u - ut, alpha=work.settings.alpha)
    return ScsState(v=v_new, u=u, ut=ut, k=state.k + 1)


def scs_rsk(work: ScsWork, state: ScsState) -> torch.Tensor:
    """``[r; s; kappa] = R (v_in + u - 2 u~) = R (v + (1 - alpha) u + (alpha - 2) u~)`` of the last step."""
    alpha = work.settings.alpha
    return work.r * (state.v + (1.0 - alpha) * state.u + (alpha - 2.0) * state.ut)


def scs_residual(work: ScsWork, old: ScsState, new: ScsState) -> torch.Tensor:
    """Fixed-point residual of a step, per instance: ``||v_new - v_in||_2 = alpha ||u - u~||_2``.

    ``v_in`` is the step's input, ``old.v`` normalized, so this is the Douglas-Rachford residual
    ``||T(z) - z||`` of the (normalized) iterate ``z`` the step was applied to.
    """
    return work.settings.alpha * torch.linalg.vector_norm(new.u - new.ut, dim=1)


def scs_point(work: ScsWork, state: ScsState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The primal-dual point ``(x, y, s)`` a state's fixed-point variable ``v = [x; y + s / r_y; tau]`` stands for,
    with no linear solve (the torch SCS algorithm's ``optimality`` takes the optimality residual there).

    ``v`` alone does not say which part of ``y + s / r_y`` is the dual (on the nonnegative orthant both parts are
    nonnegative), so the slack is read from the primal, ``s = Pi_K(b - A x)``, and the dual is the rest, ``y =
    Pi_K*(v_y - s / r_y)`` (``x``, ``v_y`` divided by ``tau``): at a fixed point, ``v* = [x*; y* + s* / r_y; 1]``,
    this gives back ``(x*, y*, s*)``. One sparse product and two cone projections, where :func:`scs_solution`
    needs a step (a solve with ``M``)."""
    n, m = work.n, work.m
    v = state.v
    inv = 1.0 / v[:, n + m:].clamp_min(1e-30)
    x, vy = v[:, :n] * inv, v[:, n:n + m] * inv
    s = project_cone(work.b - spmv(work.A, x), work.cones)
    return x, project_dual_cone(vy - s / work.r[n:n + m], work.cones), s


def scs_solution(work: ScsWork, state: ScsState) -> ScsSolution:
    """Estimates ``x = u_x/tau``, ``y = u_y/tau``, ``s = rsk_s/tau`` (C SCS's output after ``max_iters``)."""
    n, nm = work.n, work.n + work.m
    rsk = scs_rsk(work, state)
    tau = state.u[:, nm].abs()
    kappa = rsk[:, nm].abs()
    inv = (1.0 / tau.clamp_min(1e-30)).unsqueeze(1)
    return ScsSolution(x=state.u[:, :n] * inv, y=state.u[:, n:nm] * inv, s=rsk[:, n:nm] * inv, tau=tau,
                       kappa=kappa)


SOLVED_INACCURATE, UNBOUNDED_INACCURATE, INFEASIBLE_INACCURATE = 2, -6, -7
"""SCS's ``status_val`` codes for a solve stopped by ``max_iters``."""


class ScsCOutput(NamedTuple):
    """What C SCS returns when it stops at ``max_iters`` on a state (see :func:`scs_c_output`).

    Attributes:
        status: ``(B,)`` int64: 2 (solved inaccurate), -6 (unbounded inaccurate), -7 (infeasible inaccurate).
        x, y, s: the returned vectors; NaN where C returns NaN.
    """

    status: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor


def scs_c_output(work: ScsWork, state: ScsState) -> ScsCOutput:
    """Mimic C SCS's ``finalize`` for an unfinished solve (``max_iters`` reached), per instance.

    With ``tau = |u_tau|``, ``kappa = |rsk_tau|``, ``b'y~ = b'u_y`` and ``c'x~ = c'u_x``:

    * ``tau > kappa``: solved (inaccurate), ``(x, y, s) = (u_x, u_y, rsk_s) / tau``;
    * else if ``b'u_y < c'u_x``: infeasible (inaccurate), ``y = -u_y / b'u_y``, ``x = s = NaN``;
    * else: unbounded (inaccurate), ``x = -u_x / c'u_x``, ``s = -rsk_s / c'u_x``, ``y = NaN``.
    """
    n, nm = work.n, work.n + work.m
    sol = scs_solution(work, state)
    ux, uy, rs = state.u[:, :n], state.u[:, n:nm], scs_rsk(work, state)[:, n:nm]
    bty = (uy * work.b).sum(dim=1, keepdim=True)
    ctx = (ux * work.c).sum(dim=1, keepdim=True)
    solved = (sol.tau > sol.kappa).unsqueeze(1)
    infeas = ~solved & (bty < ctx)
    unbdd = ~solved & ~infeas
    nan = torch.full_like(ux[:, :1], float("nan"))
    x = torch.where(solved, sol.x, torch.where(unbdd, -ux / ctx, nan))
    y = torch.where(solved, sol.y, torch.where(infeas, -uy / bty, nan))
    s = torch.where(solved, sol.s, torch.where(unbdd, -rs / ctx, nan))
    status = torch.where(solved[:, 0], SOLVED_INACCURATE,
                         torch.where(infeas[:, 0], INFEASIBLE_INACCURATE, UNBOUNDED_INACCURATE))
    return ScsCOutput(status=status, x=x, y=y, s=s)


def scs_fixed_point(work: ScsWork, state: ScsState) -> torch.Tensor:
    """The fixed-point variable ``v`` of a state."""
    return state.v


def scs_embed(work: ScsWork, v: torch.Tensor) -> ScsState:
    """A state whose next step is a general step (``k >= 1``) from ``v`` rescaled to norm ``sqrt(l)``.

    Its fixed-point variable is that rescaled ``v``, the point the step acts on (the iteration is
    homogeneous), so ``scs_fixed_point(step(s)) - scs_fixed_point(s)`` is the step's residual vector. Used by
    extrapolating loops (Anderson acceleration) to continue from a point that no step produced.
    """
    v = batch_rows(v, work.n + work.m + 1, work.batch_size, "v", work.g)
    v = v * (math.sqrt(v.shape[1]) / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300))
    return ScsState(v=v, u=v, ut=v, k=1)
