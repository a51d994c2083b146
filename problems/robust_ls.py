"""Robust least squares (SOCP), parameters: the data matrix ``A`` and the observations ``b``.

For a data matrix known up to a perturbation ``||Delta||_2 <= rho`` (spectral norm), the worst-case residual
is ``max_{||Delta|| <= rho} ||(A + Delta) x - b||_2 = ||A x - b||_2 + rho ||x||_2`` (El Ghaoui and Lebret,
1997), so the robust estimate solves

.. math::

    \\min_x\\; \\|A x - b\\|_2 + \\rho \\|x\\|_2 ,

two second-order cones. Both ``A`` and ``b`` are parameters: ``A`` multiplies the variable, so it lands in the
constraint matrix of the cone program (not only in its right-hand side).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (rows m, unknowns n).
SIZES: dict[str, tuple[int, int]] = {"small": (20, 10), "large": (200, 100)}


def robust_ls(size: str = "small", seed: int = 0) -> Family:
    """Robust least squares with parametric data ``(A, b)``.

    Constant data (fixed by ``seed``): nominal sensing matrix ``A_nom`` with i.i.d. ``N(0, 1/m)`` entries
    and nominal signal ``x_nom ~ N(0, I_n)``; ``rho = 0.2`` (about a fifth of the typical column norm).

    Sampler: a recalibrated matrix ``A = A_nom + 0.1 N(0, 1/m)`` (10% relative drift), a signal
    ``x_true = x_nom + N(0, 0.5^2 I_n)`` and ``b = A x_true + N(0, 0.1^2 I_m)``.

    Args:
        size: ``"small"`` (20 x 10) or ``"large"`` (200 x 100).
        seed: fixes ``A_nom`` and ``x_nom``.

    Returns:
        The ``Family`` (kind ``"socp"``); ``extras`` holds ``A_nom``, ``x_nom`` and ``rho``.
    """
    check_size(size, SIZES)
    m, n = SIZES[size]
    rng = as_generator(seed)
    A_nom = rng.standard_normal((m, n)) / np.sqrt(m)
    x_nom = rng.standard_normal(n)
    rho = 0.2

    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    x = cp.Variable(n, name="x")
    problem = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + rho * cp.norm(x, 2)))

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        mats = A_nom[None] + 0.1 * rng.standard_normal((num, m, n)) / np.sqrt(m)
        x_true = x_nom[None] + rng.normal(0.0, 0.5, (num, n))
        obs = np.einsum("kij,kj->ki", mats, x_true) + rng.normal(0.0, 0.1, (num, m))
        return {"A": mats, "b": obs}

    return Family(
        name="robust_ls",
        problem=problem,
        parameters={"A": A, "b": b},
        kind="socp",
        size=size,
        sampler=sampler,
        description=f"robust least squares min ||Ax-b|| + rho ||x||, A in R^{m}x{n}, parameters A and b",
        extras={"A_nom": A_nom, "x_nom": x_nom, "rho": rho},
    )
