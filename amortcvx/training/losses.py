"""Training losses for warm-start predictors, selectable and combinable.

For a batch with predictions ``z0 = f(theta)``, optimal fixed-point variables ``z*`` and ``z_k`` the iterate
after ``k`` unrolled steps of the torch solver started at ``z0``:

* regression:  ``mean_i mean_j ((z0_ij - z*_ij) / sigma_j)^2`` with ``sigma`` the predictor's output scale;
* residual:    ``mean_i ||T(z_k) - z_k||_2``, the fixed-point residual after ``k`` steps;
* distance:    ``mean_i ||z_k - z*||_2``, the distance to the optimum after ``k`` steps (for SCS both sides are
  rescaled to the iteration's sphere ``||v|| = sqrt(n + m + 1)``).

The total is the weighted sum with :class:`LossWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amortcvx.iterations.loop import FixedPointAlgorithm, unroll
from amortcvx.predictors.fixed_point import OutputSpace


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three losses (at least one must be positive)."""

    regression: float = 1.0
    residual: float = 0.0
    distance: float = 0.0

    def __post_init__(self):
        vals = (self.regression, self.residual, self.distance)
        if any(w < 0 for w in vals) or not any(w > 0 for w in vals):
            raise ValueError(f"loss weights must be nonnegative with at least one positive; got {self}")

    @property
    def needs_unroll(self) -> bool:
        return self.residual > 0 or self.distance > 0


def losses(alg: FixedPointAlgorithm, space: OutputSpace, z0: torch.Tensor, target: torch.Tensor,
           out_scale: torch.Tensor, k: int, weights: LossWeights, *, checkpoint: int | None = None,
           ) -> dict[str, torch.Tensor]:
    """The weighted total and each active loss (scalars) for one batch.

    Args:
        alg: the algorithm bound to this batch's data.
        space: the algorithm's output space.
        z0: predictions (B, d), with autograd.
        target: optimal fixed-point variables in prediction coordinates (B, d).
        out_scale: per-output scale ``sigma`` (d,) of the regression loss.
        k: unrolled steps for the residual and distance losses.
        weights: the combination.
        checkpoint: steps per checkpointed block of the unroll (memory-light mode), or None.
    """
    out: dict[str, torch.Tensor] = {}
    total = z0.new_zeros(())
    if weights.regression > 0:
        out["regression"] = (((z0 - target) / out_scale) ** 2).mean()
        total = total + weights.regression * out["regression"]
    if weights.needs_unroll:
        state = unroll(alg, space.to_state(alg, z0), k, checkpoint=checkpoint).state  # z_k
        if weights.residual > 0:
            out["residual"] = alg.residual(state, alg.step(state)).mean()  # ||T(z_k) - z_k||
            total = total + weights.residual * out["residual"]
        if weights.distance > 0:
            zk = space.comparable(alg, alg.fixed_point(state))
            zs = space.comparable(alg, space.full(alg, target))
            out["distance"] = torch.linalg.vector_norm(zk - zs, dim=1).mean()
            total = total + weights.distance * out["distance"]
    out["total"] = total
    return out
