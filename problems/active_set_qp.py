"""A box- and halfspace-constrained QP whose active set changes from instance to instance (QP).

.. math::

    \\min_{x}\\; \\tfrac12 x^T Q x + q^T x \\quad \\text{s.t.}\\quad -1 \\le x \\le 1,\\; G x \\le h.

The linear term is drawn independently per coordinate with a spread larger than the curvature, so about half
of the bounds are active, on a different set of coordinates in every instance (no low-dimensional structure
in the parameters decides which).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (variables n, halfspaces k)
SIZES: dict[str, tuple[int, int]] = {"small": (30, 10), "large": (500, 100)}


def active_set_qp(size: str = "small", seed: int = 0) -> Family:
    """Box-constrained QP with parametric linear term ``q`` and halfspace offsets ``h``.

    Constant data (fixed by ``seed``): ``Q = L L^T / n + 0.5 I`` with ``L ~ N(0, 1)``, ``G ~ N(0, 1) / sqrt(n)``.

    Sampler: ``q ~ N(0, 2^2 I)`` (the unconstrained minimizer ``-Q^-1 q`` lies well outside the box in about
    half the coordinates), ``h ~ U[0.5, 1.5]`` per row.

    Args:
        size: ``"small"`` (n=30, k=10) or ``"large"`` (n=500, k=100).
        seed: fixes ``Q`` and ``G``.

    Returns:
        The ``Family`` (kind ``"qp"``); ``extras`` holds ``Q`` and ``G``.
    """
    check_size(size, SIZES)
    n, k = SIZES[size]
    rng = as_generator(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T / n + 0.5 * np.eye(n)
    G = rng.standard_normal((k, n)) / np.sqrt(n)

    q = cp.Parameter(n, name="q")
    h = cp.Parameter(k, name="h")
    x = cp.Variable(n, name="x")
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + q @ x), [x >= -1, x <= 1, G @ x <= h])

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"q": 2.0 * rng.standard_normal((num, n)), "h": rng.uniform(0.5, 1.5, (num, k))}

    return Family(
        name="active_set_qp", problem=problem, parameters={"q": q, "h": h}, kind="qp", size=size, sampler=sampler,
        description=f"box + halfspace QP with an often-changing active set, n={n}, k={k}, parameters q and h",
        extras={"Q": Q, "G": G},
    )
