"""Side-by-side warm-start strategies on the real C solvers, with exact iteration counts.

:func:`compare` solves the same instances once per strategy (a list of warm starts, None = cold) with fresh
solver objects (:func:`amortcvx.backends.solve_batch` builds a new solver per solve, so no adapted scale / rho
or previous iterate is shared) and exact iteration counts, and summarizes, per strategy ``s`` over the ``N``
instances with iteration counts ``k_s,i``:

    median_s = median_i k_s,i,   p90_s = 90th percentile (linear interpolation),   mean_s = mean_i k_s,i,
    ratio_s  = median_s / median_baseline   (baseline: the cold start by default),
    non_optimal_s = #{i : status_s,i != optimal},
    objective_gap_s = max_i |f_s,i - f_baseline,i| / max(1, |f_baseline,i|)   (over instances optimal in both).

A warm start changes how fast a solver converges, never to what: every solve must end ``optimal`` at the
requested tolerance; those that do not are counted (``non_optimal``), not hidden.

Solve times come from a second, timed pass (``exact_iterations=False``: exact counting changes the per-iteration
cost) when ``timing=True``; they are the solver's own setup and solve times, without Python overhead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from amortcvx.backends import SolveResult, Status, WarmStart, solve_batch
from amortcvx.canon.data import ConeInstance, QPInstance


class StrategyResult(NamedTuple):
    """Per-instance outcome of one strategy.

    Attributes:
        name: the strategy's name.
        iterations: exact iteration counts (N,) int64.
        status: status strings (N,) (values of :class:`~amortcvx.backends.Status`).
        objective: objective values (N,) (NaN without a solution).
        setup_time: solver-reported setup seconds (N,): from the timed pass, NaN when ``timing=False``.
        solve_time: solver-reported solve seconds (N,): from the timed pass, NaN when ``timing=False``.
        warm: bool (N,), True where a warm start was given (False: cold start).
    """

    name: str
    iterations: np.ndarray
    status: np.ndarray
    objective: np.ndarray
    setup_time: np.ndarray
    solve_time: np.ndarray
    warm: np.ndarray

    @property
    def optimal(self) -> np.ndarray:
        """bool (N,): the solve ended ``optimal`` (met the tolerance)."""
        return self.status == Status.OPTIMAL.value


class Summary(NamedTuple):
    """Summary statistics of one strategy (see the module docstring for the definitions).

    Attributes:
        name: the strategy's name.
        count: number of instances.
        median, p90, mean: of the exact iteration counts.
        ratio: ``median / median of the baseline`` (NaN without a baseline).
        non_optimal: instances whose status is not ``optimal``.
        warm: instances that received a warm start (the others started cold).
        median_time_ms: median of setup + solve time in milliseconds (timed pass; NaN without one).
        objective_gap: largest relative objective difference to the baseline (NaN without a baseline).
    """

    name: str
    count: int
    median: float
    p90: float
    mean: float
    ratio: float
    non_optimal: int
    warm: int
    median_time_ms: float
    objective_gap: float


def summarize(result: StrategyResult, baseline: StrategyResult | None = None) -> Summary:
    """The :class:`Summary` of ``result``, with ratios and objective gaps relative to ``baseline``."""
    it = np.asarray(result.iterations, dtype=np.float64)
    if it.size == 0:
        raise ValueError(f"strategy {result.name!r} has no instances")
    median = float(np.median(it))
    ratio = gap = float("nan")
    if baseline is not None:
        if baseline.iterations.shape != result.iterations.shape:
            raise ValueError(f"strategy {result.name!r} has {it.size} instances but the baseline "
                             f"{baseline.name!r} has {baseline.iterations.size}")
        base_median = float(np.median(baseline.iterations))
        ratio = median / base_median if base_median > 0 else float("nan")
        both = result.optimal & baseline.optimal
        if both.any():
            fb = baseline.objective[both]
            gap = float(np.max(np.abs(result.objective[both] - fb) / np.maximum(1.0, np.abs(fb))))
    total = result.setup_time + result.solve_time
    time_ms = float(np.median(total)) * 1e3 if np.isfinite(total).any() else float("nan")
    return Summary(name=result.name, count=int(it.size), median=median, p90=float(np.percentile(it, 90)),
                   mean=float(it.mean()), ratio=ratio, non_optimal=int((~result.optimal).sum()),
                   warm=int(result.warm.sum()), median_time_ms=time_ms, objective_gap=gap)


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`.

    Attributes:
        backend: the C backend used.
        settings: the solver settings given (on top of the backend's defaults).
        strategies: name -> :class:`StrategyResult`, in the order given.
        baseline: name of the strategy ratios refer to, or None.
        timed: whether solve times come from a timed pass.
    """

    backend: str
    settings: Mapping[str, Any]
    strategies: Mapping[str, StrategyResult]
    baseline: str | None = None
    timed: bool = False

    @property
    def names(self) -> list[str]:
        return list(self.strategies)

    @property
    def summaries(self) -> list[Summary]:
        """One :class:`Summary` per strategy, in order."""
        base = self.strategies.get(self.baseline) if self.baseline is not None else None
        return [summarize(r, base) for r in self.strategies.values()]

    def summary(self, name: str) -> Summary:
        """The :class:`Summary` of strategy ``name``."""
        if name not in self.strategies:
            raise KeyError(f"no strategy {name!r}; have {self.names}")
        base = self.strategies.get(self.baseline) if self.baseline is not None else None
        return summarize(self.strategies[name], base)

    @property
    def non_optimal(self) -> dict[str, int]:
        """Strategy name -> number of solves that did not end ``optimal``."""
        return {name: int((~r.optimal).sum()) for name, r in self.strategies.items()}


