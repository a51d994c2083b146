"""SCS 3 backend: ``min 1/2 x'Px + c'x  s.t.  Ax + s = b, s in K`` from a fresh ``scs.SCS`` per instance.

Exact iteration counts
----------------------
SCS evaluates its termination test only every 25 iterations (``CONVERGED_INTERVAL``, a compile-time
constant), so ``info['iter']`` is a multiple of 25. With ``exact_iterations=True`` the solve runs with
``log_csv_filename`` set; SCS then writes, for every iteration ``i = 0, 1, ...``, the residual quantities its
test uses, computed from the same iterate the test would see (logging does not change the iterates: we
checked that the returned solution is bitwise identical with and without the log). From the log we
recompute SCS 3.3.1's ``has_converged`` at every iteration (infinity norms, original unnormalized data)::

    solved:     tau > 0 and  res_pri  < eps_abs + eps_rel * max(|b| tau, |s|, |Ax|) / tau
                        and  res_dual < eps_abs + eps_rel * max(|c| tau, |Px|, |A'y|) / tau
                        and  gap      < eps_abs + eps_rel * max(|x'Px|, |c'x|, |b'y|)      (tau divided out)
    unbounded:  res_unbdd_a < eps_infeas and res_unbdd_p < eps_infeas
    infeasible: res_infeas < eps_infeas

and report ``iterations = i* + 1``, where ``i*`` is the first iteration at which the test gives the outcome
of the full run. ``i* + 1`` is the number of iterations executed, i.e. the smallest ``max_iters`` whose
returned iterate passes the test (SCS's own ``info['iter']`` is the 0-based index ``i`` when it stops
at a check, so a warm start at the optimum reports ``info['iter'] = 0`` and ``iterations = 1`` here).
The solution returned is that of the full run, which stopped at the first check ``i = 25 j >= i*`` that
passed (not always the next one: the residuals are not monotone).

Timings in exact mode include writing the log (one CSV row per iteration, ~1.5 kB each): time with
``exact_iterations=False``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.sparse as sp

from amortcvx.backends.base import (
    CONE_KINDS,
    BackendInfo,
    SolveResult,
    Status,
    WarmStart,
    check_cone_instance,
    check_warm_start,
    csc_parts,
    failed_result,
    merge_settings,
    objective_value,
    session_objective,
    warm_vector,
)
from amortcvx.backends.batched import host, host_matrix, inf_norm
from amortcvx.canon.data import ConeData, ConeInstance

#: SCS ``status_val`` -> Status (scs/include/glbopts.h). 2, -6, -7 are SCS's best guesses at a limit.
STATUS_MAP: Mapping[int, Status] = MappingProxyType({
    1: Status.OPTIMAL,
    2: Status.OPTIMAL_INACCURATE,
    -1: Status.UNBOUNDED,
    -6: Status.UNBOUNDED_INACCURATE,
    -2: Status.INFEASIBLE,
    -7: Status.INFEASIBLE_INACCURATE,
    -3: Status.SOLVER_ERROR,  # indeterminate
    -4: Status.SOLVER_ERROR,  # failed
    -5: Status.INTERRUPTED,
    0: Status.SOLVER_ERROR,  # unfinished (never returned)
})

#: Defaults passed to SCS unless overridden. eps_abs / eps_rel are CVXPY's; eps_infeas and max_iters are
#: SCS's own defaults, stated here because the exact-iteration recomputation needs their values.
#: linear_solver: SCS's bundled sparse LDL (QDLDL), the same on every platform, instead of SCS's "auto"
#: (MKL PARDISO where the wheel ships it, as CVXPY gets): on the mpc family (n = 624, m = 1704) PARDISO
#: took 15 ms setup + 10 ms solve against 1.6 ms + 7.4 ms for QDLDL, same iteration count. Dropped for an
#: older SCS without the ``linear_solver`` setting.
DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType({
    "eps_abs": 1e-5,
    "eps_rel": 1e-5,
    "eps_infeas": 1e-7,
    "max_iters": 100_000,
    "linear_solver": "qdldl",
    "verbose": False,
})

LINEAR_SOLVERS = ("qdldl", "cpu_dense")
"""The linear solvers :meth:`~amortcvx.deploy.AmortizedSolver.choose_setup` times where ``A`` or ``P``
depend on the parameters (a new setup, with its factorization, for every instance): SCS's sparse LDL (QDLDL) and
its dense LAPACK solver. On robust_ls large (``n = 102``, ``m = 302``, a dense ``A``), per cold solve: setup 6.2
against 1.2 ms, 25 iterations 1.15 against 0.39 ms; on mpc_param_dyn large (``n = 624``, sparse) the dense
solver took 27 + 34 ms against 9 + 8 ms (the same iteration counts: both solve exactly)."""
DENSE_MAX_N = 1000
"""The dense linear solver is timed only where ``n`` is at most this (its factor holds ``n^2`` entries)."""
NORMALIZE_CHOICES = (True, False)
"""The values of SCS's ``normalize`` (equilibration of the data at setup; SCS's default True) that
:meth:`~amortcvx.deploy.AmortizedSolver.choose_setup` times. The equilibration passes run at every setup (for every
instance where ``A`` or ``P`` depend on the parameters, and before every solve of the adaptive object) and cost most of
it on a dense ``A``; what they save in iterations depends on the problem. Per fresh cold solve (16 instances, eps 1e-4,
``scale`` 0.1): robust_ls large with the dense solver, setup 1.05 against 0.25 ms, 25 against 50 iterations (1.44
against 0.94 ms in all); mpc_param_dyn large with QDLDL, setup 2.4 against 1.5 ms, 100 against 125 iterations (8.9
against 10.6 ms), but on the stateless object at its own fixed scale 4.3 against 3.4 ms per instance through the
package; transport large (``A`` shared, the adaptive object kept for cold solves), 52.7 against 48.0 ms per instance at
batch 1 through the package. SCS tests termination on the unnormalized data either way, so both answer at the same
tolerance; only the time differs."""

_RESERVED = ("warm_start",)

STATELESS_SETTINGS: Mapping[str, Any] = MappingProxyType({"adaptive_scale": False, "acceleration_lookback": 0})
"""SCS settings under which a solve leaves no state that the next solve reads (fixed scale, no Anderson
acceleration): a persistent object then never needs a new setup (see :class:`Session`)."""

# SCS 3 settings checked here so that a bad value raises ValueError instead of becoming a solver error.
_POSITIVE = ("max_iters", "scale", "rho_x", "acceleration_interval")
_NONNEGATIVE = ("eps_abs", "eps_rel", "eps_infeas", "time_limit_secs")

_LOG_COLUMNS = ("iter", "res_pri", "res_dual", "gap", "tau", "xt_p_x", "ctx", "bty", "ax_nrm_inf",
                "s_nrm_inf", "px_nrm_inf", "aty_nrm_inf", "b_nrm_inf", "c_nrm_inf", "res_infeas",
                "res_unbdd_a", "res_unbdd_p")


def validate(instance: Any, warm_start: WarmStart | None) -> None:
    """Raise ValueError / TypeError when ``instance`` or ``warm_start`` cannot be given to SCS."""
    check_cone_instance(instance, "scs", CONE_KINDS)
    check_warm_start(warm_start, int(np.shape(instance.c)[0]), instance.cones.size, ("x", "y", "s"), "scs")


def _settings(settings: Mapping[str, Any] | None, exact_iterations: bool) -> dict[str, Any]:
    reserved = _RESERVED + (("log_csv_filename",) if exact_iterations else ())
    opts = merge_settings(DEFAULT_SETTINGS, settings, reserved, "scs")
    for key in _POSITIVE:
        if key in opts and not opts[key] > 0:
            raise ValueError(f"SCS setting {key} must be positive, got {opts[key]!r}")
    for key in _NONNEGATIVE:
        if key in opts and not opts[key] >= 0:
            raise ValueError(f"SCS setting {key} must be nonnegative, got {opts[key]!r}")
    if "alpha" in opts and not 0 < opts["alpha"] < 2:
        raise ValueError(f"SCS setting alpha must be in (0, 2), got {opts['alpha']!r}")
    return opts


@contextlib.contextmanager
def _quiet_stdout(enabled: bool) -> Iterator[None]:
    """Discard what SCS prints to ``sys.stdout`` for the duration.

    SCS's Python extension prints ``Logging run data to ...`` (through ``sys.stdout``) whenever
    ``log_csv_filename`` is set, even with ``verbose=False``; this keeps exact-iteration batches quiet.
    It only wraps the solver construction, but ``sys.stdout`` is process-global: another thread printing
    during that call loses its output.
    """
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def read_log(path: str) -> dict[str, np.ndarray]:
    """Columns of an SCS 3 ``log_csv_filename`` file that the termination test needs.

    The header may list more names than the rows hold (spectral-cone columns are only written for those
    cones); the leading columns line up, which is all that is used.

    Returns:
        dict column name -> float64 array with one entry per logged row.
    """
    with open(path) as f:
        names = [h.strip() for h in f.readline().split(",")]
    missing = [c for c in _LOG_COLUMNS if c not in names]
    if missing:
        raise RuntimeError(f"SCS log {path} lacks the columns {missing}; SCS version changed its log format")
    idx = [names.index(c) for c in _LOG_COLUMNS]
    table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=idx, ndmin=2, dtype=np.float64)
    return {c: table[:, j] for j, c in enumerate(_LOG_COLUMNS)}


def termination_tests(log: Mapping[str, np.ndarray], eps_abs: float, eps_rel: float,
                      eps_infeas: float) -> dict[str, np.ndarray]:
    """SCS 3.3.1's ``has_converged``, evaluated on every logged iterate.

    Returns:
        dict with boolean arrays ``'solved'``, ``'unbounded'``, ``'infeasible'``: the outcome the test would
        return at each row (checked in that order, as SCS does, so at most one is True per row).
    """
    tau = log["tau"]
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_tau = np.where(tau > 0, tau, 1.0)
        prl = np.maximum.reduce([log["b_nrm_inf"] * tau, log["s_nrm_inf"], log["ax_nrm_inf"]]) / safe_tau
        drl = np.maximum.reduce([log["c_nrm_inf"] * tau, log["px_nrm_inf"], log["aty_nrm_inf"]]) / safe_tau
        grl = np.maximum.reduce([np.abs(log["xt_p_x"]), np.abs(log["ctx"]), np.abs(log["bty"])])
        solved = ((tau > 0) & (log["res_pri"] < eps_abs + eps_rel * prl)
                  & (log["res_dual"] < eps_abs + eps_rel * drl) & (log["gap"] < eps_abs + eps_rel * grl))
        unbounded = ~solved & (log["res_unbdd_a"] < eps_infeas) & (log["res_unbdd_p"] < eps_infeas)
        infeasible = ~solved & ~unbounded & (log["res_infeas"] < eps_infeas)
    return {"solved": solved, "unbounded": unbounded, "infeasible": infeasible}


def exact_count(log: Mapping[str, np.ndarray], status: Status, executed: int, opts: Mapping[str, Any]) -> int:
    """Iterations until SCS's test first gave the run's outcome (``executed`` when it never did).

    Args:
        log: :func:`read_log` columns.
        status: the outcome of the full run.
        executed: iterations the run executed (rows ``iter < executed`` are the loop's; SCS appends one
            final row that repeats the last iterate).
        opts: the settings of the run (``eps_abs``, ``eps_rel``, ``eps_infeas``).
    """
    outcomes = {Status.OPTIMAL: "solved", Status.UNBOUNDED: "unbounded", Status.INFEASIBLE: "infeasible"}
    key = outcomes.get(status)
    if key is None:
        return executed
    rows = log["iter"] < executed
    hits = termination_tests(log, float(opts["eps_abs"]), float(opts["eps_rel"]), float(opts["eps_infeas"]))
    first = np.flatnonzero(hits[key] & rows)
    if first.size == 0:  # rounding at the threshold: keep the (upper bound) count SCS executed
        return executed
    return int(log["iter"][first[0]]) + 1


def converged(instance: ConeInstance, x: np.ndarray, y: np.ndarray, s: np.ndarray, *, eps_abs: float = 1e-5,
              eps_rel: float = 1e-5) -> bool:
    """Whether ``(x, y, s)`` passes SCS 3's optimality test (infinity norms, ``tau = 1``)::

        |Ax + s - b| < eps_abs + eps_rel max(|b|, |s|, |Ax|),
        |Px + A'y + c| < eps_abs + eps_rel max(|c|, |Px|, |A'y|),
        |x'Px + c'x + b'y| < eps_abs + eps_rel max(|x'Px|, |c'x|, |b'y|).
    """
    A = sp.csc_matrix(instance.A)
    b = np.asarray(instance.b, dtype=np.float64)
    c = np.asarray(instance.c, dtype=np.float64)
    px = np.zeros_like(x) if instance.P is None else sp.csc_matrix(instance.P) @ x

    def row(v: np.ndarray) -> np.ndarray:  # a batch of one for the shared test
        return np.asarray(v, dtype=np.float64)[None, :]

    return bool(_optimality_test(row(A @ x), row(A.T @ y), row(px), row(b), row(c), row(x), row(y), row(s),
                                 eps_abs, eps_rel)[0])


def _optimality_test(ax: np.ndarray, aty: np.ndarray, px: np.ndarray, b: np.ndarray, c: np.ndarray, x: np.ndarray,
                     y: np.ndarray, s: np.ndarray, eps_abs: float, eps_rel: float) -> np.ndarray:
    """SCS 3.3.1's optimality test with ``tau = 1`` on ``(B, .)`` arrays (see :func:`certify`); bool ``(B,)``."""
    xpx, ctx, bty = (x * px).sum(axis=1), (c * x).sum(axis=1), (b * y).sum(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        pri = inf_norm(ax + s - b) < eps_abs + eps_rel * np.maximum.reduce([inf_norm(b), inf_norm(s), inf_norm(ax)])
        dual = inf_norm(px + aty + c) < eps_abs + eps_rel * np.maximum.reduce(
            [inf_norm(c), inf_norm(px), inf_norm(aty)])
        gap = np.abs(xpx + ctx + bty) < eps_abs + eps_rel * np.maximum.reduce([np.abs(xpx), np.abs(ctx), np.abs(bty)])
    return pri & dual & gap


def solver_data(instance: ConeInstance, int_dtype: type) -> dict[str, Any]:
    """The data dict ``scs.SCS`` takes (``A``, ``b``, ``c``[, upper-triangular ``P``]) for one instance."""
    data = {"A": csc_parts(instance.A, int_dtype), "b": np.ascontiguousarray(instance.b, dtype=np.float64),
            "c": np.ascontiguousarray(instance.c, dtype=np.float64)}
    if instance.P is not None:
        data["P"] = csc_parts(instance.P, int_dtype, upper=True)  # SCS reads the upper triangle
    return data


def run(instance: ConeInstance, warm_start: WarmStart | None, settings: Mapping[str, Any] | None,
        exact_iterations: bool) -> SolveResult:
    """Solve one validated instance with a fresh ``scs.SCS`` (see :func:`amortcvx.backends.solve`).

    Raises:
        ValueError: bad settings (unknown name or invalid value). Solver failures are returned as status.
    """
    import scs

    opts = _settings(settings, exact_iterations)
    if not hasattr(scs, "LinearSolver") and "linear_solver" not in (settings or {}):
        opts.pop("linear_solver", None)
    n, m = int(np.shape(instance.c)[0]), instance.cones.size
    int_dtype = np.int64 if getattr(scs, "__sizeof_int__", 8) == 8 else np.int32
    data = solver_data(instance, int_dtype)
    log_path = None
    if exact_iterations:  # a file, not a directory: rmdir costs ~3 ms on some file systems
        fd, log_path = tempfile.mkstemp(prefix="amortcvx_scs_", suffix=".csv")
        os.close(fd)
        opts["log_csv_filename"] = log_path
    try:
        try:
            with _quiet_stdout(exact_iterations and not opts.get("verbose", False)):
                solver = scs.SCS(data, instance.cones.to_scs(), **opts)
        except TypeError as e:
            raise ValueError(f"invalid SCS settings {sorted(opts)}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any setup failure is a solver failure
            return failed_result(n, m, True, Status.SOLVER_ERROR, f"SCS setup failed: {e}")
        try:
            if warm_start is None:
                raw = solver.solve(warm_start=False)
            else:
                raw = solver.solve(warm_start=True, x=warm_vector(warm_start.x, n),
                                   y=warm_vector(warm_start.y, m), s=warm_vector(warm_start.s, m))
        except Exception as e:  # noqa: BLE001
            return failed_result(n, m, True, Status.SOLVER_ERROR, f"SCS solve failed: {e}")
        info = raw["info"]
        status = STATUS_MAP.get(int(info["status_val"]), Status.SOLVER_ERROR)
        executed = max(0, min(int(info["iter"]) + 1, int(opts["max_iters"])))
        iterations = executed
        if log_path is not None and executed > 0 and os.path.getsize(log_path) > 0:
            iterations = exact_count(read_log(log_path), status, executed, opts)
    finally:
        if log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(log_path)
    x = np.asarray(raw["x"], dtype=np.float64)
    objective = objective_value(instance.P, np.asarray(instance.c, dtype=np.float64), x,
                                instance.offset) if status.has_solution else float("nan")
    return SolveResult(
        x=x, y=np.asarray(raw["y"], dtype=np.float64), s=np.asarray(raw["s"], dtype=np.float64),
        status=status, iterations=int(iterations), setup_time=float(info["setup_time"]) / 1e3,
        solve_time=float(info["solve_time"]) / 1e3, objective=objective, message=str(info.get("status", "")))




# ----------------------------------------------------------------------------------------------------------
# certified finish and persistent solver objects

def certify(data: ConeData, x: np.ndarray, y: np.ndarray, s: np.ndarray, *, eps_abs: float,
            eps_rel: float) -> np.ndarray:
    """Per instance, whether ``(x, y, s)`` passes SCS 3.3.1's optimality test (``has_converged``, ``tau = 1``).

    Evaluated in float64 on the original (unnormalized) data with SCS's infinity norms and strict
    inequalities::

        ||Ax + s - b|| < eps_abs + eps_rel max(||b||, ||s||, ||Ax||)
        ||Px + A'y + c|| < eps_abs + eps_rel max(||c||, ||Px||, ||A'y||)
        |x'Px + c'x + b'y| < eps_abs + eps_rel max(|x'Px|, |c'x|, |b'y|)

    SCS's own iterates have ``y`` in ``K*`` and ``s`` in ``K`` by construction; a caller certifying another
    point must project them first (the test does not look at cone membership).

    Args:
        data: the batch (float64; ``A``/``P`` shared or per instance).
        x, y, s: ``(B, n)``, ``(B, m)``, ``(B, m)`` float64 arrays.

    Returns:
        bool ``(B,)``; False wherever a quantity is not finite.
    """
    A = host_matrix(data.A)
    px = host_matrix(data.P).matvec(x) if data.P is not None else np.zeros_like(x)
    return _optimality_test(A.matvec(x), A.rmatvec(y), px, host(data.b), host(data.c), x, y, s, eps_abs, eps_rel)


CHECK_INTERVAL = 25
"""SCS 3.3's ``CONVERGED_INTERVAL`` (compiled in): it tests termination at iterations 0, 25, 50, ..."""
CERTIFY_COST = 2.0
"""The cost of :func:`certify` per instance in SCS iterations, at batch sizes of tens or more (mpc small, the
stateless object, batch 64: 0.02 ms against 0.011 ms per iteration)."""


def timed_iterations(k: int) -> int:
    """The iterations a timed SCS solve executes when its test first holds after ``k`` (SCS stops at the first
    check at or after iteration ``k - 1``; residuals are not monotone, so this is the usual case, not a bound)."""
    return 1 if k <= 1 else CHECK_INTERVAL * -(-(k - 1) // CHECK_INTERVAL) + 1


def stop_point(iterations: Sequence[int], certify_cost: float = CERTIFY_COST) -> int | None:
    """The ``max_iters`` of a first, short SCS run whose iterate :func:`certify` checks (SCS's own test between
    its checks), chosen to minimize the expected iterations over solves whose test first holds after
    ``iterations`` (exact counts, e.g. of validation instances); None where no stop point beats SCS alone.

    A solve that passes after ``k`` iterations costs, with stop point ``c``: ``c`` iterations plus the
    certificate, and where ``k > c`` a continuation warm-started from the iterate, which SCS tests at its
    iterations 0 (failing: the certificate just did), 25, ... (``timed_iterations(k - c + 1)``, at least 26).
    Without a stop point it costs ``timed_iterations(k)``. Returns the ``c`` of least mean cost when that is
    below the mean without one.

    Raises:
        ValueError: no counts, or a count below 1.
    """
    its = np.asarray(list(iterations), dtype=np.int64)
    if its.size == 0 or its.min() < 1:
        raise ValueError(f"stop_point needs iteration counts >= 1; got {its.tolist()[:10]}")
    plain = float(np.mean([timed_iterations(int(k)) for k in its]))
    best, best_cost = None, plain
    for c in range(1, int(its.max()) + 1):
        rest = its[its > c]
        cont = sum(max(CHECK_INTERVAL + 1, timed_iterations(int(k - c + 1))) for k in rest)
        cost = c + certify_cost + cont / its.size
        if cost < best_cost:
            best, best_cost = c, cost
    return best


class Session:
    """One ``scs.SCS`` object for a stream of instances of one problem (see :class:`~.persistent.PersistentSolver`).

    Reset protocol. SCS 3.3's Python API cannot reset what a solve leaves in the object: the adapted scale (and
    the running estimate that drives it, updated at every check) and the Anderson-acceleration memory, which the
    next solve reads (measured: the same instance took 100-475 iterations after another instance, 75-125 on a
    fresh object). So the object is rebuilt (setup and factorization; the data were converted once) before any
    solve that would otherwise see such state:

    * ``adaptive_scale=True`` (SCS's default): before every solve. The object is built on the reference
      instance and updated with the instance's ``b``, ``c`` (as in the next case), so that it can be built
      ahead: where the reference's setup took at least :data:`AHEAD_SETUP_SECONDS`, the next solve's object is
      built on a background thread (SCS releases the GIL in its setup) while the caller works or the current
      instance solves, and the setup leaves the critical path where there is a free core or time between calls.
    * ``adaptive_scale=False``: only after a solve that ran past its first check (``info['iter'] > 0``; the
      Anderson step first acts at iteration ``acceleration_interval``); otherwise ``update(b=, c=)`` and solve
      on the same object. The object is built on the reference instance's ``b``, ``c`` (SCS normalizes ``b``,
      ``c`` with factors computed at setup), so a result depends on the instance and the reference only.
    * ``adaptive_scale=False, acceleration_lookback=0`` (:data:`STATELESS_SETTINGS`): never; SCS then keeps
      no state between solves (``stateless``), and one object serves the whole stream.
    * Parameters in ``A`` or ``P``: SCS has no matrix update, so every instance gets a new setup.
      Where setups are costly, the object of instance ``i + 1`` of a batch is built on the background thread
      while instance ``i`` solves.
    """

    def __init__(self, reference: ConeInstance, settings: Mapping[str, Any] | None):
        import scs

        self._scs = scs
        opts = _settings(settings, exact_iterations=False)
        if not hasattr(scs, "LinearSolver") and "linear_solver" not in (settings or {}):
            opts.pop("linear_solver", None)
        self.opts = opts
        self._max_iters = int(opts["max_iters"])
        self.n, self.m = int(np.shape(reference.c)[0]), reference.cones.size
        self._int = np.int64 if getattr(scs, "__sizeof_int__", 8) == 8 else np.int32
        self._ref = solver_data(reference, self._int)
        self._cone = reference.cones.to_scs()
        self._reuse = not bool(opts.get("adaptive_scale", True))
        # no adaptive scale and no Anderson memory: nothing a solve leaves behind is read by the next one
        self.stateless = self._reuse and int(opts.get("acceleration_lookback", 10)) == 0
        self._solver = None
        self._clean = False
        self._spare: tuple[Hashable, Future] | None = None  # (what it was built for, the build)
        self.builds = 0
        start = time.perf_counter()
        self._build(self._ref)  # raises ValueError for bad settings now, not at the first solve
        self._ahead = time.perf_counter() - start >= AHEAD_SETUP_SECONDS
        self._clean = self._reuse
        if not self._reuse:  # the first solve's object (built on the reference, never solved)
            ready: Future = Future()
            ready.set_result(self._solver)
            self._spare = ("reference", ready)

    def _new(self, data: dict[str, Any]) -> Any:
        try:
            return self._scs.SCS(data, self._cone, **self.opts)
        except TypeError as e:
            raise ValueError(f"invalid SCS settings {sorted(self.opts)}: {e}") from None

    def _build(self, data: dict[str, Any]) -> None:
        self._solver = self._new(data)
        self.builds += 1

    def _instance_data(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        """The solver data of instance ``i``: its own ``b``, ``c`` (and ``A``, ``P`` where parameters enter them)."""
        data = self._matrices(batch, i)
        data["b"], data["c"] = batch["b"][i], batch["c"][i]
        return data

    def _fresh(self, batch: dict[str, Any], i: int) -> None:
        """A freshly built object for instance ``i``: the one built in the background, where it is ready or being
        built, else one built now; then, where setups are costly, start building the next one (on the reference
        instance, or, with parameters in ``A``/``P``, for instance ``i + 1`` of the batch)."""
        matrices = batch["A"] is not None or batch["P"] is not None
        key = (batch["token"], i) if matrices else "reference"
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] == key:
            self._solver = spare[1].result()  # raises what the build raised
        else:
            self._build(self._instance_data(batch, i) if matrices else self._ref)
        if not matrices:
            self._solver.update(b=batch["b"][i], c=batch["c"][i])
            if self._ahead:
                self._spare = ("reference", _setup_pool().submit(self._new, self._ref))
                self.builds += 1
        elif self._ahead and i + 1 < batch["b"].shape[0]:
            self._spare = ((batch["token"], i + 1),
                           _setup_pool().submit(lambda: self._new(self._instance_data(batch, i + 1))))
            self.builds += 1

    def prepare(self, data: ConeData) -> dict[str, Any]:
        """Host arrays of a batch: ``b``, ``c``, the offsets (Python floats) and, where parameters enter them, the
        values of ``A``, ``P``."""
        out = {"b": host(data.b), "c": host(data.c), "offset": data.offset.tolist(), "A": None, "P": None,
               "token": next(_TOKENS)}
        if not data.A.shared:
            out["A"] = host(data.A.values)
            out["A_pattern"] = (data.A.indices.astype(self._int), data.A.indptr.astype(self._int))
        if data.P is not None and not data.P.shared:
            out["P"] = data.P  # converted per instance (upper triangle) in _matrices
        return out

    def _matrices(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        data = dict(self._ref)
        if batch["A"] is not None:
            idx, ptr = batch["A_pattern"]
            data["A"] = sp.csc_matrix((batch["A"][i], idx, ptr), shape=(self.m, self.n))
        if batch["P"] is not None:
            data["P"] = csc_parts(batch["P"].matrix(i), self._int, upper=True)
        return data

    def solve_one(self, batch: dict[str, Any], i: int, warm: Mapping[str, np.ndarray] | None,
                  check_termination: int | None = None) -> SolveResult:
        """Solve instance ``i`` of a prepared batch (``check_termination`` is OSQP's; ignored here)."""
        n, m = self.n, self.m
        b, c = batch["b"][i], batch["c"][i]
        matrices = batch["A"] is not None or batch["P"] is not None
        try:
            if matrices or not self._reuse:
                self._fresh(batch, i)
            elif self._solver is None or not self._clean:
                self._build(self._ref)
                self._solver.update(b=b, c=c)
            else:
                self._solver.update(b=b, c=c)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a setup failure is a solver failure
            self._solver, self._clean = None, False
            return SolveResult(np.full(n, np.nan), np.full(m, np.nan), np.full(m, np.nan), Status.SOLVER_ERROR, 0,
                               np.nan, np.nan, np.nan, f"SCS setup failed: {e}")
        try:
            if warm is None:
                raw = self._solver.solve(warm_start=False)
            else:
                raw = self._solver.solve(warm_start=True, x=warm["x"], y=warm["y"], s=warm["s"])
        except Exception as e:  # noqa: BLE001
            self._solver, self._clean = None, False
            return SolveResult(np.full(n, np.nan), np.full(m, np.nan), np.full(m, np.nan), Status.SOLVER_ERROR, 0,
                               np.nan, np.nan, np.nan, f"SCS solve failed: {e}")
        info = raw["info"]
        last = int(info["iter"])
        self._clean = self._reuse and not matrices and (self.stateless or last == 0)
        status = STATUS_MAP.get(int(info["status_val"]), Status.SOLVER_ERROR)
        executed = max(0, min(last + 1, self._max_iters))
        # SCS returns float64 numpy arrays of its own (not views of the object's memory)
        return SolveResult(raw["x"], raw["y"], raw["s"], status, executed, float(info["setup_time"]) / 1e3,
                           float(info["solve_time"]) / 1e3,
                           session_objective(status, float(info.get("pobj", np.nan)), batch["offset"][i]),
                           str(info.get("status", "")), {"scale": float(info.get("scale", np.nan)),
                                                         "scale_updates": float(info.get("scale_updates", 0))})


AHEAD_SETUP_SECONDS = 1e-3
"""Setups at least this long are done ahead on a background thread (shorter ones cost less than the hand-off)."""
_TOKENS = itertools.count()
_POOLS = threading.local()


def _setup_pool() -> ThreadPoolExecutor:
    """The background thread for the setups of the next instances: one per solving thread (a new one after a
    fork). Per thread, not per process: the parts of a batch solved on their own threads
    (:class:`~amortcvx.backends.persistent.ThreadedSolver`) would otherwise queue their setups on one thread.
    Measured, mpc_param_dyn large (every instance a new setup), batch 64 on 2 threads: 4.5 -> 4.1-4.3 ms per instance
    (one object: 6.2 ms)."""
    pool = getattr(_POOLS, "pool", None)
    if pool is None or pool[0] != os.getpid():
        _POOLS.pool = pool = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="amortcvx-scs-setup"))
    return pool[1]


def setup_choices(n: int, shared: bool) -> tuple[tuple[str, tuple], ...]:
    """The setup settings calibration times (``BackendInfo.setup_choices``): where every instance has its own setup
    (not ``shared``) the linear solver (:data:`LINEAR_SOLVERS`, where ``n <= DENSE_MAX_N``); then, everywhere,
    :data:`NORMALIZE_CHOICES` (the adaptive object is set up again before every solve, :class:`Session`)."""
    dense = not shared and n <= DENSE_MAX_N
    return ((("linear_solver", LINEAR_SOLVERS),) if dense else ()) + (("normalize", NORMALIZE_CHOICES),)


INFO = BackendInfo(
    name="scs", form="cone", cones=CONE_KINDS, warm_start_fields=("x", "y", "s"), supports_derivatives=False,
    status_map=STATUS_MAP, default_settings=DEFAULT_SETTINGS, validate=validate, run=run, session=Session,
    certify=certify, stateless_settings=STATELESS_SETTINGS, setup_choices=setup_choices)
