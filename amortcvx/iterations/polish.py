"""Active-set polishing of a warm start (LPs and QPs): guess the active constraints, solve for them exactly.

A fixed-point iteration approaches an LP's optimal vertex slowly, but usually knows early which constraints
hold with equality there. Polishing guesses that active set ``S`` from a primal-dual point and solves the
equality-constrained problem

    minimize 1/2 x'Px + q'x   subject to   A_i x = r_i  (i in S)

through its KKT system ``P x + q + A_S' y_S = 0``, ``A_S x = r_S`` (``y = 0`` off ``S``). When the guess is
right the result is the exact optimum, and the C solver started there stops at its first check. When it is
wrong the result can be far worse than the point it came from, so the caller keeps it only where it is better
(:class:`~amortcvx.deploy.AmortizedSolver` compares the fixed-point residuals of the C solver's first step from
either point). The same idea is OSQP's own ``polishing`` (run after the solve, with its final iterate).

Guess, per row, a score that is positive when the row looks active (the dual outweighs the slack):

* SCS (``Ax + s = b``, ``s`` in zero x nonnegative cones): zero-cone rows are always active; a nonnegative row's
  score is ``y_i - s_i``; the right-hand side is ``b``.
* OSQP (``l <= Ax <= u``, ``y = y_u - y_l``): equality rows (``l = u``) are always active; otherwise the lower
  bound scores ``-y_i - (z_i - l_i)`` and the upper ``y_i - (u_i - z_i)`` (``z = Ax``); a row takes its better
  side, and the right-hand side is that bound.

QP (``P`` given): the rows with a positive score; where :class:`EliminatedKKT` serves the guess, the solution's
own split is solved again, round after round, until it stops changing (primal-dual active-set rounds,
:func:`_active_set_rounds`). LP (no ``P``): the ``n`` rows with the highest scores (a
nondegenerate optimal vertex has exactly ``n`` active constraints; counting is far more robust than the sign
of a score when the point is still inexact). Forced rows are always in.

An LP's guess is often a swap or two away from the optimal vertex: with ``band > 0`` the active sets one or
two swaps away, between the last ``band`` rows in and the first ``band`` rows out, are solved too (``1 + band^2
+ (band (band - 1) / 2)^2`` candidates: 19 for ``band = 3``), and each instance keeps the candidate whose point
violates primal feasibility, dual feasibility and stationarity least (an optimal vertex, complementary by
construction, violates none; a singular active set leaves stationarity unmet). On the
transport family's small size, from the bare learned prediction, the one guess was the optimal vertex on 24%
of the instances and the 19 candidates contained it on 66% (``benchmarks/explore_active_set.py`` and
docs/training.md).

The KKT system (inactive rows of ``A`` zeroed, ``-y_i = 0`` there) is solved with the regularized
quasi-definite matrix ``[[P + delta I, A_S'], [A_S, -D]]`` of :class:`~amortcvx.iterations.linalg.KKTSolver`
(``D = delta`` on active rows, 1 off them), followed by ``passes`` steps of iterative refinement against the
unregularized system. Cost: one dense Cholesky factorization of an ``n x n`` matrix per instance (the active sets
differ), like the iterations' own setup when ``A`` or ``P`` depend on the parameters; where they do not and the
caller names the rows active in every split (a predictor's candidates, ``equality_qp(..., always=)``), one factor
of those rows' part, shared by the batch, and an ``r x r`` correction per instance for its ``r`` other active rows
(:class:`BorderedKKT`). Where ``A`` and ``P`` are shared and the active rows with one nonzero (bounds) fix most
variables, those variables are eliminated and each instance factors only its free variables' system
(:class:`EliminatedKKT`, before either of the others). An instance whose system cannot be factored (a wrong
guess can make it numerically singular) gets NaN, which the caller discards.

Only problems whose cones are zero and nonnegative (LPs and QPs) can be polished; :func:`check_polishable`
says so with the cones at fault.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from amortcvx.canon.data import ConeDims, SharedMemo, SparseBatch
from amortcvx.iterations.linalg import (
    KKTSolver,
    SparseOperator,
    batch_rows,
    cholesky_solve,
    dense_batch,
    flagged_rows,
    sparse_operator,
    spmv,
)

POLISHABLE_CONES = frozenset({"zero", "nonneg"})
"""Cone kinds a polishable cone program may have."""

BAND = 3
"""The rows on each side of an LP's cut whose swaps are tried as well (:func:`candidate_active_sets`)."""

DELTA = 1e-6
"""Regularization of the polishing KKT system (OSQP's ``delta`` default)."""
PASSES = 3
"""Iterative-refinement passes against the unregularized system (OSQP's ``polish_refine_iter`` default)."""


def polishable(cones: ConeDims) -> bool:
    """Whether every cone is zero or nonnegative (an LP / QP): what polishing a cone program needs."""
    return all(k in POLISHABLE_CONES for k in cones.kinds)


def polish_allowed(form: str, cones: ConeDims) -> bool:
    """Whether a problem of this form (``"cone"`` or ``"qp"``) and these cones can be polished: a QP-form problem
    always (its rows are bounds), a cone program where :func:`polishable`."""
    return form == "qp" or polishable(cones)


def eliminable(pp) -> bool:
    """Whether a compiled problem's polish stays cheap at any size: a QP whose ``A`` and ``P`` do not depend on the
    parameters and at least half of whose variables have a row with one nonzero (a bound), so that
    :class:`EliminatedKKT` serves the splits that hold most of them active (portfolio large)."""
    if not pp.quadratic or pp.dependent["A"] or pp.dependent["P"]:
        return False
    indices, indptr = pp.a_pattern
    cols = np.repeat(np.arange(pp.n), np.diff(indptr))
    return 2 * np.unique(cols[_alone(indices, pp.m)]).size >= pp.n


def _alone(rows: np.ndarray, m: int) -> np.ndarray:
    """Per entry of a matrix with ``m`` rows (its row indices ``rows``), whether it is its row's only one."""
    return np.bincount(rows, minlength=m)[rows] == 1


def check_polish_choice(form: str, cones: ConeDims, polish: bool) -> None:
    """Raise ValueError, naming the cones at fault, where ``polish`` is asked of a problem that cannot be polished
    (:func:`polish_allowed`)."""
    if polish and not polish_allowed(form, cones):
        check_polishable(cones)


def check_polishable(cones: ConeDims) -> None:
    """Raise ValueError, naming the cones at fault, unless every cone is zero or nonnegative (an LP / QP)."""
    if not polishable(cones):
        other = [k for k in cones.kinds if k not in POLISHABLE_CONES]
        raise ValueError(f"polishing needs an LP or QP (zero and nonnegative cones only); this problem also has "
                         f"{', '.join(other)} cones")


