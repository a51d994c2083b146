"""Canonicalization layer: a parametric CVXPY problem compiled once, parameter batches -> solver data."""

from amortcvx.canon.affine import AffineMap
from amortcvx.canon.data import ConeData, ConeDims, ConeInstance, QPData, QPInstance, SparseBatch
from amortcvx.canon.parametric import CvxpySolution, ParametricProblem

__all__ = [
    "AffineMap", "ConeData", "ConeDims", "ConeInstance", "CvxpySolution", "ParametricProblem", "QPData",
    "QPInstance", "SparseBatch",
]
