"""Baseline warm starts, in the :class:`~amortcvx.backends.WarmStart` form the C backends take.

Every baseline returns one ``WarmStart | None`` per test instance (None = cold start), so that they can be put
side by side with the learned warm starts in :func:`amortcvx.evaluation.compare`:

* cold: ``None`` for every instance;
* optimum: the instance's own high-accuracy solution ``(x*_i, y*_i, s*_i)`` (the floor of any warm start);
* nearest neighbour: the solution of the training instance closest in standardized parameter space,
  ``j(i) = argmin_j || (theta_i - mu) / sigma - (theta_j - mu) / sigma ||_2`` with ``mu``, ``sigma`` the
  per-coordinate mean and standard deviation of the training parameters;
* previous solution (sequential families): the optimal solution of row ``i - 1`` when rows ``i - 1`` and ``i``
  belong to the same episode, a cold start for the first row of an episode.

Solutions that are not available (rows whose high-accuracy solve did not end ``optimal``, stored as NaN) give
a cold start for the instances that would use them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from amortcvx.backends import WarmStart, get_backend
from amortcvx.backends.base import csc_parts, upper_mask
from amortcvx.backends.scs import solver_data as scs_solver_data


def _matrix(a, name: str, rows: int | None = None) -> np.ndarray:
    arr = a.detach().to("cpu", torch.float64).numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, dim); got shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise ValueError(f"{name} has {arr.shape[0]} rows; expected {rows} (one per instance)")
    return arr


def _solution_arrays(x, y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x = _matrix(x, "x")
    y = _matrix(y, "y", x.shape[0])
    s = None if s is None else _matrix(s, "s", x.shape[0])
    if s is not None and s.shape[1] != y.shape[1]:
        raise ValueError(f"s must have the shape of y {y.shape}; got {s.shape}")
    return x, y, s


def _usable(x: np.ndarray, y: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """Rows whose solution is complete and finite."""
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    if s is not None:
        ok &= np.isfinite(s).all(axis=1)
    return ok


def _warm_start(x: np.ndarray, y: np.ndarray, s: np.ndarray | None, i: int) -> WarmStart:
    return WarmStart(x=x[i].copy(), y=y[i].copy(), s=None if s is None else s[i].copy())


def cold_warm_starts(num: int) -> list[None]:
    """``num`` cold starts (``None``)."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be a nonnegative int; got {num!r}")
    return [None] * int(num)


def optimum_warm_starts(x, y, s=None) -> list[WarmStart | None]:
    """Each instance's own solution as its warm start: ``WarmStart(x*_i, y*_i, s*_i)``.

    Args:
        x: optimal primal solutions (N, n) (numpy or torch).
        y: optimal dual solutions (N, m).
        s: SCS slacks (N, m), or None (OSQP).

    Returns:
        One warm start per row; None for rows with NaN entries (no solution available).
    """
    x, y, s = _solution_arrays(x, y, s)
    ok = _usable(x, y, s)
    return [_warm_start(x, y, s, i) if ok[i] else None for i in range(x.shape[0])]


