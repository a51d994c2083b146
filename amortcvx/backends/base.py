"""Types shared by the C solver backends: status vocabulary, warm starts, results, backend capabilities.

Every backend solves one canonical instance from a fresh solver object and answers with a
:class:`SolveResult` in one vocabulary (:class:`Status`), whatever the solver's own codes are.
The validation helpers here check an instance and a warm start before any solver is touched, so that bad
input raises a :class:`ValueError` that names the field at fault, while a solver failure never raises and
is reported by status instead.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from amortcvx.canon.data import ConeInstance, QPInstance

CONE_KINDS = frozenset({"zero", "nonneg", "soc", "psd", "exp"})


class Status(str, enum.Enum):
    """Outcome of a solve, one vocabulary for every backend (values are CVXPY-like lowercase strings).

    ``*_inaccurate`` means the solver stopped at its iteration or time limit and returns its best guess
    (SCS 3 and OSQP 1 only report these at a limit). ``max_iterations`` is OSQP's "limit reached and not
    even the loosened test holds"; SCS has no such code and reports an ``*_inaccurate`` guess instead.
    """

    OPTIMAL = "optimal"
    OPTIMAL_INACCURATE = "optimal_inaccurate"
    INFEASIBLE = "infeasible"
    INFEASIBLE_INACCURATE = "infeasible_inaccurate"
    UNBOUNDED = "unbounded"
    UNBOUNDED_INACCURATE = "unbounded_inaccurate"
    MAX_ITERATIONS = "max_iterations"
    TIME_LIMIT = "time_limit"
    NON_CONVEX = "non_convex"
    INTERRUPTED = "interrupted"
    SOLVER_ERROR = "solver_error"

    def __str__(self) -> str:
        return self.value

    @property
    def cvxpy(self) -> str:
        """CVXPY's status string for this outcome (``problem.status`` after ``problem.solve``): the same word for
        the optimal / infeasible / unbounded outcomes, ``user_limit`` for a limit without a guess, else
        ``solver_error``."""
        if self in (Status.MAX_ITERATIONS, Status.TIME_LIMIT):
            return "user_limit"
        if self in (Status.NON_CONVEX, Status.INTERRUPTED, Status.SOLVER_ERROR):
            return "solver_error"
        return self.value

    @property
    def has_solution(self) -> bool:
        """True for ``optimal`` and ``optimal_inaccurate``: ``x`` (and the objective) are meaningful."""
        return self in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)

    @property
    def converged(self) -> bool:
        """True when the solver's termination test held (optimal or a certificate to the tolerance)."""
        return self in (Status.OPTIMAL, Status.INFEASIBLE, Status.UNBOUNDED)


class WarmStart(NamedTuple):
    """An initial point for the solver, in canonical coordinates.

    SCS takes ``(x, y, s)`` and starts from ``v0 = [x; y + s / r_y; 1]`` (its normalized space);
    OSQP takes ``(x, y)`` and sets ``z = A x``. A field left as None is taken as zeros, so
    ``WarmStart(zeros, zeros, zeros)`` and ``WarmStart(None, None)`` both reproduce the cold start.

    Attributes:
        x: primal variable, length ``n``.
        y: dual variable, length ``m`` (SCS: ``y`` in the dual cone; OSQP: ``y = y_u - y_l``).
        s: SCS slack ``s = b - A x`` in the cone, length ``m``; must be None for OSQP.
    """

    x: np.ndarray | None
    y: np.ndarray | None
    s: np.ndarray | None = None


class SolveResult(NamedTuple):
    """The answer of one solve.

    Attributes:
        x: primal solution (length ``n``); NaN where the solver has none (e.g. after a failure).
        y: dual solution (length ``m``); for infeasible / unbounded outcomes whatever the solver returns
            (SCS: the certificate, OSQP: NaN).
        s: SCS slack (length ``m``); None for OSQP.
        status: the outcome in the shared vocabulary.
        iterations: number of solver iterations (linear-system solves) executed until the termination test
            held. With ``exact_iterations=True`` this is exact; otherwise it is where the solver looked
            (a multiple of its check interval, plus one for SCS, which starts counting at 0).
        setup_time: seconds the solver reported for setup (factorization included); NaN after a failure.
        solve_time: seconds the solver reported for the iterations (OSQP: plus polishing).
        objective: ``1/2 x'Px + c'x + offset`` (CVXPY's optimal value) when ``status.has_solution``, else NaN.
        message: the solver's own status text, or the error for a failed solve.
        stats: solver-specific numbers of the solve where a backend reports them (persistent SCS objects:
            ``scale``, the dual scale the solve ended with, and ``scale_updates``; OSQP: ``rho_estimate``,
            ``rho_updates``), else None.
    """

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray | None
    status: Status
    iterations: int
    setup_time: float
    solve_time: float
    objective: float
    message: str = ""
    stats: Mapping[str, float] | None = None


