"""Lasso / sparse coding (QP), parameter: observations ``b``.

.. math::

    \\min_x\\; \\tfrac12 \\|A x - b\\|_2^2 + \\lambda \\|x\\|_1 .
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (measurements m, features n, nonzeros of the true code s). "large" matches the sparse-coding scale of the
# learned warm-start experiments (an over-complete dictionary with n = 2 m).
SIZES: dict[str, tuple[int, int, int]] = {"small": (15, 30, 3), "large": (500, 1000, 50)}


def lasso(size: str = "small", seed: int = 0) -> Family:
    """Lasso with a fixed dictionary and parametric observations.

    Constant data (fixed by ``seed``): dictionary ``A`` (m x n) with i.i.d. ``N(0, 1/m)`` entries (columns of
    about unit norm) and ``lambda = 0.1 * median(||A' b||_inf)`` over 64 reference draws of ``b``, the usual
    scaling that keeps a few-percent of the coefficients nonzero.

    Sampler: ``b = A x_true + e``, ``x_true`` with ``s`` nonzeros at random positions, values ``N(0, 1)``,
    and noise ``e ~ N(0, 0.05^2 I_m)`` (a sparse code observed through the dictionary).

    Args:
        size: ``"small"`` (m=15, n=30) or ``"large"`` (m=500, n=1000).
        seed: fixes ``A`` and ``lambda``.

    Returns:
        The ``Family`` (kind ``"qp"``); ``extras`` holds ``A`` and ``lam``.
    """
    check_size(size, SIZES)
    m, n, s = SIZES[size]
    rng = as_generator(seed)
    A = rng.standard_normal((m, n)) / np.sqrt(m)

    def draw(num: int, rng: np.random.Generator) -> np.ndarray:
        x_true = np.zeros((num, n))
        for i in range(num):
            support = rng.choice(n, size=s, replace=False)
            x_true[i, support] = rng.standard_normal(s)
        return x_true @ A.T + rng.normal(0.0, 0.05, (num, m))

    lam = float(0.1 * np.median(np.abs(draw(64, rng) @ A).max(axis=1)))

    b = cp.Parameter(m, name="b")
    x = cp.Variable(n, name="x")
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A @ x - b) + lam * cp.norm1(x)))

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"b": draw(num, rng)}

    return Family(
        name="lasso",
        problem=problem,
        parameters={"b": b},
        kind="qp",
        size=size,
        sampler=sampler,
        description=f"lasso / sparse coding, A in R^{m}x{n}, lambda={lam:.3g}, parameter b",
        extras={"A": A, "lam": lam},
    )