def _arrays(name: str, results: Sequence[SolveResult], warm: Sequence[WarmStart | None],
            timed: Sequence[SolveResult] | None) -> StrategyResult:
    num = len(results)
    nan = np.full(num, np.nan)
    return StrategyResult(
        name=name,
        iterations=np.array([r.iterations for r in results], dtype=np.int64),
        status=np.array([str(r.status) for r in results], dtype=str).reshape(num),
        objective=np.array([r.objective for r in results], dtype=np.float64).reshape(num),
        setup_time=nan.copy() if timed is None else np.array([r.setup_time for r in timed], dtype=np.float64),
        solve_time=nan.copy() if timed is None else np.array([r.solve_time for r in timed], dtype=np.float64),
        warm=np.array([w is not None for w in warm], dtype=bool).reshape(num))


def compare(instances: Sequence[ConeInstance | QPInstance], backend: str,
            strategies: Mapping[str, Sequence[WarmStart | None]], *, settings: Mapping[str, Any] | None = None,
            workers: int | None = None, baseline: str | None = "cold", timing: bool = True,
            progress: bool = False) -> Comparison:
    """Solve ``instances`` once per strategy on the C backend and count iterations exactly.

    Args:
        instances: canonical instances (``ConeInstance`` for SCS, ``QPInstance`` for OSQP).
        backend: ``"scs"`` or ``"osqp"``.
        strategies: name -> one warm start (or None = cold) per instance, e.g.
            ``{"cold": [None] * N, "nearest neighbour": nn_starts, "learned": learned_starts}``.
        settings: C solver settings for every solve (e.g. ``{"eps_abs": 1e-4, "eps_rel": 1e-4}``); copied.
        workers: processes for the solves (see :func:`amortcvx.backends.solve_batch`; > 1 needs a
            ``__main__`` guard in scripts).
        baseline: the strategy that ratios and objective gaps refer to (None: no ratios). It must be one of
            ``strategies``; the default ``"cold"`` is used only if present.
        timing: also run every strategy in timed mode (``exact_iterations=False``) and record the solver's
            setup and solve times (the exact counts come from the first pass either way).
        progress: show progress bars.

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: no strategy, a strategy with the wrong number of warm starts, an unknown baseline, or what
            ``solve_batch`` raises for bad instances / warm starts (naming the index).
    """
    instances = list(instances)
    num = len(instances)
    if num == 0:
        raise ValueError("no instances to compare")
    if not isinstance(strategies, Mapping) or not strategies:
        raise ValueError("strategies must be a non-empty mapping name -> warm starts")
    starts: dict[str, list[WarmStart | None]] = {}
    for name, ws in strategies.items():
        ws = list(ws)
        if len(ws) != num:
            raise ValueError(f"strategy {name!r} has {len(ws)} warm starts for {num} instances")
        starts[str(name)] = ws
    if baseline is not None and baseline not in starts:
        if baseline == "cold":
            baseline = None
        else:
            raise ValueError(f"baseline {baseline!r} is not one of the strategies {list(starts)}")
    settings = None if settings is None else dict(settings)
    out: dict[str, StrategyResult] = {}
    for name, ws in starts.items():
        exact = solve_batch(instances, backend, warm_starts=ws, settings=settings, exact_iterations=True,
                            workers=workers, progress=progress)
        timed = None
        if timing:
            timed = solve_batch(instances, backend, warm_starts=ws, settings=settings, exact_iterations=False,
                                workers=workers, progress=progress)
        out[name] = _arrays(name, exact, ws, timed)
    return Comparison(backend=backend, settings=dict(settings or {}), strategies=out, baseline=baseline,
                      timed=bool(timing))
