"""Deployment layer: predicted, refined and safeguarded warm starts finished by the C solvers."""

from amortcvx.deploy.cvxpy_native import inject_warm_start
from amortcvx.deploy.cvxpy_native import solve as solve_cvxpy
from amortcvx.deploy.result import AmortizedResult, ByKey
from amortcvx.deploy.solver import AmortizedSolver, Calibration, WarmStartBatch

__all__ = ["AmortizedResult", "AmortizedSolver", "ByKey", "Calibration", "WarmStartBatch", "inject_warm_start",
           "solve_cvxpy"]
