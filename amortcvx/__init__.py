"""amortcvx: amortized convex optimization.

Learned warm starts for parametric CVXPY problems, refined by batched torch fixed-point iterations and finished
by the real C solvers (SCS 3, OSQP 1) at the requested tolerance::

    import amortcvx as ac
    solver = ac.AmortizedSolver.fit(problem, sampler, solver="scs")   # compile, solve samples, train, calibrate
    result = solver.solve({"mu": mu_batch})                           # result.variables["w"]: (B, *shape)

Layers, in the direction data flows: ``amortcvx.canon`` (problem -> batched solver data), ``amortcvx.backends``
(C solvers), ``amortcvx.iterations`` (torch solver layers), ``amortcvx.datasets``, ``amortcvx.predictors``,
``amortcvx.training``, ``amortcvx.deploy``, ``amortcvx.layers`` (differentiable torch layers) and
``amortcvx.evaluation``; ``amortcvx.problems`` holds the bundled problem families. See README.md and docs/.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AmortizedSolver": "amortcvx.deploy.solver",
    "AmortizedResult": "amortcvx.deploy.result",
    "Calibration": "amortcvx.deploy.solver",
    "ParametricProblem": "amortcvx.canon.parametric",
    "AndersonSettings": "amortcvx.iterations.loop",
    "TrainConfig": "amortcvx.training.trainer",
    "WarmStartPredictor": "amortcvx.predictors.model",
    "Status": "amortcvx.backends.base",
    "CvxpyLayer": "amortcvx.layers.layer",
}
"""Public name -> the module that defines it. Imported on first use, so ``import amortcvx`` stays light (solver
worker processes import subpackages without loading torch-heavy layers they do not need)."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amortcvx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
