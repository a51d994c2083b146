"""Robust Kalman smoothing for vehicle tracking (SOCP), parameter: the measurements ``y``.

A vehicle in the plane with state ``x_t = (position, velocity)`` in ``R^4`` follows
``x_{t+1} = A x_t + B w_t`` (``w_t`` in ``R^2`` an unknown drive force) and is observed through
``y_t = C x_t + v_t`` (``C`` picks the position). Some measurements are outliers, so the residuals are
penalised by the Huber function of their norm,
``psi_rho(v) = ||v||^2 if ||v|| <= rho else 2 rho ||v|| - rho^2``, written with its infimal-convolution form
``psi_rho(v) = min_z ||v - z||^2 + 2 rho ||z||_2`` (one second-order cone per time step)::

    minimize    sum_t ||w_t||^2 + mu sum_t (||y_t - C x_t - z_t||^2 + 2 rho ||z_t||_2)
    subject to  x_{t+1} = A x_t + B w_t,  t = 0..T-2.

This is the robust Kalman example of the CVXPY gallery and of Sambharya et al. (JMLR 2024).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from .base import Family, as_generator, check_size

# Horizon T (number of measurements). "large" is the horizon of the learned warm-start robust Kalman
# experiment (T = 50).
SIZES: dict[str, int] = {"small": 12, "large": 50}

DT = 0.5          # sampling time
DAMPING = 0.05    # velocity damping
MU = 2.0          # weight of the measurement residuals
RHO = 2.0         # Huber threshold on the residual norm
W_STD = np.sqrt(0.5)     # drive-force std, the Gaussian prior matching the unit weight on ||w||^2
V_STD = np.sqrt(0.25)    # nominal measurement-noise std, matching the weight mu on ||v||^2
OUTLIER_PROB = 0.15
OUTLIER_STD = 5.0


def vehicle_model(dt: float = DT, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Discrete vehicle model ``(A, B, C)`` with ``A`` (4x4), ``B`` (4x2), ``C`` (2x4).

    ``A = [[I, (1 - damping dt / 2) dt I], [0, (1 - damping dt) I]]``, ``B = [[dt^2 / 2 I], [dt I]]``,
    ``C = [I, 0]``.
    """
    eye = np.eye(2)
    zero = np.zeros((2, 2))
    A = np.block([[eye, (1 - damping * dt / 2) * dt * eye], [zero, (1 - damping * dt) * eye]])
    B = np.vstack([dt**2 / 2 * eye, dt * eye])
    C = np.hstack([eye, zero])
    return A, B, C


def kalman(size: str = "small", seed: int = 0) -> Family:
    """Robust Kalman smoother with parametric measurements.

    Sampler: a true trajectory from ``x_0`` (position ``N(0, 1)``, velocity ``N(0, 0.5^2)``) driven by
    ``w_t ~ N(0, 0.5 I)``; measurements ``y_t = C x_t + v_t`` with ``v_t ~ N(0, 0.25 I)``, replaced with
    probability 0.15 by an outlier ``v_t ~ N(0, 25 I)``.

    Args:
        size: ``"small"`` (T=12) or ``"large"`` (T=50).
        seed: unused (the model is fixed); accepted for a uniform signature.

    Returns:
        The ``Family`` (kind ``"socp"``); ``extras`` holds ``A``, ``B``, ``C``, ``mu``, ``rho`` and the
        variables ``x`` (4, T), ``w`` (2, T-1).
    """
    check_size(size, SIZES)
    as_generator(seed)
    T = SIZES[size]
    A, B, C = vehicle_model()

    y = cp.Parameter((2, T), name="y")
    x = cp.Variable((4, T), name="x")
    w = cp.Variable((2, T - 1), name="w")
    z = cp.Variable((2, T), name="z")
    objective = (cp.sum_squares(w) + MU * cp.sum_squares(y - C @ x - z)
                 + 2 * MU * RHO * cp.sum(cp.norm(z, 2, axis=0)))
    problem = cp.Problem(cp.Minimize(objective), [x[:, 1:] == A @ x[:, :-1] + B @ w])

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        state = np.concatenate([rng.normal(0.0, 1.0, (num, 2)), rng.normal(0.0, 0.5, (num, 2))], axis=1)
        ys = np.zeros((num, 2, T))
        for t in range(T):
            noise = rng.normal(0.0, V_STD, (num, 2))
            outlier = rng.random(num) < OUTLIER_PROB
            noise[outlier] = rng.normal(0.0, OUTLIER_STD, (int(outlier.sum()), 2))
            ys[:, :, t] = state @ C.T + noise
            state = state @ A.T + rng.normal(0.0, W_STD, (num, 2)) @ B.T
        return {"y": ys}

    return Family(
        name="kalman",
        problem=problem,
        parameters={"y": y},
        kind="socp",
        size=size,
        sampler=sampler,
        description=f"robust (Huber) Kalman smoothing of a planar vehicle, T={T} measurements, parameter y",
        extras={"A": A, "B": B, "C": C, "mu": MU, "rho": RHO, "x": x, "w": w},
    )
