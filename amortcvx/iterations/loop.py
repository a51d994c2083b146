"""Generic loops over fixed-point algorithms: k steps, to a tolerance, or unrolled for backpropagation.

An algorithm is a :class:`FixedPointAlgorithm`: pure functions over a NamedTuple state whose tensor fields
carry the batch in their first dimension. The loops below know nothing else about it:

* :func:`run` takes ``k`` steps without building a graph (inference, warm-start refinement);
* :func:`unroll` takes ``k`` steps with autograd on, optionally checkpointing blocks of steps so that memory
  grows with ``k / block`` instead of ``k`` (the steps of a block are recomputed in the backward pass);
* :func:`run_to_tolerance` steps until each instance's fixed-point residual ``||T(z) - z||_2`` is at most
  ``tol`` (instances that are done are frozen: their state no longer changes), or ``max_steps``.

All three report the residual of every instance at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

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
    """

    name: str
    work: Any
    init: Callable[..., State]
    step: Callable[[State], State]
    fixed_point: Callable[[State], torch.Tensor]
    residual: Callable[[State, State], torch.Tensor]
    solution: Callable[[State], Any]


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


def run(alg: FixedPointAlgorithm, state: State, num_steps: int) -> LoopResult:
    """Take ``num_steps`` steps without autograd (no graph is kept).

    Returns:
        :class:`LoopResult` with residuals of shape ``(B, num_steps)``.
    """
    with torch.no_grad():
        return _iterate(alg, state, num_steps, None)


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
                     check_every: int = 10) -> LoopResult:
    """Step until each instance's residual ``||T(z) - z||_2 <= tol`` or ``max_steps`` steps, without autograd.

    An instance stops at the first step whose residual is at most ``tol``; its state keeps that step's result.
    The loop ends when every instance has stopped, checked every ``check_every`` steps (the only host
    synchronizations), or after ``max_steps``.

    Returns:
        :class:`LoopResult` with the per-instance step counts and the convergence flags.
    """
    _check_steps(max_steps)
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int; got {check_every!r}")
    batch = _batch_size(state)
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
            if (t + 1) % check_every == 0 and not bool(active.any()):
                break
    residuals = torch.stack(history, dim=1) if history else ref.new_zeros((batch, 0))
    return LoopResult(state, residuals, iterations, last <= tol)
