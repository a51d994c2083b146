"""Transportation problem (LP), parameters: unit costs, supplies and demands.

.. math::

    \\min_{X \\ge 0}\\; \\sum_{ij} C_{ij} X_{ij}
    \\quad \\text{s.t.}\\quad \\sum_j X_{ij} \\le s_i \\;(\\text{supply}),\\quad
    \\sum_i X_{ij} \\ge d_j \\;(\\text{demand}),

``X_ij`` the amount shipped from warehouse ``i`` to store ``j``. The complete bipartite network makes every
instance with ``sum(s) >= sum(d)`` feasible, and costs are positive, so the LP is bounded.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# (sources S, sinks D): S * D shipping variables.
SIZES: dict[str, tuple[int, int]] = {"small": (4, 6), "large": (50, 100)}


def transport(size: str = "small", seed: int = 0) -> Family:
    """Transportation LP with parametric costs, supplies and demands.

    Constant data (fixed by ``seed``): warehouse and store locations uniform in the unit square, nominal
    demands ``U[5, 15]``, nominal supply shares ``U[0.5, 1.5]`` (normalised).

    Sampler: costs ``C_ij = fuel * dist_ij * LogNormal(0, 0.1) + 0.05`` with a common fuel price
    ``fuel ~ U[0.8, 1.2]`` per instance (route-level noise, fixed handling fee); demands
    ``d_j = nominal_j * LogNormal(0, 0.2)``; supplies ``s_i = (1 + slack) sum(d) * share_i`` with
    ``slack ~ U[0.05, 0.3]`` and shares the nominal ones times ``LogNormal(0, 0.2)``, renormalised. Hence
    ``sum(s) >= 1.05 sum(d)``: every sampled instance is feasible.

    Args:
        size: ``"small"`` (4 x 6) or ``"large"`` (50 x 100).
        seed: fixes the locations and nominal demands/shares.

    Returns:
        The ``Family`` (kind ``"lp"``); ``extras`` holds ``distance``, ``demand_nominal``, ``share_nominal``.
    """
    check_size(size, SIZES)
    S, D = SIZES[size]
    rng = as_generator(seed)
    src = rng.uniform(0.0, 1.0, (S, 2))
    dst = rng.uniform(0.0, 1.0, (D, 2))
    distance = np.linalg.norm(src[:, None, :] - dst[None, :, :], axis=-1)
    demand_nominal = rng.uniform(5.0, 15.0, D)
    share_nominal = rng.uniform(0.5, 1.5, S)
    share_nominal = share_nominal / share_nominal.sum()

    cost = cp.Parameter((S, D), name="cost")
    supply = cp.Parameter(S, name="supply")
    demand = cp.Parameter(D, name="demand")
    X = cp.Variable((S, D), name="shipment")
    problem = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(cost, X))),
        [cp.sum(X, axis=1) <= supply, cp.sum(X, axis=0) >= demand, X >= 0],
    )

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fuel = rng.uniform(0.8, 1.2, (num, 1, 1))
        c = fuel * distance[None] * rng.lognormal(0.0, 0.1, (num, S, D)) + 0.05
        d = demand_nominal[None] * rng.lognormal(0.0, 0.2, (num, D))
        shares = share_nominal[None] * rng.lognormal(0.0, 0.2, (num, S))
        shares = shares / shares.sum(axis=1, keepdims=True)
        slack = rng.uniform(0.05, 0.3, (num, 1))
        s = (1.0 + slack) * d.sum(axis=1, keepdims=True) * shares
        return {"cost": c, "supply": s, "demand": d}

    return Family(
        name="transport",
        problem=problem,
        parameters={"cost": cost, "supply": supply, "demand": demand},
        kind="lp",
        size=size,
        sampler=sampler,
        description=f"transportation LP, {S} warehouses x {D} stores, parameters cost, supply, demand",
        extras={"distance": distance, "demand_nominal": demand_nominal, "share_nominal": share_nominal},
    )
