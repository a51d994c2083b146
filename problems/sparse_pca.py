"""Sparse PCA, the SDP relaxation of d'Aspremont et al. (2007), parameter: the covariance matrix ``A``.

.. math::

    \\max_{X}\\; \\operatorname{tr}(A X) - \\lambda \\mathbf{1}^T |X| \\mathbf{1}
    \\quad \\text{s.t.}\\quad \\operatorname{tr} X = 1,\\; X \\succeq 0 .

The leading eigenvector of the solution ``X`` is a sparse principal direction of ``A``. The parameter is a
plain (non-symmetric-attributed) ``k x k`` parameter; samples are symmetric. It enters the objective only
(``tr(A X)`` is linear in ``X``), i.e. the cost vector ``c`` of the cone program.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (matrix order k, support size of the spike s, number of data points behind each covariance N).
# "large" is the order of the sparse PCA experiment of the learned warm-start literature (k = 40).
SIZES: dict[str, tuple[int, int, int]] = {"small": (6, 2, 30), "large": (40, 8, 200)}

LAMBDA = 0.2


def sparse_pca(size: str = "small", seed: int = 0) -> Family:
    """Sparse PCA SDP with a parametric sample covariance.

    Constant data (fixed by ``seed``): the support (``s`` coordinates) and signs/magnitudes of a nominal
    sparse direction ``v_nom`` (unit norm); ``lambda = 0.2``.

    Sampler (spiked covariance model): each instance draws a direction ``v = normalise(v_nom + 0.2 N(0, I)
    on the support)``, a signal strength ``beta ~ U[2, 5]`` and ``N`` data points
    ``z = sqrt(beta) g v + e`` (``g ~ N(0, 1)``, ``e ~ N(0, I_k)``); the parameter is their sample covariance
    ``A = Z'Z / N`` (symmetric positive semidefinite).

    Args:
        size: ``"small"`` (k=6) or ``"large"`` (k=40).
        seed: fixes the support and nominal direction.

    Returns:
        The ``Family`` (kind ``"sdp"``); ``extras`` holds ``v_nom``, ``support``, ``lam`` and the variable
        ``X``.
    """
    check_size(size, SIZES)
    k, s, N = SIZES[size]
    rng = as_generator(seed)
    support = np.sort(rng.choice(k, size=s, replace=False))
    v_nom = np.zeros(k)
    v_nom[support] = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 1.0, s)
    v_nom /= np.linalg.norm(v_nom)

    A = cp.Parameter((k, k), name="A")
    X = cp.Variable((k, k), symmetric=True, name="X")
    problem = cp.Problem(
        cp.Maximize(cp.trace(A @ X) - LAMBDA * cp.sum(cp.abs(X))),
        [cp.trace(X) == 1, X >> 0],
    )

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        v = np.repeat(v_nom[None], num, axis=0)
        v[:, support] += 0.2 * rng.standard_normal((num, s))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        beta = rng.uniform(2.0, 5.0, (num, 1, 1))
        g = rng.standard_normal((num, N, 1))
        Z = np.sqrt(beta) * g * v[:, None, :] + rng.standard_normal((num, N, k))
        cov = np.einsum("bni,bnj->bij", Z, Z) / N
        return {"A": 0.5 * (cov + np.swapaxes(cov, 1, 2))}

    return Family(
        name="sparse_pca",
        problem=problem,
        parameters={"A": A},
        kind="sdp",
        size=size,
        sampler=sampler,
        description=f"sparse PCA SDP relaxation, {k}x{k} covariance, lambda={LAMBDA}, parameter A",
        extras={"v_nom": v_nom, "support": support, "lam": LAMBDA, "X": X},
    )
