"""Typed containers for canonical problem data.

Two canonical forms are used throughout amortcvx:

* Cone form (SCS)::

      minimize    1/2 x' P x + c' x
      subject to  A x + s = b,   s in K = K_zero x K_nonneg x K_soc x K_psd x K_exp

  The cone order of the rows of ``A`` is zero, nonneg, SOC, PSD, exp (CVXPY's and SCS's order).
  PSD cones are stored as the scaled lower-triangular ``svec`` of SCS (off-diagonals times sqrt(2),
  column-major), exp cones as consecutive triples ``(x, y, z)`` with ``y exp(x / y) <= z``.

* QP form (OSQP)::

      minimize    1/2 x' P x + q' x
      subject to  l <= A x <= u

Batched containers hold torch tensors with a leading batch dimension (differentiable with respect to the
parameters that produced them). Single instances used by the C backends hold numpy / scipy objects and are
picklable, so they can be shipped to worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch


@dataclass(frozen=True)
class ConeDims:
    """Sizes of the cones of a cone-form problem, in row order.

    Attributes:
        zero: number of equality rows.
        nonneg: number of nonnegative rows.
        soc: sizes of the second-order cones ``{(t, x): ||x||_2 <= t}``.
        psd: orders ``k`` of the PSD cones; each takes ``k (k + 1) / 2`` rows (scaled svec).
        exp: number of 3-dimensional exponential cones (3 rows each).
    """

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()
    psd: tuple[int, ...] = ()
    exp: int = 0

    @property
    def size(self) -> int:
        """Total number of rows ``m`` covered by the cones."""
        return (self.zero + self.nonneg + sum(self.soc) + sum(k * (k + 1) // 2 for k in self.psd)
                + 3 * self.exp)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Names of the cone kinds present, among ``'zero'``, ``'nonneg'``, ``'soc'``, ``'psd'``, ``'exp'``."""
        present = []
        for name in ("zero", "nonneg", "soc", "psd", "exp"):
            if getattr(self, name):
                present.append(name)
        return tuple(present)

    def to_scs(self) -> dict:
        """The cone dictionary expected by ``scs.SCS``."""
        return {"z": self.zero, "l": self.nonneg, "q": list(self.soc), "s": list(self.psd), "ep": self.exp}


