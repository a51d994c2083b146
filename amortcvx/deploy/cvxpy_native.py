"""Learned warm starts for users who keep calling ``problem.solve(solver=cp.SCS | cp.OSQP)``.

CVXPY warm-starts SCS and OSQP from a per-problem cache (``problem._solver_cache``) when ``solve`` is called
with ``warm_start=True``. :func:`inject_warm_start` fills that cache with the learned warm start for the
problem's *current* parameter values, so the next ``problem.solve(solver=..., warm_start=True)`` starts from it
and fills the CVXPY variables and duals as usual. :func:`solve` does both in one call.

The cache layout is CVXPY's (checked against cvxpy 1.9): SCS reads ``{"x", "y", "s"}``; OSQP reads
``(osqp_object, data, results)`` and calls ``warm_start(results.x, results.y)`` on the object, so a fresh OSQP
object set up with the current data is cached (no state from earlier solves leaks in).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import cvxpy as cp
import numpy as np

from amortcvx.backends.base import csc_parts
from amortcvx.deploy.solver import AmortizedSolver


def _current_params(problem: cp.Problem) -> dict[str, np.ndarray]:
    values = {}
    for p in problem.parameters():
        if p.value is None:
            raise ValueError(f"parameter {p.name()!r} has no value; set it before injecting a warm start")
        values[p.name()] = np.asarray(p.value, dtype=np.float64)
    return values


def inject_warm_start(problem: cp.Problem, amortized: AmortizedSolver, **solver_opts: Any) -> bool:
    """Put the learned warm start for the current parameter values into ``problem``'s CVXPY warm-start cache.

    Args:
        problem: the problem ``amortized`` was built for (the same ``cp.Problem`` object).
        amortized: the :class:`AmortizedSolver` (predictor, refinement steps, safeguard).
        solver_opts: (OSQP only) the settings the next ``solve`` will use; the cached OSQP object is set up with
            them, since OSQP fixes some settings at setup.

    Returns:
        True if a warm start was injected; False if the safeguard chose the cold start (the cache is cleared
        for this solver, so the next solve is cold).
    """
    if problem is not amortized.pp.problem:
        raise ValueError("the AmortizedSolver was built for another cp.Problem object; build it from this one "
                         "(ParametricProblem(problem, form))")
    name = amortized.description.cvxpy_name
    cache = problem._solver_cache
    cache.pop(name, None)
    pred = amortized.predict_warm_start(_current_params(problem))
    ws = pred.warm_starts[0]
    if ws is None:
        return False
    if amortized.algorithm == "scs":
        cache[name] = {"x": ws.x, "y": ws.y, "s": ws.s}
        return True
    import osqp
    import scipy.sparse as sp

    data, _, _ = problem.get_problem_data(cp.OSQP)
    data = dict(data)  # what CVXPY's OSQP interface builds from it, so its cache comparison sees no change:
    data["Ax"] = sp.vstack([data["A"], data["F"]]).tocsc()
    data["u"] = np.concatenate([data["b"], data["G"]])
    data["l"] = np.concatenate([data["b"], -np.inf * np.ones(data["G"].shape)])
    solver = osqp.OSQP()
    opts = {"eps_abs": 1e-5, "eps_rel": 1e-5, "max_iter": 10000, **solver_opts}
    P, A = csc_parts(data["P"], np.int32, upper=True), csc_parts(data["Ax"], np.int32)  # as the OSQP backend
    solver.setup(P, data["q"], A, data["l"], data["u"], verbose=False, **opts)
    results = SimpleNamespace(x=ws.x, y=ws.y, info=SimpleNamespace(status_val=int(osqp.SolverStatus.OSQP_SOLVED)))
    cache[name] = (solver, data, results)
    return True


def solve(problem: cp.Problem, amortized: AmortizedSolver, **solve_kwargs: Any) -> float:
    """Inject the learned warm start and call ``problem.solve(solver=..., warm_start=True, **solve_kwargs)``.

    The solver settings of ``amortized`` (``solver_settings``: tolerances, ...) are passed to ``problem.solve``;
    keyword arguments given here override them. Returns ``problem.solve``'s value; variables, duals, status
    and ``solver_stats`` are filled as usual.
    """
    name = amortized.description.cvxpy_name
    if solve_kwargs.pop("solver", name) != name:
        raise ValueError(f"this AmortizedSolver warm-starts {name}; do not pass another solver")
    solve_kwargs.pop("warm_start", None)
    solve_kwargs = {**amortized.solver_settings, **solve_kwargs}
    opts = {k: v for k, v in solve_kwargs.items() if k not in ("verbose", "ignore_dpp", "canon_backend")}
    inject_warm_start(problem, amortized, **(opts if name == cp.OSQP else {}))
    return problem.solve(solver=name, warm_start=True, **solve_kwargs)