def guess_active(score: torch.Tensor, forced: torch.Tensor, vertex: int | None) -> torch.Tensor:
    """The guessed active set, bool ``(B, m)``.

    Args:
        score: ``(B, m)``, positive where a row looks active.
        forced: bool ``(m,)`` or ``(B, m)``, rows that are always active (equalities).
        vertex: for an LP, the number of variables ``n``: the ``n`` highest-scoring rows are taken (forced rows
            first); None (QP): the rows with a positive score.
    """
    forced = forced.expand_as(score)
    if vertex is None:
        return forced | (score > 0)
    ranked = torch.where(forced, torch.inf, torch.nan_to_num(score, nan=-torch.inf))
    top = ranked.topk(min(vertex, score.shape[1]), dim=1).indices
    return forced | torch.zeros_like(forced).scatter(1, top, True)


def candidate_active_sets(score: torch.Tensor, forced: torch.Tensor, vertex: int | None, band: int) -> torch.Tensor:
    """The guess of :func:`guess_active` and, for an LP, the active sets one or two swaps away from it within
    ``band`` rows of the cut: bool ``(C, B, m)``, the guess first. A QP (``vertex`` None) or ``band = 0``: the
    guess alone."""
    guess = guess_active(score, forced, vertex)
    forced = forced.expand_as(score)
    free = int((~forced).sum(dim=1).min())  # rows that can move in or out
    taken = max(0, vertex - int(forced.sum(dim=1).max())) if vertex is not None else 0
    band = min(band, taken, free - taken) if vertex is not None else 0
    if band <= 0:
        return guess.unsqueeze(0)
    ranked = torch.where(forced, -torch.inf, torch.nan_to_num(score, nan=-torch.inf)).argsort(dim=1, descending=True)
    last_in, first_out = ranked[:, taken - band:taken], ranked[:, taken:taken + band]  # free rows, by score
    rows = torch.arange(score.shape[0], device=score.device)
    out = [guess]
    for k in (1, 2):
        for a in itertools.combinations(range(band), k):
            for b in itertools.combinations(range(band), k):
                c = guess.clone()
                c[rows.unsqueeze(1), last_in[:, list(a)]] = False
                c[rows.unsqueeze(1), first_out[:, list(b)]] = True
                out.append(c)
    return torch.stack(out)


def _tiled(t, copies: int, batch: int):
    """A batch tensor (or :class:`SparseBatch`) of ``batch`` instances repeated ``copies`` times along the batch
    (candidate-major); shared matrices stay shared."""
    if t is None or copies == 1:
        return t
    if isinstance(t, SparseBatch):
        values = t.values[:1].expand(copies * batch, -1) if t.shared else t.values.repeat(copies, 1)
        return SparseBatch(t.indices, t.indptr, t.shape, values, t.shared)
    return t.expand(batch, *t.shape[1:]).repeat(copies, *([1] * (t.dim() - 1)))


