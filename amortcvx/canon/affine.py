"""Batched, differentiable affine maps ``theta -> T [theta; 1]`` with a sparse, fixed ``T``.

CVXPY's DPP compilation gives every entry of the canonical data as an affine function of the flattened
parameter vector. :class:`AffineMap` stores that function for a subset of entries and applies it to a whole
batch of parameter vectors at once, touching only the entries that depend on parameters (the others are a
shared constant).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch


class _SparseAffineProduct(torch.autograd.Function):
    """``Y = const + Theta @ T'`` for a sparse ``T`` (k, p), differentiable with respect to ``Theta`` (B, p).

    On the CPU the product runs in scipy (faster than torch's sparse kernels there); on other devices it
    uses a torch sparse CSR copy of ``T`` cached on that device.
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, amap: AffineMap) -> torch.Tensor:  # type: ignore[override]
        ctx.amap = amap
        return amap._product(theta, transpose=False, add_const=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.amap._product(grad.contiguous(), transpose=True), None


class _Selection(NamedTuple):
    """A map whose rows each hold at most one parameter (``y_r = v_r theta_{j_r} + const_r``), at least half of them
    one: applied to a batch of more than one as one gather of columns of ``theta`` (B, p), C-ordered, instead of a
    sparse product with ``theta``'s transpose (which scipy first copies into row order). Measured (CPU, the ``stack``
    of the parameter-dependent pieces, interleaved medians): robust_ls large (``A`` a 200 x 100 parameter, 20404
    rows) 75 against 96 ms at batch 1024, portfolio large 7.0 against 8.7 ms; at batch 1 the product is 1-3 us
    faster (docs/canonicalization.md).

    Attributes:
        cols: (k,) the parameter each row reads (0 for parameter-free rows).
        vals: (k,) its coefficient (0 for parameter-free rows).
        free: the parameter-free rows, set back to their constant where ``theta[:, 0]`` is not finite (its product
            with 0 would reach them).
    """

    cols: np.ndarray
    vals: np.ndarray
    free: np.ndarray

    def apply(self, theta: np.ndarray, const: np.ndarray) -> np.ndarray:
        """``const + T theta`` for a C-ordered (B, p) float64 ``theta``: a new C-ordered (B, k) array."""
        out = np.take(theta, self.cols, axis=1)
        out *= self.vals
        out += const
        if self.free.size and not np.isfinite(theta[:, 0]).all():
            out[:, self.free] = const[self.free]
        return out


def _selection(params: sp.csr_array) -> _Selection | None:
    """:class:`_Selection` of a map (k, p), or None where a row holds more than one parameter, fewer than half the
    rows hold one, or the parameters number fewer than half the rows: there the sparse product, which touches only
    the parameters' rows and copies only ``theta``, costs less (batch 1024: mpc_param_dyn large, 11544 of 17808 rows
    from 600 parameters, 53 against 68 us per instance; mpc large, 48 of 3408 rows)."""
    counts = np.diff(params.indptr)
    k, p = params.shape
    if k == 0 or counts.max(initial=0) > 1 or 2 * int(np.count_nonzero(counts)) < k or 2 * p < k:
        return None
    free = counts == 0
    first = np.minimum(params.indptr[:-1], max(params.indices.size - 1, 0))
    cols = np.where(free, 0, params.indices[first]).astype(np.intp)
    vals = np.where(free, 0.0, params.data[first])
    return _Selection(cols, vals, np.flatnonzero(free))


class AffineMap:
    """``y = const + T theta`` restricted to the rows of ``T`` that depend on parameters.

    Args:
        tensor: scipy sparse matrix of shape ``(k, p + 1)``; the last column is the constant term.
        scale: optional per-row factor (length ``k``) applied to the whole row (used for sign flips).
        mask: optional boolean per row; rows where it is False ignore ``tensor`` and equal ``fill``.
        fill: the constant of the masked-out rows (e.g. ``-inf`` for one-sided bounds).

    Attributes:
        size: number of outputs ``k``.
        dependent: indices of the rows that depend on at least one parameter.
    """

    def __init__(self, tensor: sp.spmatrix | sp.sparray, scale: np.ndarray | None = None,
                 mask: np.ndarray | None = None, fill: float = 0.0):
        t = sp.csr_array(tensor, dtype=np.float64)
        if mask is not None:
            scale = (np.ones(t.shape[0]) if scale is None else np.asarray(scale, dtype=np.float64)) * mask
        if scale is not None:
            t = sp.csr_array(sp.diags_array(np.asarray(scale, dtype=np.float64)) @ t)
        t.sum_duplicates()
        t.eliminate_zeros()
        p1 = t.shape[1]
        const = t[:, [p1 - 1]].toarray().ravel()
        if mask is not None:
            const[~np.asarray(mask, dtype=bool)] = fill
        self._set(sp.csr_array(t[:, : p1 - 1]), const)

    def _set(self, params: sp.csr_array, const: np.ndarray) -> None:
        self.size, self.num_params = params.shape
        self.const = const
        self.dependent = np.flatnonzero(np.diff(params.indptr) > 0)
        self._dep = params  # (k, p); rows that do not depend on parameters are empty
        self._dep_t = sp.csr_array(params.T)
        self._cache: dict = {}
        self._expanded: tuple | None = None
        self._select = _selection(params)

    @classmethod
    def stack(cls, maps: list[AffineMap]) -> AffineMap:
        """One map whose output is the outputs of ``maps`` side by side (one product for all of them)."""
        if not maps:
            raise ValueError("stack needs at least one map")
        out = cls.__new__(cls)
        out._set(sp.csr_array(sp.vstack([m._dep for m in maps], format="csr")),
                 np.concatenate([m.const for m in maps]))
        return out

    @property
    def shared(self) -> bool:
        """True when no output depends on parameters."""
        return self.dependent.size == 0

    def _device_data(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            const = torch.as_tensor(self.const, dtype=dtype, device=device)
            mats = None
            if device.type != "cpu":
                mats = tuple(
                    torch.sparse_csr_tensor(
                        torch.as_tensor(m.indptr, dtype=torch.int64),
                        torch.as_tensor(m.indices, dtype=torch.int64),
                        torch.as_tensor(m.data, dtype=dtype), size=m.shape).to(device)
                    for m in (self._dep, self._dep_t))
            self._cache[key] = (const, mats)
        return self._cache[key]

    def _product(self, theta: torch.Tensor, transpose: bool, add_const: bool = False) -> torch.Tensor:
        """``[const +] theta @ T'`` (or ``theta @ T`` when ``transpose``) for a dense (B, .) ``theta``.

        On the CPU, a :class:`_Selection` (a batch of more than one, not transposed) is one gather of ``theta``'s
        columns; otherwise the result is computed as its transpose (one sparse-times-dense product) and returned as
        a transposed view, which avoids a scatter into a (B, k) array.
        """
        if theta.is_cpu:
            host = theta.detach() if theta.requires_grad else theta
            host = host if host.dtype == torch.float64 else host.to(torch.float64)
            if (self._select is not None and not transpose and add_const and host.shape[0] > 1
                    and host.is_contiguous()):
                out = self._select.apply(host.numpy(), self.const)
                return torch.from_numpy(out) if theta.dtype == torch.float64 else torch.from_numpy(out).to(theta.dtype)
            mat = self._dep_t if transpose else self._dep
            out = mat @ host.numpy().T
            if add_const:
                out += self.const[:, None]
            out = torch.from_numpy(out).T
            return out if theta.dtype == torch.float64 else out.to(theta.dtype)
        const, mats = self._device_data(theta.device, theta.dtype)
        mat = mats[1] if transpose else mats[0]
        out = (mat @ theta.T).T
        return out + const if add_const else out

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """Apply to a batch of flattened parameter vectors ``theta`` (B, p); returns (B, k)."""
        if self.shared:  # the constant, as a view per batch size (the last one kept: repeated calls reuse it)
            key = (theta.device, theta.dtype, theta.shape[0])
            if self._expanded is None or self._expanded[0] != key:
                const, _ = self._device_data(theta.device, theta.dtype)
                self._expanded = (key, const.expand(theta.shape[0], self.size))
            return self._expanded[1]
        if not theta.requires_grad:  # no graph to record: skip autograd's bookkeeping (batch-1 latency)
            return self._product(theta, transpose=False, add_const=True)
        return _SparseAffineProduct.apply(theta, self)
