"""One description per solver: the facts every layer needs about ``solver="scs"`` or ``solver="osqp"``.

In the style of cvxpy's solver adapters, a :class:`SolverDescription` gathers what the layers below register
about one solver (the C backend's :class:`~amortcvx.backends.BackendInfo`, the torch iteration's
:class:`~amortcvx.iterations.registry.IterationInfo`) and the one fact that belongs to neither (the CVXPY
solver name). The user-facing word is the solver's name; the canonical form,
backend, iteration, settings and warm-start coordinates follow from it::

    from amortcvx.solvers import get_solver
    d = get_solver("osqp")
    d.form                  # 'qp'      -> ParametricProblem(problem, form=d.form)
    d.backend.name          # 'osqp'    -> amortcvx.backends.solve_batch(..., d.backend.name)
    d.iteration.factory     # make_osqp -> the torch fixed-point iteration
    d.settings_class()      # OsqpSettings() of the torch iteration
    d.default_settings      # the C solver's settings (eps_abs = eps_rel = 1e-5)
    d.warm_start_fields     # ('x', 'y')
    d.cvxpy_name            # 'OSQP'

Layering: this module imports ``backends`` and ``iterations`` only; datasets and everything above may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import cvxpy as cp

from amortcvx.backends.base import BackendInfo
from amortcvx.backends.registry import BACKENDS
from amortcvx.iterations.registry import FORM_OF_DATA, ITERATIONS, IterationInfo


@dataclass(frozen=True)
class SolverDescription:
    """Everything amortcvx knows about one solver.

    Attributes:
        name: the user-facing word (``solver="scs"``); also the name of its C backend and torch iteration.
        cvxpy_name: CVXPY's name of the solver (``problem.solve(solver=cvxpy_name)``).
        backend: the C backend (form, cones, warm-start fields, status map, C default settings, ...).
        iteration: the torch fixed-point iteration (factory, settings class, data class, fixed-point variable).
    """

    name: str
    cvxpy_name: str
    backend: BackendInfo
    iteration: IterationInfo

    def __post_init__(self) -> None:
        if FORM_OF_DATA[self.iteration.data] != self.backend.form:
            raise ValueError(f"solver {self.name!r}: its torch iteration takes form "
                             f"{FORM_OF_DATA[self.iteration.data]!r} but its C backend form {self.backend.form!r}")

    @property
    def form(self) -> str:
        """The canonical form its problems are compiled to: ``ParametricProblem(problem, form=...)``."""
        return self.backend.form

    @property
    def cones(self) -> frozenset[str]:
        """The cones it accepts (``'zero', 'nonneg', 'soc', 'psd', 'exp'``)."""
        return self.backend.cones

    @property
    def warm_start_fields(self) -> tuple[str, ...]:
        """The fields of :class:`~amortcvx.backends.WarmStart` it reads (SCS ``x, y, s``; OSQP ``x, y``)."""
        return tuple(self.backend.warm_start_fields)

    @property
    def default_settings(self) -> Mapping[str, Any]:
        """The C solver's default settings in amortcvx (CVXPY's tolerances)."""
        return self.backend.default_settings

    @property
    def settings_class(self) -> type:
        """The frozen dataclass of the torch iteration's settings (``ScsSettings`` / ``OsqpSettings``)."""
        return self.iteration.settings

    def accepts(self, problem: cp.Problem) -> bool:
        """Whether CVXPY can hand ``problem`` to this solver (QP solvers: CVXPY's ``problem.is_qp()``)."""
        return self.form != "qp" or problem.is_qp()

    def check_problem(self, problem: cp.Problem, what: str = "this problem") -> None:
        """Raise a ValueError when CVXPY cannot hand ``problem`` to this solver (e.g. a SOCP to OSQP).

        Uses CVXPY's own test for QP solvers (``problem.is_qp()``); cone solvers are checked when the problem is
        compiled (:class:`~amortcvx.canon.ParametricProblem` names the cone it cannot take).
        """
        if not self.accepts(problem):
            others = [d.name for d in SOLVERS.values() if d.form != "qp"]
            raise ValueError(f"solver {self.name!r} takes QPs and LPs only (zero and nonnegative cones), but {what} "
                             "is not a QP (it needs second-order, semidefinite or exponential cones); use solver "
                             + " or ".join(repr(o) for o in others))


def _describe(name: str, cvxpy_name: str) -> SolverDescription:
    return SolverDescription(name=name, cvxpy_name=cvxpy_name, backend=BACKENDS[name], iteration=ITERATIONS[name])


SOLVERS: Mapping[str, SolverDescription] = MappingProxyType({d.name: d for d in (
    _describe("scs", cp.SCS),
    _describe("osqp", cp.OSQP),
)})
"""Solver name -> :class:`SolverDescription`: the one place the solver list is written."""

NAMES: tuple[str, ...] = tuple(SOLVERS)
"""The solver names, in registration order (``("scs", "osqp")``): the choices of every ``solver=`` option."""

FORMS: Mapping[str, str] = MappingProxyType({name: d.form for name, d in SOLVERS.items()})
"""Solver name -> canonical form (``{"scs": "cone", "osqp": "qp"}``)."""


def get_solver(name: str, what: str = "solver") -> SolverDescription:
    """The :class:`SolverDescription` of ``name``; ``what`` is the word the error message uses for it.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; known solvers: {', '.join(NAMES)}") from None


def solver_for_form(form: str) -> SolverDescription:
    """The (first registered) solver that takes canonical form ``form``."""
    for d in SOLVERS.values():
        if d.form == form:
            return d
    raise ValueError(f"no solver takes form {form!r}; forms: {sorted(set(FORMS.values()))}")
