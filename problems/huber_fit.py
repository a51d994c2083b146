"""Huber regression whose data matrix is a parameter (QP; the parameter multiplies the variable, so it lands in A).

.. math::

    \\min_{w}\\; \\sum_i \\phi_M\\big((X w - y)_i\\big) + \\lambda \\|w\\|_2^2,

with ``phi_M`` the Huber function (quadratic within ``|r| <= M``, linear outside). Both the features ``X`` and
the targets ``y`` change per instance: a robust refit on a new window of data.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (samples m, features d)
SIZES: dict[str, tuple[int, int]] = {"small": (30, 5), "large": (400, 40)}


def huber_fit(size: str = "small", seed: int = 0) -> Family:
    """Huber regression with parametric data matrix ``X`` and targets ``y``.

    Constant data (fixed by ``seed``): nominal features ``X_bar ~ N(0, 1)``, nominal coefficients
    ``w_bar ~ N(0, 1)``, Huber threshold ``M = 1``, ridge weight ``lambda = 0.1``.

    Sampler: ``X = X_bar + 0.3 N(0, 1)`` (entrywise), ``w_true = w_bar + 0.3 N(0, 1)``,
    ``y = X w_true + 0.1 N(0, 1)`` plus, on 10% of the samples (drawn per instance), an outlier ``5 N(0, 1)``:
    which residuals sit on the linear part of the Huber function changes from instance to instance.

    Args:
        size: ``"small"`` (m=30, d=5) or ``"large"`` (m=400, d=40).
        seed: fixes ``X_bar`` and ``w_bar``.

    Returns:
        The ``Family`` (kind ``"qp"``); ``extras`` holds ``X_bar``, ``w_bar``, ``M``, ``lam``.
    """
    check_size(size, SIZES)
    m, d = SIZES[size]
    rng = as_generator(seed)
    X_bar = rng.standard_normal((m, d))
    w_bar = rng.standard_normal(d)
    M, lam = 1.0, 0.1

    X = cp.Parameter((m, d), name="X")
    y = cp.Parameter(m, name="y")
    w = cp.Variable(d, name="w")
    problem = cp.Problem(cp.Minimize(cp.sum(cp.huber(X @ w - y, M)) + lam * cp.sum_squares(w)))

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        Xs = X_bar[None] + 0.3 * rng.standard_normal((num, m, d))
        wt = w_bar[None] + 0.3 * rng.standard_normal((num, d))
        ys = np.einsum("nmd,nd->nm", Xs, wt) + 0.1 * rng.standard_normal((num, m))
        outlier = rng.random((num, m)) < 0.1
        ys = ys + outlier * 5.0 * rng.standard_normal((num, m))
        return {"X": Xs, "y": ys}

    return Family(
        name="huber_fit", problem=problem, parameters={"X": X, "y": y}, kind="qp", size=size, sampler=sampler,
        description=f"Huber regression, data matrix X a parameter (in A), m={m} samples, d={d} features",
        extras={"X_bar": X_bar, "w_bar": w_bar, "M": M, "lam": lam},
    )
