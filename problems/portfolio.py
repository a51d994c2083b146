"""Markowitz portfolio with a factor risk model (QP), parameter: expected returns ``mu``.

.. math::

    \\min_{x, f}\\; \\gamma \\,(x^T D x + f^T f) - \\mu^T x
    \\quad \\text{s.t.}\\quad f = F^T x,\\; \\mathbf{1}^T x = 1,\\; x \\ge 0,

with asset covariance ``Sigma = F F^T + D`` (``F`` in R^{n x k} factor loadings, ``D`` diagonal idiosyncratic
variances), long-only weights and a full-investment budget.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from .base import Family, as_generator, check_size

# (assets n, factors k). "large" follows the scale of the learned warm-start portfolio experiments
# (n = 3000 assets) with k = n / 100 factors as in the OSQP benchmark suite.
SIZES: dict[str, tuple[int, int]] = {"small": (30, 3), "large": (3000, 30)}


def portfolio(size: str = "small", seed: int = 0) -> Family:
    """Long-only factor-model Markowitz portfolio with parametric expected returns.

    Constant data (fixed by ``seed``): loadings ``F_ij = 0.2 N(0, 1) / sqrt(k)`` (about 20% annual factor
    volatility per asset), idiosyncratic variances ``D_ii ~ U[0.01, 0.09]`` (10%-30% volatility), nominal
    returns ``mu_bar_i ~ N(0.06, 0.04^2)`` and risk aversion ``gamma = 2``.

    Sampler: ``mu = mu_bar + F g + e`` with factor views ``g ~ N(0, 0.1^2 I_k)`` and asset noise
    ``e ~ N(0, 0.02^2 I_n)``: returns forecasts that move with the factors, as in a rebalancing loop.

    Args:
        size: ``"small"`` (n=30, k=3) or ``"large"`` (n=3000, k=30).
        seed: fixes ``F``, ``D`` and ``mu_bar``.

    Returns:
        The ``Family`` (kind ``"qp"``); ``extras`` holds ``F``, ``d`` (diagonal of ``D``), ``mu_bar``,
        ``gamma``.
    """
    check_size(size, SIZES)
    n, k = SIZES[size]
    rng = as_generator(seed)
    F = 0.2 * rng.standard_normal((n, k)) / np.sqrt(k)
    d = rng.uniform(0.01, 0.09, n)
    mu_bar = rng.normal(0.06, 0.04, n)
    gamma = 2.0

    mu = cp.Parameter(n, name="mu")
    x = cp.Variable(n, name="weights")
    f = cp.Variable(k, name="factor_exposure")
    risk = cp.quad_form(x, sp.diags(d)) + cp.quad_form(f, sp.eye(k))
    problem = cp.Problem(
        cp.Minimize(gamma * risk - mu @ x),
        [f == F.T @ x, cp.sum(x) == 1, x >= 0],
    )

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        g = rng.normal(0.0, 0.1, (num, k))
        e = rng.normal(0.0, 0.02, (num, n))
        return {"mu": mu_bar[None, :] + g @ F.T + e}

    return Family(
        name="portfolio",
        problem=problem,
        parameters={"mu": mu},
        kind="qp",
        size=size,
        sampler=sampler,
        description=f"long-only factor-model Markowitz portfolio, n={n} assets, k={k} factors, parameter mu",
        extras={"F": F, "d": d, "mu_bar": mu_bar, "gamma": gamma},
    )