def session_objective(status: Status, value: float, offset: float) -> float:
    """A persistent session's ``objective``: the solver's own report ``value`` of ``1/2 x'Px + c'x`` (SCS
    ``info['pobj']``, OSQP ``info.obj_val``: equal to :func:`objective_value` without the offset to machine
    precision, 3e-16 relative on the small families) plus the instance's ``offset``; NaN without a solution."""
    return value + offset if status.has_solution else math.nan


@dataclass(frozen=True)
class BackendInfo:
    """Declared capabilities of one backend (a registry entry).

    Attributes:
        name: registry key, e.g. ``"scs"``.
        form: ``"cone"`` (takes :class:`ConeInstance`) or ``"qp"`` (takes :class:`QPInstance`).
        cones: cone kinds it can solve (for ``"qp"``: ``zero`` and ``nonneg``, as rows with ``l == u`` and
            one-sided or two-sided bounds).
        warm_start_fields: the :class:`WarmStart` fields it uses.
        supports_derivatives: whether the C library itself computes derivatives of the solution.
        status_map: solver status code -> :class:`Status`.
        default_settings: settings amortcvx passes unless the caller overrides them.
        validate: ``validate(instance, warm_start)`` raises ValueError for bad input.
        run: ``run(instance, warm_start, settings, exact_iterations) -> SolveResult`` on validated input.
        session: ``session(reference, settings)``, a persistent solver object for a stream of instances of one
            problem (see :mod:`amortcvx.backends.persistent`).
        certify: ``certify(data, *point, eps_abs=, eps_rel=) -> bool (B,)``, the solver's own optimality test
            evaluated in float64 on a batch of candidate points (the certified finish).
        stateless_settings: settings under which a solve leaves no state that the next solve on the same
            persistent object reads, so one object serves a whole stream with no reset (SCS: fixed scale, no
            Anderson memory; OSQP: fixed ``rho``).
        setup_choices: ``setup_choices(n, shared) -> ((name, values), ...)``, the settings whose cost recurs
            with every solve's setup that calibration times, each with the values tried, for a problem of ``n``
            variables whose ``A`` and ``P`` are ``shared`` by every instance or not (SCS: ``normalize``, and the
            linear solver where every instance has its own setup; OSQP: ``scaling`` where every instance has its
            own matrices; see :meth:`amortcvx.deploy.AmortizedSolver.choose_setup`).
    """

    name: str
    form: str
    cones: frozenset[str]
    warm_start_fields: tuple[str, ...]
    supports_derivatives: bool
    status_map: Mapping[int, Status]
    default_settings: Mapping[str, Any]
    validate: Callable[[Any, WarmStart | None], None] = field(repr=False, compare=False)
    run: Callable[..., SolveResult] = field(repr=False, compare=False)
    session: Callable[..., Any] = field(repr=False, compare=False)
    certify: Callable[..., np.ndarray] = field(repr=False, compare=False)
    stateless_settings: Mapping[str, Any] = field(default_factory=dict)
    setup_choices: Callable[[int, bool], tuple[tuple[str, tuple], ...]] = field(default=lambda n, shared: (),
                                                                                repr=False, compare=False)


# ----------------------------------------------------------------------------------------------------------
# validation helpers

def _vector(v: Any, length: int, what: str) -> np.ndarray:
    """``v`` as a contiguous float64 vector of the given length; ValueError naming ``what`` otherwise."""
    try:
        arr = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a float vector: {e}") from None
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{what} must have shape ({length},), got {arr.shape}")
    return arr


def _finite(arr: np.ndarray, what: str, allow_inf: bool = False) -> None:
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        kind = "NaN" if allow_inf else "non-finite"
        raise ValueError(f"{what} has {kind} entries (first at index {int(np.flatnonzero(bad)[0])})")


