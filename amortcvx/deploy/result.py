"""What :meth:`AmortizedSolver.solve <amortcvx.deploy.AmortizedSolver.solve>` returns: a batch of answers.

:class:`AmortizedResult` holds one :class:`~amortcvx.backends.SolveResult` per instance (canonical ``x, y[, s]``)
and presents the batch the way a CVXPY user reads it: ``result.variables["w"]`` (or ``result.variables[w]`` with
the ``cp.Variable``) is an array with the batch dimension first, ``result.duals[constraint]`` likewise,
``result.objective`` carries CVXPY's sign, and ``status``, ``iterations``, times and how each instance ended
(warm-started, certified, fell back, retried) are arrays over the batch. The CVXPY-space views are computed on
first use, not in the timed solve, by the batched affine maps of :mod:`amortcvx.canon.recover` (and, for
variables with nonneg / nonpos / bounds attributes, CVXPY's projection onto them:
:func:`~amortcvx.canon.recover.project_recovered`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cvxpy as cp
import numpy as np
import torch

from amortcvx.backends import SolveResult, Status
from amortcvx.canon.parametric import CvxpySolution, ParametricProblem
from amortcvx.canon.recover import dual_maps, project_recovered, variable_maps


class ByKey(Mapping):
    """Batched values keyed by name (variables) or position (constraints), also by the CVXPY object itself.

    ``values[key]`` accepts the key, or the ``cp.Variable`` / ``cp.Constraint`` it stands for; an unknown key is
    a KeyError that lists the known ones.
    """

    def __init__(self, values: dict[Any, np.ndarray | None], ids: dict[int, Any], what: str):
        self._values, self._ids, self._what = values, ids, what

    def _key(self, key: Any) -> Any:
        if isinstance(key, (cp.Variable, cp.constraints.constraint.Constraint)):
            if key.id not in self._ids:
                raise KeyError(f"{key} is not a {self._what} of this problem")
            return self._ids[key.id]
        if key not in self._values:
            raise KeyError(f"unknown {self._what} {key!r}; known: {list(self._values)}")
        return key

    def __getitem__(self, key: Any) -> np.ndarray | None:
        return self._values[self._key(key)]

    def __iter__(self) -> Iterator:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shapes = {k: None if v is None else tuple(np.shape(v)) for k, v in self._values.items()}
        return f"{type(self).__name__}({self._what}s: {shapes})"


@dataclass(frozen=True, eq=False)
class AmortizedResult:
    """Answers for a batch of ``B`` instances.

    Attributes:
        results: one :class:`~amortcvx.backends.SolveResult` per instance (canonical solution, from the C solver
            or the certificate, at the requested tolerance); its ``objective`` has CVXPY's sign.
        fallback: bool (B,), the safeguard used the (refined) cold start instead of the prediction.
        retried: bool (B,), the warm-started solve did not reach ``optimal`` and was redone cold.
        predict_seconds: time of prediction and refinement for the batch.
        solve_seconds: wall time of the certificate and the C solves for the batch.
        certified: bool (B,), answered by the certified finish (no C solve; ``iterations`` 0).
        warm_started: bool (B,), the C solver or the certificate started from a point of the torch path (the
            prediction, or the refined cold start when the predictor is off or fell back), not the plain cold
            start.
        predictor_enabled: False when calibration switched the predictor off (every instance then starts from
            the (refined) cold start; see :attr:`AmortizedSolver.calibration`).
        problem: the compiled problem (for the CVXPY views).
    """

    results: list[SolveResult]
    fallback: np.ndarray
    retried: np.ndarray
    predict_seconds: float
    solve_seconds: float
    certified: np.ndarray
    warm_started: np.ndarray
    predictor_enabled: bool = True
    problem: ParametricProblem | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.results)

    # ------------------------------------------------------------------ per-instance numbers, as arrays
    @cached_property
    def status(self) -> np.ndarray:
        """(B,) the statuses (:class:`~amortcvx.backends.Status`, CVXPY-like strings)."""
        return np.array([r.status for r in self.results], dtype=object)

    @cached_property
    def optimal(self) -> np.ndarray:
        """bool (B,), status ``optimal`` (the requested tolerance met by the solver's own test)."""
        return np.array([r.status == Status.OPTIMAL for r in self.results], dtype=bool)

    @cached_property
    def objective(self) -> np.ndarray:
        """(B,) optimal values with CVXPY's sign (NaN where there is no solution)."""
        return np.array([r.objective for r in self.results], dtype=np.float64)

    @cached_property
    def iterations(self) -> np.ndarray:
        """(B,) C solver iterations (0 for certified instances; both attempts for retried ones)."""
        return np.array([r.iterations for r in self.results], dtype=np.int64)

    @cached_property
    def solve_time(self) -> np.ndarray:
        """(B,) seconds the C solver reported for its iterations (0 for certified instances)."""
        return np.array([r.solve_time for r in self.results], dtype=np.float64)

    @cached_property
    def x(self) -> np.ndarray:
        """(B, n) canonical primal solutions."""
        return np.stack([r.x for r in self.results])

    @cached_property
    def y(self) -> np.ndarray:
        """(B, m) canonical dual solutions."""
        return np.stack([r.y for r in self.results])

    # ------------------------------------------------------------------ CVXPY views
    def _need_problem(self) -> ParametricProblem:
        if self.problem is None:
            raise ValueError("this result was built without its problem; CVXPY views are not available")
        return self.problem

    @cached_property
    def variables(self) -> ByKey:
        """CVXPY variables: ``variables[name or cp.Variable]`` -> array ``(B, *shape)`` (NaN without a solution)."""
        pp = self._need_problem()
        variables = pp.problem.variables()
        maps = variable_maps(pp, variables)
        x = torch.from_numpy(np.ascontiguousarray(self.x, dtype=np.float64))
        values = {v.name(): project_recovered(v, amap.apply(x).numpy()) for v, amap in zip(variables, maps)}
        return ByKey(values, {v.id: v.name() for v in variables}, "variable")

    @cached_property
    def duals(self) -> ByKey:
        """Constraint duals: ``duals[i or constraint]`` -> array ``(B, *shape)`` (i: position in
        ``problem.constraints``)."""
        pp = self._need_problem()
        cons = pp.problem.constraints
        y = torch.from_numpy(np.ascontiguousarray(self.y, dtype=np.float64))
        values = {i: amap.apply(y).numpy() for i, amap in enumerate(dual_maps(pp))}
        return ByKey(values, {c.id: i for i, c in enumerate(cons)}, "constraint")

    @cached_property
    def solutions(self) -> list[CvxpySolution]:
        """Per instance, the full CVXPY solution (variables, duals, status, value), as ``problem.solve`` gives."""
        pp = self._need_problem()
        out = []
        for r in self.results:
            if r.status.has_solution:
                out.append(pp.recover(r.x, r.y, status=r.status.cvxpy, value=r.objective))
            else:
                out.append(CvxpySolution(r.status.cvxpy, float("nan"), {v.name(): None for v in pp.problem.variables()},
                                         [None] * len(pp.problem.constraints)))
        return out

    def summary(self) -> str:
        """One line: how the batch ended (optimal, certified, warm-started, fallbacks, retries) and its times."""
        size = len(self)
        parts = [f"{int(self.optimal.sum())}/{size} optimal", f"{int(self.certified.sum())} certified",
                 f"{int(self.warm_started.sum())} warm-started", f"{int(self.fallback.sum())} fell back",
                 f"{int(self.retried.sum())} retried",
                 f"median C iterations {float(np.median(self.iterations)) if size else float('nan'):g}",
                 f"{1e3 * (self.predict_seconds + self.solve_seconds) / max(size, 1):.3g} ms per instance"]
        line = ", ".join(parts)
        if not self.predictor_enabled:
            line = "PREDICTOR OFF (calibration found it slower than the cold start; see solver.calibration): " + line
        return line
