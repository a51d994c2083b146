"""Deployment layer: predicted, refined and safeguarded warm starts finished by the C solvers."""

from amortcvx.deploy.solver import AmortizedResult, AmortizedSolver, WarmStartBatch

__all__ = ["AmortizedResult", "AmortizedSolver", "WarmStartBatch"]
