"""End-to-end wall time per instance: parameter values to answers at the tolerance, cold against learned."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from amortcvx.backends.persistent import thread_parts
from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver
from amortcvx.evaluation.baselines import PersistentColdLoop
from amortcvx.evaluation.reports import format_rows


def params_rows(params: Mapping[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a parameter batch, as writable copies (dataset arrays are read-only; torch warns on those)."""
    return {k: np.array(v[rows]) for k, v in params.items()}


class TimingResult(NamedTuple):
    """End-to-end time per instance of one strategy at one batch size (wall clock, timed-mode C solves).

    Attributes:
        strategy: ``"cold"`` or a learned strategy's name.
        batch_size: instances per call.
        instances: instances timed in all.
        total_ms: wall milliseconds per instance: canonicalization + prediction + refinement + C solves.
        predict_ms: of which prediction + refinement + conversion (0 for cold).
        solve_ms: of which the C solves (``solve_batch``, timed mode).
        speedup: cold ``total_ms`` / this ``total_ms``.
        threads: threads of the C solves (the hand-written loop: 1; the package: the parts its
            :class:`~amortcvx.backends.persistent.ThreadedSolver` cuts a batch of this size into).
    """

    strategy: str
    batch_size: int
    instances: int
    total_ms: float
    predict_ms: float
    solve_ms: float
    speedup: float
    threads: int


def _time_cold(loop: PersistentColdLoop, params) -> tuple[float, float]:
    t0 = time.perf_counter()
    loop.solve(params)
    total = time.perf_counter() - t0
    return total, total


def _time_learned(solver: AmortizedSolver, params) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    out = solver.solve(params, exact_iterations=False)
    total = time.perf_counter() - t0
    return total, out.predict_seconds, out.solve_seconds


def measure_end_to_end(pp: ParametricProblem, params: Mapping[str, np.ndarray], solvers: Mapping[str, AmortizedSolver],
                       backend: str, *, settings: Mapping[str, Any], batch_size: int,
                       instances: int) -> list[TimingResult]:
    """Wall time per instance of cold starts and of each learned solver, in calls of ``batch_size`` instances.

    Each call starts from parameter values and ends with answers at the tolerance (timed mode,
    ``exact_iterations=False``): cold = canonicalize + the hand-written persistent loop on the solver's own API
    (:class:`~amortcvx.evaluation.baselines.PersistentColdLoop`, the best a user has without amortcvx);
    learned = ``AmortizedSolver.solve`` (parameter vector, canonicalization, prediction, ``k`` torch steps,
    safeguard, certificate, C solves on the persistent solver objects, on the solver's ``threads``, cold retry of
    failures).
    The first ``instances`` rows of ``params`` are used, in ``instances // batch_size`` calls; one untimed
    warm-up call of each path comes first (imports, worker pool start, first-touch allocations), and within
    each call index the paths run back to back so that machine load affects them alike.

    Returns:
        One :class:`TimingResult` for ``"cold"`` and one per entry of ``solvers``.
    """
    total_rows = next(iter(params.values())).shape[0]
    calls = max(1, min(instances, total_rows) // batch_size)
    if batch_size > total_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the {total_rows} instances available")
    first = params_rows(params, slice(0, batch_size))
    loop = PersistentColdLoop(pp, backend, settings)
    _time_cold(loop, first)  # warm-up (and the loop's one setup)
    for solver in solvers.values():
        _time_learned(solver, first)
    sums = {name: np.zeros(3) for name in ["cold", *solvers]}
    for c in range(calls):
        chunk = params_rows(params, slice(c * batch_size, (c + 1) * batch_size))
        total, solve = _time_cold(loop, chunk)
        sums["cold"] += (total, 0.0, solve)
        for name, solver in solvers.items():
            sums[name] += _time_learned(solver, chunk)
    count = calls * batch_size
    cold_ms = sums["cold"][0] / count * 1e3
    out = []
    for name, (total, predict, solve) in sums.items():
        ms = total / count * 1e3
        threads = 1 if name == "cold" else thread_parts(batch_size, solvers[name].threads)
        out.append(TimingResult(strategy=name, batch_size=batch_size, instances=count, total_ms=ms,
                                predict_ms=predict / count * 1e3, solve_ms=solve / count * 1e3,
                                speedup=cold_ms / ms if ms > 0 else float("nan"), threads=threads))
    return out


def format_timings(timings: tuple[TimingResult, ...] | list[TimingResult], title: str | None = None) -> str:
    """Aligned text table of :class:`TimingResult` rows."""
    header = ("strategy", "batch", "instances", "threads", "total ms/inst", "predict ms", "C solve ms",
              "speedup vs cold")
    rows = [(t.strategy, str(t.batch_size), str(t.instances), str(t.threads), f"{t.total_ms:.3f}",
             f"{t.predict_ms:.3f}", f"{t.solve_ms:.3f}", f"{t.speedup:.2f}x") for t in timings]
    return format_rows(header, rows, title=title)


def write_timings_csv(timings, path: str | os.PathLike) -> Path:
    """Write the timings, one row each, to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TimingResult._fields)
        for t in timings:
            writer.writerow(list(t))
    return path


def read_timings_csv(path: str | os.PathLike) -> list[TimingResult]:
    """The timings written by :func:`write_timings_csv` (an empty list when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    types = {"strategy": str, "batch_size": int, "instances": int, "threads": int}
    renamed = {"workers": "threads"}  # files written before the C solves ran on threads
    with open(path, newline="") as fh:
        return [TimingResult(**{renamed.get(k, k): types.get(renamed.get(k, k), float)(v) for k, v in row.items()})
                for row in csv.DictReader(fh)]