def _matrix(M: Any, shape: tuple[int, int], what: str) -> None:
    """Check that ``M`` (scipy sparse or dense 2-D array) has the given shape and finite entries."""
    if sp.issparse(M):
        data = M.data if hasattr(M, "data") and M.format in ("csc", "csr", "coo") else sp.coo_matrix(M).data
    elif isinstance(M, np.ndarray) and M.ndim == 2:
        data = M
    else:
        raise ValueError(f"{what} must be a scipy sparse matrix or a 2-D numpy array, got {type(M).__name__}")
    if tuple(M.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {shape}, got {tuple(M.shape)}")
    try:
        _finite(np.asarray(data, dtype=np.float64).ravel(), what)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None


def _symmetric_P(P: Any, n: int) -> None:
    """Check that ``P`` is ``n x n``, finite and symmetric (the full matrix, not one triangle)."""
    if P is None:
        return
    _matrix(P, (n, n), "P")
    coo = sp.coo_matrix(P, dtype=np.float64)
    coo.sum_duplicates()
    coo.eliminate_zeros()
    if coo.nnz == 0:
        return
    r, c, v = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    key, key_t = r * n + c, c * n + r
    o, o_t = np.argsort(key, kind="stable"), np.argsort(key_t, kind="stable")
    scale = max(1.0, float(np.max(np.abs(v))))
    if not np.array_equal(key[o], key_t[o_t]):
        raise ValueError("P must be the full symmetric matrix (not one triangle): its sparsity pattern "
                         "is not symmetric")
    gap = float(np.max(np.abs(v[o] - v[o_t])))
    if gap > 1e-9 * scale:
        raise ValueError(f"P must be the full symmetric matrix: max |P - P'| = {gap:.3e}")


def upper_mask(indices: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """bool ``(nnz,)``: which stored entries of a CSC pattern lie on or above the diagonal (row <= column)."""
    cols = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.asarray(indices) <= cols


def csc_parts(M: Any, int_dtype: type, upper: bool = False) -> sp.csc_matrix:
    """``M`` as a float64 ``csc_matrix`` with sorted ``int_dtype`` indices (its upper triangle if ``upper``).

    Both solvers read only the upper triangle of ``P``; OSQP's builtin algebra needs int32 indices and a
    ``csc_matrix`` (not ``csc_array``, which its wrapper would convert with a warning).
    """
    if not (sp.issparse(M) and M.format == "csc"):
        M = sp.csc_matrix(M)
    if not M.has_sorted_indices:
        M = M.sorted_indices()
    data = np.asarray(M.data, dtype=np.float64)
    indices, indptr = M.indices, M.indptr
    if upper:
        keep = upper_mask(indices, indptr)
        if not keep.all():
            cols = np.repeat(np.arange(M.shape[1]), np.diff(indptr))
            counts = np.bincount(cols[keep], minlength=M.shape[1])
            indptr = np.concatenate([[0], np.cumsum(counts)])
            indices, data = indices[keep], data[keep]
    return sp.csc_matrix((data, np.asarray(indices, dtype=int_dtype), np.asarray(indptr, dtype=int_dtype)),
                         shape=M.shape)


def check_cone_instance(inst: Any, backend: str, cones: frozenset[str]) -> None:
    """Check a :class:`ConeInstance` for a cone-form backend.

    Raises:
        ValueError: wrong container type, inconsistent shapes (``A`` is ``m x n`` with ``m`` the cone size,
            ``b`` length ``m``, ``c`` length ``n``, ``P`` ``n x n`` symmetric), non-finite data, or a cone
            kind the backend does not support.
    """
    if isinstance(inst, QPInstance):
        raise ValueError(f"backend {backend!r} takes a ConeInstance (Ax + s = b, s in K), got a QPInstance")
    if not isinstance(inst, ConeInstance):
        raise ValueError(f"backend {backend!r} takes a ConeInstance, got {type(inst).__name__}")
    kinds = set(inst.cones.kinds)
    unsupported = sorted(kinds - cones)
    if unsupported:
        raise ValueError(f"backend {backend!r} does not support the cone(s) {unsupported} of this instance "
                         f"(supported: {sorted(cones)})")
    n = int(np.shape(inst.c)[0]) if np.ndim(inst.c) == 1 else -1
    if n <= 0:
        raise ValueError(f"c must be a non-empty vector, got shape {np.shape(inst.c)}")
    m = inst.cones.size
    if m <= 0:
        raise ValueError("the cones cover no rows (m = 0); SCS needs m > 0")
    _finite(_vector(inst.b, m, f"b (m = {m} rows from the cones {inst.cones})"), "b")
    _finite(_vector(inst.c, n, "c"), "c")
    _matrix(inst.A, (m, n), "A")
    _symmetric_P(inst.P, n)
    if not np.isfinite(float(inst.offset)):
        raise ValueError(f"offset must be finite, got {inst.offset}")


def check_qp_instance(inst: Any, backend: str) -> None:
    """Check a :class:`QPInstance` (``l <= A x <= u``) for a QP backend.

    Raises:
        ValueError: wrong container type (a :class:`ConeInstance` is named with its cones), inconsistent
            shapes, NaN data, infinite ``q``/``A``/``P``, or ``l > u`` in some row.
    """
    if isinstance(inst, ConeInstance):
        raise ValueError(
            f"backend {backend!r} takes a QPInstance (l <= Ax <= u), got a ConeInstance with cones "
            f"{inst.cones.kinds}; compile the problem for the QP form (e.g. ParametricProblem(form='qp'))")
    if not isinstance(inst, QPInstance):
        raise ValueError(f"backend {backend!r} takes a QPInstance, got {type(inst).__name__}")
    n = int(np.shape(inst.q)[0]) if np.ndim(inst.q) == 1 else -1
    if n <= 0:
        raise ValueError(f"q must be a non-empty vector, got shape {np.shape(inst.q)}")
    _finite(_vector(inst.q, n, "q"), "q")
    m = int(np.shape(inst.l)[0]) if np.ndim(inst.l) == 1 else -1
    if m < 0:
        raise ValueError(f"l must be a vector, got shape {np.shape(inst.l)}")
    lo = _vector(inst.l, m, "l")
    hi = _vector(inst.u, m, "u")
    _finite(lo, "l", allow_inf=True)
    _finite(hi, "u", allow_inf=True)
    bad = lo > hi
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"l > u in row {i}: l = {lo[i]}, u = {hi[i]}")
    _matrix(inst.A, (m, n), "A")
    _symmetric_P(inst.P, n)
    if not np.isfinite(float(inst.offset)):
        raise ValueError(f"offset must be finite, got {inst.offset}")


def check_warm_start(ws: Any, n: int, m: int, fields: tuple[str, ...], backend: str) -> None:
    """Check a warm start against the problem sizes and the fields the backend uses.

    Raises:
        TypeError: ``ws`` is not a :class:`WarmStart` (or None).
        ValueError: a field of the wrong length or with non-finite entries, or a field the backend does
            not take (``s`` for OSQP).
    """
    if ws is None:
        return
    if not isinstance(ws, WarmStart):
        raise TypeError(f"warm_start must be a WarmStart or None, got {type(ws).__name__}")
    sizes = {"x": n, "y": m, "s": m}
    for name in WarmStart._fields:
        value = getattr(ws, name)
        if value is None:
            continue
        if name not in fields:
            raise ValueError(f"backend {backend!r} takes no warm-start field {name!r} (it uses {fields})")
        arr = _vector(value, sizes[name], f"warm_start.{name}")
        _finite(arr, f"warm_start.{name}")


def warm_vector(value: np.ndarray | None, length: int) -> np.ndarray:
    """A warm-start field as float64 (zeros when None)."""
    if value is None:
        return np.zeros(length)
    return np.ascontiguousarray(np.asarray(value, dtype=np.float64))


def objective_value(P: Any, c: np.ndarray, x: np.ndarray, offset: float) -> float:
    """``1/2 x'Px + c'x + offset`` for a full symmetric ``P`` (or None)."""
    val = float(np.dot(c, x)) + float(offset)
    if P is not None:
        val += 0.5 * float(x @ (P @ x))
    return val


def failed_result(n: int, m: int, with_slack: bool, status: Status, message: str) -> SolveResult:
    """A result with NaN vectors for a solve that produced nothing."""
    nan = float("nan")
    return SolveResult(
        x=np.full(n, nan), y=np.full(m, nan), s=np.full(m, nan) if with_slack else None, status=status,
        iterations=0, setup_time=nan, solve_time=nan, objective=nan, message=message)


def instance_sizes(inst: Any) -> tuple[int, int, bool]:
    """``(n, m, has_slack)`` of a ConeInstance or QPInstance."""
    if isinstance(inst, ConeInstance):
        return int(np.shape(inst.c)[0]), int(np.shape(inst.b)[0]), True
    return int(np.shape(inst.q)[0]), int(np.shape(inst.l)[0]), False


def merge_settings(defaults: Mapping[str, Any], settings: Mapping[str, Any] | None,
                   reserved: tuple[str, ...], backend: str) -> dict[str, Any]:
    """A new dict: ``defaults`` updated with ``settings`` (never mutated); reserved keys are refused."""
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping or None, got {type(settings).__name__}")
    out = dict(defaults)
    for key, value in (settings or {}).items():
        if key in reserved:
            raise ValueError(f"setting {key!r} is managed by amortcvx for backend {backend!r}; "
                             "pass warm starts / exact_iterations instead")
        out[key] = value
    return out