def _stationarity(A: SparseBatch, P: SparseBatch | None, q: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
    """``||P x + q + A' y||_inf`` per instance: what an active set whose KKT system is singular leaves (the
    regularized solve then is no solution of it)."""
    grad = q + sparse_operator(A, q.dtype).rmatvec(y)
    if P is not None:
        grad = grad + spmv(P, x)
    return grad.abs().amax(dim=1)


def _best(points: dict[str, torch.Tensor], violation: torch.Tensor, copies: int) -> dict[str, torch.Tensor]:
    """Per instance, the candidate of least ``violation`` ((C B,), candidate-major; NaN counts as infinite)."""
    batch = violation.shape[0] // copies
    pick = torch.nan_to_num(violation, nan=torch.inf).reshape(copies, batch).argmin(dim=0)
    index = pick * batch + torch.arange(batch, device=pick.device)
    return {k: v[index] for k, v in points.items()}


BASE_ENTRIES = 2 ** 23
"""The largest dense ``A`` (entries over the batch) :func:`equality_qp` keeps with its ``always`` rows' Schur
complement (64 MB in float64); beyond it the Schur complement is formed per call, in chunks."""

BORDER_FRACTION = 0.5
"""At most this many other active rows per variable for :class:`BorderedKKT` (beyond, an ``r x r`` correction
costs about an ``n x n`` factorization)."""

_BASES = SharedMemo(limit=2)
"""Per batch of data (its ``A`` and ``P`` values), the dense ``A`` and the Schur complement of the rows active in
every split (:func:`equality_qp`'s ``always``): the splits of a predictor's candidates are solved one call each
on the same data."""


def equality_qp(A: SparseBatch, P: SparseBatch | None, q: torch.Tensor, rhs: torch.Tensor, active: torch.Tensor,
                *, delta: float = DELTA, passes: int = PASSES, always: torch.Tensor | None = None,
                start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``min 1/2 x'Px + q'x  s.t.  A_i x = rhs_i (active i)`` for a batch, with its multipliers.

    Args:
        A: ``(m, n)`` constraint matrices; P: ``(n, n)`` or None.
        q: ``(B, n)``; rhs: ``(B, m)`` (read on active rows only); active: bool ``(B, m)``.
        delta: regularization; passes: iterative-refinement passes.
        always: bool ``(m,)``, rows active in every instance (the cone form's zero rows), for callers that solve
            many splits on the same data: the Schur complement of these rows, ``P + delta I + A_F' A_F / delta``,
            is formed once per data (kept for the next call on the same ``A`` and ``P``, :data:`_BASES`) and each
            call adds only its other active rows, gathered (mpc_param_dyn small, ``A`` a parameter, 72 zero rows
            and about 3 active others of 232, batch 100: 38 -> 18 ms per split). The same solution to rounding.
        start: ``(x0, y0)``, ``(B, n)`` and ``(B, m)``: the refinement starts there instead of at the regularized
            solution from zero (one more pass). Where the reduced KKT system is singular but consistent (a degenerate
            LP's active set: more active rows than variables, or fewer, its optimal face wider than a point), its
            solutions form an affine set and the regularized passes move little along it: the result is then about
            the solution nearest the start, where from zero it is the one nearest the origin, which may violate the
            inactive rows or have multipliers of the wrong sign. With a start near an optimum, the optimal active
            set gives an optimum (degenerate_lp small, 200 instances, their true active sets, starts off the optimum
            by Gaussian noise of 1e-2: SCS's median C iterations 1 from the result, 75% within one iteration; from
            zero, 60.5; docs/training.md). Where the system is nonsingular the solution is the same either way (to
            the regularization left after refinement).

    Returns:
        ``x`` (B, n) and ``y`` (B, m), zero off the active rows, with ``P x + q + A' y = 0`` (up to the
        regularization left after refinement; exact for a nonsingular reduced KKT system).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if passes < 0:
        raise ValueError(f"passes must be nonnegative; got {passes}")
    on = active.to(q.dtype)
    # K = [[P, A_S'], [A_S, -(1 - on)]] (an inactive row reads -y_i = 0); the factored K_delta adds delta I to
    # the first block and -delta I to the active rows of the second. Instances whose K_delta cannot be factored
    # (numerically singular) come out NaN.
    solver = EliminatedKKT.of(A, P, active, delta, q.dtype)
    if solver is None and always is not None:
        solver = BorderedKKT.of(A, P, active, always, delta, q.dtype)
    if solver is not None:  # A shared: its products masked to the active rows, no copy of A per instance
        shared = sparse_operator(A, q.dtype)
        a_mv, a_rmv = (lambda v: on * shared.matvec(v)), (lambda v: shared.rmatvec(on * v))
    else:
        batch = active.shape[0]
        rows = torch.as_tensor(A.coo()[0], device=active.device)
        values = A.values.expand(batch, -1) if A.shared else A.values
        a_act = SparseBatch(A.indices, A.indptr, A.shape, values * active[:, rows], False)  # inactive rows zeroed
        schur = None if always is None else _active_schur(A, P, active, always, delta, q.dtype)
        solver = KKTSolver(a_act, P, delta, 1.0 - (1.0 - delta) * on, dtype=q.dtype, method="cholesky",
                           strict=False, schur=schur)
        a_op = SparseOperator(a_act, q.dtype)
        a_mv, a_rmv = a_op.matvec, a_op.rmatvec
    p_op = None if P is None else sparse_operator(P, q.dtype)
    r_x, r_y = -q, torch.where(active, rhs, 0.0)  # rhs may be infinite off the active rows
    if start is None:
        x, y = solver.solve(r_x, r_y)
    else:  # the first pass from the start is the solve from zero's counterpart
        x, y = start[0].to(q), torch.where(active, start[1].to(q), 0.0)
        passes += 1
    for _ in range(passes):
        kx = a_rmv(y) if p_op is None else p_op.matvec(x) + a_rmv(y)
        ky = a_mv(x) - (1.0 - on) * y
        dx, dy = solver.solve(r_x - kx, r_y - ky)
        x, y = x + dx, y + dy
    return x, on * y


ELIMINATED_FRACTION = 0.5
""":class:`EliminatedKKT` serves an instance whose factored system (free variables and other active rows, or with a
diagonal ``P`` the other active rows alone) has an order of at most this fraction of ``n``."""

_STRUCTURE = SharedMemo()
"""Per shared constant matrix, what :class:`EliminatedKKT` reads from it once: ``A``'s rows with one nonzero
(:meth:`~EliminatedKKT.single_rows`), ``P``'s diagonal (:meth:`~EliminatedKKT.diagonal`)."""


class EliminatedKKT:
    """:func:`equality_qp`'s KKT solves where active bounds fix most variables: an active row with one nonzero (a
    bound, ``a_i x_j = r_i``) fixes its variable, and what is left is a small dense system per instance over the
    free variables and the other active rows, where ``A`` and ``P`` are shared.

    With the active one-variable rows ``B``, the variables ``J`` they fix, the other variables ``F`` and the other
    active rows ``E``, the KKT system ``K [u; w] = [r_x; r_y]`` (``K = [[P, A_S'], [A_S, -D]]``, ``D`` 1 off the
    active rows) gives ``u_J = r_B / a_B``; then ``[[P_FF + delta I, A_EF'], [A_EF, -delta I]] [u_F; w_E] = [r_x -
    P u_J; r_y - A u_J]`` on ``F`` and ``E``, regularized as :class:`~amortcvx.iterations.linalg.KKTSolver` does, by
    its Schur complement ``P_FF + delta I + A_EF' A_EF / delta`` (``f x f``, one Cholesky per instance), or where
    ``P`` is diagonal by the other one, ``delta I + A_EF D^-1 A_EF'`` (``e x e``, ``D = P_FF + delta I``); then
    ``w_B = (r_x - P u - A_E' w_E)_J / a_B``, and ``w = -r_y`` off the active rows. Only the reduced block is
    regularized, so :func:`equality_qp`'s refinement against ``K`` reaches the same solution as through the whole
    system. Where the long-only portfolio's 3000 weights hold about 25 nonzero at the optimum (portfolio large,
    diagonal ``P``), an active set costs a ``31 x 31`` factorization here against a ``3030 x 3030`` one: its optimal
    active set's solve took 1.1 ms per instance at batch 8 against 2.3 s (SCS form, the same solution to ``1e-14``).
    """

    def __init__(self, A: SparseOperator, P: SparseOperator | None, single: tuple[torch.Tensor, ...],
                 fixing: torch.Tensor, free: torch.Tensor, free_on: torch.Tensor, other: torch.Tensor,
                 other_on: torch.Tensor, a_ef: torch.Tensor, diag: torch.Tensor | None, chol: torch.Tensor,
                 active: torch.Tensor, delta: float):
        self.A, self.P, self.delta = A, P, delta
        self.rows, self.cols, self.vals = single
        self.fixing, self.free, self.free_on, self.other, self.other_on = fixing, free, free_on, other, other_on
        self.a_ef, self.diag, self.chol, self.active = a_ef, diag, chol, active

    @staticmethod
    def single_rows(A: SparseBatch, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(rows, cols, values)`` of the rows of a shared ``A`` with exactly one nonzero, memoized per ``A``."""
        def build() -> tuple[torch.Tensor, ...]:
            rows, cols = A.coo()
            values = A.values[0].detach().cpu().numpy()
            rows, cols = rows[values != 0], cols[values != 0]
            values = values[values != 0]
            pick = _alone(rows, A.shape[0])
            return tuple(torch.as_tensor(t).to(device) for t in (rows[pick], cols[pick])) + (
                torch.as_tensor(values[pick], dtype=dtype, device=device),)
        return _STRUCTURE.get(A, ("single", dtype, str(device)), build)

    @classmethod
    def parts(cls, A: SparseBatch, P: SparseBatch | None, active: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """``(serving, fixing, fixed, other, single)``: per instance whether this solver serves its active rows
        ``(B,)`` (no variable with two active one-variable rows, a degenerate bound pair; a factored system within
        :data:`ELIMINATED_FRACTION` ``n``: the free variables and other active rows, or with a diagonal ``P`` the
        other active rows alone), the active one-variable rows ``(B, s)`` (bool, over :meth:`single_rows`),
        the variables they fix ``(B, n)``, the other active rows ``(B, m)`` and the one-variable rows; None where it
        serves none: ``A`` or ``P`` per instance or carrying a gradient, or no one-variable row."""
        if not BorderedKKT.serves(A, P):
            return None
        single = cls.single_rows(A, torch.float64, active.device)
        rows, cols, _ = single
        if not rows.numel():
            return None
        fixing = active[:, rows]
        per_col = torch.zeros(active.shape[0], A.shape[1], dtype=torch.int32, device=active.device)
        per_col.scatter_add_(1, cols.expand(active.shape[0], -1), fixing.to(torch.int32))
        other = active.clone()
        other[:, rows] = False
        fixed = per_col > 0
        order = other.sum(dim=1) + (0 if cls.diagonal(P, torch.float64, active.device) is not None
                                    else (~fixed).sum(dim=1))
        serving = (per_col <= 1).all(dim=1) & (order <= ELIMINATED_FRACTION * A.shape[1])
        return serving, fixing, fixed, other, single

    @classmethod
    def sizes(cls, A: SparseBatch, P: SparseBatch | None, active: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """:meth:`parts` less ``serving`` where this solver serves every instance, else None."""
        found = cls.parts(A, P, active)
        if found is None or not bool(found[0].all()):
            return None
        return found[1:]

    @classmethod
    def serving(cls, A: SparseBatch, P: SparseBatch | None, active: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: the instances whose active rows this solver serves (:meth:`parts`)."""
        found = cls.parts(A, P, active)
        return torch.zeros(active.shape[0], dtype=torch.bool, device=active.device) if found is None else found[0]

    @classmethod
    def entries(cls, P: SparseBatch | None, fixed: torch.Tensor, other: torch.Tensor) -> int:
        """The dense entries per instance of a batch's reduced systems (:meth:`sizes`' parts): the other active
        rows' block over the free variables and the factored matrix."""
        if not fixed.shape[0]:
            return 0
        f, e = int((~fixed).sum(dim=1).max()), int(other.sum(dim=1).max())
        return e * f + (e * e if cls.diagonal(P, torch.float64, fixed.device) is not None else (f + e) ** 2)

    @classmethod
    def of(cls, A: SparseBatch, P: SparseBatch | None, active: torch.Tensor, delta: float, dtype: torch.dtype
           ) -> EliminatedKKT | None:
        """The solver for these active sets, or None where it does not serve (:meth:`sizes`)."""
        found = cls.sizes(A, P, active)
        if found is None:
            return None
        fixing, fixed, other_rows, (rows, cols, vals) = found
        B, device = active.shape[0], active.device
        free, free_on, pos_f = _packed(~fixed)
        other, other_on, pos_e = _packed(other_rows)
        f, e = free.shape[1], other.shape[1]
        a_ef = _gathered_block(A, pos_e, free, free_on, e, dtype)
        diagonal = cls.diagonal(P, dtype, device)
        if diagonal is not None:  # P_FF + delta I diagonal: the Schur complement on the E side, e x e
            diag = diagonal[free] * free_on + delta
            schur = (a_ef / diag.unsqueeze(1)) @ a_ef.mT + delta * torch.eye(e, dtype=dtype, device=device)
        else:
            diag = None
            schur = delta * torch.eye(f, dtype=dtype, device=device).expand(B, f, f)
            if P is not None:
                schur = schur + _gathered_block(P, pos_f, free, free_on, f, dtype)
            if e:
                schur = schur + a_ef.mT @ a_ef / delta
        chol, info = torch.linalg.cholesky_ex(0.5 * (schur + schur.mT))
        if bool((info != 0).any()):  # cannot be factored: NaN, as elsewhere
            chol = torch.where((info != 0)[:, None, None], torch.nan, chol)
        return cls(sparse_operator(A, dtype), None if P is None else sparse_operator(P, dtype),
                   (rows, cols, vals.to(dtype)), fixing.to(dtype), free, free_on.to(dtype), other, other_on.to(dtype),
                   a_ef, diag, chol, active, delta)

    @staticmethod
    def diagonal(P: SparseBatch | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """``P``'s diagonal ``(n,)`` where a shared ``P`` has no other nonzero, else None (and None for an LP, whose
        ``P_FF + delta I`` is ``delta I``: the ``f x f`` form then); memoized per ``P``."""
        if P is None:
            return None

        def build() -> torch.Tensor | None:
            rows, cols = P.coo()
            values = P.values[0].detach().cpu().numpy()
            if bool(((rows != cols) & (values != 0)).any()):
                return None
            diag = np.zeros(P.shape[1])
            np.add.at(diag, cols, values)
            return torch.as_tensor(diag, dtype=dtype, device=device)
        return _STRUCTURE.get(P, ("diagonal", dtype, str(device)), build)

    def _p_mv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if self.P is None else self.P.matvec(x)

    def solve(self, r_x: torch.Tensor, r_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K [u; w] = [r_x; r_y]`` with the reduced block regularized (the class's note)."""
        u = torch.zeros_like(r_x).scatter_add_(1, self.cols.expand(r_x.shape[0], -1),
                                               self.fixing * r_y[:, self.rows] / self.vals)
        # bounds at zero (x >= 0) fix their variables at zero: nothing to carry over then
        t_x, t_y = (r_x - self._p_mv(u), r_y - self.A.matvec(u)) if bool(u.any()) else (r_x, r_y)
        t_f, t_e = t_x.gather(1, self.free) * self.free_on, t_y.gather(1, self.other) * self.other_on
        if self.diag is not None:  # w_e from the E side's Schur complement, then u_f
            w_e = cholesky_solve(self.chol, (self.a_ef @ (t_f / self.diag).unsqueeze(-1)).squeeze(-1) - t_e)
            u_f = (t_f - (self.a_ef.mT @ w_e.unsqueeze(-1)).squeeze(-1)) / self.diag * self.free_on
            w_e = w_e * self.other_on
        else:
            if self.other.shape[1]:
                t_f = t_f + (self.a_ef.mT @ t_e.unsqueeze(-1)).squeeze(-1) / self.delta
            u_f = cholesky_solve(self.chol, t_f) * self.free_on
            w_e = ((self.a_ef @ u_f.unsqueeze(-1)).squeeze(-1) - t_e) / self.delta * self.other_on
        u = u.scatter_add(1, self.free, u_f)
        w = torch.zeros_like(r_y).scatter_add(1, self.other, w_e)
        g = r_x - self._p_mv(u) - self.A.rmatvec(w)
        w = w.scatter_add(1, self.rows.expand(r_x.shape[0], -1), self.fixing * g[:, self.cols] / self.vals)
        return u, torch.where(self.active, w, -r_y)


def _packed(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flagged entries of each row of ``flags`` (``(B, k)`` bool), packed: ``(index (B, c), on (B, c), slot (B,
    k))`` with ``c`` the most any row has, ``index`` their positions in order (0 in the slots past a row's count,
    where ``on`` is False) and ``slot`` each entry's place in ``index`` (-1 where not flagged)."""
    count = flags.sum(dim=1)
    c = int(count.max()) if flags.shape[0] else 0
    slot = torch.where(flags, torch.cumsum(flags, dim=1) - 1, -1)
    index = torch.zeros(flags.shape[0], c + 1, dtype=torch.long, device=flags.device)
    index.scatter_(1, torch.where(flags, slot, c), torch.arange(flags.shape[1], device=flags.device).expand_as(slot))
    index = index[:, :c].clone()
    return index, torch.arange(c, device=flags.device) < count.unsqueeze(1), slot


def _gathered_block(mat: SparseBatch, pos_r: torch.Tensor, free: torch.Tensor, free_on: torch.Tensor, r: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``(B, r, f)``: the entries of a shared ``mat`` in each instance's columns ``free`` (``(B, f)``, where
    ``free_on``) and at the rows with a slot in ``pos_r`` (:func:`_packed`), read from those columns' nonzeros
    alone (``mat`` is CSC)."""
    device = pos_r.device
    indptr = torch.as_tensor(mat.indptr, device=device)
    indices = torch.as_tensor(mat.indices, device=device)
    B, f = free.shape
    count = ((indptr[1:] - indptr[:-1])[free] * free_on).reshape(-1)  # each slot's nonzeros (pads none)
    owner = torch.repeat_interleave(torch.arange(B * f, device=device), count)
    offset = torch.arange(owner.shape[0], device=device) - torch.repeat_interleave(torch.cumsum(count, 0) - count,
                                                                                    count)
    k = indptr[:-1][free].reshape(-1)[owner] + offset  # the nonzeros of the slots' columns
    b, col = owner // f, owner % f
    row = pos_r[b, indices[k]]
    keep = row >= 0
    block = torch.zeros(B * r * f, dtype=dtype, device=device)
    block.index_put_((((b * r + row) * f + col)[keep],), mat.values[0].to(dtype)[k][keep], accumulate=True)
    return block.view(B, r, f)


class BorderedKKT:
    """:func:`equality_qp`'s regularized KKT solves through the ``always`` rows' factor, shared by the batch, and a
    small correction per instance for its other active rows, where ``A`` and ``P`` are shared.

    With ``K_0 = P + delta I + A_F' A_F / delta`` over the ``always`` rows ``F`` (factored once per data, ``L_0 L_0'``,
    and kept with ``U = A L_0^-T`` for every row, :data:`_BASES`) and the instance's other active rows ``E`` (``r``
    of them), the Schur complement of the regularized KKT matrix is ``S = K_0 + E'E / delta = L_0 (I + V V' / delta)
    L_0'`` with ``V = L_0^-1 E'`` (the rows of ``U`` at ``E``, gathered), so by the Woodbury identity ::

        S^-1 t = L_0^-T (v - V C^-1 V' v),   v = L_0^-1 t,   C = delta I + V'V  (r x r, one Cholesky each).

    A solve costs two triangular solves with the shared ``n x n`` factor and products with ``V``, instead of a new
    ``n x n`` Cholesky per instance and split (:class:`~amortcvx.iterations.linalg.KKTSolver` on ``K_0 + E'E /
    delta``): where splits add few rows to the equalities (mpc large, ``n = 624``: 504 equality rows, a median of 1
    active inequality), that is the difference between a predictor's candidate costing a factorization or a few
    products. The same regularized system, so the same answer to rounding.
    """

    def __init__(self, L0: torch.Tensor, rows: torch.Tensor, chol: torch.Tensor, A: SparseOperator,
                 active: torch.Tensor, delta: float):
        self.L0, self.rows, self.chol, self.A = L0, rows, chol, A
        self.on = active.to(L0.dtype)
        self.inv_dy = torch.where(active, 1.0 / delta, 1.0).to(L0.dtype)

    @classmethod
    def of(cls, A: SparseBatch, P: SparseBatch | None, active: torch.Tensor, always: torch.Tensor, delta: float,
           dtype: torch.dtype) -> BorderedKKT | None:
        """The solver for these splits, or None where it does not apply: ``A`` or ``P`` per instance (or carrying a
        gradient), no ``always`` row (``K_0`` is then ``P + delta I`` alone, and an LP's ``delta I`` leaves the
        correction to carry the whole system, with cancellation where an active set is degenerate), ``U`` beyond
        :data:`BASE_ENTRIES`, or an instance with more than :data:`BORDER_FRACTION` ``n`` other active rows (the
        correction then costs about what a new factorization does)."""
        if not cls.serves(A, P):
            return None
        split = _other_rows(A, active, always)
        if split is None or not cls.fits(A, split[3]):
            return None
        always, extra, count, most = split

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            dense, base = _always_base(A, P, always, delta, torch.float64)
            L0 = torch.linalg.cholesky(0.5 * (base[0] + base[0].mT))  # positive definite: delta I
            U = torch.linalg.solve_triangular(L0, dense[0].mT, upper=False).mT  # (m, n): row i is (L0^-1 A_i')'
            return L0.to(dtype), U.to(dtype), None if P is None else P.values  # held: their storage stays theirs

        L0, U, _ = _BASES.get(A, _base_key("bordered", A, P, always, delta, dtype), build)
        _, order = flagged_rows(U[None, :, :1], extra, most)  # the other active rows' indices, padded
        valid = (torch.arange(most, device=active.device) < count.unsqueeze(1)).to(dtype)
        V = U[order] * valid.unsqueeze(-1)  # (B, r, n); padded rows zero (their C entries delta)
        chol = V  # no other active row anywhere: nothing to correct
        if most:  # an instance whose C cannot be factored comes out NaN
            chol, info = torch.linalg.cholesky_ex(V @ V.mT + delta * torch.eye(most, dtype=dtype, device=V.device))
            chol = torch.where((info != 0)[:, None, None], torch.nan, chol)
        return cls(L0, V, chol, sparse_operator(A, dtype), active, delta)

    @staticmethod
    def fits(A: SparseBatch, most: int) -> bool:
        """Whether ``U`` of ``A`` is within :data:`BASE_ENTRIES` and ``most`` other active rows within
        :data:`BORDER_FRACTION` ``n``."""
        m, n = A.shape
        return m * n <= BASE_ENTRIES and most <= BORDER_FRACTION * n

    @staticmethod
    def serves(A: SparseBatch, P: SparseBatch | None) -> bool:
        """Whether ``A`` and ``P`` are shared by the batch and constant (no gradient): what a shared factor needs."""
        return A.shared and not A.values.requires_grad and (P is None or (P.shared and not P.values.requires_grad))

    def _schur_solve(self, t: torch.Tensor) -> torch.Tensor:
        v = torch.linalg.solve_triangular(self.L0, t.mT, upper=False).mT  # L0^-1 t, the rows as columns
        if self.rows.shape[1]:
            c = cholesky_solve(self.chol, (self.rows @ v.unsqueeze(-1)).squeeze(-1))
            v = v - (self.rows.mT @ c.unsqueeze(-1)).squeeze(-1)
        return torch.linalg.solve_triangular(self.L0.mT, v.mT, upper=True).mT

    def solve(self, r_x: torch.Tensor, r_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K [u; w] = [r_x; r_y]`` for the regularized ``K = [[P + delta I, A_S'], [A_S, -D]]`` (``D`` delta on the
        active rows, 1 off them, where ``A_S`` is zero)."""
        u = self._schur_solve(r_x + self.A.rmatvec(self.on * r_y * self.inv_dy))
        return u, (self.on * self.A.matvec(u) - r_y) * self.inv_dy


def _other_rows(A: SparseBatch, active: torch.Tensor, always: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``always`` checked as a bool ``(m,)`` row mask active in every instance of ``active``; None where it holds no
    row. Else ``(always, extra, count, most)``: the mask on ``active``'s device, the other active rows ``(B, m)``,
    their count per instance and the largest count."""
    always = always.to(device=active.device, dtype=torch.bool)
    if always.shape != (A.shape[0],):
        raise ValueError(f"always must have shape (m,) = ({A.shape[0]},); got {tuple(always.shape)}")
    if not bool(always.any()):
        return None
    if bool((~active[:, always]).any()):
        raise ValueError("a row in always is inactive in some instance of active")
    extra = active & ~always
    count = extra.sum(dim=1)
    return always, extra, count, int(count.max()) if count.numel() else 0


def _always_base(A: SparseBatch, P: SparseBatch | None, always: torch.Tensor, delta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense ``A`` (``(1 or B, m, n)``) and the ``always`` rows' part ``P + delta I + A_F' A_F / delta`` of the
    Schur complement (``(1 or B, n, n)``), in ``dtype``."""
    dense = dense_batch(A, dtype=dtype)
    rows = dense[:, always]
    base = torch.matmul(rows.mT, rows) / delta + delta * torch.eye(A.shape[1], dtype=dtype, device=dense.device)
    if P is not None:
        base = base + dense_batch(P, dtype=dtype)
    return dense, base


def _base_key(kind: str, A: SparseBatch, P: SparseBatch | None, always: torch.Tensor, delta: float,
              dtype: torch.dtype) -> tuple:
    """The :data:`_BASES` key of a part built from ``A`` (its values' version; the memo adds their identity), ``P``
    (its values' storage and version: a part of the batch, ``take``, holds them in a new view), ``always``, ``delta``
    and ``dtype``."""
    return (kind, delta, dtype, bytes(always.cpu().numpy()), A.values._version,
            None if P is None else (P.values.data_ptr(), P.values._version))


def _active_schur(A: SparseBatch, P: SparseBatch | None, active: torch.Tensor, always: torch.Tensor, delta: float,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """``P + delta I + A_S' A_S / delta`` over the ``active`` rows ``S`` (``(1 or B, n, n)``): the ``always`` rows'
    part from :data:`_BASES`, the others gathered per instance (padded with zero rows to the most any has); None
    where there is no such row, or some instance has more than half of the other rows active (the whole product
    then costs no more: the caller forms it)."""
    split = _other_rows(A, active, always)
    if split is None:
        return None
    always, extra, count, most = split
    n = A.shape[1]
    if 2 * most > A.shape[0] - int(always.sum()) or (1 if A.shared else A.batch_size) * A.shape[0] * n > BASE_ENTRIES:
        return None

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dense, base = _always_base(A, P, always, delta, dtype)
        return dense, base, None if P is None else P.values  # P's values held: their storage is not reused meanwhile

    dense, base, _ = _BASES.get(A, _base_key("active-schur", A, P, always, delta, dtype), build)
    if most == 0:
        return base
    rows, _ = flagged_rows(dense, extra, most)
    rows = rows * (torch.arange(most, device=count.device) < count.unsqueeze(1)).unsqueeze(-1).to(dtype)
    return base + torch.matmul(rows.mT, rows) / delta


def scs_polish(work, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, *, delta: float = DELTA,
               passes: int = PASSES, band: int = BAND) -> dict[str, torch.Tensor]:
    """Polish a cone-form warm start ``(x, y, s)``; returns the polished ``{"x", "y", "s"}`` (``s = b - Ax``).

    ``work`` is the :class:`~amortcvx.iterations.scs.ScsWork` of the batch (its data and cones). LPs: the
    candidates of :func:`candidate_active_sets` within ``band``, the least infeasible kept (the largest of ``-s``
    and ``-y`` on nonnegative rows and ``||Px + c + A'y||_inf``, relative to ``1 + ||b||_inf + ||c||_inf``).
    """
    check_polishable(work.cones)
    n, m, batch = work.n, work.m, work.batch_size
    x, y, s = (batch_rows(t, size, batch, name, work.b) for t, size, name in ((x, n, "x"), (y, m, "y"), (s, m, "s")))
    forced = _scs_forced(work)
    if work.P is not None:  # a QP: active-set rounds from the point's split
        A, P, b, c = work.A, work.P, work.b.expand(batch, -1), work.c.expand(batch, -1)
        return _active_set_rounds(
            A, P, _cone_split(forced, y, s), {"x": x, "y": y, "s": s}, passes,
            lambda i, split, p: _scs_on_active(A.take(i), P.take(i), b[i], c[i], split != 0, delta, p),
            lambda i, pt: _cone_split(forced, pt["y"], pt["s"]))
    actives = candidate_active_sets(y - s, forced, n, band)
    copies = actives.shape[0]
    active = actives.reshape(copies * batch, m)
    A, P, b, c = (_tiled(t, copies, batch) for t in (work.A, work.P, work.b, work.c))
    out = _scs_on_active(A, P, b, c, active, delta, passes)
    if copies == 1:
        return out
    xp, yp, sp = out["x"], out["y"], out["s"]
    nonneg = ~forced
    worst = torch.stack([(-sp[:, nonneg]).amax(dim=1), (-yp[:, nonneg]).amax(dim=1),
                         _stationarity(A, P, c, xp, yp)], dim=1).amax(dim=1)
    return _best({"x": xp, "y": yp, "s": sp}, worst / (1.0 + b.abs().amax(dim=1) + c.abs().amax(dim=1)), copies)


def osqp_polish(work, x: torch.Tensor, y: torch.Tensor, *, delta: float = DELTA,
                passes: int = PASSES, band: int = BAND) -> dict[str, torch.Tensor]:
    """Polish a QP-form warm start ``(x, y)``; returns the polished ``{"x", "y"}``.

    ``work`` is the :class:`~amortcvx.iterations.osqp.OsqpWork` of the batch (its data). LPs: the candidates of
    :func:`candidate_active_sets` within ``band``, the least infeasible kept (the largest of ``Ax`` outside ``[l,
    u]``, ``y`` of the wrong sign for its bound and ``||Px + q + A'y||_inf``, relative to ``1 + ||q||_inf``).
    """
    n, m, batch = work.n, work.m, work.batch_size
    if work.P is not None:  # a QP: active-set rounds from the point's split
        q, l, u = (t.expand(batch, -1) for t in (work.q, work.l, work.u))
        forced = _osqp_forced(work).expand(batch, -1)

        def solve(i: torch.Tensor, split: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
            rhs = torch.where((split > 0) & ~forced[i], u[i], l[i])
            xp, yp = equality_qp(work.A.take(i), work.P.take(i), q[i], rhs, split != 0, delta=delta, passes=p)
            return {"x": xp, "y": yp}

        x, y = batch_rows(x, n, batch, "x", q), batch_rows(y, m, batch, "y", q)
        return _active_set_rounds(work.A, work.P, _qp_split(work.A, l, u, forced, x, y), {"x": x, "y": y}, passes,
                                  solve,
                                  lambda i, pt: _qp_split(work.A.take(i), l[i], u[i], forced[i], pt["x"], pt["y"]))
    score, use_upper, forced = _osqp_scores(work, x, y)
    actives = candidate_active_sets(score, forced, n, band)
    copies = actives.shape[0]
    active = actives.reshape(copies * batch, m)
    rhs = torch.where(use_upper & ~forced, work.u, work.l)
    A, P, q = (_tiled(t, copies, batch) for t in (work.A, work.P, work.q))
    xp, yp = equality_qp(A, P, q, _tiled(rhs, copies, batch), active, delta=delta, passes=passes)
    if copies == 1:
        return {"x": xp, "y": yp}
    zp, l, u, up = (spmv(A, xp), _tiled(work.l, copies, batch), _tiled(work.u, copies, batch),
                    _tiled(use_upper, copies, batch))
    primal = torch.maximum(l - zp, zp - u).clamp_min(0.0).nan_to_num(nan=0.0, posinf=0.0)  # infinite bounds
    free = ~_tiled(forced.expand_as(rhs), copies, batch)
    dual = torch.where(active & free, torch.where(up, -yp, yp), 0.0).clamp_min(0.0)
    stationary = _stationarity(A, P, q, xp, yp)
    worst = torch.stack([primal.amax(dim=1), dual.amax(dim=1), stationary], dim=1).amax(dim=1)
    return _best({"x": xp, "y": yp}, worst / (1.0 + q.abs().amax(dim=1)), copies)


ROUNDS = 10
"""The most solves of a QP's polish (:func:`_active_set_rounds`): on portfolio large (SCS, the nearest of 1800
training instances' optimal active sets as the first guess, 100 held-out instances) the split of 18% of the
instances was the optimal one after 4 solves, of 72% after 5, of 99% after 6 and of all after 7."""

WHOLE_LIMIT = 2000
"""The most variables for which a QP's polish solves the whole KKT system of an instance whose active rows
:class:`EliminatedKKT` does not serve (a dense ``n x n`` factorization each); beyond, such an instance is left as
it came (its point returned unpolished)."""


def _active_set_rounds(A: SparseBatch, P: SparseBatch, split: torch.Tensor, start: dict[str, torch.Tensor],
                       passes: int, solve: Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]],
                       split_of: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """A QP's polish as primal-dual active-set rounds: solve on the guessed ``split`` (int8 ``(B, m)``, nonzero on
    active rows), take the split of the solution (its multipliers and slacks, the guess's own rule) and solve
    again where it changed, until no instance's split changes or :data:`ROUNDS` solves; the rounds skip iterative
    refinement, and the last split is solved once more with ``passes``. On a QP the solution of the optimal
    active set is the optimum, and a wrong guess's solution says which rows to add (a negative slack) and drop (a
    multiplier of the wrong sign). Rounds run only where :class:`EliminatedKKT` serves an instance's split (a
    round then factors its free variables' system alone) and stop where it no longer does; an instance it does
    not serve at first is solved once through the whole system (as before the rounds) up to :data:`WHOLE_LIMIT`
    variables and left as it came (``start``) beyond. ``solve(index, split, passes)`` and ``split_of(index,
    point)`` on the instances ``index``."""
    batch, n = split.shape[0], A.shape[1]
    every = torch.arange(batch, device=split.device)
    first = EliminatedKKT.serving(A, P, split != 0)
    if not bool(first.any()):
        return solve(every, split, passes) if n <= WHOLE_LIMIT else {k: v.clone() for k, v in start.items()}
    index = every[first]
    split = split.clone()
    point = {k: v.clone() for k, v in start.items()}
    going = index
    for _ in range(ROUNDS - 1):
        found = solve(going, split[going], 0)
        for key, value in found.items():
            point[key][going] = value
        new = split_of(going, found)
        moved = (new != split[going]).any(dim=1) & EliminatedKKT.serving(A, P, new != 0)
        going, new = going[moved], new[moved]
        if not going.numel():
            break
        split[going] = new
    for key, value in solve(index, split[index], passes).items():
        point[key][index] = value
    rest = every[~first]
    if rest.numel() and n <= WHOLE_LIMIT:
        for key, value in solve(rest, split[rest], passes).items():
            point[key][rest] = value
    return point


class ActiveSets(NamedTuple):
    """An algorithm's ``active_set`` (LPs and QPs): the split of the inequality rows a point says, and the exact
    solution on a given split.

    A split is an int8 ``(B, m)`` tensor: ``1`` where a row is active (the cone form's nonnegative rows with ``y_i
    > s_i``; the QP form's upper bound, ``y_i - (u_i - z_i) > 0``), ``-1`` where the QP form's lower bound is active
    (``-y_i - (z_i - l_i) > 0``), ``0`` where the row is inactive; equality rows (the cone form's zero rows, the QP
    form's ``l = u``) are ``1``. At an optimum it is the optimal active set; :func:`equality_qp` on it gives the
    optimum back exactly wherever that active set's KKT system is nonsingular (a predictor that guesses splits,
    :class:`~amortcvx.predictors.NeighborActiveSet`, is exact where it guesses right).

    Attributes:
        of: ``of(**warm_start) -> split``, the split of a point (``x``, ``y``, and ``s`` in the cone form).
        solve: ``solve(split, start=None) -> warm_start``, the solution of the equality-constrained problem on the
            split's active rows (its bounds as right-hand sides), with its multipliers (and ``s = b - Ax``, 0 on the
            active rows); NaN where that KKT system cannot be factored. ``start``: a point ``{"x", "y", ...}`` (a
            warm start's fields; others ignored) the solve starts from: of the solutions of a singular active set
            (a degenerate LP's), about the one nearest it (:func:`equality_qp`'s ``start``).
        entries: ``entries(split) -> int``, the tensor entries solving one of the splits ``(..., m)`` takes per
            instance (:func:`split_entries`): what a caller sizes its groups of splits by.
    """

    of: Callable[..., torch.Tensor]
    solve: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    entries: Callable[[torch.Tensor], int]


def scs_split(work, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:attr:`ActiveSets.of` in the cone form (``work``: the batch's :class:`~amortcvx.iterations.scs.ScsWork`)."""
    batch = work.batch_size
    y, s = batch_rows(y, work.m, batch, "y", work.b), batch_rows(s, work.m, batch, "s", work.b)
    return _cone_split(_scs_forced(work), y, s)


def _cone_split(forced: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The cone form's split of a point: the rows ``forced`` and those whose dual outweighs the slack."""
    return (forced | (y - s > 0)).to(torch.int8)


def scs_solve_split(work, split: torch.Tensor, start: dict[str, torch.Tensor] | None = None, *, delta: float = DELTA,
                    passes: int = PASSES) -> dict[str, torch.Tensor]:
    """:attr:`ActiveSets.solve` in the cone form: ``{"x", "y", "s"}``."""
    forced = _scs_forced(work)
    active = (_split_rows(split, work.m, work.batch_size) != 0) | forced
    return _scs_on_active(work.A, work.P, work.b, work.c, active, delta, passes, always=forced,
                          start=_start_rows(start, work.n, work.m, split.shape[0]))


def osqp_split(work, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:attr:`ActiveSets.of` in the QP form (``work``: the batch's :class:`~amortcvx.iterations.osqp.OsqpWork`;
    the scores of :func:`osqp_polish`, each row taking its better side)."""
    x, y = batch_rows(x, work.n, work.batch_size, "x", work.q), batch_rows(y, work.m, work.batch_size, "y", work.q)
    return _qp_split(work.A, work.l, work.u, _osqp_forced(work), x, y)


def osqp_solve_split(work, split: torch.Tensor, start: dict[str, torch.Tensor] | None = None, *, delta: float = DELTA,
                     passes: int = PASSES) -> dict[str, torch.Tensor]:
    """:attr:`ActiveSets.solve` in the QP form: ``{"x", "y"}`` (an equality row's bound is ``l = u``)."""
    split = _split_rows(split, work.m, work.batch_size)
    forced = _osqp_forced(work)
    active = (split != 0) | forced
    rhs = torch.where((split > 0) & ~forced, work.u, work.l)
    x, y = equality_qp(work.A, work.P, work.q, rhs, active, delta=delta, passes=passes,
                       always=forced.all(dim=0),  # the rows that are equalities in every instance
                       start=_start_rows(start, work.n, work.m, split.shape[0]))
    return {"x": x, "y": y}


def split_entries(A: SparseBatch, P: SparseBatch | None, forced: torch.Tensor, split: torch.Tensor) -> int:
    """The tensor entries :func:`equality_qp` takes per instance to solve one of ``split`` (``(..., m)``; nonzero where
    active) given the rows ``forced`` (``(m,)``) active in every split: ``n + m`` vectors, and where
    :class:`EliminatedKKT` serves (active bounds fix most variables), the gathered entries of ``A`` and ``P`` and the
    reduced system's square; else where :class:`BorderedKKT` serves (``A`` and ``P`` shared, some row forced, few
    others active), ``n`` more per other active row (its correction), else a dense ``n x n`` factor and ``m x n``
    rows."""
    m, n = A.shape
    forced = forced.to(split.device)
    if split.numel():
        found = EliminatedKKT.sizes(A, P, (split != 0).reshape(-1, m) | forced)
        if found is not None:
            return n + m + A.nnz + (0 if P is None else P.nnz) + EliminatedKKT.entries(P, found[1], found[2])
    extra = int(((split != 0) & ~forced).sum(dim=-1).max()) if split.numel() else 0
    if BorderedKKT.serves(A, P) and bool(forced.any()) and BorderedKKT.fits(A, extra):
        return n + m + n * extra
    return n * (n + m)


def scs_split_entries(work, split: torch.Tensor) -> int:
    """:attr:`ActiveSets.entries` in the cone form."""
    return split_entries(work.A, work.P, _scs_forced(work), split)


def osqp_split_entries(work, split: torch.Tensor) -> int:
    """:attr:`ActiveSets.entries` in the QP form."""
    return split_entries(work.A, work.P, _osqp_forced(work).all(dim=0), split)


def _scs_forced(work) -> torch.Tensor:
    """The cone form's rows that are always active, bool ``(m,)``: the zero cone's."""
    return torch.arange(work.m, device=work.b.device) < work.cones.zero


def _scs_on_active(A: SparseBatch, P: SparseBatch | None, b: torch.Tensor, c: torch.Tensor, active: torch.Tensor,
                   delta: float, passes: int, always: torch.Tensor | None = None,
                   start: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The cone form's equality-constrained problem on the ``active`` rows (:func:`equality_qp`, with its
    ``always`` and ``start``) as a warm start: ``{"x", "y", "s"}`` with ``s = b - Ax`` off the active rows and 0 on
    them."""
    x, y = equality_qp(A, P, c, b, active, delta=delta, passes=passes, always=always, start=start)
    return {"x": x, "y": y, "s": torch.where(active, 0.0, b - spmv(A, x))}


def _osqp_forced(work) -> torch.Tensor:
    """The QP form's equality rows (``u - l`` below ``rho_tol``, as ``osqp_rho`` counts them), bool ``(B or 1, m)``."""
    return (work.u - work.l) < work.settings.rho_tol


def _qp_split(A: SparseBatch, l: torch.Tensor, u: torch.Tensor, forced: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """The QP form's split of a point on data ``A, l, u`` (:func:`_qp_scores`), the rows ``forced`` (equalities)
    active."""
    score, use_upper = _qp_scores(A, l, u, x, y)
    side = torch.where(score > 0, torch.where(use_upper, 1, -1), 0)
    return torch.where(forced, 1, side).to(torch.int8)


def _qp_scores(A: SparseBatch, l: torch.Tensor, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The QP form's activity scores of a point: each row's better side (``use_upper``: the upper bound scores
    ``y_i - (u_i - z_i)`` above the lower's ``-y_i - (z_i - l_i)``, ``z = A x``) and its score (positive where the
    row looks active on that side)."""
    z = spmv(A, x)
    lower, upper = -y - (z - l), y - (u - z)
    use_upper = upper > lower
    return torch.where(use_upper, upper, lower), use_upper


def _osqp_scores(work, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_qp_scores` of a point on the batch's data, and the equality rows (:func:`_osqp_forced`)."""
    x, y = batch_rows(x, work.n, work.batch_size, "x", work.q), batch_rows(y, work.m, work.batch_size, "y", work.q)
    return *_qp_scores(work.A, work.l, work.u, x, y), _osqp_forced(work)


def _start_rows(start: dict[str, torch.Tensor] | None, n: int, m: int, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A split solve's ``start`` point as :func:`equality_qp` takes it, ``x`` and ``y`` checked as ``(batch, n)`` and
    ``(batch, m)``."""
    if start is None:
        return None
    x, y = start["x"], start["y"]
    if x.shape != (batch, n) or y.shape != (batch, m):
        raise ValueError(f"a start must have x (B, n) = ({batch}, {n}) and y (B, m) = ({batch}, {m}); got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def _split_rows(split: torch.Tensor, m: int, batch: int) -> torch.Tensor:
    """``split`` checked as ``(batch, m)``."""
    if split.shape != (batch, m):
        raise ValueError(f"a split must have shape (B, m) = ({batch}, {m}); got {tuple(split.shape)}")
    return split