class NearestNeighbor:
    """Nearest-neighbour warm starts from a set of solved training instances.

    Distances are Euclidean in standardized parameter space: with ``mu`` and ``sigma`` the mean and standard
    deviation of each coordinate of the training parameters (``sigma = 1`` where it is below ``1e-12``, so
    constant coordinates do not matter), ``d(i, j) = ||(theta_i - theta_j) / sigma||_2``. Training rows whose
    solution is not available (NaN) are left out of the search.

    Args:
        theta: training parameter vectors (N, p) (``ParametricProblem.parameter_vector``).
        x, y, s: their optimal solutions (N, n), (N, m), (N, m) or None.
        chunk_size: test rows per block of distances (memory ``chunk_size * N`` floats).

    Raises:
        ValueError: inconsistent shapes, or no usable training row.
    """

    def __init__(self, theta, x, y, s=None, *, chunk_size: int = 2048):
        theta = _matrix(theta, "theta")
        x, y, s = _solution_arrays(x, y, s)
        if x.shape[0] != theta.shape[0]:
            raise ValueError(f"theta has {theta.shape[0]} rows but the solutions have {x.shape[0]}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
        keep = _usable(x, y, s) & np.isfinite(theta).all(axis=1)
        if not keep.any():
            raise ValueError("no training instance has a usable solution (all rows are NaN)")
        self.index = np.flatnonzero(keep)  # rows of the given arrays that can be neighbours
        theta = theta[keep]
        self.mean = theta.mean(axis=0)
        std = theta.std(axis=0)
        self.scale = np.where(std > 1e-12, std, 1.0)
        self._train = torch.as_tensor((theta - self.mean) / self.scale)
        self._train_sq = (self._train ** 2).sum(dim=1)
        self.x, self.y, self.s = x, y, s
        self.chunk_size = int(chunk_size)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def query(self, theta) -> tuple[np.ndarray, np.ndarray]:
        """Nearest training row of each query.

        Args:
            theta: query parameter vectors (B, p).

        Returns:
            ``(rows, distances)``: for each query, the row of the arrays given to the constructor that is
            nearest, and the standardized distance to it (ties go to the lowest row).
        """
        q = _matrix(theta, "theta")
        if q.shape[1] != self._train.shape[1]:
            raise ValueError(f"theta must have {self._train.shape[1]} columns (the training parameters'); "
                             f"got {q.shape[1]}")
        if not np.isfinite(q).all():
            raise ValueError("theta contains NaN or inf values")
        q = torch.as_tensor((q - self.mean) / self.scale)
        rows, dists = [], []
        for start in range(0, q.shape[0], self.chunk_size):
            # squared distances by one matrix product, then the chosen row's distance exactly (torch.cdist took
            # 43 ms for one query row against 270 rows of 20,200 parameters, robust_ls large, 1 ms per row in
            # blocks of 64: its small-batch path does not use a matrix product)
            block = q[start:start + self.chunk_size]
            d2 = (block ** 2).sum(dim=1, keepdim=True) - 2.0 * (block @ self._train.mT) + self._train_sq
            best = d2.argmin(dim=1)  # the first of equal minima: ties go to the lowest row
            rows.append(best.numpy())
            dists.append(torch.linalg.vector_norm(block - self._train[best], dim=1).numpy())
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty(0)
        return self.index[np.concatenate(rows)], np.concatenate(dists)

    def warm_starts(self, theta) -> list[WarmStart]:
        """The solution of each query's nearest training instance, as a warm start."""
        rows, _ = self.query(theta)
        return [_warm_start(self.x, self.y, self.s, int(j)) for j in rows]


def nearest_neighbor_warm_starts(train_theta, train_x, train_y, train_s, theta, *,
                                 chunk_size: int = 2048) -> list[WarmStart]:
    """``NearestNeighbor(train_theta, train_x, train_y, train_s).warm_starts(theta)`` (see the class)."""
    return NearestNeighbor(train_theta, train_x, train_y, train_s, chunk_size=chunk_size).warm_starts(theta)


def episode_ids(num: int, episode_length: int) -> np.ndarray:
    """Episode of each row of a sample made of consecutive episodes of ``episode_length`` rows: ``i // L``."""
    if isinstance(episode_length, bool) or not isinstance(episode_length, (int, np.integer)) or episode_length < 1:
        raise ValueError(f"episode_length must be a positive int; got {episode_length!r}")
    return np.arange(int(num)) // int(episode_length)


def previous_solution_warm_starts(x, y, s=None, *, episodes: Sequence[int] | np.ndarray) -> list[WarmStart | None]:
    """Warm start row ``i`` from the optimal solution of row ``i - 1`` of the same episode.

    Args:
        x, y, s: the optimal solutions of the rows, in sequence order (N, n), (N, m), (N, m) or None.
        episodes: episode id of each row (N,); a row whose predecessor has another id starts an episode and
            gets a cold start (see :func:`episode_ids`).

    Returns:
        ``[None, WarmStart(x*_0, ...), WarmStart(x*_1, ...), ...]`` with None at every episode start and where
        the previous row has no solution.
    """
    x, y, s = _solution_arrays(x, y, s)
    ep = np.asarray(episodes)
    if ep.shape != (x.shape[0],):
        raise ValueError(f"episodes must have shape ({x.shape[0]},) (one id per row); got {ep.shape}")
    ok = _usable(x, y, s)
    out: list[WarmStart | None] = [None] * x.shape[0]
    for i in range(1, x.shape[0]):
        if ep[i] == ep[i - 1] and ok[i - 1]:
            out[i] = _warm_start(x, y, s, i - 1)
    return out


class PersistentColdLoop:
    """The best cold solve a user writes by hand: one solver object, updated and solved per instance.

    Written on the solvers' own Python API, as a user would: SCS ``scs.SCS`` set up once, then
    ``update(b=, c=)`` and ``solve(warm_start=False)`` per instance (a new setup per instance where parameters
    enter ``A`` or ``P``: SCS cannot update matrices); OSQP ``osqp.OSQP().setup`` once with
    ``warm_starting=False``, then ``update(q=, l=, u=)`` (and ``Px=``, ``Ax=``) and ``solve()``. No state is reset
    between instances (a user does not), so SCS's adapted scale and Anderson memory and OSQP's adapted rho carry
    over. Canonical data come from :meth:`ParametricProblem.canonicalize` (the fastest way to get them).
    The timing baseline "(b)" of ``benchmarks/bench_endtoend.py``.
    """

    def __init__(self, pp, backend: str, settings: Mapping[str, Any] | None = None):
        self.pp, self.backend = pp, backend
        info = get_backend(backend)
        self.settings = {**info.default_settings, **(settings or {})}
        self._solver = None

    def _setup(self, inst) -> None:
        if self.backend == "scs":
            import scs

            self._solver = scs.SCS(scs_solver_data(inst, np.int64), inst.cones.to_scs(), **self.settings)
        else:
            import osqp

            self._solver = osqp.OSQP()
            P = None if inst.P is None else csc_parts(inst.P, np.int32, upper=True)
            self._solver.setup(P, np.ascontiguousarray(inst.q), csc_parts(inst.A, np.int32),
                               np.ascontiguousarray(inst.l), np.ascontiguousarray(inst.u),
                               **{**self.settings, "warm_starting": False})

    def solve(self, params: Mapping[str, np.ndarray]) -> list[Any]:
        """Canonicalize ``params`` and solve each instance cold on the one object; returns the raw results."""
        data = self.pp.canonicalize(params, dtype=torch.float64, device="cpu")
        out = []
        if self.backend == "scs":
            b, c = data.b.numpy(), data.c.numpy()
            per_instance = not data.matrices_shared
            for i in range(data.batch_size):
                if self._solver is None or per_instance:
                    self._setup(data.instance(i))
                else:
                    self._solver.update(b=np.ascontiguousarray(b[i]), c=np.ascontiguousarray(c[i]))
                out.append(self._solver.solve(warm_start=False))
            return out
        q, lo, hi = data.q.numpy(), data.l.numpy(), data.u.numpy()
        a_vals = None if data.A.shared else data.A.values.numpy()
        p_vals = None
        if data.P is not None and not data.P.shared:
            p_vals = data.P.values.numpy()[:, upper_mask(data.P.indices, data.P.indptr)]
        for i in range(data.batch_size):
            if self._solver is None:
                self._setup(data.instance(i))
            else:
                self._solver.update(q=np.ascontiguousarray(q[i]), l=np.ascontiguousarray(lo[i]),
                                    u=np.ascontiguousarray(hi[i]))
                if a_vals is not None or p_vals is not None:
                    self._solver.update(**({} if a_vals is None else {"Ax": np.ascontiguousarray(a_vals[i])}),
                                        **({} if p_vals is None else {"Px": np.ascontiguousarray(p_vals[i])}))
            out.append(self._solver.solve(raise_error=False))
        return out
