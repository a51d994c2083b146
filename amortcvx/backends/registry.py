"""Registry of the C solver backends and the one-instance :func:`solve`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from amortcvx.backends import osqp as _osqp
from amortcvx.backends import scs as _scs
from amortcvx.backends.base import BackendInfo, SolveResult, WarmStart
from amortcvx.canon.data import ConeInstance, QPInstance

#: name -> capabilities. Importing this does not import the solver packages (they load on first solve).
BACKENDS: Mapping[str, BackendInfo] = MappingProxyType({info.name: info for info in (_scs.INFO, _osqp.INFO)})


def get_backend(name: str) -> BackendInfo:
    """The :class:`BackendInfo` registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None


def solve(instance: ConeInstance | QPInstance, backend: str, warm_start: WarmStart | None = None,
          settings: Mapping[str, Any] | None = None, exact_iterations: bool = True) -> SolveResult:
    """Solve one canonical instance with a fresh solver object (no state shared with any other solve).

    SCS solves ``min 1/2 x'Px + c'x s.t. Ax + s = b, s in K`` (:class:`ConeInstance`); OSQP solves
    ``min 1/2 x'Px + q'x s.t. l <= Ax <= u`` (:class:`QPInstance`). A reused solver object would keep SCS's
    adapted scale or OSQP's adapted rho and previous iterate, so cold and warm solves would not be
    comparable; every call here builds (and factors) a new one.

    Args:
        instance: the problem data (numpy / scipy; ``P`` full symmetric or None).
        backend: a name in :data:`BACKENDS` (``"scs"``, ``"osqp"``).
        warm_start: initial point (fields per backend, see :class:`WarmStart`); None for a cold start.
        settings: solver settings passed through (copied, never mutated) on top of the backend's
            ``default_settings`` (``eps_abs = eps_rel = 1e-5`` for both, CVXPY's defaults).
        exact_iterations: count iterations exactly (SCS: per-iteration residual log; OSQP:
            ``check_termination=1``). Timings are then not representative; see the backend modules.

    Returns:
        The :class:`SolveResult`. Infeasible, unbounded or failing instances are reported by status.

    Raises:
        ValueError: unknown backend, an instance the backend cannot take (wrong form or cone), inconsistent
            shapes, a warm start of the wrong length or with a field the backend does not use, bad settings.
        TypeError: ``warm_start`` is not a :class:`WarmStart`, or ``settings`` is not a mapping.
    """
    info = get_backend(backend)
    info.validate(instance, warm_start)
    return info.run(instance, warm_start, settings, exact_iterations)
