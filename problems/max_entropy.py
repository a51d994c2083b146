"""Maximum-entropy distribution with parametric moments and linear tilt (exponential cone).

.. math::

    \\max_{p}\\; \\sum_j -p_j \\log p_j + c^T p
    \\quad \\text{s.t.}\\quad F p = \\mu,\\; \\mathbf{1}^T p = 1,

(``p >= 0`` is implied by the entropy's domain). Each ``-p_j log p_j`` is one exponential cone; the moment
targets ``mu`` land in ``b`` and the tilt ``c`` in the cost.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (outcomes n, moments k)
SIZES: dict[str, tuple[int, int]] = {"small": (20, 3), "large": (300, 12)}


def max_entropy(size: str = "small", seed: int = 0) -> Family:
    """Maximum-entropy distribution on ``n`` outcomes with ``k`` parametric moment constraints.

    Constant data (fixed by ``seed``): moment features ``F_ij ~ U[-1, 1]``.

    Sampler: ``mu = F p_ref`` with ``p_ref ~ Dirichlet(2 * 1)`` (always feasible, in the interior of the moment
    polytope), tilt ``c ~ N(0, 0.5^2 I)``.

    Args:
        size: ``"small"`` (n=20, k=3) or ``"large"`` (n=300, k=12).
        seed: fixes ``F``.

    Returns:
        The ``Family`` (kind ``"exp"``); ``extras`` holds ``F``.
    """
    check_size(size, SIZES)
    n, k = SIZES[size]
    rng = as_generator(seed)
    F = rng.uniform(-1.0, 1.0, (k, n))

    mu = cp.Parameter(k, name="mu")
    c = cp.Parameter(n, name="c")
    p = cp.Variable(n, name="p")
    problem = cp.Problem(cp.Maximize(cp.sum(cp.entr(p)) + c @ p), [F @ p == mu, cp.sum(p) == 1])

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p_ref = rng.dirichlet(2.0 * np.ones(n), size=num)
        return {"mu": p_ref @ F.T, "c": 0.5 * rng.standard_normal((num, n))}

    return Family(
        name="max_entropy", problem=problem, parameters={"mu": mu, "c": c}, kind="exp", size=size, sampler=sampler,
        description=f"maximum-entropy distribution, n={n} outcomes (exp cones), k={k} parametric moments, tilt c",
        extras={"F": F},
    )
