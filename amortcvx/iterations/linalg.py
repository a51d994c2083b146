"""Linear algebra of the torch fixed-point iterations: batched quasi-definite KKT systems.

Both SCS and OSQP solve, at every step, a linear system with the same quasi-definite matrix

    K = [[P + D_x,   A'  ],
         [A,       -D_y ]],        D_x = diag(d_x) > 0,  D_y = diag(d_y) > 0,

(SCS: ``d_x = rho_x``, ``d_y = r_y``; OSQP: ``d_x = sigma``, ``d_y = 1 / rho``). Eliminating the second block
gives the symmetric positive definite Schur complement ``S = P + D_x + A' D_y^-1 A`` of size ``n``:

    K [u; w] = [r_x; r_y]   <=>   S u = r_x + A' D_y^-1 r_y,    w = D_y^-1 (A u - r_y),

    K^-1 = [[S^-1,   E                     ],       E = S^-1 A' D_y^-1.
            [E',     D_y^-1 A E - D_y^-1  ]],

:class:`KKTSolver` factors ``K`` once (the Cholesky factor of ``S``, always computed in float64 and then cast
to the working dtype) and applies ``K^-1`` to a batch of right-hand sides at every step. Methods:

* ``"kkt"``: the explicit ``K^-1`` (``N x N``, ``N = n + m``); a solve is one matrix product. The default when
  ``A``, ``P`` and the diagonals are shared by the batch and ``N <= KKT_LIMIT``: one GEMM over the batch.
* ``"inverse"``: the explicit ``S^-1`` (``n x n``) plus two products with ``A``. The default when the data
  differ per instance (parameters in ``A`` or ``P``): ``S^-1`` is stored per instance, and an ``A`` that is
  less than 25% full (and, when shared, has more than ``2^22`` entries) is applied sparsely (gather / scatter
  over its ``nnz`` stored entries) instead of as a dense ``(B or 1, m, n)`` tensor.
* ``"cholesky"``: keeps the Cholesky factor and does two triangular solves per step (no explicit inverse).
* ``"sparse"`` (CPU; shared, constant ``A``/``P`` only): a SuperLU factorization of the sparse ``K`` on the
  host (scipy), each step solving for the whole batch at once. The default for shared, constant data on the CPU
  with ``n + m`` beyond ``SPARSE_AUTO_MIN``; it carries gradients to the right-hand side (hence to ``b``, ``c``
  and the iterate), not to ``A`` or ``P``.

All dense paths are differentiable with respect to ``A``, ``P`` (through ``SparseBatch.values``), the
diagonals and the right-hand side, on any device; no step moves data between host and device. Dense storage
is ``N^2`` (``"kkt"``) or ``n^2`` per factorization (one for shared data, ``B`` otherwise): that is the limit
of the dense paths (``n = 4000`` is 128 MB per factorization in float64).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from amortcvx.canon.data import SharedMemo, SparseBatch

METHODS = ("auto", "kkt", "inverse", "cholesky", "sparse")
KKT_LIMIT = 3000
"""Largest ``N = n + m`` for which ``method="auto"`` stores the explicit ``K^-1`` (shared data only)."""
SPARSE_AUTO_MIN = 800
"""Smallest ``N = n + m`` above which ``method="auto"`` takes the sparse path for shared, constant data on the
CPU. Measured (SCS iteration, 1 thread, seconds per step, dense explicit inverse vs SuperLU): at the large
family sizes (N = 994 to 6061) the sparse path was faster at batch 1 (2.2-14x) and at batch 64 (1.1-8x); at the
small sizes (N = 58 to 320) it was as fast at batch 1 and 2-9x slower at batch 1024."""
DENSE_LIMIT = 4000
"""Largest ``n`` that ``method="auto"`` factors densely; larger shared, constant problems on the CPU go to the
sparse path, anything else larger is refused (pass ``method`` explicitly to override)."""
_SETUP_CHUNK = 256  # instances per chunk when forming per-instance Schur complements
_DENSE_SHARED_A = 1 << 22  # a shared A with at most this many entries (32 MB in float64) is stored densely


def batch_rows(t: torch.Tensor | None, size: int, batch: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A warm-start part as a ``(batch, size)`` tensor like ``like``: zeros for None, a row broadcast to the batch.

    Raises:
        ValueError: naming ``name`` when the shape is neither ``(size,)`` nor ``(batch, size)``.
    """
    if t is None:
        return like.new_zeros((batch, size))
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 1 and t.shape[0] == size:
        return t.expand(batch, size)
    if t.ndim != 2 or t.shape != (batch, size):
        raise ValueError(f"warm start {name} must have shape ({size},) or ({batch}, {size}); "
                         f"got {tuple(t.shape)}")
    return t


