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

Fresh-object solves (:func:`amortcvx.backends.solve_batch`) stay the tool for exact iteration counts; the
counts here are those the solver reports (SCS: executed iterations ``info['iter'] + 1``, a multiple of its check
interval 25 plus one; OSQP: a multiple of ``check_termination``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from amortcvx.backends.base import RawSolve, SolveResult
from amortcvx.backends.batched import objectives
from amortcvx.backends.registry import get_backend
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

    @property
    def builds(self) -> int:
        return int(self._session.builds)

    def solve(self, data: ConeData | QPData, warm_starts: Mapping[str, np.ndarray] | None = None,
              warm_mask: np.ndarray | None = None, *, check_termination: int | None = None) -> list[SolveResult]:
        """Solve every instance of a batch, in order, on this object.

        Args:
            data: the batch in the backend's form (any dtype/device; converted to float64 on the host once).
            warm_starts: batched warm-start arrays by field (SCS ``x``, ``y``, ``s``; OSQP ``x``, ``y``), each
                ``(B, .)``; None for cold starts.
            warm_mask: bool ``(B,)``: which instances use ``warm_starts`` (the others start cold).
            check_termination: OSQP only: the termination-check interval of these solves (default: the
                object's setting, OSQP's 25 unless given).

        Returns:
            One :class:`SolveResult` per instance; ``objective`` is CVXPY's minimization value
            ``1/2 x'Px + c'x + offset``. Failures are reported by status.

        Raises:
            ValueError: a batch of another size, or with non-finite vectors (naming the instance).
        """
        expected = ConeData if self._info.form == "cone" else QPData
        if not isinstance(data, expected):
            raise ValueError(f"backend {self.backend!r} takes {expected.__name__}, got {type(data).__name__}")
        if (data.n, data.m) != (self.n, self.m):
            raise ValueError(f"the batch has (n, m) = {(data.n, data.m)}; this solver was set up for "
                             f"{(self.n, self.m)}")
        batch = self._session.prepare(data)
        size = data.batch_size
        vectors = ("b", "c") if expected is ConeData else ("q",)
        for name in vectors:
            bad = ~np.isfinite(batch[name]).all(axis=1)
            if bad.any():
                raise ValueError(f"instance {int(np.flatnonzero(bad)[0])}: {name} has non-finite entries")
        warm = None
        if warm_starts is not None:
            warm = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in warm_starts.items()
                    if k in self._info.warm_start_fields}
        mask = np.ones(size, dtype=bool) if warm_mask is None else np.asarray(warm_mask, dtype=bool)
        raw = []
        for i in range(size):
            start = None if warm is None or not mask[i] else {k: v[i] for k, v in warm.items()}
            raw.append(self._session.solve_one(batch, i, start, check_termination))
        return self._results(data, raw)

    def _results(self, data: ConeData | QPData, raw: list[RawSolve]) -> list[SolveResult]:
        """SolveResults with objectives computed for the whole batch at once."""
        objective = objectives(data, np.stack([r.x for r in raw]))
        return [SolveResult(x=r.x, y=r.y, s=r.s, status=r.status, iterations=int(r.iterations),
                            setup_time=r.setup_time, solve_time=r.solve_time,
                            objective=float(obj) if r.status.has_solution else float("nan"), message=r.message,
                            stats=r.stats)
                for r, obj in zip(raw, objective)]


__all__ = ["PersistentSolver"]
