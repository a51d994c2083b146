"""A primal and dual degenerate packing LP with integer data (LP).

.. math::

    \\max_{x}\\; c^T x \\quad \\text{s.t.}\\quad A x \\le b,\\; 0 \\le x \\le 1,

with a 0/1 matrix ``A`` and integer ``b`` and ``c``: many constraints meet at each vertex (primal
degeneracy) and ties in ``c`` make optimal faces with more than one point (dual degeneracy), so the optimum is
not unique and nearby parameters can have far-apart solutions.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (variables n, packing rows m)
SIZES: dict[str, tuple[int, int]] = {"small": (20, 12), "large": (400, 200)}


def degenerate_lp(size: str = "small", seed: int = 0) -> Family:
    """Packing LP with parametric integer profits ``c`` and capacities ``b``.

    Constant data (fixed by ``seed``): ``A_ij ~ Bernoulli(0.3)`` (each column gets at least one 1).

    Sampler: profits ``c_j`` uniform on ``{1, 2, 3}`` (ties), capacities ``b_i = floor(U[0.3, 0.6] * sum_j
    A_ij)`` (integer, so vertices are often shared by several tight rows).

    Args:
        size: ``"small"`` (n=20, m=12) or ``"large"`` (n=400, m=200).
        seed: fixes ``A``.

    Returns:
        The ``Family`` (kind ``"lp"``); ``extras`` holds ``A``.
    """
    check_size(size, SIZES)
    n, m = SIZES[size]
    rng = as_generator(seed)
    A = (rng.random((m, n)) < 0.3).astype(float)
    A[rng.integers(0, m, n), np.arange(n)] = 1.0
    row_sum = A.sum(1)

    c = cp.Parameter(n, name="c")
    b = cp.Parameter(m, name="b")
    x = cp.Variable(n, name="x")
    problem = cp.Problem(cp.Maximize(c @ x), [A @ x <= b, x >= 0, x <= 1])

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cs = rng.integers(1, 4, (num, n)).astype(float)
        bs = np.floor(rng.uniform(0.3, 0.6, (num, m)) * row_sum[None])
        return {"c": cs, "b": bs}

    return Family(
        name="degenerate_lp", problem=problem, parameters={"c": c, "b": b}, kind="lp", size=size, sampler=sampler,
        description=f"degenerate packing LP with integer data, n={n}, m={m}, parameters c (ties) and b",
        extras={"A": A},
    )
