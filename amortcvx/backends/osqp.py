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

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

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
    warm_vector,
)
from amortcvx.canon.data import QPInstance

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


INFO = BackendInfo(
    name="osqp", form="qp", cones=frozenset({"zero", "nonneg"}), warm_start_fields=("x", "y"),
    supports_derivatives=True, status_map=STATUS_MAP, default_settings=DEFAULT_SETTINGS, validate=validate,
    run=run)
