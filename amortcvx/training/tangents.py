"""Derivatives of the optimal fixed-point variable with respect to the parameters, at solved instances.

For :class:`~amortcvx.predictors.NeighborTangent` (the nearest training solution moved along the solution map's
derivative there). At a solved instance ``theta`` with solution ``(x*, y*, s*)``, for each parameter ``k``, one
Newton step on the optimality conditions ``F(x, w; data) = 0`` (:mod:`amortcvx.iterations.kkt`) is taken from the
solution on the data at ``theta +- h_k e_k`` (dense or matrix-free linear algebra by size, ``kkt.auto``), and
the targets of the two points (the algorithm's fixed-point variable, :func:`~amortcvx.training.trainer.targets`)
are differenced::

    dz*/du_k ~ (z(theta + h_k e_k) - z(theta - h_k e_k)) / (2 STEP),     h_k = STEP * in_std_k

in the predictor's normalized units (``u = (theta - in_mean) / in_std``, ``z`` divided by ``out_std``). ``F`` is
affine in the canonical data at a fixed point, so where ``A`` and ``P`` do not depend on the parameters (the same
Newton matrix on both sides) the difference is the implicit derivative ``-J^{-1} dF/du_k`` up to rounding, for any
step; otherwise up to ``O(STEP^2)``. Where a perturbation changes the active set (an instance on a boundary of
the solution map's pieces) the column is a one-sided mix: rare at this step. An instance whose steps give
non-finite values gets a zero derivative (its prediction is then the plain neighbour's).
"""

from __future__ import annotations

import time

import torch

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations import kkt
from amortcvx.training.trainer import SolvedSet, targets

STEP = 1e-4
"""The central-difference step in normalized parameter units."""
NEWTON_BATCH = 256
"""Perturbed instances per batched Newton step (bounds memory)."""


def solution_tangents(pp: ParametricProblem, algorithm: str, settings, solved: SolvedSet, in_std: torch.Tensor,
                      out_std: torch.Tensor, *, step: float = STEP, deadline: float | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(K, d, p)`` derivatives ``dz*/du`` in normalized units at the first ``K`` instances of ``solved``, computed
    in float64 and returned in ``dtype`` (each chunk converted as it is done, so float32 never holds all of them in
    float64).

    ``K = len(solved)`` unless ``deadline`` (a ``time.perf_counter()`` value) passes first: the instances are
    done in chunks, and the chunks finished by then are returned (at least two instances' worth, whatever the
    deadline, where ``solved`` has them).
    """
    p = pp.num_params
    theta = solved.theta.to(torch.float64)
    std = in_std.to(torch.float64)
    per_chunk = max(1, NEWTON_BATCH // (2 * p))
    scale = out_std.to(torch.float64)[None, :, None]
    parts = []
    for start in range(0, len(solved), per_chunk):
        if start >= 2 and deadline is not None and time.perf_counter() > deadline:
            break
        idx = torch.arange(start, min(start + per_chunk, len(solved)))
        jac = _chunk(pp, algorithm, settings, solved.subset(idx), theta[idx], std, step)
        parts.append((jac / scale).to(dtype))
    d = int(out_std.shape[0])
    if not parts:
        return torch.zeros(0, d, p, dtype=dtype)
    return torch.cat(parts)


def _chunk(pp: ParametricProblem, algorithm: str, settings, part: SolvedSet, theta: torch.Tensor,
           std: torch.Tensor, step: float) -> torch.Tensor:
    """The un-normalized-output derivatives ``(c, d, p)`` of one chunk (``2 p c`` Newton steps in one batch)."""
    c, p = theta.shape
    eye = torch.eye(p, dtype=torch.float64) * (step * std)[None, :]  # row k: h_k e_k
    shifted = torch.cat([theta[:, None, :] + eye[None], theta[:, None, :] - eye[None]], dim=1)  # (c, 2p, p)
    shifted = shifted.reshape(c * 2 * p, p)
    rep = torch.arange(c).repeat_interleave(2 * p)
    x, y = part.x.to(torch.float64)[rep], part.y.to(torch.float64)[rep]
    s = part.s.to(torch.float64)[rep] if part.s is not None else None
    d = kkt.auto(pp.canonicalize_vector(shifted))
    pt = kkt.newton_refine(d, kkt.point_from_solution(d, x, y, s), steps=1, near=None).point
    fields = kkt.warm_start_fields(d, pt)
    z = targets(pp, algorithm, settings, SolvedSet(shifted, fields["x"], fields["y"], fields.get("s")),
                len(shifted)).reshape(c, 2, p, -1)
    jac = ((z[:, 0] - z[:, 1]) / (2 * step)).transpose(1, 2)  # (c, d, p)
    finite = torch.isfinite(jac).flatten(1).all(dim=1)  # a failed step: no tangent (the plain neighbour)
    return torch.where(finite[:, None, None], jac, torch.zeros_like(jac))


__all__ = ["STEP", "solution_tangents"]
