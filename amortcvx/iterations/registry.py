"""The two fixed-point algorithms as :class:`~amortcvx.iterations.loop.FixedPointAlgorithm`, by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import NamedTuple

import torch

from amortcvx.canon.data import ConeData, QPData
from amortcvx.iterations import kkt
from amortcvx.iterations import osqp as _osqp
from amortcvx.iterations import scs as _scs
from amortcvx.iterations.convert import osqp_state_from_fixed_point
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import FixedPointAlgorithm, State
from amortcvx.iterations.polish import (
    ActiveSets,
    osqp_polish,
    osqp_solve_split,
    osqp_split,
    osqp_split_entries,
    polishable,
    scs_polish,
    scs_solve_split,
    scs_split,
    scs_split_entries,
)


def optimality(d: kkt.Batch, point: Callable[[State], tuple], state: State) -> torch.Tensor:
    """An algorithm's ``optimality``: ``||F||_inf`` of the optimality conditions' normal map
    (:func:`~amortcvx.iterations.kkt.residual_norm`) at the primal-dual point ``point(state)`` (``(x, y, s)``;
    ``s`` None in the QP form), for ``d`` the batch's data (:func:`~amortcvx.iterations.kkt.sparse`: sparse
    products, no solve)."""
    return kkt.residual_norm(d, kkt.point_from_solution(d, *point(state)))


def _osqp_point(state: _osqp.OsqpState) -> tuple:
    return state.x, state.y, None


def taken(bind: Callable[[object, kkt.Batch], FixedPointAlgorithm], rows: tuple[str, ...], work, d: kkt.Batch,
          index: torch.Tensor) -> FixedPointAlgorithm:
    """An algorithm's ``take(index)``: the algorithm ``bind(work, d)`` makes, on the batch's instances ``index`` (row
    ``r`` is instance ``index[r]``). Nothing is set up or solved again: the per-instance fields ``rows`` of ``work``
    and the vectors of ``d`` are gathered, as are the fields held once or per instance (:data:`_EITHER`) where they are
    per instance; the shared matrices and a shared factorization are the batch's own, a factorization per instance
    (``A`` or ``P`` a parameter) is gathered on its first solve (:meth:`~amortcvx.iterations.linalg.KKTSolver.take`:
    ranking candidates solves nothing with it)."""
    index = index.to(d.lin.device)
    changes = {f: getattr(work, f)[index] for f in rows if getattr(work, f) is not None}
    changes.update({f: t[index] for f in _EITHER if (t := getattr(work, f, None)) is not None and t.shape[0] != 1})
    return bind(work._replace(**changes, A=work.A.take(index), P=None if work.P is None else work.P.take(index),
                              solver=work.solver.take(index), batch_size=int(index.numel())), kkt.take(d, index))


_SCS_ROWS = ("g", "qb", "a", "b", "c")
"""The per-instance fields of :class:`~amortcvx.iterations.scs.ScsWork` (the others are shared by the batch, or held
once or per instance: :data:`_EITHER`)."""

_OSQP_ROWS = ("q", "l", "u", "c0")
"""The per-instance fields of :class:`~amortcvx.iterations.osqp.OsqpWork` (the others are shared by the batch, or
held once or per instance: :data:`_EITHER`)."""

_EITHER = ("W", "rho", "rho_inv", "Wx", "Wz")
"""The fields of either work held as ``(1, ...)`` for the whole batch or ``(B, ...)`` per instance (SCS's ``W``; OSQP's
step sizes where the row types differ between instances, and its ``Wx``, ``Wz``)."""


def _bind_scs(work: _scs.ScsWork, d: kkt.Batch) -> FixedPointAlgorithm:
    return FixedPointAlgorithm(
        name="scs", work=work, init=partial(_scs.scs_init, work), step=partial(_scs.scs_step, work),
        fixed_point=partial(_scs.scs_fixed_point, work), residual=partial(_scs.scs_residual, work),
        solution=partial(_scs.scs_solution, work), embed=partial(_scs.scs_embed, work),
        polish=partial(scs_polish, work), optimality=partial(optimality, d, partial(_scs.scs_point, work)),
        take=partial(taken, _bind_scs, _SCS_ROWS, work, d),
        active_set=ActiveSets(partial(scs_split, work), partial(scs_solve_split, work),
                              partial(scs_split_entries, work))
        if polishable(work.cones) else None)


def _bind_osqp(work: _osqp.OsqpWork, d: kkt.Batch) -> FixedPointAlgorithm:
    return FixedPointAlgorithm(
        name="osqp", work=work, init=partial(_osqp.osqp_init, work), step=partial(_osqp.osqp_step, work),
        fixed_point=partial(_osqp.osqp_fixed_point, work), residual=partial(_osqp.osqp_residual, work),
        solution=partial(_osqp.osqp_solution, work), embed=partial(osqp_state_from_fixed_point, work),
        polish=partial(osqp_polish, work), optimality=partial(optimality, d, _osqp_point),
        take=partial(taken, _bind_osqp, _OSQP_ROWS, work, d),
        active_set=ActiveSets(partial(osqp_split, work), partial(osqp_solve_split, work),
                              partial(osqp_split_entries, work)))


def make_scs(data: ConeData, settings: _scs.ScsSettings | None = None,
             cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """SCS 3's iteration bound to a batch of cone programs (factors ``M`` once; see :mod:`.scs`).

    ``init(x=None, y=None, s=None, *, v=None)``; the fixed-point variable is ``v`` (``(B, n + m + 1)``);
    ``solution`` gives :class:`~amortcvx.iterations.scs.ScsSolution` ``(x, y, s, tau, kappa)``;
    ``polish(x=, y=, s=)``: see :mod:`.polish` (LPs and QPs only); ``optimality``: :func:`optimality` at the point
    ``v`` stands for (:func:`~amortcvx.iterations.scs.scs_point`); ``take``: :func:`taken`; ``active_set``:
    :class:`~amortcvx.iterations.polish.ActiveSets` (LPs and QPs, else None).
    """
    work = _scs.scs_setup(data, settings, cache)
    return _bind_scs(work, kkt.sparse(data, work.c.dtype))


def make_osqp(data: QPData, settings: _osqp.OsqpSettings | None = None,
              cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """OSQP 1's ADMM iteration bound to a batch of QPs (factors ``K`` once; see :mod:`.osqp`).

    ``init(x=None, y=None, *, z=None)`` (``z = A x`` by default); the fixed-point variable is
    ``[x; z + y / rho]`` (``(B, n + m)``); ``solution`` gives :class:`~amortcvx.iterations.osqp.OsqpSolution`;
    ``polish(x=, y=)``: see :mod:`.polish`; ``optimality``: :func:`optimality` at the state's ``(x, y)``;
    ``take``: :func:`taken`; ``active_set``: :class:`~amortcvx.iterations.polish.ActiveSets`.
    """
    work = _osqp.osqp_setup(data, settings, cache)
    return _bind_osqp(work, kkt.sparse(data, work.q.dtype))


class IterationInfo(NamedTuple):
    """What a torch fixed-point iteration is: its factory, its settings and the canonical data it takes.

    Attributes:
        name: the algorithm's name (that of the C solver it re-implements).
        factory: ``factory(data, settings=None, cache=None) -> FixedPointAlgorithm``.
        settings: the frozen dataclass of its settings (:class:`~amortcvx.iterations.scs.ScsSettings`, ...).
        data: the canonical data class it iterates on (:class:`ConeData` or :class:`QPData`).
        fixed_point: the fixed-point variable the predictors output, in words.
    """

    name: str
    factory: Callable[..., FixedPointAlgorithm]
    settings: type
    data: type
    fixed_point: str


#: The canonical form (``ParametricProblem(form=...)``) whose ``canonicalize`` returns each data class.
FORM_OF_DATA: Mapping[type, str] = MappingProxyType({ConeData: "cone", QPData: "qp"})

ITERATIONS: Mapping[str, IterationInfo] = MappingProxyType({info.name: info for info in (
    IterationInfo("scs", make_scs, _scs.ScsSettings, ConeData, "v = [x; y + s / r_y; tau] (length n + m + 1)"),
    IterationInfo("osqp", make_osqp, _osqp.OsqpSettings, QPData, "[x; z + y / rho] (length n + m)"),
)})
"""Algorithm name -> :class:`IterationInfo`."""

ALGORITHMS: Mapping[str, Callable[..., FixedPointAlgorithm]] = MappingProxyType(
    {name: info.factory for name, info in ITERATIONS.items()})
"""Algorithm name -> ``factory(data, settings=None, cache=None) -> FixedPointAlgorithm`` (from :data:`ITERATIONS`)."""

DATA_FORMS: Mapping[str, str] = MappingProxyType(
    {name: FORM_OF_DATA[info.data] for name, info in ITERATIONS.items()})
"""Algorithm name -> the ``ParametricProblem`` form its data come in (from :data:`ITERATIONS`)."""


def make_algorithm(name: str, data: ConeData | QPData, settings=None,
                   cache: FactorCache | None = None) -> FixedPointAlgorithm:
    """``ALGORITHMS[name](data, settings, cache)`` with a clear error for an unknown name.

    ``cache`` (a :class:`~amortcvx.iterations.linalg.FactorCache` owned by the caller, one per problem) keeps
    parameter-independent factorizations across calls.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](data, settings, cache)
