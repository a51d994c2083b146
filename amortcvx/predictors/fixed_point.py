"""The space predictors work in: each algorithm's fixed-point variable, and the maps around it.

A predictor outputs ``z`` (B, d); this module says, per algorithm, how ``z`` becomes an iteration state, how
an optimal primal-dual solution becomes the target ``z*``, how a state becomes a warm start for the C solver,
and how to compare two fixed-point variables.

SCS (``d = n + m``): ``z`` is ``v`` without its last entry, which is 1 (``v = [x; y + s / r_y; 1]``). The
iteration is homogeneous (it rescales ``v`` to norm ``sqrt(n + m + 1)`` every step), so fixed-point variables
are compared after the same rescaling.

OSQP (``d = n + m``): ``z = [x; w]`` with ``w = z_osqp + y / rho``; the state is ``x``, ``z_osqp = clip(w, l,
u)``, ``y = rho (w - z_osqp)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from amortcvx.iterations.convert import osqp_state_from_fixed_point, scs_v_from_xys
from amortcvx.iterations.loop import FixedPointAlgorithm
from amortcvx.iterations.scs import ScsState


class OutputSpace(NamedTuple):
    """How one algorithm's fixed-point variable relates to predictions, targets and warm starts.

    Attributes:
        dim: ``dim(n, m)``, the length of a prediction.
        to_state: ``to_state(alg, z) -> state`` for a prediction ``z`` (a state whose next step is a general step).
        target: ``target(alg, x, y, s) -> z*`` from optimal primal-dual solutions (batched tensors).
        comparable: ``comparable(alg, zfull) -> tensor`` puts a full fixed-point variable in the units in
            which distances are measured.
        full: ``full(alg, z) -> zfull``, the full fixed-point variable of a prediction (``alg.fixed_point``'s
            space).
        warm_start: ``warm_start(alg, state) -> dict`` of batched tensors ``x``, ``y`` (and ``s`` for SCS),
            the primal-dual estimates of a state reached by at least one step, handed to the C solver.
        prediction_warm_start: ``prediction_warm_start(alg, z) -> dict``, the same for a bare prediction.
        prediction_after_step: whether ``prediction_warm_start(alg, z)`` equals ``warm_start(alg, step(to_state(alg,
            z)))`` (SCS: the estimates one step after the prediction), so that a caller that takes that step anyway
            can reuse it.
    """

    dim: Callable[[int, int], int]
    to_state: Callable[[FixedPointAlgorithm, torch.Tensor], Any]
    target: Callable[..., torch.Tensor]
    comparable: Callable[[FixedPointAlgorithm, torch.Tensor], torch.Tensor]
    full: Callable[[FixedPointAlgorithm, torch.Tensor], torch.Tensor]
    warm_start: Callable[[FixedPointAlgorithm, Any], dict[str, torch.Tensor]]
    prediction_warm_start: Callable[[FixedPointAlgorithm, torch.Tensor], dict[str, torch.Tensor]]
    prediction_after_step: bool = False


def _scs_full(alg: FixedPointAlgorithm, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, z.new_ones((z.shape[0], 1))], dim=1)


def _scs_to_state(alg: FixedPointAlgorithm, z: torch.Tensor) -> ScsState:
    # k = 1: the next step is a general one (normalizes v, solves for tau), as in the middle of a run.
    return alg.init(v=_scs_full(alg, z))._replace(k=1)


def _scs_target(alg: FixedPointAlgorithm, x, y, s) -> torch.Tensor:
    work = alg.work
    v = scs_v_from_xys(x, y, s, work.cones, work.settings)
    return v[:, :-1]


def _scs_comparable(alg: FixedPointAlgorithm, v: torch.Tensor) -> torch.Tensor:
    return v * (math.sqrt(v.shape[1]) / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30))


def _scs_warm_start(alg: FixedPointAlgorithm, state) -> dict[str, torch.Tensor]:
    sol = alg.solution(state)
    return {"x": sol.x, "y": sol.y, "s": sol.s}


def _scs_prediction_warm_start(alg: FixedPointAlgorithm, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The estimates one step after the prediction.

    A bare ``v`` does not determine ``(y, s)``: ``v_y = y + s / r_y`` with ``y`` in ``K*`` and ``s`` in ``K``
    orthogonal is ambiguous (on the nonnegative orthant, ``y + s`` hides which part is which), so the split is
    the one SCS's own next step makes (``u_y = Pi_K*(2 u~ - v)``, ``s = rsk_s / tau``); exact at a fixed point.
    """
    return _scs_warm_start(alg, alg.step(_scs_to_state(alg, z)))


