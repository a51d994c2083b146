"""amortcvx: amortized convex optimization.

Learned warm starts for parametric CVXPY problems, refined by batched torch fixed-point iterations and finished
by the real C solvers (SCS 3, OSQP 1) at the requested tolerance. Layers, in the direction data flows:
``amortcvx.canon`` (problem -> batched solver data), ``amortcvx.backends`` (C solvers),
``amortcvx.iterations`` (torch solver layers), ``amortcvx.datasets``, ``amortcvx.predictors``,
``amortcvx.training``, ``amortcvx.deploy`` and ``amortcvx.evaluation``. See README.md and docs/.
"""

__version__ = "0.1.0"