@dataclass(frozen=True)
class SparseBatch:
    """A batch of sparse matrices that share one CSC sparsity pattern.

    Matrix ``i`` of the batch is ``scipy.sparse.csc_array((values[i], indices, indptr), shape)``.

    Attributes:
        indices: CSC row indices, int64 numpy array of length ``nnz``.
        indptr: CSC column pointers, int64 numpy array of length ``shape[1] + 1``.
        shape: ``(rows, cols)`` of each matrix.
        values: tensor of shape ``(B, nnz)``; when ``shared`` it is an expanded view of one row.
        shared: True when every matrix of the batch is the same (the values do not depend on parameters).
    """

    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    values: torch.Tensor
    shared: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def coo(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column index of every stored entry (numpy int64 arrays of length ``nnz``)."""
        cols = np.repeat(np.arange(self.shape[1], dtype=np.int64), np.diff(self.indptr))
        return self.indices.astype(np.int64), cols

    def to_dense(self) -> torch.Tensor:
        """Dense batch of shape ``(B, rows, cols)``; differentiable with respect to ``values``."""
        rows, cols = self.coo()
        flat = torch.as_tensor(rows * self.shape[1] + cols, device=self.values.device)
        out = self.values.new_zeros((self.batch_size, self.shape[0] * self.shape[1]))
        out = out.index_add(1, flat, self.values)
        return out.reshape(self.batch_size, *self.shape)

    def matrix(self, i: int) -> sp.csc_array:
        """Instance ``i`` as a scipy CSC array (float64, on the host)."""
        vals = self.values[i].detach().to("cpu", torch.float64).numpy()
        return sp.csc_array((vals, self.indices, self.indptr), shape=self.shape)

    def to(self, *args, **kwargs) -> SparseBatch:
        """Move / cast ``values`` like ``torch.Tensor.to``."""
        return SparseBatch(self.indices, self.indptr, self.shape, self.values.to(*args, **kwargs), self.shared)

    def take(self, index: torch.Tensor) -> SparseBatch:
        """The instances at ``index`` (a shared batch stays shared)."""
        values = self.values[:1].expand(int(index.shape[0]), -1) if self.shared else self.values[index]
        return SparseBatch(self.indices, self.indptr, self.shape, values, self.shared)


class SharedMemo:
    """Objects derived from shared (parameter-independent) :class:`SparseBatch` es, built once each.

    A compiled problem hands out the same constant value tensor on every call for a given device and dtype, so
    an object derived from a shared batch (a host copy, a sparse operator, ...) is memoized by the identity of
    its value tensor and pattern; the memo holds references to both, so those identities cannot be reused by
    other arrays. :meth:`get_pattern` memoizes by the pattern alone (objects that do not depend on the values). At
    most ``limit`` entries are kept (the oldest goes first).
    """

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._store: dict[tuple, tuple[Any, tuple]] = {}

    def get(self, mat: SparseBatch, key: Hashable, build: Callable[[], Any]) -> Any:
        """The object memoized for ``mat`` (shared: its values and pattern) and ``key``, ``build()`` on a miss."""
        return self._get((mat.values.data_ptr(), id(mat.indices), tuple(mat.shape), key), (mat.values, mat.indices),
                         build)

    def get_pattern(self, mat: SparseBatch, key: Hashable, build: Callable[[], Any]) -> Any:
        """The object memoized for ``mat``'s sparsity pattern alone (its index arrays, whatever its values) and
        ``key``, ``build()`` on a miss."""
        return self._get((id(mat.indices), id(mat.indptr), tuple(mat.shape), key), (mat.indices, mat.indptr), build)

    def _get(self, ident: tuple, held: tuple, build: Callable[[], Any]) -> Any:
        """The entry ``ident``; on a miss ``build()``, kept with ``held`` (the objects whose identities ``ident``
        names, so that no other object takes them while the entry is kept)."""
        hit = self._store.get(ident)
        if hit is None:
            if len(self._store) >= self.limit:
                self._store.pop(next(iter(self._store)))
            hit = self._store[ident] = (build(), held)
        return hit[0]


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@dataclass(frozen=True)
class ConeData:
    """A batch of cone-form problems ``min 1/2 x'Px + c'x  s.t.  Ax + s = b, s in K``.

    Attributes:
        P: quadratic term (full symmetric), or None for a linear objective.
        A: constraint matrix, shape ``(m, n)``.
        b: tensor ``(B, m)``.
        c: tensor ``(B, n)``.
        cones: the cone sizes, shared by the batch.
        offset: tensor ``(B,)``, constant added to the objective to get CVXPY's optimal value.
    """

    P: SparseBatch | None
    A: SparseBatch
    b: torch.Tensor
    c: torch.Tensor
    cones: ConeDims
    offset: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.b.shape[0])

    @property
    def n(self) -> int:
        return int(self.c.shape[1])

    @property
    def m(self) -> int:
        return int(self.b.shape[1])

    @property
    def matrices_shared(self) -> bool:
        """Whether ``A`` and ``P`` are the same for every instance (neither depends on the parameters)."""
        return self.A.shared and (self.P is None or self.P.shared)

    def instance(self, i: int) -> ConeInstance:
        """Instance ``i`` in numpy / scipy form (float64, on the host), for the C backends."""
        return ConeInstance(
            P=None if self.P is None else self.P.matrix(i),
            A=self.A.matrix(i), b=_host(self.b[i]), c=_host(self.c[i]), cones=self.cones,
            offset=float(self.offset[i]))

    def instances(self) -> list[ConeInstance]:
        return [self.instance(i) for i in range(self.batch_size)]

    def take(self, index: torch.Tensor | np.ndarray) -> ConeData:
        """The sub-batch of the instances at ``index`` (integer positions)."""
        index = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.b.device)
        return ConeData(P=None if self.P is None else self.P.take(index), A=self.A.take(index), b=self.b[index],
                        c=self.c[index], cones=self.cones, offset=self.offset[index])


@dataclass(frozen=True)
class QPData:
    """A batch of QPs ``min 1/2 x'Px + q'x  s.t.  l <= Ax <= u`` (``l``/``u`` may hold -inf/inf).

    Attributes:
        P: quadratic term (full symmetric), or None for an LP.
        q: tensor ``(B, n)``.
        A: constraint matrix, shape ``(m, n)``; equality rows have ``l == u``.
        l: tensor ``(B, m)``.
        u: tensor ``(B, m)``.
        offset: tensor ``(B,)``, constant added to the objective to get CVXPY's optimal value.
        eq: the first ``eq`` rows are CVXPY's equality constraints (``l == u`` for every parameter value; the
            cone form's zero cone).
    """

    P: SparseBatch | None
    q: torch.Tensor
    A: SparseBatch
    l: torch.Tensor
    u: torch.Tensor
    offset: torch.Tensor
    eq: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        return int(self.q.shape[1])

    @property
    def m(self) -> int:
        return int(self.l.shape[1])

    @property
    def matrices_shared(self) -> bool:
        """Whether ``A`` and ``P`` are the same for every instance (neither depends on the parameters)."""
        return self.A.shared and (self.P is None or self.P.shared)

    def instance(self, i: int) -> QPInstance:
        """Instance ``i`` in numpy / scipy form (float64, on the host), for the C backends."""
        return QPInstance(
            P=None if self.P is None else self.P.matrix(i), q=_host(self.q[i]),
            A=self.A.matrix(i), l=_host(self.l[i]), u=_host(self.u[i]), offset=float(self.offset[i]))

    def instances(self) -> list[QPInstance]:
        return [self.instance(i) for i in range(self.batch_size)]

    def take(self, index: torch.Tensor | np.ndarray) -> QPData:
        """The sub-batch of the instances at ``index`` (integer positions)."""
        index = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.q.device)
        return QPData(P=None if self.P is None else self.P.take(index), q=self.q[index], A=self.A.take(index),
                      l=self.l[index], u=self.u[index], offset=self.offset[index], eq=self.eq)


class ConeInstance(NamedTuple):
    """One cone-form problem in numpy / scipy form (see :class:`ConeData`)."""

    P: sp.csc_array | None
    A: sp.csc_array
    b: np.ndarray
    c: np.ndarray
    cones: ConeDims
    offset: float = 0.0


class QPInstance(NamedTuple):
    """One QP in numpy / scipy form (see :class:`QPData`)."""

    P: sp.csc_array | None
    q: np.ndarray
    A: sp.csc_array
    l: np.ndarray
    u: np.ndarray
    offset: float = 0.0