def _osqp_to_state(alg: FixedPointAlgorithm, z: torch.Tensor):
    return osqp_state_from_fixed_point(alg.work, z, k=1)


def _osqp_target(alg: FixedPointAlgorithm, x, y, s=None) -> torch.Tensor:
    return alg.fixed_point(alg.init(x=x, y=y))


def _osqp_warm_start(alg: FixedPointAlgorithm, state) -> dict[str, torch.Tensor]:
    sol = alg.solution(state)
    return {"x": sol.x, "y": sol.y}


def _osqp_prediction_warm_start(alg: FixedPointAlgorithm, z: torch.Tensor) -> dict[str, torch.Tensor]:
    return _osqp_warm_start(alg, _osqp_to_state(alg, z))


def _same_units(alg: FixedPointAlgorithm, z: torch.Tensor) -> torch.Tensor:
    return z


OUTPUT_SPACES: dict[str, OutputSpace] = {
    "scs": OutputSpace(dim=lambda n, m: n + m, to_state=_scs_to_state, target=_scs_target,
                       comparable=_scs_comparable, full=_scs_full, warm_start=_scs_warm_start,
                       prediction_warm_start=_scs_prediction_warm_start, prediction_after_step=True),
    "osqp": OutputSpace(dim=lambda n, m: n + m, to_state=_osqp_to_state, target=_osqp_target,
                        comparable=_same_units, full=_same_units, warm_start=_osqp_warm_start,
                        prediction_warm_start=_osqp_prediction_warm_start),
}
"""Algorithm name -> :class:`OutputSpace`."""


RANK_ENTRIES = 2 ** 17
""":func:`predict` ranks a batch's candidates in groups of ``g`` per instance, ``g B d`` at most this many entries
(``d`` the length of a prediction; at least one candidate per group). Wider products cost more per row, narrower
calls more per call (torch 2.13, CPU, 1 thread, the uncorrected expansion's candidates, ms per instance): mpc large
(``d = 2328``, ``A`` 1704 x 624 with 16104 nonzeros), batch 1, 64 candidates, groups of 8 / 16 / 32 / 64 / 128
rows: 9.5 / 6.3 / 5.6 / 5.8 / 6.4; portfolio small (``d = 67``), batch 64, 1024 candidates, 64 / 512 / 1024 / 2048
/ 4096 rows: 13.1 / 8.8 / 8.2 / 8.6 / 12.8. This many entries is 56 rows of the one and 1956 of the other."""


EXACT_RESIDUAL = 1e-9
""":func:`predict` stops ranking an instance's candidates once one has an optimality residual (``alg.optimality``) at
most this: an exact candidate (the optimum solved on the instance's own active set, or a first-order expansion on its
own affine piece) is at rounding level, and no later candidate can be a better start than an optimum. Measured on the
classifier's candidates at batch 1024 (transport, portfolio, degenerate_lp small): the exact ones at most ``4.1e-15``,
every other at least ``6.4e-5`` (docs/training.md)."""


