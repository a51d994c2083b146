"""Differentiable, warm-started torch layers for parametric convex problems (see ``docs/layers.md``)."""

from amortcvx.layers.layer import CvxpyLayer, Solution, SolverFailure

__all__ = ["CvxpyLayer", "Solution", "SolverFailure"]
