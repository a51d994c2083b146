"""The two fixed-point algorithms as :class:`~amortcvx.iterations.loop.FixedPointAlgorithm`, by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from amortcvx.canon.data import ConeData, QPData
from amortcvx.iterations import osqp as _osqp
from amortcvx.iterations import scs as _scs
from amortcvx.iterations.convert import osqp_state_from_fixed_point
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import FixedPointAlgorithm
from amortcvx.iterations.polish import osqp_polish, scs_polish


def make_scs(data: ConeData, settings: _scs.ScsSettings | None = None,
             cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """SCS 3's iteration bound to a batch of cone programs (factors ``M`` once; see :mod:`.scs`).

    ``init(x=None, y=None, s=None, *, v=None)``; the fixed-point variable is ``v`` (``(B, n + m + 1)``);
    ``solution`` gives :class:`~amortcvx.iterations.scs.ScsSolution` ``(x, y, s, tau, kappa)``;
    ``polish(x=, y=, s=)``: see :mod:`.polish` (LPs and QPs only).
    """
    work = _scs.scs_setup(data, settings, cache)
    return FixedPointAlgorithm(
        name="scs", work=work, init=partial(_scs.scs_init, work), step=partial(_scs.scs_step, work),
        fixed_point=partial(_scs.scs_fixed_point, work), residual=partial(_scs.scs_residual, work),
        solution=partial(_scs.scs_solution, work), embed=partial(_scs.scs_embed, work),
        polish=partial(scs_polish, work))


def make_osqp(data: QPData, settings: _osqp.OsqpSettings | None = None,
              cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """OSQP 1's ADMM iteration bound to a batch of QPs (factors ``K`` once; see :mod:`.osqp`).

    ``init(x=None, y=None, *, z=None)`` (``z = A x`` by default); the fixed-point variable is
    ``[x; z + y / rho]`` (``(B, n + m)``); ``solution`` gives :class:`~amortcvx.iterations.osqp.OsqpSolution`;
    ``polish(x=, y=)``: see :mod:`.polish`.
    """
    work = _osqp.osqp_setup(data, settings, cache)
    return FixedPointAlgorithm(
        name="osqp", work=work, init=partial(_osqp.osqp_init, work), step=partial(_osqp.osqp_step, work),
        fixed_point=partial(_osqp.osqp_fixed_point, work), residual=partial(_osqp.osqp_residual, work),
        solution=partial(_osqp.osqp_solution, work), embed=partial(osqp_state_from_fixed_point, work),
        polish=partial(osqp_polish, work))


ALGORITHMS: dict[str, Callable[..., FixedPointAlgorithm]] = {"scs": make_scs, "osqp": make_osqp}
"""Algorithm name -> ``factory(data, settings=None, cache=None) -> FixedPointAlgorithm``."""

DATA_FORMS: dict[str, str] = {"scs": "cone", "osqp": "qp"}
"""Algorithm name -> the ``ParametricProblem`` form its data come in."""


def make_algorithm(name: str, data: ConeData | QPData, settings=None,
                   cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """``ALGORITHMS[name](data, settings, cache)`` with a clear error for an unknown name.

    ``cache`` (a :class:`~amortcvx.iterations.linalg.FactorCache` owned by the caller, one per problem) keeps
    parameter-independent factorizations across calls.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](data, settings, cache)
