"""Generic loops over fixed-point algorithms: k steps, to a tolerance, or unrolled for backpropagation.

An algorithm is a :class:`FixedPointAlgorithm`: pure functions over a NamedTuple state whose tensor fields
carry the batch in their first dimension. The loops below know nothing else about it:

* :func:`run` takes ``k`` steps without building a graph (inference, warm-start refinement), optionally with
  safeguarded Anderson acceleration (:class:`AndersonSettings`);
* :func:`unroll` takes ``k`` steps with autograd on, optionally checkpointing blocks of steps so that memory
  grows with ``k / block`` instead of ``k`` (the steps of a block are recomputed in the backward pass);
* :func:`run_to_tolerance` steps until each instance's fixed-point residual ``||T(z) - z||_2`` is at most
  ``tol`` (instances that are done are frozen: their state no longer changes), or ``max_steps``.

All three report the residual of every instance at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

if TYPE_CHECKING:
    from amortcvx.iterations.polish import ActiveSets

State = Any


class FixedPointAlgorithm(NamedTuple):
    """A batched fixed-point iteration ``z <- T(z)`` bound to one batch of problem data.

    Attributes:
        name: registry key (``"scs"``, ``"osqp"``).
        work: the per-problem quantities (factorizations, ...) the functions below close over.
        init: ``init(**warm_start) -> state`` (no arguments: cold start).
        step: ``step(state) -> state``, one iteration ``T``.
        fixed_point: ``fixed_point(state) -> z``, the fixed-point variable, ``(B, d)``.
        residual: ``residual(old, new) -> (B,)``, the fixed-point residual ``||T(z) - z||_2`` of a step.
        solution: ``solution(state) -> NamedTuple`` of primal-dual estimates (the warm start for C).
        embed: ``embed(z) -> state``, a state whose next step applies ``T`` to ``z`` and whose
            ``fixed_point`` is ``z`` (up to the algorithm's own normalization); needed only by accelerated
            loops, which continue from extrapolated points that no step produced.
        polish: ``polish(**warm_start) -> warm_start``, active-set polishing of a primal-dual point given as
            ``init``'s keyword arguments (see :mod:`amortcvx.iterations.polish`); None where not available.
        optimality: ``optimality(state) -> (B,)``, a residual of the optimality conditions at the point a state
            stands for that needs no linear solve (nil exactly at the solutions), to rank starts more cheaply than by
            a step; None where not available.
        take: ``take(index) -> FixedPointAlgorithm``, the algorithm bound to the batch's instances ``index`` (a 1-D
            int64 tensor: any order, repeats allowed; row ``r`` is instance ``index[r]``), with the batch's
            factorization reused (a shared one as it is, one per instance gathered on the first solve): to rank
            several candidates per instance in one call, and only for the instances still ranking
            (:func:`~amortcvx.predictors.predict`). None where not available.
        active_set: :class:`~amortcvx.iterations.polish.ActiveSets` (LPs and QPs): the split of the rows a point
            says and the exact solution on a given split (to decode a predicted active set, :func:`~amortcvx.
            predictors.predict`); None where not available (cone programs with other cones).
    """

    name: str
    work: Any
    init: Callable[..., State]
    step: Callable[[State], State]
    fixed_point: Callable[[State], torch.Tensor]
    residual: Callable[[State, State], torch.Tensor]
    solution: Callable[[State], Any]
    embed: Callable[[torch.Tensor], State] | None = None
    polish: Callable[..., dict[str, torch.Tensor]] | None = None
    optimality: Callable[[State], torch.Tensor] | None = None
    take: Callable[[torch.Tensor], FixedPointAlgorithm] | None = None
    active_set: ActiveSets | None = None


@dataclass(frozen=True)
class AndersonSettings:
    """Safeguarded type-II Anderson acceleration of a fixed-point iteration (used by :func:`run`).

    With the last ``memory + 1`` points ``z_i`` and their images ``f_i = T(z_i)``, residuals ``g_i = f_i - z_i``,
    the next point is ``f_t - dF gamma`` where ``dF``, ``dG`` hold the differences of consecutive ``f_i``,
    ``g_i`` and ``gamma = argmin ||g_t - dG gamma||^2 + regularization ||dG||_F^2 ||gamma||^2``. Safeguard,
    per instance: an extrapolated point whose residual exceeds ``safeguard`` times the residual of the last
    accepted point is discarded, the memory is cleared, and the iteration continues from the plain image
    ``T(z)`` of that accepted point ``z``. The last step of a run is always a plain step from an accepted
    point.

    Attributes:
        memory: number of differences kept (SCS's ``acceleration_lookback`` plays the same role).
        regularization: relative Tikhonov regularization of the least-squares problem.
        safeguard: allowed growth of the residual at an extrapolated point.
    """

    memory: int = 10
    regularization: float = 1e-10
    safeguard: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"AndersonSettings.memory must be a positive int; got {self.memory!r}")
        if not self.regularization >= 0.0:
            raise ValueError(f"AndersonSettings.regularization must be nonnegative; got {self.regularization}")
        if not self.safeguard > 0.0:
            raise ValueError(f"AndersonSettings.safeguard must be positive; got {self.safeguard}")


class LoopResult(NamedTuple):
    """What a loop returns.

    Attributes:
        state: the final state.
        residuals: ``(B, steps)``, the fixed-point residual of every instance at every step taken (in
            :func:`run_to_tolerance`, an instance that is done repeats its last residual).
        iterations: ``(B,)`` int64, steps taken by each instance.
        converged: ``(B,)`` bool, residual at most ``tol`` (None for the fixed-``k`` loops).
    """

    state: State
    residuals: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor | None


def _batch_size(state: State) -> int:
    for value in state:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    raise ValueError("the state holds no batched tensor")


def select(mask: torch.Tensor, new: State, old: State) -> State:
    """Per instance, ``new`` where ``mask`` else ``old``, for each batched tensor field of a NamedTuple state.

    Non-tensor fields (e.g. step counters) are taken from ``new``.
    """
    fields = []
    for a, b in zip(new, old, strict=True):
        if isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == mask.shape[0]:
            fields.append(torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b))
        else:
            fields.append(a)
    return type(new)(*fields)


def _steps(alg: FixedPointAlgorithm, state: State, num: int) -> tuple[State, torch.Tensor]:
    res = []
    for _ in range(num):
        new = alg.step(state)
        res.append(alg.residual(state, new))
        state = new
    return state, torch.stack(res, dim=1)


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a nonnegative int; got {num_steps!r}")


def _iterate(alg: FixedPointAlgorithm, state: State, num_steps: int, checkpoint: int | None) -> LoopResult:
    _check_steps(num_steps)
    if checkpoint is not None and (isinstance(checkpoint, bool) or not isinstance(checkpoint, int)
                                   or checkpoint < 1):
        raise ValueError(f"checkpoint must be None or a positive int (steps per block); got {checkpoint!r}")
    batch = _batch_size(state)
    ref = next(v for v in state if isinstance(v, torch.Tensor))
    if num_steps == 0:
        empty = ref.new_zeros((batch, 0))
        return LoopResult(state, empty, torch.zeros(batch, dtype=torch.int64, device=ref.device), None)
    chunks = []
    if checkpoint is not None:
        done = 0
        while done < num_steps:
            block = min(checkpoint, num_steps - done)
            state, res = _checkpoint(_steps, alg, state, block, use_reentrant=False)
            chunks.append(res)
            done += block
    else:
        state, res = _steps(alg, state, num_steps)
        chunks.append(res)
    iterations = torch.full((batch,), num_steps, dtype=torch.int64, device=ref.device)
    return LoopResult(state, torch.cat(chunks, dim=1), iterations, None)


def _anderson_steps(alg: FixedPointAlgorithm, state: State, num: int, settings: AndersonSettings
                    ) -> tuple[State, torch.Tensor]:
    """``num`` evaluations of ``T`` with safeguarded Anderson acceleration; returns the last stepped state.

    The differences ``dF``, ``dG`` of consecutive images and residuals live in ring buffers of ``memory``
    columns (their order does not matter to the least-squares problem). ``valid`` marks, per instance, the
    columns of its current memory; the others are masked out of the small ``memory x memory`` system (they get
    ``gamma = 0``), so forgetting costs nothing on the buffers.
    """
    if alg.embed is None:
        raise ValueError(f"algorithm {alg.name!r} has no embed function, so it cannot be accelerated")
    new = alg.step(state)  # the first step is plain (it may be special, e.g. SCS's tau = 1 at a cold start)
    res = [alg.residual(state, new)]
    point = alg.fixed_point(new)
    batch, dim, mem = point.shape[0], point.shape[1], settings.memory
    dF = point.new_zeros((batch, mem, dim))
    dG = point.new_zeros((batch, mem, dim))
    gram = point.new_zeros((batch, mem, mem))  # dG dG', updated one row and column per step
    valid = torch.zeros((batch, mem), dtype=torch.bool, device=point.device)
    eye = torch.eye(mem, dtype=point.dtype, device=point.device)
    tiny = torch.finfo(point.dtype).tiny
    extrapolated = torch.zeros(batch, dtype=torch.bool, device=point.device)  # the current point is extrapolated
    # the plain image, its residual vector and residual norm at the last accepted point
    base_f = base_g = base_r = None
    for t in range(1, num):
        state = alg.embed(point)
        z = alg.fixed_point(state)
        new = alg.step(state)
        res.append(alg.residual(state, new))
        if t == num - 1:
            break
        f = alg.fixed_point(new)
        g = f - z
        r = torch.linalg.vector_norm(g, dim=1)
        if base_r is None:
            keep = torch.ones_like(extrapolated)
            base_f, base_g, base_r = f, g, r
        else:
            # a rejected point leaves no trace: its instance forgets its memory and goes on from the plain image
            # of the last accepted point (base_f, base_g stay that point's, so the next difference is sound)
            keep = ~extrapolated | (r <= settings.safeguard * base_r)
            col = (t - 2) % mem
            dF[:, col] = f - base_f
            dG[:, col] = g - base_g
            row = (dG * dG[:, col].unsqueeze(1)).sum(dim=2)  # (B, mem); small batched matmuls are slow on CPU
            gram[:, col, :] = row
            gram[:, :, col] = row
            valid &= keep[:, None]
            valid[:, col] = keep
            keep2 = keep[:, None]
            base_f, base_g = torch.where(keep2, f, base_f), torch.where(keep2, g, base_g)
            base_r = torch.where(keep, r, base_r)
        if t >= 2 and t < num - 2:
            w = valid.to(point.dtype)
            system = gram * (w.unsqueeze(2) * w.unsqueeze(1))
            reg = settings.regularization * system.diagonal(dim1=1, dim2=2).sum(-1) + tiny
            system = system + reg[:, None, None] * eye + torch.diag_embed(1.0 - w)  # masked columns: gamma = 0
            rhs = (dG * g.unsqueeze(1)).sum(dim=2) * w
            # solve_ex: a (numerically) singular system gives non-finite entries, never an exception
            gamma = torch.linalg.solve_ex(system, rhs.unsqueeze(2))[0]
            acc = f - (dF * gamma).sum(dim=1)
            extrapolated = keep & valid.any(dim=1) & torch.isfinite(acc).all(dim=1)
            point = torch.where(extrapolated[:, None], acc, base_f)
        else:
            extrapolated = torch.zeros_like(keep)
            point = base_f
    return new, torch.stack(res, dim=1)


def run(alg: FixedPointAlgorithm, state: State, num_steps: int, *,
        anderson: AndersonSettings | None = None) -> LoopResult:
    """Take ``num_steps`` steps without autograd (no graph is kept).

    Args:
        alg: the algorithm.
        state: the initial state.
        num_steps: ``k``, the number of steps.
        anderson: None for plain steps ``z <- T(z)``; :class:`AndersonSettings` for safeguarded Anderson
            acceleration: still ``num_steps`` evaluations of ``T``, each taken from an extrapolated point when
            that helps (each step also makes a few passes over the ``(B, memory, d)`` memory and solves a
            ``memory x memory`` system per instance).

    Returns:
        :class:`LoopResult` with residuals of shape ``(B, num_steps)`` (the residual of each evaluation at the
        point it was taken from); its ``state`` is the result of a plain step, as without acceleration.
    """
    _check_steps(num_steps)
    with torch.no_grad():
        if anderson is None or num_steps <= 2:
            return _iterate(alg, state, num_steps, None)
        state, res = _anderson_steps(alg, state, num_steps, anderson)
        iterations = torch.full((res.shape[0],), num_steps, dtype=torch.int64, device=res.device)
        return LoopResult(state, res, iterations, None)


def unroll(alg: FixedPointAlgorithm, state: State, num_steps: int, *,
           checkpoint: int | None = None) -> LoopResult:
    """Take ``num_steps`` steps with autograd: the result is differentiable with respect to the initial state
    and to the problem data the algorithm was built from.

    Args:
        alg: the algorithm.
        state: the initial state (e.g. ``alg.init(...)`` from a predictor's output).
        num_steps: ``k``.
        checkpoint: None keeps every step's intermediates (memory ``O(k)``); an int ``c`` wraps each block of
            ``c`` steps in ``torch.utils.checkpoint`` (memory ``O(k / c + c)`` step-states, one extra forward
            pass in the backward). ``checkpoint=1`` checkpoints every step.
    """
    with torch.enable_grad():
        return _iterate(alg, state, num_steps, checkpoint)


def run_to_tolerance(alg: FixedPointAlgorithm, state: State, *, tol: float, max_steps: int,
                     check_every: int = 10, stopped: float = 1.0) -> LoopResult:
    """Step until each instance's residual ``||T(z) - z||_2 <= tol`` or ``max_steps`` steps, without autograd.

    An instance stops at the first step whose residual is at most ``tol``; its state keeps that step's result.
    The loop ends when at least the fraction ``stopped`` of the instances has stopped (default: every one),
    checked every ``check_every`` steps (the only host synchronizations), or after ``max_steps``. A fraction below
    1 leaves the slowest instances to whoever comes next (the layer's Newton refinement and C solver): the whole
    batch steps until its slowest instance stops, so a long tail costs every instance.

    Returns:
        :class:`LoopResult` with the per-instance step counts and the convergence flags.
    """
    _check_steps(max_steps)
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int; got {check_every!r}")
    if not 0 < stopped <= 1:
        raise ValueError(f"stopped must be a fraction in (0, 1]; got {stopped!r}")
    batch = _batch_size(state)
    allowed = int(batch - math.ceil(stopped * batch - 1e-9))  # instances that may still be active at the end
    ref = next(v for v in state if isinstance(v, torch.Tensor))
    active = torch.ones(batch, dtype=torch.bool, device=ref.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=ref.device)
    last = torch.full((batch,), float("inf"), dtype=ref.dtype, device=ref.device)
    history = []
    with torch.no_grad():
        for t in range(max_steps):
            new = alg.step(state)
            res = alg.residual(state, new)
            state = select(active, new, state)
            last = torch.where(active, res, last)
            iterations += active
            active = active & ~(res <= tol)
            history.append(last)
            if (t + 1) % check_every == 0 and int(active.sum()) <= allowed:
                break
    residuals = torch.stack(history, dim=1) if history else ref.new_zeros((batch, 0))
    return LoopResult(state, residuals, iterations, last <= tol)