def predict(model, space: OutputSpace, alg: FixedPointAlgorithm, theta: torch.Tensor,
            dtype: torch.dtype = torch.float64, rank_entries: int = RANK_ENTRIES,
            exact: float | None = EXACT_RESIDUAL) -> torch.Tensor:
    """The prediction handed to the solver for parameters ``theta`` (B, p), on ``theta``'s device in ``dtype`` (that
    of ``alg``, which is bound to ``theta``'s canonical data).

    ``model`` is a :class:`~amortcvx.predictors.model.WarmStartPredictor` (or any module ``theta -> z``), on any
    device, in any dtype. Where it offers several candidates per instance (``choices`` > 1 with
    :meth:`~WarmStartPredictor.candidate_groups`, or ``candidates`` (B, K, d)), the one whose residual is
    smallest: ``alg.optimality`` where the algorithm has it (SCS and OSQP: the optimality conditions at the
    candidate, a few sparse products and cone projections), else the fixed-point residual after one step (a solve
    each). A neighbour's first-order expansion is exact where the neighbour lies on the query's piece of the
    solution map, and there either residual is nil (mpc small, 4000 stored instances, 8 candidates: median C
    iterations 1 against 8 from the nearest one alone, mean 16 against 26). A model that predicts active sets
    (``model.splits``: :class:`~amortcvx.predictors.NeighborActiveSet`) on an LP or QP (``alg.active_set``) has its
    candidate active sets solved exactly on the batch's data (``alg.active_set.solve``, one KKT solve per candidate
    and instance, each started from the forward pass's point) and ranked the same way, after that point (the nearest
    stored solution, or the model's reference network's prediction).

    The candidates are ranked a group at a time (:func:`rank_group`), each group in one call on the instances still
    ranking, taken ``g`` times (``alg.take``), and only the best so far is kept: at small batches and on small
    problems one call per candidate costs more in per-call overhead than in arithmetic (batch 1, 1024 candidates:
    portfolio small 14 against 315 ms; docs/training.md); active sets in groups of 1, 2, 4, ... up to that size (the
    most probable first, and each a KKT solve: mpc large at batch 1, 32 candidates in 6 calls). An instance stops
    ranking once its best residual is at most
    ``exact`` (:data:`EXACT_RESIDUAL`; None: rank every candidate): its later candidates are not solved or ranked,
    and the whole call ends when no instance is left (where the first candidates are exact, most of an active-set
    model's KKT solves are skipped: 0.15 to 0.70 of the time at batch 1024 on portfolio, transport and degenerate_lp,
    docs/training.md). An algorithm without ``take``: one call per candidate on the whole batch, ending when every
    instance is exact (SCS and OSQP take parts of a batch whose factorization is per instance too, ``A`` or ``P`` a
    parameter: huber_fit small, 512 candidates, batch 200, 159 -> 19 ms per instance). Among equal residuals the
    first wins (residuals computed in a group and one at a time may differ by rounding, so near-ties may be broken
    differently); non-finite residuals count as infinite.
    """
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    inputs = theta if tensor is None else theta.to(tensor.device, tensor.dtype)
    batch = theta.shape[0]
    live = torch.arange(batch, device=theta.device)  # the instances still ranking
    on_live: dict[int, FixedPointAlgorithm] = {}  # the algorithm on them, taken g times, by g (emptied as they end)

    def ranker(g: int) -> FixedPointAlgorithm:
        """The algorithm on the live instances repeated ``g`` times, copy after copy (row ``c b + i``: live instance
        ``i``)."""
        if g not in on_live:
            whole = g == 1 and live.numel() == batch
            on_live[g] = alg if whole else alg.take(live.repeat(g))
        return on_live[g]

    def residual(a: FixedPointAlgorithm, z: torch.Tensor) -> torch.Tensor:
        state = space.to_state(a, z)
        res = a.residual(state, a.step(state)) if a.optimality is None else a.optimality(state)
        return torch.nan_to_num(res, nan=float("inf"))

    def padded(group: torch.Tensor) -> torch.Tensor:
        """A group (b, g, .) of more than one but fewer than ``size`` candidates padded to ``size`` with copies of
        its last (a copy never wins: the first of equal residuals does); others as they are."""
        b, g = group.shape[:2]
        return group if g in (1, size) else torch.cat([group, group[:, -1:].expand(b, size - g, -1)], dim=1)

    def group_best(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best of a group (b, g, d) of the live instances and its residual (:func:`padded` to ``size``)."""
        b = z.shape[0]
        if z.shape[1] == 1:
            return z[:, 0], residual(ranker(1), z[:, 0])
        z = padded(z)
        res = residual(ranker(size), z.transpose(0, 1).reshape(size * b, -1)).view(size, b)
        pick = res.argmin(dim=0)
        return z[torch.arange(b, device=z.device), pick], res.gather(0, pick[None])[0]

    def decoded(split: torch.Tensor, start: dict[str, torch.Tensor]) -> torch.Tensor:
        """Active sets (B, g, m) solved for the live instances, each from that instance's point in ``start`` (B, .):
        (b, g, d) points (:func:`padded` like a group)."""
        split = padded(split.to(theta.device)[live])
        b, g = split.shape[:2]
        a = ranker(g)
        fields = a.active_set.solve(split.transpose(0, 1).reshape(g * b, -1),  # candidate-major, as the ranker
                                    start={f: v[live].repeat(g, 1) for f, v in start.items()})
        return space.target(a, **fields).view(g, b, -1).transpose(0, 1)

    def growing(model, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """The model's splits in groups of 1, 2, 4, ... (sets ``size``), each at most what the instances still ranking
        may take (:func:`rank_group`, for the entries a split's solve takes, ``alg.active_set.entries``). The most
        probable come first and are often exact, so a small batch solves one before it solves more, and an instance
        none is exact for ranks the rest in a few calls rather than one per candidate (mpc large, ``A`` shared, batch
        1: 32 candidates in 6 calls instead of 32)."""
        nonlocal size
        size = 1
        # drawn for the whole batch, int8: as many bytes as rank_entries float64 entries
        drawn = _group_size(alg, space, model.choices, batch, 8 * rank_entries, lambda n, m: m)
        for group in model.split_groups(inputs, drawn):
            width = alg.active_set.entries(group)
            at, step = 0, size
            while at < group.shape[1]:
                size = min(step, group.shape[1] - at)  # the group's last part as it is: nothing solved twice
                yield group[:, at:at + size]
                at += size
                step = min(2 * step, _group_size(alg, space, model.choices, live.numel(), rank_entries,
                                                 lambda n, m, width=width: width))
            size = step

    # the groups are generated lazily: each reads ``live`` when it is drawn, after the groups before it were ranked
    if getattr(model, "splits", False) and alg.active_set is not None:
        # the forward pass first (the nearest stored solution or the model's reference network: finite where every
        # active set's KKT system is singular), then the candidate active sets solved on this batch's data (a KKT
        # solve each, alg.active_set.entries), each from the forward pass's point (of a degenerate active set's
        # solutions, about the one nearest it)
        first = model(inputs)[:, None]
        start = space.prediction_warm_start(alg, first[:, 0].to(theta.device, dtype))
        groups = itertools.chain([first], (decoded(s, start) for s in growing(model, inputs)))
    elif hasattr(model, "candidate_groups") and int(getattr(model, "choices", 1)) > 1:
        size = _group_size(alg, space, model.choices, batch, rank_entries)
        groups = (z.to(theta.device)[live] for z in model.candidate_groups(inputs, size))
    elif hasattr(model, "candidates"):  # a module with ``candidates`` (B, K, d) only
        every = model.candidates(inputs)
        if every.shape[1] == 1:
            return every[:, 0].to(theta.device, dtype)
        size = 1
        groups = (z.to(theta.device)[live] for z in every.split(1, dim=1))
    else:
        return model(inputs).to(theta.device, dtype)
    best, best_res = (t.clone() for t in group_best(next(groups).to(theta.device, dtype)))  # updated in place
    while True:
        done = best_res[live] <= (-math.inf if exact is None else exact)
        if bool(done.all()):
            break
        if alg.take is not None and bool(done.any()):
            live, on_live = live[~done], {}
        z = next(groups, None)
        if z is None:
            break
        cand, res = group_best(z.to(theta.device, dtype))
        better = res < best_res[live]
        best[live] = torch.where(better[:, None], cand, best[live])
        best_res[live] = torch.where(better, res, best_res[live])
    return best


def _group_size(alg: FixedPointAlgorithm, space: OutputSpace, count: int, batch: int, entries: int,
                width: Callable[[int, int], int] | None = None) -> int:
    """:func:`predict`'s group size for ``count`` candidates per instance (1 where the work does not say its sizes or
    cannot take a part of its batch, ``alg.take``); ``width(n, m)``: the entries each candidate of an instance takes
    (default: the prediction's length)."""
    work = alg.work
    sized = hasattr(work, "n") and hasattr(work, "m")  # a work that does not say its sizes: one at a time
    if not sized or alg.take is None:
        return 1
    return rank_group(count, batch, (width or space.dim)(work.n, work.m), entries)


def rank_group(count: int, batch: int, width: int, entries: int = RANK_ENTRIES) -> int:
    """How many of ``count`` candidates per instance :func:`predict` ranks in one call for a batch of ``batch``
    predictions of length ``width``: ``g`` with ``g batch width <= entries``, at least 1, at most ``count``."""
    return max(1, min(count, entries // max(1, batch * width)))


def output_space(algorithm: str) -> OutputSpace:
    """``OUTPUT_SPACES[algorithm]`` with a clear error for an unknown name."""
    if algorithm not in OUTPUT_SPACES:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(OUTPUT_SPACES)}")
    return OUTPUT_SPACES[algorithm]
