"""Conversions between the iterations' fixed-point variables and primal-dual points (warm starts).

SCS (``l = n + m + 1``; ``r_y`` as in :func:`amortcvx.iterations.scs.scs_r_y`)::

    (x, y, s) -> v = [x; y + s / r_y; 1]                  (what C SCS does with a warm start)
    v -> (x, y, s): one step from v, then x = u_x/tau, y = u_y/tau, s = rsk_s/tau

The second direction is exact at a fixed point (and scale invariant, the embedding being homogeneous); a
bare ``v`` does not determine ``(y, s)`` otherwise, because ``y + s / r_y`` mixes them.

OSQP::

    (x, y) -> state (x, z = A x, y)                       (what C OSQP's ``warm_start(x=, y=)`` does)
    state -> (x, y);   state <-> [x; w] with w = z + y / rho,  z = clip(w, l, u),  y = rho (w - z)
"""

from __future__ import annotations

import numpy as np
import torch

from amortcvx.canon.data import ConeDims
from amortcvx.iterations.osqp import OsqpState, OsqpWork, osqp_fixed_point, osqp_init
from amortcvx.iterations.scs import ScsSettings, ScsState, ScsWork, scs_r_y, scs_solution, scs_step


def scs_v_from_xys(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, cones: ConeDims,
                   settings: ScsSettings | None = None) -> torch.Tensor:
    """``v = [x; y + s / r_y; 1]`` for ``x`` (B, n), ``y`` (B, m), ``s`` (B, m); returns (B, n + m + 1)."""
    if x.ndim != 2 or y.shape != s.shape or y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x, y, s must have shapes (B, n), (B, m), (B, m); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(s.shape)}")
    if y.shape[1] != cones.size:
        raise ValueError(f"y and s must have m = {cones.size} columns (the cones' size); got {y.shape[1]}")
    r_y = scs_r_y(cones, settings, dtype=y.dtype, device=y.device)
    return torch.cat([x, y + s / r_y, x.new_ones((x.shape[0], 1))], dim=1)


def scs_xys_from_state(work: ScsWork, state: ScsState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The estimates ``(x, y, s)`` of a state (C SCS's output when it stops there)."""
    sol = scs_solution(work, state)
    return sol.x, sol.y, sol.s


def scs_xys_from_v(work: ScsWork, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, s)`` from a fixed-point variable: the estimates after one general (``k >= 1``) step from it.

    Exact when ``v`` is a fixed point; otherwise the point C SCS would report one step later.
    """
    state = ScsState(v=v, u=v, ut=v, k=1)
    return scs_xys_from_state(work, scs_step(work, state))


def osqp_state_from_xy(work: OsqpWork, x: torch.Tensor | None, y: torch.Tensor | None) -> OsqpState:
    """The state C OSQP starts from after ``warm_start(x=x, y=y)``: ``(x, z = A x, y)``."""
    return osqp_init(work, x, y)


def osqp_xy_from_state(state: OsqpState) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm start ``(x, y)`` for C OSQP from a state."""
    return state.x, state.y


def osqp_fixed_point_from_state(work: OsqpWork, state: OsqpState) -> torch.Tensor:
    """``[x; w]`` with ``w = z + y / rho``, ``(B, n + m)``."""
    return osqp_fixed_point(work, state)


def osqp_state_from_fixed_point(work: OsqpWork, xw: torch.Tensor, *, k: int = 1) -> OsqpState:
    """State from ``[x; w]``: ``z = clip(w, l, u)``, ``y = rho (w - z)`` (every state after a step is so)."""
    n, m = work.n, work.m
    if xw.ndim != 2 or xw.shape[1] != n + m:
        raise ValueError(f"the OSQP fixed-point variable must have shape (B, {n + m}); got {tuple(xw.shape)}")
    x, w = xw[:, :n], xw[:, n:]
    z = torch.clamp(w, min=work.l, max=work.u)
    return OsqpState(x=x, z=z, y=work.rho * (w - z), k=k)


def to_numpy_rows(**tensors: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """Split batched tensors into one float64 numpy dict per instance, e.g. ``to_numpy_rows(x=x, y=y, s=s)``.

    This is the form the C backends take warm starts in (one host copy for the whole batch).
    """
    host = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in tensors.items()}
    sizes = {v.shape[0] for v in host.values()}
    if len(sizes) != 1:
        raise ValueError(f"all tensors must share the batch size; got {sorted(sizes)}")
    return [{k: v[i].copy() for k, v in host.items()} for i in range(sizes.pop())]
