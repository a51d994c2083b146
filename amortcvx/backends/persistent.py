"""Persistent C solver objects: one per problem and settings, solving a stream of instances by updates.

A fresh solver object per instance pays, every time, for Python-side validation and conversion, the solver's
setup and its factorization; on small problems that is most of the cost of a solve (portfolio small with
SCS: 0.45 ms per instance through fresh objects against 0.05 ms through one object updated per instance).
:class:`PersistentSolver` validates and converts the constant data once (from a *reference* instance), then
hands each instance's vectors (SCS ``b``, ``c``; OSQP ``q``, ``l``, ``u``; and the values of ``A``/``P`` where
parameters enter them) to one solver object.

A result must not depend on which instances the object solved before. Each backend's
:class:`~amortcvx.backends.scs.Session` / :class:`~amortcvx.backends.osqp.Session` documents how it gets
there: OSQP resets its adapted ``rho`` after a solve that changed it and starts every solve from the given
point (zeros for cold); SCS, whose Python API cannot reset its adaptive scale or Anderson memory, rebuilds the
object whenever a solve may have left such state (where a setup is costly, the next object is built ahead on
a background thread). Results then depend on the instance and on the reference instance only (the solvers
scale the data once at setup): fix the reference (for example the mean parameter of a training set) and a
batch gives the same answers in any order.

:class:`ThreadedSolver` keeps one such object per thread and cuts a batch into contiguous parts solved
concurrently (SCS and OSQP release the GIL while they iterate): the same answers, in about ``1 / threads`` of
the time on large enough batches.

Fresh-object solves (:func:`amortcvx.backends.solve_batch`) stay the tool for exact iteration counts; the
counts here are those the solver reports (SCS: executed iterations ``info['iter'] + 1``, a multiple of its check
interval 25 plus one; OSQP: a multiple of ``check_termination``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import numpy as np

from amortcvx.backends import scs
from amortcvx.backends.base import SolveResult, Status
from amortcvx.backends.batched import host, objectives
from amortcvx.backends.race import Race
from amortcvx.backends.registry import get_backend
from amortcvx.backends.scs import STATELESS_SETTINGS
from amortcvx.canon.data import ConeData, ConeInstance, QPData, QPInstance


class PersistentSolver:
    """One solver object of ``backend`` for instances that share the structure of ``reference``.

    Args:
        backend: ``"scs"`` or ``"osqp"``.
        reference: an instance of the problem (validated here, once); its matrices are used for every
            instance whose batch shares them, and the solver's scaling is computed on it.
        settings: solver settings (merged with the backend's defaults; invalid ones raise here).

    Attributes:
        builds: solver setups so far (1 after construction; see the backend's reset protocol).
    """

    def __init__(self, backend: str, reference: ConeInstance | QPInstance, settings: Mapping[str, Any] | None = None):
        info = get_backend(backend)
        info.validate(reference, None)
        self.backend = backend
        self._info = info
        self._session = info.session(reference, settings)
        self.settings = dict(self._session.opts)
        self.n, self.m = self._session.n, self._session.m
        self._data_type = ConeData if info.form == "cone" else QPData
        self._vectors = ("b", "c") if info.form == "cone" else ("q",)  # the vectors the solvers do not check

    @property
    def builds(self) -> int:
        return int(self._session.builds)

    def solve(self, data: ConeData | QPData, warm_starts: Mapping[str, np.ndarray] | None = None,
              warm_mask: np.ndarray | None = None, *, check_termination: int | None = None,
              checked: bool = False) -> list[SolveResult]:
        """Solve every instance of a batch, in order, on this object.

        Args:
            data: the batch in the backend's form (any dtype/device; converted to float64 on the host once).
            warm_starts: batched warm-start arrays by field (SCS ``x``, ``y``, ``s``; OSQP ``x``, ``y``), each
                ``(B, .)``; None for cold starts.
            warm_mask: bool ``(B,)``: which instances use ``warm_starts`` (the others start cold).
            check_termination: OSQP only: the termination-check interval of these solves (default: the
                object's setting, OSQP's 25 unless given).
            checked: the batch is known to pass :meth:`check` (the form and size of this object, finite
                vectors): data that :meth:`ParametricProblem.canonicalize_vector` made for this object's problem
                (it refuses non-finite data), or a batch checked once before it was cut into parts. The checks
                are skipped (at batch 1 on portfolio small they are 5% of the package's whole call).

        Returns:
            One :class:`SolveResult` per instance; ``objective`` is CVXPY's minimization value
            ``1/2 x'Px + c'x + offset``. Failures are reported by status.

        Raises:
            ValueError: a batch of another size, or with non-finite vectors (naming the instance).
        """
        if not checked:
            self._check_form(data)
        batch = self._session.prepare(data)
        if not checked:
            self._check_finite(batch)
        size = data.batch_size
        warm, mask = None, None
        if warm_starts is not None:
            warm = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in warm_starts.items()
                    if k in self._info.warm_start_fields}
            mask = np.ones(size, dtype=bool) if warm_mask is None else np.asarray(warm_mask, dtype=bool)
        out = []
        for i in range(size):
            start = None if warm is None or not mask[i] else {k: v[i] for k, v in warm.items()}
            out.append(self._session.solve_one(batch, i, start, check_termination))
        return out

    def check(self, data: ConeData | QPData) -> None:
        """Raise ValueError for a batch this object cannot solve: another form or size, or non-finite vectors
        (naming the instance; the solvers do not check these)."""
        self._check_form(data)
        self._check_finite({name: host(getattr(data, name)) for name in self._vectors})

    def _check_form(self, data: ConeData | QPData) -> None:
        if not isinstance(data, self._data_type):
            raise ValueError(f"backend {self.backend!r} takes {self._data_type.__name__}, got {type(data).__name__}")
        if (data.n, data.m) != (self.n, self.m):
            raise ValueError(f"the batch has (n, m) = {(data.n, data.m)}; this solver was set up for "
                             f"{(self.n, self.m)}")

    def _check_finite(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The vectors the solvers do not check, as host arrays (a prepared batch, :meth:`check`)."""
        for name in self._vectors:
            values = arrays[name]
            # one sum of the whole batch (NaN or inf wherever an entry is); the entries only where it is not finite
            if not math.isfinite(values.sum()) and not np.isfinite(values).all():
                first = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
                raise ValueError(f"instance {first}: {name} has non-finite entries")


STOP_MIN_BATCH = 8
"""The smallest batch :class:`StopPointSolver` runs to its stop point. Measured per instance (SCS, eps 1e-4,
calibrated stop points, the package's cold path, load ~1 from another job): at batch 256 the stop point took
0.87x of the stateless object's time on mpc small, 0.84x on mpc large, 0.89x on kalman large; at batch 1,
1.63x on mpc small and 1.25x on kalman large (the certificate's numpy calls cost more than the iterations
saved); break-even near 3 to 6 instances."""


class StopPointSolver:
    """SCS with a stop point (:func:`~amortcvx.backends.scs.stop_point`): :class:`PersistentSolver`'s interface,
    two stateless objects.

    SCS tests termination only at iterations 0, 25, 50, ... (compiled in), so a solve whose test holds after 14
    iterations runs 26. Here each instance first runs at most ``stop`` iterations on one object (its
    ``max_iters``); the iterate it returns is checked by :func:`~amortcvx.backends.scs.certify`, SCS's own test
    in float64, and answered where it passes (status ``optimal``, message ``"certified at the stop point"``); the
    rest continue on the second object, with the full settings, warm-started from that iterate, to SCS's own
    test. Every answer meets the tolerance by SCS's test; the iterations, setup and solve times of both runs add
    up. Batches of fewer than ``min_batch`` instances go to the second object directly: the certificate's fixed
    cost per call (about 0.2 ms of numpy on mpc small, against 0.3 ms for its whole SCS solve) exceeds what a
    few instances save.

    Args:
        reference: as for :class:`PersistentSolver`.
        settings: the settings of both objects (the short one's ``max_iters`` is ``stop``); they must be stateless
            (:data:`~amortcvx.backends.scs.STATELESS_SETTINGS`), so that nothing leaks between instances.
        stop: the short run's ``max_iters`` (positive).
        min_batch: the smallest batch that takes the stop point (:data:`STOP_MIN_BATCH`).
    """

    def __init__(self, reference: ConeInstance, settings: Mapping[str, Any], stop: int,
                 min_batch: int | None = None):
        if not (isinstance(stop, (int, np.integer)) and stop >= 1):
            raise ValueError(f"stop must be a positive int (SCS iterations); got {stop!r}")
        bad = {k: v for k, v in STATELESS_SETTINGS.items() if settings.get(k) != v}
        if bad:
            raise ValueError(f"a stop point needs stateless SCS settings {dict(STATELESS_SETTINGS)}; got "
                             f"{ {k: settings.get(k) for k in bad} }")
        self._full = PersistentSolver("scs", reference, settings)
        self._short = PersistentSolver("scs", reference, {**settings, "max_iters": int(stop)})
        self.stop = int(stop)
        self.min_batch = STOP_MIN_BATCH if min_batch is None else int(min_batch)
        self.backend, self.settings, self.n, self.m = "scs", self._full.settings, self._full.n, self._full.m
        self._eps = (float(self.settings["eps_abs"]), float(self.settings["eps_rel"]))

    @property
    def builds(self) -> int:
        return self._full.builds + self._short.builds

    def check(self, data: ConeData) -> None:
        """:meth:`PersistentSolver.check`."""
        self._full.check(data)

    def solve(self, data: ConeData, warm_starts: Mapping[str, np.ndarray] | None = None,
              warm_mask: np.ndarray | None = None, *, check_termination: int | None = None,
              checked: bool = False) -> list[SolveResult]:
        """:meth:`PersistentSolver.solve` (``check_termination`` is OSQP's: ignored)."""
        if data.batch_size < self.min_batch:
            return self._full.solve(data, warm_starts, warm_mask, checked=checked)
        first = self._short.solve(data, warm_starts, warm_mask, checked=checked)
        point = {k: np.stack([getattr(r, k) for r in first]) for k in ("x", "y", "s")}
        passed = scs.certify(data, **point, eps_abs=self._eps[0], eps_rel=self._eps[1])
        value = objectives(data, point["x"])  # SCS reports no objective for a run that hit max_iters
        out = [r._replace(status=Status.OPTIMAL, message="certified at the stop point", objective=float(f))
               if ok else r for r, ok, f in zip(first, passed, value)]
        rest = np.flatnonzero(~passed)
        if rest.size:
            usable = np.isfinite(point["x"][rest]).all(axis=1)  # a failed short run continues from the cold start
            more = self._full.solve(data.take(rest), {k: v[rest] for k, v in point.items()}, usable, checked=True)
            for i, r in zip(rest, more):
                short = first[i]
                out[i] = r._replace(iterations=short.iterations + r.iterations,
                                    setup_time=short.setup_time + r.setup_time,
                                    solve_time=short.solve_time + r.solve_time)
        return out


THREAD_PROBE = 16
""":class:`ThreadedSolver` races one object against the parts on threads per batch size (by powers of two): each is
timed (its best time per instance over at least two calls; a call that set up new objects is not timed), then the
faster is used, and the other again after ``THREAD_PROBE`` calls, or after more where it was much slower
(:class:`~amortcvx.backends.race.Race`, :data:`~amortcvx.backends.race.PROBE_SHARE`: probes add about 2% of the
time at most; the recorded times are each way's best over calls that set nothing up, so a ratio is not
overstated). Measured on 2 cores (package path, calibrated objects, batch 256): the parts took 0.5-0.7x of one
object's time on most small families, but 1.27x on portfolio small with OSQP (solves of about 15 us, where the
Python around each solve holds the GIL) and 1.0x on robust_ls small with SCS."""
RACE_CALLS = 5
"""Calls of one batch size after which :class:`ThreadedSolver`'s race has timed both ways (the parts' first call,
which sets their objects up, is not timed; then two calls each): what a measurement of its settled pace runs
first (``AmortizedSolver.choose_c_modes``, ``benchmarks/bench_endtoend.py``)."""
THREAD_MIN_PART = 8
"""The fewest instances :class:`ThreadedSolver` gives one thread (smaller batches run on one object: a hand-off
to a thread costs tens of microseconds, a whole small solve about as much). Parts this large also keep
:class:`StopPointSolver`'s choice (:data:`STOP_MIN_BATCH`) the one the whole batch would get."""


def thread_parts(size: int, threads: int) -> int:
    """The parts :class:`ThreadedSolver` cuts a batch of ``size`` instances into with ``threads`` threads (1: not
    cut)."""
    return max(1, min(threads, size // THREAD_MIN_PART))


MAX_DEFAULT_THREADS = 8
"""The most threads :func:`default_threads` gives: each thread's object holds its own copy of the solver's
factorization, which on large problems is tens of megabytes."""


def default_threads() -> int:
    """The cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count()``), at most
    :data:`MAX_DEFAULT_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


def resolve_threads(threads: int | None) -> int:
    """A ``threads`` option: :func:`default_threads` for None, else a positive int (ValueError otherwise)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be None or a positive int; got {threads!r}")
    return int(threads)


_THREADS: tuple[int, int, ThreadPoolExecutor] | None = None


def _thread_pool(size: int) -> ThreadPoolExecutor:
    """The process's pool of at least ``size`` threads for :class:`ThreadedSolver` (a new one after a fork or when
    more threads are asked for)."""
    global _THREADS
    if _THREADS is None or _THREADS[0] != os.getpid() or _THREADS[1] < size:
        _THREADS = (os.getpid(), size, ThreadPoolExecutor(max_workers=size, thread_name_prefix="amortcvx-solve"))
    return _THREADS[2]


class ThreadedSolver:
    """Copies of one solver object on ``threads`` threads, with :class:`PersistentSolver`'s interface.

    A batch of at least ``2 x`` :data:`THREAD_MIN_PART` instances is cut into up to ``threads`` contiguous parts,
    each solved on its own object, concurrently: SCS and OSQP release the GIL while they iterate, so the parts run
    on separate cores (measured on 2 cores, stateless objects, eps 1e-4: kalman large SCS batch 64 0.51x of one
    object's time, mpc large OSQP 0.55x, mpc small SCS and OSQP batch 256 0.52x and 0.54x; docs/backends.md).
    Where the solves are so short that the Python around them dominates, the parts gain nothing or lose, so
    whether to cut is raced per batch size against one object (:data:`THREAD_PROBE`).
    The objects are alike (made by ``make``, on the same reference instance and settings) and each answers an
    instance independently of what it solved before (the objects' reset protocols), so the answers are those of
    one object, whatever the split.

    Args:
        make: builds one solver object (:class:`PersistentSolver` or :class:`StopPointSolver`); called once here
            and again, up to ``threads`` times in all, the first time a batch is cut into that many parts.
        threads: the most parts (and threads) per batch (a positive int; None: :func:`default_threads`).
    """

    def __init__(self, make: Callable[[], PersistentSolver | StopPointSolver], threads: int | None):
        self._make, self.threads = make, resolve_threads(threads)
        self._objects = [make()]
        self._races: dict[int, Race] = {}
        self._first: dict[tuple[int, str], float] = {}  # a way's first timing, until its second
        first = self._objects[0]
        self.backend, self.settings, self.n, self.m = first.backend, first.settings, first.n, first.m

    @property
    def builds(self) -> int:
        return sum(o.builds for o in self._objects)

    def check(self, data: ConeData | QPData) -> None:
        """:meth:`PersistentSolver.check`."""
        self._objects[0].check(data)

    def solve(self, data: ConeData | QPData, warm_starts: Mapping[str, np.ndarray] | None = None,
              warm_mask: np.ndarray | None = None, *, check_termination: int | None = None,
              checked: bool = False) -> list[SolveResult]:
        """:meth:`PersistentSolver.solve`, the parts of the batch on their own threads (errors name the instance
        in the whole batch)."""
        size = data.batch_size
        parts = thread_parts(size, self.threads)
        if parts == 1:
            return self._objects[0].solve(data, warm_starts, warm_mask, check_termination=check_termination,
                                          checked=checked)
        race = self._races.setdefault(size.bit_length(), Race(("parts", "one"), THREAD_PROBE))
        choice = race.pick()
        fresh = choice == "parts" and len(self._objects) < parts
        while choice == "parts" and len(self._objects) < parts:
            self._objects.append(self._make())
        start = time.perf_counter()
        if choice == "one":
            out = self._objects[0].solve(data, warm_starts, warm_mask, check_termination=check_termination,
                                         checked=checked)
        else:
            out = self._solve_parts(data, warm_starts, warm_mask, check_termination, parts, checked)
        if not fresh:  # a new object's first solve (first touches, lazy set-up in the solver) is not its pace
            # the best time seen, and none before two: which way is faster depends on the problem and the machine,
            # little on the call, and single calls are noisy
            seconds = (time.perf_counter() - start) / size
            key = (size.bit_length(), choice)
            if choice in race.seconds or key in self._first:
                race.record(choice, min(seconds, self._first.pop(key, math.inf), race.seconds.get(choice, math.inf)))
            else:
                self._first[key] = seconds
        return out

    def _solve_parts(self, data: ConeData | QPData, warm_starts: Mapping[str, np.ndarray] | None,
                     warm_mask: np.ndarray | None, check_termination: int | None, parts: int,
                     checked: bool) -> list[SolveResult]:
        size = data.batch_size
        if not checked:  # once for the whole batch (errors name the instance in it), not per part
            self.check(data)
        bounds = np.linspace(0, size, parts + 1).round().astype(int)

        def part(j: int) -> list[SolveResult]:
            idx = np.arange(bounds[j], bounds[j + 1])
            warm = None if warm_starts is None else {k: np.asarray(v)[idx] for k, v in warm_starts.items()}
            mask = None if warm_mask is None else np.asarray(warm_mask)[idx]
            return self._objects[j].solve(data.take(idx), warm, mask, check_termination=check_termination,
                                          checked=True)

        futures = [_thread_pool(self.threads - 1).submit(part, j) for j in range(1, parts)]
        try:
            out = part(0)  # the first part on this thread
        finally:
            wait(futures)  # no object is left solving when this returns or raises
        for fut in futures:
            out += fut.result()
        return out


SCALE_STEP = 10 ** 0.5
"""The ratio between neighbouring values tried by :func:`stateless_scale` and :func:`stateless_rho` (half a
decade)."""
SCALE_RANGE = (1e-6, 1e6)
"""The values :func:`stateless_scale` and :func:`stateless_rho` stay within (SCS's own bounds on its adaptive
scale; OSQP's on its rho)."""


WALK_SECONDS = 10.0
"""About how long :func:`stateless_scale` and :func:`stateless_rho` may take: where the first try's solves take
longer than this over the tries still allowed, the walk keeps fewer instances (at least :data:`WALK_INSTANCES`)."""
WALK_INSTANCES = 8
"""The fewest instances a walk keeps when it shortens itself (:data:`WALK_SECONDS`)."""


class Walk(NamedTuple):
    """What :func:`stateless_scale` and :func:`stateless_rho` found.

    Attributes:
        value: the setting's value of fewest mean iterations.
        tried: every value tried and its mean iterations (a solve that did not end optimal counted at the try's
            iteration cap).
        counts: the iterations of each instance the means are over at ``value`` (the first of ``data``, in order),
            where every one of those solves ended optimal under the try's cap, so that they are what an uncapped
            object with the same settings counts; None otherwise.
    """

    value: float
    tried: dict[float, float]
    counts: tuple[int, ...] | None


def _fewest_iterations(backend: str, reference, data, settings: Mapping[str, Any] | None, key: str,
                       start: float | None, default: float, instances: int, max_tries: int,
                       limit_key: str) -> Walk:
    """The value of setting ``key`` of a stateless ``backend`` object (``settings`` with the backend's
    ``stateless_settings``) with the fewest mean iterations on the first ``instances`` of ``data``, by a walk on a
    half-decade grid from ``start`` (None: the settings' value, else ``default``).

    The walk moves by :data:`SCALE_STEP` toward the side that lowers the mean iteration count (a solve that does
    not end optimal counts as the try's iteration cap) while it strictly lowers it, within :data:`SCALE_RANGE` and
    ``max_tries`` tries; up first, down only where the first step up does not help; then it tries the geometric
    midpoints between the best value and its tried neighbours (two more tries at most), which halves the grid
    where the walk stopped between two half-decade points (MPC large, OSQP rho from 0.43: 0.43 -> 1.36 on the
    grid, 40 mean iterations, then 0.76: 31). Tries after the first cap their iterations at ``3 x`` the best
    try's largest count (plus 25), so a bad value costs little (``limit_key``: the backend's iteration limit
    setting). Where the first try took more than :data:`WALK_SECONDS` over the tries left, every mean (the first
    try's included) is over fewer of the instances (lasso large with OSQP, 64 instances: 20 s before)."""
    base = {**dict(settings or {}), **get_backend(backend).stateless_settings}
    start = float(base.get(key, default) if start is None else start)
    if not start > 0:
        raise ValueError(f"the starting {key} must be positive; got {start!r}")
    sub = data if data.batch_size <= instances else data.take(np.arange(instances))
    limit = int(base.get(limit_key, get_backend(backend).default_settings[limit_key]))
    counts: dict[float, list[int]] = {}
    optimal: dict[float, bool] = {}  # whether every solve of the try ended optimal under its cap
    tried: dict[float, float] = {}
    cap = limit

    def cap_after(best_counts: list[int]) -> int:  # the iteration cap of the tries after the best one so far
        return 3 * max(best_counts) + 25

    def cost(candidate: float) -> float:
        nonlocal cap
        if candidate not in tried:
            iters = min(limit, cap)
            out = PersistentSolver(backend, reference, {**base, key: candidate, limit_key: iters}).solve(sub)
            counts[candidate] = [r.iterations if r.status == Status.OPTIMAL else iters for r in out]
            optimal[candidate] = all(r.status == Status.OPTIMAL for r in out)
            tried[candidate] = float(np.mean(counts[candidate]))
            if tried[candidate] <= min(tried.values()):
                cap = cap_after(counts[candidate])
        return tried[candidate]

    value = float(start)
    t0 = time.perf_counter()
    best = cost(value)
    per_instance = (time.perf_counter() - t0) / sub.batch_size
    keep = max(WALK_INSTANCES, int(WALK_SECONDS / max(per_instance * (max_tries + 1), 1e-12)))
    if keep < sub.batch_size:  # slow solves: the rest of the walk, and the first try's mean, on fewer instances
        sub = sub.take(np.arange(keep))
        counts[value] = counts[value][:keep]
        best = tried[value] = float(np.mean(counts[value]))
        cap = cap_after(counts[value])
    for factor in (SCALE_STEP, 1 / SCALE_STEP):
        moved = False
        while len(tried) < max_tries:
            nxt = min(SCALE_RANGE[1], max(SCALE_RANGE[0], value * factor))
            if nxt == value or cost(nxt) >= best:
                break
            value, best, moved = nxt, tried[nxt], True
        if moved:
            break
    for side in (max, min):  # then the geometric midpoints toward the tried neighbours: a quarter-decade grid
        near = [t for t in tried if (t < value if side is max else t > value)]
        if near:
            mid = math.sqrt(value * side(near))
            if mid not in tried and cost(mid) < best:
                value, best = mid, tried[mid]
    return Walk(value, tried, tuple(counts[value]) if optimal[value] else None)


def stateless_scale(reference: ConeInstance, data: ConeData, settings: Mapping[str, Any] | None = None, *,
                    start: float | None = None, instances: int = 64, max_tries: int = 9) -> Walk:
    """The fixed SCS ``scale`` of a stateless object (no adaptive scale, no Anderson memory) that needs the fewest
    iterations on ``data`` (:func:`_fewest_iterations`, from ``start``: the settings' ``scale``, else SCS's
    default 0.1).

    A stateless object (:data:`~amortcvx.backends.scs.STATELESS_SETTINGS`) keeps its scale for every solve, so it
    should start at a good one; SCS's adaptive scale rarely moves within a solve at moderate tolerances, so the
    scale it ends at is no guide (measured gains in docs/backends.md: kalman small 107 -> 26 mean iterations).

    Returns the :class:`Walk` (``value``: the scale).
    """
    return _fewest_iterations("scs", reference, data, settings, "scale", start, 0.1, instances, max_tries,
                              "max_iters")


def stateless_rho(reference: QPInstance, data: QPData, settings: Mapping[str, Any] | None = None, *,
                  start: float | None = None, instances: int = 64, max_tries: int = 9) -> Walk:
    """The fixed OSQP ``rho`` of a stateless object (no rho adaptation) that needs the fewest iterations on ``data``
    (:func:`_fewest_iterations`, from ``start``: for example the rho OSQP's own adaptation points to, else the
    settings' ``rho``, else OSQP's default 0.1). The walk's solves count exactly (``check_termination=1``): the
    check interval of later solves is chosen from such counts (:func:`~amortcvx.backends.osqp.check_interval`).

    The rho OSQP's adaptation estimates at the end of a solve is a noisy guide: on MPC large two validation samples
    of the same distribution gave geometric medians of 0.08 and 0.43, with 183 and 40 mean exact iterations at that
    fixed rho (64 instances, eps 1e-4), where 0.8 needs 31 on both; OSQP's solves there end before its first
    adaptation (at 50 iterations), so the starting rho decides.

    Returns the :class:`Walk` (``value``: the rho; its ``counts`` are exact counts).
    """
    exact = {**dict(settings or {}), "check_termination": 1}
    return _fewest_iterations("osqp", reference, data, exact, "rho", start, 0.1, instances, max_tries, "max_iter")


__all__ = ["RACE_CALLS", "PersistentSolver", "StopPointSolver", "ThreadedSolver", "Walk", "default_threads",
           "resolve_threads", "stateless_rho", "stateless_scale", "thread_parts"]
