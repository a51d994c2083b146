"""OSQP 1 backend: ``min 1/2 x'Px + q'x  s.t.  l <= Ax <= u`` from a fresh ``osqp.OSQP`` per instance.

Exact iteration counts
----------------------
OSQP evaluates its termination test every ``check_termination`` iterations (default 25). With
``exact_iterations=True`` the solve runs with ``check_termination=1``, so ``info.iter`` is the first
iteration at which the test holds (OSQP counts from 1: a warm start at the optimum reports 1). Checking
every iteration computes the residuals every iteration, roughly doubling the per-iteration cost: timings
taken in that mode are not representative; time with ``exact_iterations=False``.

Deterministic adaptive rho
--------------------------
OSQP 1 adapts rho every ``adaptive_rho_interval`` iterations (``adaptive_rho=1``). Its value 0 means
"derive the interval": from the setup time in OSQP 0.x (nondeterministic), and as 4 x ``check_termination``
in OSQP 1.x, which would make the exact mode (``check_termination=1``) follow a different trajectory than
the timed mode. amortcvx pins ``adaptive_rho_interval=50`` (OSQP 1.1.3's own default, stated explicitly),
so both modes run the same iterates and counts are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.sparse as sp

from amortcvx.backends.base import (
    BackendInfo,
    SolveResult,
    Status,
    WarmStart,
    check_qp_instance,
    check_warm_start,
    csc_parts,
    failed_result,
    merge_settings,
    objective_value,
    session_objective,
    upper_mask,
    warm_vector,
)
from amortcvx.backends.batched import host, host_matrix, inf_norm
from amortcvx.canon.data import QPData, QPInstance

#: OSQP 1 ``status_val`` -> Status (osqp_status_type; the 0.x codes differ and are not supported).
STATUS_MAP: Mapping[int, Status] = MappingProxyType({
    1: Status.OPTIMAL,
    2: Status.OPTIMAL_INACCURATE,
    3: Status.INFEASIBLE,
    4: Status.INFEASIBLE_INACCURATE,
    5: Status.UNBOUNDED,
    6: Status.UNBOUNDED_INACCURATE,
    7: Status.MAX_ITERATIONS,
    8: Status.TIME_LIMIT,
    9: Status.NON_CONVEX,
    10: Status.INTERRUPTED,
    11: Status.SOLVER_ERROR,  # unsolved
})

#: Defaults passed to OSQP unless overridden: CVXPY's tolerances and max_iter, no polishing (it adds time
#: and does not change the iteration count; set ``polishing=True`` to get CVXPY's answer exactly), and a
#: pinned adaptive-rho interval (see the module docstring).
DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType({
    "eps_abs": 1e-5,
    "eps_rel": 1e-5,
    "max_iter": 10_000,
    "polishing": False,
    "adaptive_rho_interval": 50,
    "verbose": False,
})

SCALING_CHOICES = (10, 0)
"""The values of OSQP's ``scaling`` (Ruiz equilibration passes; OSQP's default 10) that
:meth:`~amortcvx.deploy.AmortizedSolver.choose_setup` times where ``A`` or ``P`` depend on the parameters: OSQP
computes the equilibration again at every ``update(Px=, Ax=)``, so there it is paid per instance. On
mpc_param_dyn large (6 December 2026, stop 40; eps 1e-4, calibrated package, 32 instances, medians of 3 rounds):
3.44 ms per instance at batch 1 with 10 passes, 2.73 ms without, at the same 32-33 iterations (batch 32: 2.20
against 1.66 ms). OSQP tests termination on the unscaled data either way (its ``scaled_termination`` is off)."""


def setup_choices(n: int, shared: bool) -> tuple[tuple[str, tuple], ...]:
    """The setup settings calibration times (``BackendInfo.setup_choices``): :data:`SCALING_CHOICES` where every
    instance has its own matrices (not ``shared``); none where they are shared (the equilibration then runs once,
    at the setup, and the persistent object never sets up again: :class:`Session`)."""
    return () if shared else (("scaling", SCALING_CHOICES),)


RELAXATION_CHOICES = (1.6, 1.4, 1.2)
"""OSQP's relaxation ``alpha`` values calibration tries (:meth:`~amortcvx.deploy.AmortizedSolver.choose_osqp_alpha`;
OSQP's default 1.6 first). An iteration costs the same at any ``alpha``; the count does not. Mean exact iterations of
128 cold solves on a stateless object, eps 1e-4, ``rho`` walked at 1.6 (7 December 2026, stop 53), at 1.6 / 1.4 /
1.2: mpc small 30.2 / 23.0 / 26.5, portfolio small 29.0 / 18.6 / 18.9, lasso small 34.8 / 33.7 / 38.3, mpc_param_dyn
small 30.2 / 27.2 / 32.1, transport small 410 / 364 / 339, mpc large 31.1 / 33.4 / 39.3 (1.0 more on every one; 1.8
about twice 1.6's)."""


STATELESS_SETTINGS: Mapping[str, Any] = MappingProxyType({"adaptive_rho": False})
"""OSQP settings under which a solve leaves no state that the next solve reads: ``rho`` stays where it was set,
so a persistent object never needs the reset of :class:`Session` (no refactorization between solves). Measured
(small families, 200 instances, eps 1e-4, ``rho`` fixed at the geometric median OSQP's adaptation reaches, against
adaptive ``rho`` starting there): the same iteration counts on portfolio, mpc, mpc_param_dyn and lasso (their
solves end before the first adaptation at 50 iterations) and 0.09 against 0.13 ms per solve on portfolio; 494
against 600 iterations on transport."""

_RESERVED = ("warm_starting", "warm_start")

# osqp_error_type codes raised by setup (OSQPException(code)).
_SETTINGS_VALIDATION_ERROR = 2
_NONCVX_ERROR = 4


def validate(instance: Any, warm_start: WarmStart | None) -> None:
    """Raise ValueError / TypeError when ``instance`` or ``warm_start`` cannot be given to OSQP."""
    check_qp_instance(instance, "osqp")
    check_warm_start(warm_start, int(np.shape(instance.q)[0]), int(np.shape(instance.l)[0]), ("x", "y"),
                     "osqp")


def _settings(settings: Mapping[str, Any] | None, exact_iterations: bool) -> dict[str, Any]:
    reserved = _RESERVED + (("check_termination",) if exact_iterations else ())
    opts = merge_settings(DEFAULT_SETTINGS, settings, reserved, "osqp")
    if exact_iterations:
        opts["check_termination"] = 1
    return opts


def _check_settings(solver: Any, opts: Mapping[str, Any]) -> None:
    """Raise ValueError for an unknown setting name or a value of the wrong type (before setup)."""
    fields = {k for k in solver.ext.OSQPSettings.__dict__ if not k.startswith("_")}
    known = fields | {"solver_type", "cg_preconditioner"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown OSQP settings {unknown}; known: {sorted(known)}")
    probe = solver.ext.OSQPSettings()
    for key, value in opts.items():
        if key in fields:
            try:
                setattr(probe, key, value)
            except TypeError:
                raise ValueError(f"OSQP setting {key}={value!r} has the wrong type") from None


def run(instance: QPInstance, warm_start: WarmStart | None, settings: Mapping[str, Any] | None,
        exact_iterations: bool) -> SolveResult:
    """Solve one validated instance with a fresh ``osqp.OSQP`` (see :func:`amortcvx.backends.solve`).

    Raises:
        ValueError: bad settings (unknown name or invalid value). Solver failures are returned as status.
    """
    import osqp

    opts = _settings(settings, exact_iterations)
    q = np.ascontiguousarray(instance.q, dtype=np.float64)
    n, m = q.shape[0], int(np.shape(instance.l)[0])
    # OSQP's builtin algebra needs int32 CSC indices (int64 arrays raise TypeError) and reads triu(P)
    P = None if instance.P is None else csc_parts(instance.P, np.int32, upper=True)
    A = csc_parts(instance.A, np.int32)
    lo = np.ascontiguousarray(instance.l, dtype=np.float64)
    hi = np.ascontiguousarray(instance.u, dtype=np.float64)
    solver = osqp.OSQP()
    _check_settings(solver, opts)
    try:
        solver.setup(P, q, A, lo, hi, **opts)
    except osqp.OSQPException as e:
        code = e.args[0] if e.args else None
        if code == _SETTINGS_VALIDATION_ERROR:
            raise ValueError(f"invalid OSQP settings {opts} (see OSQP's message)") from None
        status = Status.NON_CONVEX if code == _NONCVX_ERROR else Status.SOLVER_ERROR
        return failed_result(n, m, False, status, f"OSQP setup failed with error code {code}")
    except Exception as e:  # noqa: BLE001 - any other setup failure is a solver failure
        return failed_result(n, m, False, Status.SOLVER_ERROR, f"OSQP setup failed: {e}")
    try:
        if warm_start is not None:
            solver.warm_start(x=warm_vector(warm_start.x, n), y=warm_vector(warm_start.y, m))
        res = solver.solve(raise_error=False)
    except Exception as e:  # noqa: BLE001
        return failed_result(n, m, False, Status.SOLVER_ERROR, f"OSQP solve failed: {e}")
    info = res.info
    status = STATUS_MAP.get(int(info.status_val), Status.SOLVER_ERROR)
    x = np.array(res.x, dtype=np.float64)
    objective = objective_value(instance.P, q, x, instance.offset) if status.has_solution else float("nan")
    return SolveResult(
        x=x, y=np.array(res.y, dtype=np.float64), s=None, status=status, iterations=int(info.iter),
        setup_time=float(info.setup_time), solve_time=float(info.solve_time) + float(info.polish_time),
        objective=objective, message=str(info.status))


CHECK_COST = 2.0
"""The cost of one OSQP termination check in iterations (residuals, norms and the unscaled test): measured on the
small families, fixed ``rho``, 200 solves each: 1.5 (mpc) to 2.5 (transport); 2.1 on portfolio."""


def check_interval(iterations: Sequence[int], check_cost: float = CHECK_COST) -> int:
    """The ``check_termination`` that minimizes the expected work of solves whose termination tests first pass
    at ``iterations`` (exact counts, e.g. of validation instances): the interval ``c`` minimizing the mean of
    ``ceil(k / c) * (c + check_cost)`` over the counts ``k``, in iterations. A solve that passes at iteration
    ``k`` stops at the first multiple of ``c`` at or after it, and pays a check at every multiple before.

    For counts that hardly vary this is about their largest value (one check: portfolio small, 28-29 iterations
    -> 29, where OSQP's default 25 runs to 50); for spread counts a shorter interval. The iterates do not depend
    on the interval (``adaptive_rho_interval`` is pinned), so neither does ``k``.

    Raises:
        ValueError: no counts, or a count below 1.
    """
    candidates, work = _interval_work(iterations, check_cost)
    return int(candidates[int(np.argmin(work))])


def checked_work(iterations: Sequence[int], check_cost: float = CHECK_COST) -> float:
    """The expected work per solve, in iterations, of solves whose termination tests first pass at ``iterations``
    (exact counts) at the interval :func:`check_interval` chooses for them: what timed solves cost where the counts
    are those of the instances to come (the same ValueError as :func:`check_interval`)."""
    return float(_interval_work(iterations, check_cost)[1].min())


def _interval_work(iterations: Sequence[int], check_cost: float) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate interval ``c`` (1 to the largest count) and the mean of ``ceil(k / c) * (c + check_cost)``
    over the counts ``k`` at each."""
    its = np.asarray(list(iterations), dtype=np.int64)
    if its.size == 0 or its.min() < 1:
        raise ValueError(f"check_interval needs iteration counts >= 1; got {its.tolist()[:10]}")
    candidates = np.arange(1, int(its.max()) + 1)
    checks = np.ceil(its[None, :] / candidates[:, None])  # (c, instances)
    return candidates, (checks * (candidates[:, None] + check_cost)).mean(axis=1)


OSQP_INFTY = 1e30
"""OSQP's infinity: bounds beyond it are clamped to it (``OSQP_INFTY``)."""


# ----------------------------------------------------------------------------------------------------------
# certified finish and persistent solver objects

def certify(data: QPData, x: np.ndarray, z: np.ndarray, y: np.ndarray, *, eps_abs: float, eps_rel: float,
            check_dualgap: bool = True) -> np.ndarray:
    """Per instance, whether ``(x, z, y)`` passes OSQP 1.1's ``check_termination`` (unscaled termination).

    Evaluated in float64 on the original data, with OSQP's infinity norms, strict inequalities and its
    duality-gap test (``check_dualgap``, on by default)::

        ||Ax - z|| < eps_abs + eps_rel max(||z||, ||Ax||)
        ||Px + q + A'y|| < eps_abs + eps_rel max(||q||, ||A'y||, ||Px||)
        |x'Px + q'x + SC(y)| < eps_abs + eps_rel max(|x'Px|, |q'x|, |SC(y)|),   SC(y) = u'y_+ + l'y_-

    OSQP's iterates satisfy ``l <= z <= u`` and ``y`` in the normal cone of the box at ``z`` by construction
    (``z`` is a projection and ``y`` the rest); this test also requires both, exactly, so that a point that did
    not come out of an OSQP step is never certified.

    Args:
        data: the batch (float64).
        x, z, y: ``(B, n)``, ``(B, m)``, ``(B, m)`` float64 arrays.

    Returns:
        bool ``(B,)``; False wherever a quantity is not finite.
    """
    A = host_matrix(data.A)
    q = host(data.q)
    lo, hi = np.maximum(host(data.l), -OSQP_INFTY), np.minimum(host(data.u), OSQP_INFTY)
    ax, aty = A.matvec(x), A.rmatvec(y)
    px = host_matrix(data.P).matvec(x) if data.P is not None else np.zeros_like(x)
    with np.errstate(invalid="ignore", over="ignore"):
        box = ((z >= lo) & (z <= hi) & ((y <= 0) | (z >= hi)) & ((y >= 0) | (z <= lo))).all(axis=1)
        if z.shape[1]:
            pri = inf_norm(ax - z) < eps_abs + eps_rel * np.maximum(inf_norm(z), inf_norm(ax))
        else:
            pri = np.ones(x.shape[0], dtype=bool)
        dual = inf_norm(px + q + aty) < eps_abs + eps_rel * np.maximum.reduce(
            [inf_norm(q), inf_norm(aty), inf_norm(px)])
        ok = box & pri & dual
        if check_dualgap:
            xpx, qx = (x * px).sum(axis=1), (q * x).sum(axis=1)
            support = (np.where(y > 0, hi * y, 0.0) + np.where(y < 0, lo * y, 0.0)).sum(axis=1)
            ok &= np.abs(xpx + qx + support) < eps_abs + eps_rel * np.maximum.reduce(
                [np.abs(xpx), np.abs(qx), np.abs(support)])
    return ok & np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)


class Session:
    """One ``osqp.OSQP`` object for a stream of instances of one problem (see :class:`~.persistent.PersistentSolver`).

    Set up once on the reference instance (OSQP's Ruiz scaling, including its cost scaling, which reads ``q``,
    is computed there); each instance then calls ``update(q=, l=, u=)`` (and ``update(Px=, Ax=)`` where
    parameters enter ``P`` or ``A``), sets its start and solves: a warm start with ``warm_start(x=, y=)``, a cold
    start with OSQP's ``warm_starting`` setting off (OSQP then starts from zeros instead of continuing from the
    previous instance's iterate; the setting is switched only when the kind of start changes). Reset protocol:
    the only other state a solve leaves is the adapted ``rho``; after a solve that changed it
    (``info.rho_updates > 0``) it is set back with ``update_settings(rho=)`` (a numeric refactorization, no new
    setup). A result therefore depends on the instance and the reference only. Vectors are passed as contiguous
    float64 arrays (OSQP 1.1.3 silently returns wrong solutions for non-contiguous views).

    Per instance the session calls the extension object under ``osqp.OSQP`` directly (``update_data_vec``,
    ``update_data_mat``, ``warm_start``, ``solve``, ``update_rho``, its ``info`` and ``solution``): the Python
    wrapper's ``update`` and ``solve`` add about 10 us per solve (infinity clamping and derivative caches per call,
    a namespace of every info field), as much as a whole small solve's iterations. The clamping of the bounds to
    OSQP's infinity, which its ``update`` does per instance, is done here once per batch in :meth:`prepare`.
    """

    def __init__(self, reference: QPInstance, settings: Mapping[str, Any] | None):
        import osqp

        self._osqp = osqp
        opts = _settings(settings, exact_iterations=False)
        solver = osqp.OSQP()
        _check_settings(solver, opts)
        P = None if reference.P is None else csc_parts(reference.P, np.int32, upper=True)
        A = csc_parts(reference.A, np.int32)
        self.n, self.m = int(np.shape(reference.q)[0]), int(np.shape(reference.l)[0])
        try:
            solver.setup(P, np.ascontiguousarray(reference.q, dtype=np.float64), A,
                         np.ascontiguousarray(reference.l, dtype=np.float64),
                         np.ascontiguousarray(reference.u, dtype=np.float64), **opts)
        except osqp.OSQPException as e:
            code = e.args[0] if e.args else None
            raise ValueError(f"OSQP setup of the reference instance failed with error code {code} (settings "
                             f"{opts})") from None
        self._solver = solver
        self._ext = solver._solver  # the extension object (see the class docstring)
        self.opts = opts
        self.rho0 = float(solver.settings.rho)
        self.check0 = int(solver.settings.check_termination)
        self._check = self.check0
        self._warm_starting = bool(solver.settings.warm_starting)  # the setting now on the object
        self.check_dualgap = bool(getattr(solver.settings, "check_dualgap", True))
        self.builds = 1
        self._p_upper = None
        if reference.P is not None:
            full = sp.csc_matrix(reference.P)
            self._p_upper = upper_mask(full.indices, full.indptr)

    def prepare(self, data: QPData) -> dict[str, Any]:
        """Host arrays of a batch: ``q``, ``l``, ``u``, the offsets (Python floats) and, where parameters enter
        them, the values of ``A``, ``P``."""
        out = {"q": host(data.q), "l": np.maximum(host(data.l), -OSQP_INFTY), "u": np.minimum(host(data.u), OSQP_INFTY),
               "offset": data.offset.tolist(), "A": None, "P": None}
        if not data.A.shared:
            out["A"] = host(data.A.values)
        if data.P is not None and not data.P.shared:
            out["P"] = np.ascontiguousarray(host(data.P.values)[:, self._p_upper])
        return out

    def solve_one(self, batch: dict[str, Any], i: int, warm: Mapping[str, np.ndarray] | None,
                  check_termination: int | None = None) -> SolveResult:
        """Solve instance ``i`` of a prepared batch with the given termination-check interval (None: the object's)."""
        ext = self._ext
        n, m = self.n, self.m
        try:
            ext.update_data_vec(q=batch["q"][i], l=batch["l"][i], u=batch["u"][i])
            if batch["A"] is not None or batch["P"] is not None:
                ext.update_data_mat(P_x=None if batch["P"] is None else batch["P"][i], P_i=None,
                                    A_x=None if batch["A"] is None else batch["A"][i], A_i=None)
            check = self.check0 if check_termination is None else int(check_termination)
            warm_starting = warm is not None
            changed = {}
            if check != self._check:
                changed["check_termination"] = check
            if warm_starting != self._warm_starting:
                changed["warm_starting"] = warm_starting
            if changed:
                self._solver.update_settings(**changed)
                self._check, self._warm_starting = check, warm_starting
            if warm is not None:
                ext.warm_start(warm["x"], warm["y"])
            ext.solve()
        except Exception as e:  # noqa: BLE001 - a failing instance never stops the stream
            return SolveResult(np.full(n, np.nan), np.full(m, np.nan), None, Status.SOLVER_ERROR, 0, np.nan, np.nan,
                               np.nan, f"OSQP solve failed: {e}")
        info, solution = ext.info, ext.solution
        rho_updates = int(info.rho_updates)
        stats = {"rho_estimate": float(info.rho_estimate), "rho_updates": float(rho_updates)}
        if rho_updates > 0:
            ext.update_rho(self.rho0)
        status = STATUS_MAP.get(int(info.status_val), Status.SOLVER_ERROR)
        value = float(info.obj_val) if status != Status.NON_CONVEX else float("nan")
        return SolveResult(solution.x, solution.y, None, status, int(info.iter), float(info.update_time),
                           float(info.solve_time) + float(info.polish_time),
                           session_objective(status, value, batch["offset"][i]), str(info.status), stats)


INFO = BackendInfo(
    name="osqp", form="qp", cones=frozenset({"zero", "nonneg"}), warm_start_fields=("x", "y"),
    supports_derivatives=True, status_map=STATUS_MAP, default_settings=DEFAULT_SETTINGS, validate=validate,
    run=run, session=Session, certify=certify, stateless_settings=STATELESS_SETTINGS,
    setup_choices=setup_choices)
