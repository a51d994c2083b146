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
from collections.abc import Callable
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


def predict(model, space: OutputSpace, alg: FixedPointAlgorithm, theta: torch.Tensor,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The prediction handed to the solver for parameters ``theta`` (B, p), on ``theta``'s device in ``dtype`` (that
    of ``alg``, which is bound to ``theta``'s canonical data).

    ``model`` is a :class:`~amortcvx.predictors.model.WarmStartPredictor` (or any module ``theta -> z``), on any
    device, in any dtype. Where it offers several candidates per instance
    (:meth:`~WarmStartPredictor.candidate_stream`, or ``candidates`` (B, K, d)), the one whose residual is
    smallest: ``alg.optimality`` where the algorithm has it (SCS and OSQP: the optimality conditions at the
    candidate, a few sparse products and cone projections), else the fixed-point residual after one step (a solve
    each). A neighbour's first-order expansion is exact where the neighbour lies on the query's piece of the
    solution map, and there either residual is nil (mpc small, 4000 stored instances, 8 candidates: median C
    iterations 1 against 8 from the nearest one alone, mean 16 against 26). The candidates are taken one at a time
    and only the best so far is kept (memory of two, whatever their number); among equal residuals the first
    wins. Non-finite residuals count as infinite.
    """
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    inputs = theta if tensor is None else theta.to(tensor.device, tensor.dtype)
    if hasattr(model, "candidate_stream"):
        stream = iter(model.candidate_stream(inputs))
    else:  # a module with ``candidates`` (B, K, d) only, or with a forward only
        stream = iter(model.candidates(inputs).unbind(1) if hasattr(model, "candidates") else [model(inputs)])
    best = next(stream).to(theta.device, dtype)
    following = next(stream, None)
    if following is None:
        return best

    def residual(z: torch.Tensor) -> torch.Tensor:
        state = space.to_state(alg, z)
        res = alg.residual(state, alg.step(state)) if alg.optimality is None else alg.optimality(state)
        return torch.nan_to_num(res, nan=float("inf"))

    best_res = residual(best)
    for z in itertools.chain([following], stream):
        z = z.to(theta.device, dtype)
        res = residual(z)
        better = res < best_res
        best, best_res = torch.where(better[:, None], z, best), torch.where(better, res, best_res)
    return best


def output_space(algorithm: str) -> OutputSpace:
    """``OUTPUT_SPACES[algorithm]`` with a clear error for an unknown name."""
    if algorithm not in OUTPUT_SPACES:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(OUTPUT_SPACES)}")
    return OUTPUT_SPACES[algorithm]