def flagged_rows(matrix: torch.Tensor, flags: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per instance, the rows of ``matrix`` (``(1 or B, m, k)``) where ``flags`` (``(B, m)`` bool) holds, in their
    order, in ``count`` slots: ``(rows (B, count, k), order (B, count))``, ``order`` the row indices. An instance with
    fewer than ``count`` flagged rows fills its last slots with unflagged rows (the caller weights or masks them out):
    products over a few active rows of a tall shared matrix, batched, without the others."""
    order = torch.argsort(flags.to(torch.int8), dim=1, descending=True, stable=True)[:, :count]
    rows = torch.gather(matrix.expand(flags.shape[0], -1, -1), 1, order.unsqueeze(-1).expand(-1, -1, matrix.shape[-1]))
    return rows, order


def check_matrices(owner: str, A: SparseBatch, P: SparseBatch | None, m: int, n: int, batch: int) -> None:
    """Check the matrices of a data batch: ``A`` is ``(m, n)``; ``A`` and ``P`` are shared or one per instance.

    Raises:
        ValueError: naming ``owner.A`` / ``owner.P`` (e.g. ``"ConeData.A"``) at fault.
    """
    if tuple(A.shape) != (m, n):
        raise ValueError(f"{owner}.A has shape {tuple(A.shape)}; expected (m, n) = {(m, n)}")
    for name, mat in (("A", A), ("P", P)):
        if mat is not None and not mat.shared and mat.batch_size != batch:
            raise ValueError(f"{owner}.{name} holds {mat.batch_size} matrices but the batch has {batch} instances")


def dense_batch(mat: SparseBatch, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense copy of a :class:`SparseBatch`: shape ``(1, r, c)`` when it is shared, else ``(B, r, c)``.

    Differentiable with respect to ``mat.values``. The copy of a shared matrix without gradient is memoized
    (read-only for the caller).
    """
    def build() -> torch.Tensor:
        values = mat.values[:1] if mat.shared else mat.values
        if dtype is not None:
            values = values.to(dtype)
        return SparseBatch(mat.indices, mat.indptr, mat.shape, values, mat.shared).to_dense()
    if mat.shared and not mat.values.requires_grad:  # a constant matrix: one dense copy per problem and dtype
        return _DENSE.get(mat, ("dense", dtype, str(mat.values.device)), build)
    return build()


_DENSE = SharedMemo()
"""Dense copies of shared (parameter-independent) matrices, by :func:`dense_batch`; callers must not write to
them."""


def matvec(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y_i = M_i x_i`` for ``mat`` of shape ``(1 or B, r, c)`` and ``x`` (B, c); returns (B, r).

    Computed as the row vectors ``x_i' M_i'``: with torch 2.13 on the CPU, in float64, a batched product of ``(1, c)``
    rows with ``(c, r)`` matrices is 3-8x faster than the same product as ``(r, c)`` matrices with ``(c, 1)`` columns
    (measured: batch 64 of 36 x 36, 13 against 47 us; batch 8 of 500 x 500, 0.19 against 1.46 ms); every batched
    matrix-vector product of the package is written this way."""
    if mat.shape[0] == 1:
        return x @ mat[0].mT
    return torch.bmm(x.unsqueeze(1), mat.mT).squeeze(1)


def rmatvec(mat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x_i = M_i' y_i`` for ``mat`` of shape ``(1 or B, r, c)`` and ``y`` (B, r); returns (B, c)."""
    if mat.shape[0] == 1:
        return y @ mat[0]
    return torch.bmm(y.unsqueeze(1), mat).squeeze(1)


DENSE_ROW_FRACTION = 0.1
""":class:`ConstantMatrix` multiplies a row with at least this share of its columns nonzero (and at least
:data:`DENSE_ROW_MIN` nonzeros) as part of a dense block."""

DENSE_ROW_MIN = 256
"""The fewest nonzeros of a row :class:`ConstantMatrix` multiplies densely within a CSR matrix (a small matrix is
dense as a whole: :data:`SMALL_DENSE_ENTRIES`)."""

SMALL_DENSE_ENTRIES = 4096
SMALL_DENSE_PER_NONZERO = 20
""":class:`ConstantMatrix` stores a whole matrix densely when its ``r * c`` entries are at most
``SMALL_DENSE_ENTRIES + SMALL_DENSE_PER_NONZERO * nnz``: a torch CSR product costs about 15 us per call plus 1 ns
per nonzero and batch row, a dense one about 0.05 ns per entry and batch row (torch 2.13, CPU, float64, 1 thread;
batch 64, ``M x`` / ``M' y``: the layer benchmark's QP, ``60 x 40`` with 1220 nonzeros, 29 / 29 us as CSR against 9 /
7 us dense; its SOCP, ``72 x 22`` with 382, 26 / 23 against 7 / 6 us; random ``82 x 37`` with 120, 26 / 24 against 9
/ 9 us; its SDP's ``108 x 100`` with 172 (33 us either way), random ``300 x 120`` with 600 (49 / 42 against 62 / 60
us) and ``1000 x 500`` with 3000 (212 / 179 against 862 / 930 us) stay CSR)."""

DENSE_BLOCK_ENTRIES = 2 ** 24
"""The most entries of :class:`ConstantMatrix`'s dense block (128 MB in float64; its densest rows first): a dense row
stores up to ten times its nonzeros."""

BLOCK_COLUMNS_FRACTION = 0.75
""":class:`ConstantMatrix`'s dense block keeps only the columns its rows use where they are at most this share of
all."""


class ConstantMatrix:
    """Products of batches with one constant 2-D matrix ``M`` (``r x c``, dense or sparse COO) and with ``M'``.

    A small matrix (:data:`SMALL_DENSE_ENTRIES`) is stored and multiplied densely, as a whole. In a larger one,
    its dense rows (:data:`DENSE_ROW_FRACTION`, :data:`DENSE_ROW_MIN`) are a dense block multiplied by BLAS (over
    the columns they use where that is at most :data:`BLOCK_COLUMNS_FRACTION` of them), the others a CSR matrix
    (torch's CSR support, which it calls beta: its warning is silenced here). Torch's CSR product runs about 3
    GFLOP/s on one thread where a dense one runs 5-10: portfolio large's ``A`` (``3031 x 3030``, 96030 nonzeros,
    93030 of them in 31 rows), batch 1 / 8 / 64, ``M x`` 0.12 / 0.21 / 2.2 ms as CSR alone against 0.04 / 0.17 /
    0.9 ms split, ``M' y`` 0.09 / 0.21 / 1.4 against 0.04 / 0.15 / 0.8; lasso large (its 500 data rows, 1000 of
    2500 columns nonzero in each, 1500 used by them), ``M x`` 0.54 / 0.75 / 7.0 against 0.14 / 0.53 / 2.9 ms,
    ``M' y`` 0.54 / 0.76 / 6.5 against 0.14 / 0.54 / 3.1 (torch 2.13, CPU, float64; the tests check these products
    against dense ones).

    Attributes:
        dtype: the stored values' dtype (products take batches of it).
        shape: ``(r, c)``.
    """

    def __init__(self, mat: torch.Tensor):
        coo = (mat if mat.is_sparse else mat.to_sparse()).coalesce()
        (r, c), idx, val = tuple(coo.shape), coo.indices(), coo.values()
        self.dtype, self.shape = val.dtype, (r, c)
        counts = torch.bincount(idx[0], minlength=r)
        dense = counts >= max(DENSE_ROW_FRACTION * c, DENSE_ROW_MIN)
        small = r * c <= SMALL_DENSE_ENTRIES + SMALL_DENSE_PER_NONZERO * val.numel()  # all of it dense
        dense |= small
        densest = torch.argsort(counts, descending=True, stable=True)[max(1, DENSE_BLOCK_ENTRIES // max(c, 1)):]
        dense[densest] = False  # the block's cap
        self.rows = torch.nonzero(dense).flatten()  # the dense block's rows of M, in order
        in_block = dense[idx[0]]
        # the block's columns: all, or where most columns hold none of its nonzeros (lasso's data rows: 1500 of
        # 2500), only those that do (a gathered batch, fewer flops)
        used = torch.zeros(c, dtype=torch.bool, device=val.device)
        used[idx[1, in_block]] = True
        if small or int(used.sum()) > BLOCK_COLUMNS_FRACTION * c:
            used[:] = True
        self.cols = None if bool(used.all()) else torch.nonzero(used).flatten()  # None: every column
        self.block = torch.zeros(self.rows.numel(), int(used.sum()), dtype=val.dtype, device=val.device)
        self.block[(torch.cumsum(dense, 0) - 1)[idx[0, in_block]], (torch.cumsum(used, 0) - 1)[idx[1, in_block]]] = (
            val[in_block])
        rest = torch.sparse_coo_tensor(idx[:, ~in_block], val[~in_block], (r, c), check_invariants=True).coalesce()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.csr, self.csr_t = rest.to_sparse_csr(), rest.t().coalesce().to_sparse_csr()
        self.dense = self.rows.numel() == r and self.cols is None  # the block is M itself: no CSR product

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """``M x_i`` for every row ``x_i`` of ``x`` (B, c): (B, r), contiguous."""
        if self.dense:
            return x @ self.block.T
        y = csr_matvec(self.csr, x)
        if not self.rows.numel():
            return y
        return y.index_add_(1, self.rows, (x if self.cols is None else x.index_select(1, self.cols)) @ self.block.T)

    def rmv(self, y: torch.Tensor) -> torch.Tensor:
        """``M' y_i`` for every row ``y_i`` of ``y`` (B, r): (B, c), contiguous."""
        if self.dense:
            return y @ self.block
        x = csr_matvec(self.csr_t, y)
        if not self.rows.numel():
            return x
        part = y.index_select(1, self.rows)
        return x.addmm_(part, self.block) if self.cols is None else x.index_add_(1, self.cols, part @ self.block)


def csr_matvec(csr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``csr x_i`` for every row ``x_i`` of ``x`` (B, c), as a contiguous (B, r) tensor.

    The product runs on ``x.mT``; its result, transposed back, is copied into rows: a batch left in that transposed
    layout makes the batched products that use it later 3-4x slower (torch 2.13, CPU, float64: the PSD Jacobian's
    blocks applied to 64 rows of 36, 124 against 33 us), for a copy of a few microseconds."""
    return (csr @ x.mT).mT.contiguous()


def _ones_coo(rows: torch.Tensor, cols: torch.Tensor, ones: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), ones, shape, check_invariants=True).coalesce()


PATTERN_MEMO = 16
"""How many sparsity patterns :func:`_pattern_parts` keeps (each of at most :data:`PATTERN_MEMO_NNZ` entries; the
oldest goes first)."""

PATTERN_MEMO_NNZ = 2 ** 20
"""Larger patterns are not kept (their parts take about 56 bytes per entry; their products cost more than
building them)."""

_PATTERNS = SharedMemo(limit=PATTERN_MEMO)


def _pattern_parts(mat: SparseBatch, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The value-independent parts of a :class:`SparseOperator` of ``mat``'s pattern (row and column of each entry,
    the 0/1 summing matrices), built once per pattern (the identity of its index arrays), dtype and device:
    operators of other values on the same pattern (a batch's matrix with rows masked, one per candidate active set:
    about 40% of such a solve's time went to building them) share them. Read-only."""
    def build() -> tuple[torch.Tensor, ...]:
        rows, cols = mat.coo()
        nnz = rows.shape[0]
        rows_t, cols_t = torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
        ones = torch.ones(nnz, dtype=dtype, device=device)
        k = torch.arange(nnz, device=device)
        return (rows_t, cols_t, _ones_coo(rows_t, k, ones, (mat.shape[0], nnz)),
                _ones_coo(cols_t, k, ones, (mat.shape[1], nnz)))
    if len(mat.indices) > PATTERN_MEMO_NNZ:
        return build()
    return _PATTERNS.get_pattern(mat, (dtype, str(device)), build)


class SparseOperator:
    """A batch of sparse matrices with one pattern, applied in ``O(B nnz)`` per product.

    ``y_i = M_i x_i`` is computed as a gather, a product with the stored values and a sum into the rows; the
    sum is a product with the constant 0/1 sparse matrix ``E[row_k, k] = 1`` (a COO ``torch.sparse.mm``, much
    faster on the CPU than ``index_add`` along the batch's inner dimension). Work is done in the transposed
    ``(nnz, B)`` layout so that gathers and sums run over contiguous rows.

    Args:
        mat: the batch; its ``values`` are kept (with their autograd graph) in dtype ``dtype``.
        dtype: working dtype.
    """

    def __init__(self, mat: SparseBatch, dtype: torch.dtype):
        device = mat.values.device
        self.shape = tuple(mat.shape)
        self.rows, self.cols, self.sum_rows, self.sum_cols = _pattern_parts(mat, dtype, device)
        self.values_t = (mat.values[:1] if mat.shared else mat.values).to(dtype).mT.contiguous()  # (nnz, B)
        self.constant = None
        if mat.shared and not mat.values.requires_grad:  # one constant matrix: its own products (5-20x faster here)
            self.constant = ConstantMatrix(torch.sparse_coo_tensor(
                torch.stack([self.rows, self.cols]), self.values_t[:, 0], self.shape, check_invariants=True))

    def take(self, index: torch.Tensor) -> SparseOperator:
        """The operator on the batch's instances ``index`` (itself where the values are shared)."""
        if self.values_t.shape[1] == 1:
            return self
        out = copy.copy(self)
        out.values_t = self.values_t[:, index]
        return out

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``M_i x_i`` for ``x`` (B, c) -> (B, r)."""
        if self.constant is not None and x.dtype == self.constant.dtype:
            return self.constant.mv(x)
        prod = x.mT.contiguous().index_select(0, self.cols) * self.values_t
        return torch.sparse.mm(self.sum_rows, prod).mT.contiguous()

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``M_i' y_i`` for ``y`` (B, r) -> (B, c)."""
        if self.constant is not None and y.dtype == self.constant.dtype:
            return self.constant.rmv(y)
        prod = y.mT.contiguous().index_select(0, self.rows) * self.values_t
        return torch.sparse.mm(self.sum_cols, prod).mT.contiguous()


_SHARED_OPERATORS = SharedMemo()


def sparse_operator(mat: SparseBatch, dtype: torch.dtype) -> SparseOperator:
    """:class:`SparseOperator` of ``mat``: built once for a shared batch without a gradient
    (:class:`~amortcvx.canon.data.SharedMemo`), on every call otherwise."""
    if not mat.shared or mat.values.requires_grad:
        return SparseOperator(mat, dtype)
    return _SHARED_OPERATORS.get(mat, (dtype, str(mat.values.device)), lambda: SparseOperator(mat, dtype))


def spmv(mat: SparseBatch, x: torch.Tensor) -> torch.Tensor:
    """``y_i = M_i x_i`` for a :class:`SparseBatch` and ``x`` of shape ``(B, c)`` without densifying ``M``."""
    return sparse_operator(mat, x.dtype).matvec(x)


def _as_rows(d: torch.Tensor | float, size: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A positive diagonal as a tensor of shape ``(1 or B, size)``."""
    t = torch.as_tensor(d, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(1, size)
    elif t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[1] != size:
        raise ValueError(f"{name} must be a scalar, shape ({size},) or (B, {size}); got {tuple(t.shape)}")
    return t


class _SparseLUSolve(torch.autograd.Function):
    """``X = K^-1 R`` for right-hand sides ``R`` (B, N) with a host SuperLU factor of a symmetric ``K``."""

    @staticmethod
    def forward(ctx, rhs: torch.Tensor, lu) -> torch.Tensor:  # type: ignore[override]
        ctx.lu = lu
        return _SparseLUSolve.apply_lu(lu, rhs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # K is symmetric: the adjoint of R -> K^-1 R is G -> K^-1 G.
        return _SparseLUSolve.apply_lu(ctx.lu, grad), None

    @staticmethod
    def apply_lu(lu, rhs: torch.Tensor) -> torch.Tensor:
        arr = rhs.detach().to(torch.float64).numpy()
        out = lu.solve(np.ascontiguousarray(arr.T))
        return torch.from_numpy(np.ascontiguousarray(out.T)).to(rhs.dtype)


class KKTSolver:
    """Factor ``K = [[P + D_x, A'], [A, -D_y]]`` for a batch and solve ``K [u; w] = [r_x; r_y]``.

    Args:
        A: constraint matrices ``(m, n)`` as a :class:`SparseBatch`.
        P: quadratic terms ``(n, n)`` (full symmetric), or None.
        d_x: positive diagonal of the primal block: scalar, ``(n,)`` or ``(B, n)``.
        d_y: positive diagonal of the dual block: scalar, ``(m,)`` or ``(B, m)``.
        dtype: working dtype of the solves.
        method: ``"auto"``, ``"kkt"``, ``"inverse"``, ``"cholesky"`` or ``"sparse"`` (see the module doc).
        factor_dtype: dtype of the factorization (float64 by default: with ``d_x = 1e-6`` the Schur
            complement is often too ill-conditioned for a float32 Cholesky); the result is cast to ``dtype``.
        strict: raise when a Schur complement is not positive definite (numerically). With ``strict=False``
            such instances are marked in ``failed`` instead, and their solves return NaN.
        schur: ``S = P + D_x + A' D_y^-1 A`` (``(1 or B, n, n)``) where the caller has formed it (for example from
            a part shared by many calls, :func:`~amortcvx.iterations.polish.equality_qp`); factored instead of
            formed here. Not with ``method="sparse"``.

    Attributes:
        method: the method in use (``"auto"`` resolved).
        n, m: block sizes.
        batch_size: number of factorizations held (1 when shared by the batch).
        failed: bool ``(batch_size,)``, the instances whose factorization failed (all False unless
            ``strict=False``).

    Raises:
        ValueError: bad shapes, an unknown method, ``"sparse"`` where it does not apply, a problem beyond the
            dense limit under ``"auto"``, or a Schur complement that is not positive definite.
    """

    def __init__(self, A: SparseBatch, P: SparseBatch | None, d_x, d_y, *, dtype: torch.dtype,
                 method: str = "auto", factor_dtype: torch.dtype = torch.float64, strict: bool = True,
                 schur: torch.Tensor | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown linear-system method {method!r}; expected one of {METHODS}")
        m, n = A.shape
        if P is not None and tuple(P.shape) != (n, n):
            raise ValueError(f"P has shape {tuple(P.shape)}, but A has shape {(m, n)}: P must be ({n}, {n})")
        device = A.values.device
        self.n, self.m, self.dtype, self.device = n, m, dtype, device
        ref = torch.empty((), dtype=dtype, device=device)
        d_x = _as_rows(d_x, n, "d_x", ref)
        d_y = _as_rows(d_y, m, "d_y", ref)
        shared = A.shared and (P is None or P.shared) and d_x.shape[0] == 1 and d_y.shape[0] == 1
        constant = not (A.values.requires_grad or (P is not None and P.values.requires_grad)
                        or d_x.requires_grad or d_y.requires_grad)
        sparse_ok = shared and device.type == "cpu" and constant
        if method == "auto":
            if sparse_ok and n + m > SPARSE_AUTO_MIN:
                method = "sparse"
            elif shared and n + m <= KKT_LIMIT:
                method = "kkt"
            elif n <= DENSE_LIMIT:
                method = "inverse"
            elif sparse_ok:
                method = "sparse"
            else:
                raise ValueError(
                    f"n = {n} variables exceeds the dense limit ({DENSE_LIMIT}), and the sparse path needs "
                    "shared, constant A and P on the CPU; pass method='inverse' or 'cholesky' to factor "
                    "densely")
        self.method = method
        self.kinv = self.S_inv = self.L = None
        self._pending = None  # (source, index) of a :meth:`take` not gathered yet
        if method == "sparse":
            if schur is not None:
                raise ValueError("method='sparse' factors the KKT matrix itself; it takes no Schur complement")
            if not shared:
                raise ValueError("method='sparse' needs A, P and the diagonals shared by the whole batch")
            if device.type != "cpu":
                raise ValueError(f"method='sparse' runs on the CPU only; the data are on {device}")
            if not constant:
                raise ValueError("method='sparse' cannot differentiate with respect to A, P or the "
                                 "diagonals; use method='kkt', 'inverse' or 'cholesky'")
            self.batch_size = 1
            self.failed = torch.zeros(1, dtype=torch.bool, device=device)  # splu raises on a singular K
            self._setup_sparse(A, P, d_x, d_y)
            return
        fdt = factor_dtype if device.type != "mps" else torch.float32
        chol = self._schur_cholesky(A, P, d_x.to(fdt), d_y.to(fdt), fdt, strict, schur)
        self.batch_size = int(chol.shape[0])
        self.inv_dy = (1.0 / d_y).to(dtype)
        # Products with A (not needed by "kkt"): dense when A is at least 25% full or shared and small
        # (GEMMs), else gather / scatter over the stored entries.
        self.A_dense = self.A_op = None
        if method != "kkt":
            if 4 * A.nnz >= m * n or (A.shared and m * n <= _DENSE_SHARED_A):
                self.A_dense = dense_batch(A, dtype=dtype)
            else:
                self.A_op = SparseOperator(A, dtype)
        if method == "cholesky":
            self.L = chol.to(dtype).contiguous()
        elif method == "inverse":
            # contiguous: LAPACK returns batched results column-major, which halves bmm's speed
            self.S_inv = torch.cholesky_inverse(chol).to(dtype).contiguous()
        else:  # "kkt"
            s_inv = torch.cholesky_inverse(chol)
            a = dense_batch(A, dtype=fdt)
            inv_dy = 1.0 / d_y.to(fdt)
            e = torch.matmul(s_inv, a.mT) * inv_dy.unsqueeze(1)  # S^-1 A' D^-1, (b, n, m)
            bottom = torch.matmul(a * inv_dy.unsqueeze(-1), e) - torch.diag_embed(inv_dy)
            nb = bottom.shape[0]
            kinv = torch.cat([torch.cat([s_inv.expand(nb, n, n), e.expand(nb, n, m)], 2),
                              torch.cat([e.mT.expand(nb, m, n), bottom], 2)], 1)
            self.kinv = (0.5 * (kinv + kinv.mT)).to(dtype).contiguous()
            self.batch_size = int(self.kinv.shape[0])

    def _schur_cholesky(self, A: SparseBatch, P: SparseBatch | None, d_x: torch.Tensor, d_y: torch.Tensor,
                        fdt: torch.dtype, strict: bool = True, schur: torch.Tensor | None = None) -> torch.Tensor:
        """Cholesky factor of ``S = P + D_x + A' D_y^-1 A``, ``(1 or B, n, n)``, formed in chunks (or ``schur``,
        the caller's).

        Sets ``self.failed``; a failed factor (``strict=False``) is NaN, so its solves are NaN.
        """
        if schur is not None:
            if schur.shape[-2:] != (self.n, self.n) or schur.dim() != 3:
                raise ValueError(f"schur must have shape (1 or B, {self.n}, {self.n}); got {tuple(schur.shape)}")
            return self._factor(0.5 * (schur + schur.mT).to(fdt), strict)
        n = self.n
        batch = max(1 if A.shared else A.batch_size, 1 if P is None or P.shared else P.batch_size,
                    d_x.shape[0], d_y.shape[0])
        chunks = []
        for start in range(0, batch, _SETUP_CHUNK):
            stop = min(batch, start + _SETUP_CHUNK)

            def part(t: torch.Tensor, start=start, stop=stop) -> torch.Tensor:
                return t if t.shape[0] == 1 else t[start:stop]

            a = dense_batch(A if A.shared else _rows(A, start, stop), dtype=fdt)
            s = torch.matmul(a.mT, a / part(d_y).unsqueeze(-1))
            if P is not None:
                s = s + dense_batch(P if P.shared else _rows(P, start, stop), dtype=fdt)
            s = s + torch.diag_embed(part(d_x)).expand(s.shape[0], n, n)
            chunks.append(0.5 * (s + s.mT))  # exact symmetry: the Cholesky reads one triangle
        return self._factor(torch.cat(chunks) if len(chunks) > 1 else chunks[0], strict)

    def _factor(self, s: torch.Tensor, strict: bool) -> torch.Tensor:
        """Cholesky factor of the symmetric ``s``; sets ``self.failed`` (see :meth:`_schur_cholesky`)."""
        chol, info = torch.linalg.cholesky_ex(s)
        self.failed = info != 0
        if not strict:
            return torch.where(self.failed[:, None, None], torch.nan, chol)
        if bool(self.failed.any()):
            bad = int(torch.nonzero(info)[0, 0])
            raise ValueError(
                f"the Schur complement P + D_x + A' D_y^-1 A of instance {bad} is not positive definite; "
                "P must be positive semidefinite (and symmetric, stored in full)")
        return chol

    def _setup_sparse(self, A: SparseBatch, P: SparseBatch | None, d_x: torch.Tensor,
                      d_y: torch.Tensor) -> None:
        a = A.matrix(0)
        top = sp.diags_array(d_x[0].detach().to("cpu", torch.float64).numpy())
        if P is not None:
            top = top + P.matrix(0)
        bottom = sp.diags_array(-d_y[0].detach().to("cpu", torch.float64).numpy())
        kkt = sp.block_array([[top, a.T], [a, bottom]], format="csc")
        self._lu = spla.splu(kkt)

    def take(self, index: torch.Tensor) -> KKTSolver:
        """This factorization on the batch's instances ``index`` (a 1-D int64 tensor, any order, repeats allowed; row
        ``r`` is instance ``index[r]``): itself where the factorization is shared by the batch, else a solver whose
        per-instance factors are gathered from this one on its first solve (nothing is factored again, and a caller
        that never solves, such as a ranking of candidates by their optimality residual, copies nothing)."""
        if self.batch_size == 1:
            return self
        out = copy.copy(self)
        out.batch_size = int(index.numel())
        out.failed = self.failed[index]
        out._pending = (self, index) if self._pending is None else (self._pending[0], self._pending[1][index])
        out.L = out.S_inv = out.kinv = out.inv_dy = out.A_dense = out.A_op = None  # gathered on the first solve
        return out

    def _gather(self) -> None:
        """Gather the per-instance parts of a :meth:`take` from its source, once (before the first solve)."""
        if self._pending is None:
            return
        source, index = self._pending

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[index]
        self.L, self.S_inv, self.kinv, self.inv_dy, self.A_dense = (
            rows(t) for t in (source.L, source.S_inv, source.kinv, source.inv_dy, source.A_dense))
        self.A_op = None if source.A_op is None else source.A_op.take(index)
        self._pending = None

    def _a(self, x: torch.Tensor) -> torch.Tensor:
        return matvec(self.A_dense, x) if self.A_op is None else self.A_op.matvec(x)

    def _at(self, y: torch.Tensor) -> torch.Tensor:
        return rmatvec(self.A_dense, y) if self.A_op is None else self.A_op.rmatvec(y)

    def solve_packed(self, r: torch.Tensor) -> torch.Tensor:
        """``K_i^-1 r_i`` for ``r`` of shape (B, n + m); returns (B, n + m)."""
        self._gather()
        if self.method == "sparse":
            return _SparseLUSolve.apply(r, self._lu)
        if self.method == "kkt":
            return rmatvec(self.kinv, r)  # K^-1 is symmetric
        u, w = self.solve(r[:, : self.n], r[:, self.n:])
        return torch.cat([u, w], dim=1)

    def solve(self, r_x: torch.Tensor, r_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``K [u; w] = [r_x; r_y]`` for a batch: ``r_x`` (B, n), ``r_y`` (B, m) -> (B, n), (B, m)."""
        if self.method in ("sparse", "kkt"):
            out = self.solve_packed(torch.cat([r_x, r_y], dim=1))
            return out[:, : self.n], out[:, self.n:]
        self._gather()
        t = r_x + self._at(r_y * self.inv_dy)
        if self.method == "inverse":
            u = rmatvec(self.S_inv, t)  # S^-1 is symmetric; the row-vector form is the faster bmm
        else:
            u = cholesky_solve(self.L, t)
        w = (self._a(u) - r_y) * self.inv_dy
        return u, w


def cholesky_solve(L: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(L_i L_i')^-1 b_i`` for the rows of ``b`` (B, k) and lower factors ``L`` (B or 1, k, k): two triangular
    solves. ``torch.cholesky_solve`` costs 3-5 times as much on the CPU where the factor has many zeros (MKL,
    float64, one thread, 100 factors of 95 x 95 from the active sets of huber_fit small, 90% zeros: 2.4 against 0.47
    ms; on dense random factors 0.62 against 0.47 ms)."""
    if L.shape[0] == 1:  # one factor for every row: one solve with the rows as columns
        y = torch.linalg.solve_triangular(L[0], b.mT, upper=False)
        return torch.linalg.solve_triangular(L[0].mT, y, upper=True).mT
    y = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)


class FactorCache:
    """Parameter-independent factorizations, kept across calls for one problem.

    When ``A`` and ``P`` of a batch are shared by every instance (no parameter enters them) and carry no
    gradient, the factorization of ``K`` does not depend on the parameters: :func:`amortcvx.iterations.scs.scs_setup`
    and :func:`amortcvx.iterations.osqp.osqp_setup` then take it from this cache instead of factoring again.
    Entries are keyed by the identity of the shared ``A``/``P`` value tensors (a compiled problem hands out the
    same constant tensor on every call for a given device and dtype; the cache holds a reference, so the
    identity cannot be reused by another tensor), by the diagonals, the settings, the dtype and the device.

    Attributes:
        builds: number of factorizations computed (cache misses); the count a test or benchmark can read.
    """

    def __init__(self) -> None:
        self._store: dict = {}
        self.builds = 0

    @staticmethod
    def cacheable(A: SparseBatch, P: SparseBatch | None) -> bool:
        """Whether the factorization for ``A``, ``P`` is parameter-independent (shared and without gradient)."""
        return (A.shared and not A.values.requires_grad
                and (P is None or (P.shared and not P.values.requires_grad)))

    def get(self, key: tuple, A: SparseBatch, P: SparseBatch | None, build):
        """The cached value for ``key`` and these matrices, computing ``build()`` on a miss."""
        ident = (key, A.values.data_ptr(), None if P is None else P.values.data_ptr())
        hit = self._store.get(ident)
        if hit is None:
            hit = (build(), A.values, None if P is None else P.values)  # the references pin the identities
            self._store[ident] = hit
            self.builds += 1
        return hit[0]

    def clear(self) -> None:
        """Drop every cached factorization."""
        self._store.clear()


def _rows(mat: SparseBatch, start: int, stop: int) -> SparseBatch:
    return SparseBatch(mat.indices, mat.indptr, mat.shape, mat.values[start:stop], mat.shared)
