"""Linear MPC of a chain of oscillating masses (QP), parameter: the initial state ``x0``.

The plant (Wang and Boyd, "Fast model predictive control using online optimization", 2010): ``M`` unit
masses on a line, joined to each other and to walls at both ends by unit springs; ``M / 2`` actuators exert
tensions between the pairs of masses (1, 2), (3, 4), ...  The state is ``x = (positions, velocities)`` in
``R^{2M}``, the input ``u`` in ``R^{M/2}``; the continuous dynamics are discretised exactly (zero-order hold,
step ``dt``) into ``x_{t+1} = A x_t + B u_t (+ w_t)``.

MPC problem over a horizon ``T``::

    minimize    sum_{t<T} (x_t' Q x_t + u_t' R u_t) + x_T' Q_T x_T
    subject to  x_{t+1} = A x_t + B u_t,  t = 0..T-1,     x_0 = x0 (parameter),
                |u_t| <= u_max,  |x_t| <= x_max  (t = 1..T, elementwise),

with ``Q = I``, ``R = I`` and ``Q_T`` the solution of the discrete algebraic Riccati equation (the LQR cost to
go), so the controller is stabilising. In closed loop the first input ``u_0`` is applied, the plant moves one
step (with a disturbance) and the problem is solved again from the new state: :func:`mpc_next_state` and
:func:`simulate_closed_loop` do this.

``mpc_param_dyn`` is the same controller where the dynamics matrix ``A`` is a parameter too (plants with
uncertain spring stiffness and damping): the parameter then sits in the constraint matrix of the QP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from .base import Family, as_generator, check_size

# (masses M, horizon T, episode length of the sampler). Inputs nu = M / 2, states nx = 2 M.
# "large" is the size of the MPC examples in the learned warm-start literature (a few tens of states,
# horizon 20).
SIZES: dict[str, tuple[int, int, int]] = {"small": (4, 8, 20), "large": (12, 20, 50)}


@dataclass(frozen=True)
class MPCSystem:
    """Constants of an MPC family.

    Attributes:
        A: discrete dynamics matrix, shape (nx, nx).
        B: input matrix, shape (nx, nu).
        Q: stage state cost, shape (nx, nx).
        R: stage input cost, shape (nu, nu).
        QT: terminal cost (DARE solution), shape (nx, nx).
        K: LQR gain, ``u = -K x``, shape (nu, nx).
        horizon: number of steps ``T``.
        u_max: input bound, ``|u_t| <= u_max``.
        x_max: state bound, ``|x_t| <= x_max`` for ``t >= 1``.
        dt: sampling time.
        w_std: standard deviation of the velocity disturbance used by the sampler.
        episode_length: number of consecutive sampled instances that form one closed-loop trajectory.
    """

    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    QT: np.ndarray
    K: np.ndarray
    horizon: int
    u_max: float
    x_max: float
    dt: float
    w_std: float
    episode_length: int

    @property
    def nx(self) -> int:
        """State dimension."""
        return self.A.shape[0]

    @property
    def nu(self) -> int:
        """Input dimension."""
        return self.B.shape[1]


def mass_chain(num_masses: int, dt: float = 0.5, stiffness: float = 1.0, damping: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact zero-order-hold discretisation of the oscillating-masses chain.

    Continuous dynamics ``p' = v``, ``v' = -stiffness L p - damping v + E u`` with ``L`` the chain Laplacian
    with walls (tridiagonal 2, -1) and ``E`` mapping each tension ``u_j`` to ``+u_j`` on mass ``2j`` and
    ``-u_j`` on mass ``2j+1``. Returns ``(A, B) = (expm(Ac dt), int_0^dt expm(Ac s) ds Bc)``.

    Args:
        num_masses: ``M`` (even, >= 2).
        dt: sampling time.
        stiffness: spring constant.
        damping: viscous damping coefficient.

    Returns:
        ``A`` of shape (2M, 2M) and ``B`` of shape (2M, M/2).
    """
    if num_masses < 2 or num_masses % 2:
        raise ValueError(f"num_masses must be even and >= 2, got {num_masses}")
    m = num_masses
    lap = 2.0 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)
    E = np.zeros((m, m // 2))
    for j in range(m // 2):
        E[2 * j, j] = 1.0
        E[2 * j + 1, j] = -1.0
    Ac = np.block([[np.zeros((m, m)), np.eye(m)], [-stiffness * lap, -damping * np.eye(m)]])
    Bc = np.vstack([np.zeros((m, m // 2)), E])
    nx, nu = 2 * m, m // 2
    big = np.zeros((nx + nu, nx + nu))
    big[:nx, :nx] = Ac
    big[:nx, nx:] = Bc
    ebig = sla.expm(big * dt)
    return ebig[:nx, :nx], ebig[:nx, nx:]


def _system(size: str) -> MPCSystem:
    m, horizon, episode = SIZES[size]
    A, B = mass_chain(m)
    nx, nu = A.shape[0], B.shape[1]
    Q, R = np.eye(nx), np.eye(nu)
    QT = sla.solve_discrete_are(A, B, Q, R)
    QT = 0.5 * (QT + QT.T)
    K = np.linalg.solve(R + B.T @ QT @ B, B.T @ QT @ A)
    return MPCSystem(A=A, B=B, Q=Q, R=R, QT=QT, K=K, horizon=horizon, u_max=0.5, x_max=4.0, dt=0.5,
                     w_std=0.1, episode_length=episode)


def _mpc_problem(system: MPCSystem, A_param: cp.Parameter | None
                 ) -> tuple[cp.Problem, cp.Parameter, cp.Variable, cp.Expression, cp.Expression]:
    """The MPC QP over one flat variable ``z = (vec(x), vec(u))`` (column-major, time-major blocks).

    A single ``quad_form(z, P)`` with ``P = blkdiag(I_T kron Q, Q_T, I_T kron R)`` and two-sided bounds keep
    the canonical variable equal to ``z`` (slices inside ``quad_form`` or ``abs`` would add lifted copies).
    """
    nx, nu, T = system.nx, system.nu, system.horizon
    n_states = (T + 1) * nx
    x0 = cp.Parameter(nx, name="x0")
    z = cp.Variable(n_states + T * nu, name="z")
    x = cp.reshape(z[:n_states], (nx, T + 1), order="F")
    u = cp.reshape(z[n_states:], (nu, T), order="F")
    A = system.A if A_param is None else A_param
    P = sp.block_diag([sp.kron(sp.eye(T), system.Q), system.QT, sp.kron(sp.eye(T), system.R)], format="csc")
    constraints = [
        x[:, 0] == x0,
        x[:, 1:] == A @ x[:, :-1] + system.B @ u,
        u <= system.u_max,
        u >= -system.u_max,
        x[:, 1:] <= system.x_max,
        x[:, 1:] >= -system.x_max,
    ]
    return cp.Problem(cp.Minimize(cp.quad_form(z, P)), constraints), x0, z, x, u


def _initial_states(num: int, nx: int, rng: np.random.Generator) -> np.ndarray:
    """Random initial states: positions ``U[-1, 1]``, velocities ``U[-0.5, 0.5]``."""
    m = nx // 2
    return np.concatenate([rng.uniform(-1.0, 1.0, (num, m)), rng.uniform(-0.5, 0.5, (num, m))], axis=1)


def mpc_next_state(system: MPCSystem, x: np.ndarray, u: np.ndarray, w: np.ndarray | None = None
                   ) -> np.ndarray:
    """One plant step ``x+ = A x + B u + w`` (batched over leading dimensions).

    Args:
        system: the family's constants (``family.extras["system"]``).
        x: state(s), shape (..., nx).
        u: input(s), shape (..., nu).
        w: optional additive disturbance, shape (..., nx).

    Returns:
        The next state(s), shape (..., nx).
    """
    x = np.asarray(x, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    if x.shape[-1] != system.nx:
        raise ValueError(f"x must have last dimension nx={system.nx}, got shape {x.shape}")
    if u.shape[-1] != system.nu:
        raise ValueError(f"u must have last dimension nu={system.nu}, got shape {u.shape}")
    nxt = x @ system.A.T + u @ system.B.T
    if w is not None:
        w = np.asarray(w, dtype=np.float64)
        if w.shape[-1] != system.nx:
            raise ValueError(f"w must have last dimension nx={system.nx}, got shape {w.shape}")
        nxt = nxt + w
    return nxt


def _velocity_disturbance(system: MPCSystem, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    m = system.nx // 2
    w = np.zeros((*shape, system.nx))
    w[..., m:] = rng.normal(0.0, system.w_std, (*shape, m))
    return w


def simulate_closed_loop(family: Family, x0: np.ndarray, steps: int, *, solver: str = cp.OSQP,
                         disturbance: bool = True, seed: int | np.random.Generator = 0,
                         solve_options: Mapping[str, Any] | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Run the MPC family in closed loop with the real solver.

    At step ``t`` the problem is solved with ``x0 = x_t``, the first input ``u_t = u*_0(x_t)`` is applied and
    ``x_{t+1} = A x_t + B u_t + w_t`` with ``w_t`` the sampler's velocity disturbance (zero if
    ``disturbance=False``). The states ``x_0..x_{steps-1}`` are exactly the parameters a "previous solution"
    warm start sees, in order.

    Args:
        family: an ``mpc`` family (needs ``extras["system"]`` and ``extras["u"]``).
        x0: initial state, shape (nx,).
        steps: number of MPC solves.
        solver: CVXPY solver name.
        disturbance: add the random velocity disturbance.
        seed: seed or generator of the disturbance.
        solve_options: extra keyword arguments for ``problem.solve`` (not mutated).

    Returns:
        ``(states, inputs)`` of shapes (steps, nx) and (steps, nu): the parameter of each solve and the
        input applied after it.
    """
    system = family.extras.get("system")
    u_var = family.extras.get("u")
    if not isinstance(system, MPCSystem) or u_var is None:
        raise ValueError(f"family {family.name!r} is not an MPC family with a fixed system")
    x = np.asarray(x0, dtype=np.float64)
    if x.shape != (system.nx,):
        raise ValueError(f"x0 must have shape ({system.nx},), got {x.shape}")
    rng = as_generator(seed)
    options = dict(solve_options or {})
    states = np.zeros((steps, system.nx))
    inputs = np.zeros((steps, system.nu))
    for t in range(steps):
        states[t] = x
        family.parameters["x0"].value = x
        family.problem.solve(solver=solver, **options)
        if family.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise RuntimeError(f"MPC solve {t} ended with status {family.problem.status}")
        u = np.clip(u_var.value[:, 0], -system.u_max, system.u_max)
        inputs[t] = u
        w = _velocity_disturbance(system, (), rng) if disturbance else None
        x = mpc_next_state(system, x, u, w)
    return states, inputs


def lqr_trajectories(system: MPCSystem, num: int, rng: np.random.Generator) -> np.ndarray:
    """States of closed-loop episodes under saturated LQR, ``u = clip(-K x, -u_max, u_max)``.

    Episodes of ``system.episode_length`` steps start from a random state (positions ``U[-1, 1]``, velocities
    ``U[-0.5, 0.5]``) and are driven by the velocity disturbance ``N(0, w_std^2)``; the last episode is cut
    to give exactly ``num`` states. Saturated LQR with the DARE cost to go is a cheap stand-in for the MPC
    closed loop (the same controller where the bounds are inactive).

    Returns:
        States, shape (num, nx), in trajectory order.
    """
    L = system.episode_length
    episodes = -(-num // L)
    x = _initial_states(episodes, system.nx, rng)
    out = np.zeros((episodes, L, system.nx))
    for t in range(L):
        out[:, t] = x
        u = np.clip(-x @ system.K.T, -system.u_max, system.u_max)
        x = mpc_next_state(system, x, u, _velocity_disturbance(system, (episodes,), rng))
    return out.reshape(episodes * L, system.nx)[:num]


def mpc(size: str = "small", seed: int = 0) -> Family:
    """Oscillating-masses MPC with the initial state as parameter (sequential).

    Sampler: consecutive rows are closed-loop trajectories (``episode_length`` states each, see
    :func:`lqr_trajectories`), so a "previous solution" warm start is meaningful. The problem data do not
    depend on ``seed`` (the plant is fixed); it is accepted for a uniform signature.

    Args:
        size: ``"small"`` (4 masses, nx=8, nu=2, T=8) or ``"large"`` (12 masses, nx=24, nu=6, T=20).
        seed: unused (deterministic plant).

    Returns:
        The ``Family`` (kind ``"qp"``, ``sequential=True``); ``extras`` holds ``system`` (:class:`MPCSystem`),
        the problem's only variable ``z = (vec(x), vec(u))`` and the expressions ``x`` (nx, T+1) and
        ``u`` (nu, T) (views of ``z`` with ``.value``).
    """
    check_size(size, SIZES)
    as_generator(seed)
    system = _system(size)
    problem, x0, z, x, u = _mpc_problem(system, None)

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"x0": lqr_trajectories(system, num, rng)}

    m = system.nx // 2
    return Family(
        name="mpc",
        problem=problem,
        parameters={"x0": x0},
        kind="qp",
        size=size,
        sampler=sampler,
        sequential=True,
        description=f"oscillating-masses MPC, {m} masses (nx={system.nx}, nu={system.nu}), "
                    f"horizon {system.horizon}, parameter x0",
        extras={"system": system, "z": z, "x": x, "u": u},
    )


def mpc_param_dyn(size: str = "small", seed: int = 0) -> Family:
    """Oscillating-masses MPC where the dynamics matrix ``A`` is a parameter too.

    Parameters: ``x0`` (nx,) and ``A_dyn`` (nx, nx), which multiplies the state variables in the equality
    constraints, so it lands in the QP's constraint matrix. ``B``, the costs and the bounds are those of the
    nominal plant (:func:`mpc`).

    Sampler (i.i.d. instances): ``A_dyn`` is the exact discretisation of a chain with spring stiffness
    ``U[0.7, 1.3]`` and damping ``U[0, 0.2]`` (one plant per instance); ``x0`` has positions ``U[-1, 1]`` and
    velocities ``U[-0.5, 0.5]``.

    Args:
        size: ``"small"`` or ``"large"`` (as :func:`mpc`).
        seed: unused (deterministic nominal plant).

    Returns:
        The ``Family`` (kind ``"qp"``); ``extras`` as for :func:`mpc`.
    """
    check_size(size, SIZES)
    as_generator(seed)
    system = _system(size)
    m = system.nx // 2
    A_dyn = cp.Parameter((system.nx, system.nx), name="A_dyn")
    problem, x0, z, x, u = _mpc_problem(system, A_dyn)

    def sampler(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        stiffness = rng.uniform(0.7, 1.3, num)
        damping = rng.uniform(0.0, 0.2, num)
        mats = np.stack([mass_chain(m, system.dt, k, c)[0] for k, c in zip(stiffness, damping, strict=True)])
        return {"x0": _initial_states(num, system.nx, rng), "A_dyn": mats}

    return Family(
        name="mpc_param_dyn",
        problem=problem,
        parameters={"x0": x0, "A_dyn": A_dyn},
        kind="qp",
        size=size,
        sampler=sampler,
        sequential=False,
        description=f"oscillating-masses MPC with parametric dynamics A, {m} masses (nx={system.nx}), "
                    f"horizon {system.horizon}, parameters x0 and A_dyn",
        extras={"system": system, "z": z, "x": x, "u": u},
    )
