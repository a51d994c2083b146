"""Parametric problem families: DPP CVXPY problems with seeded samplers of realistic parameters.

Usage::

    from amortcvx import problems
    fam = problems.make("portfolio", size="small", seed=0)
    theta = fam.sample(100, seed=1)          # {"mu": array (100, 30)}
    fam.assign(theta, 0); fam.problem.solve()

See ``docs/problems.md`` for the math, parameters, sampling distributions and sizes of each family.
"""

from __future__ import annotations

from collections.abc import Callable

from .active_set_qp import active_set_qp
from .base import KINDS, SIZES, Family
from .degenerate_lp import degenerate_lp
from .huber_fit import huber_fit
from .kalman import kalman
from .lasso import lasso
from .max_entropy import max_entropy
from .mpc import MPCSystem, mpc, mpc_next_state, mpc_param_dyn, simulate_closed_loop
from .portfolio import portfolio
from .robust_ls import robust_ls
from .sparse_pca import sparse_pca
from .transport import transport

FAMILIES: dict[str, Callable[..., Family]] = {
    "portfolio": portfolio,
    "mpc": mpc,
    "mpc_param_dyn": mpc_param_dyn,
    "lasso": lasso,
    "transport": transport,
    "kalman": kalman,
    "robust_ls": robust_ls,
    "sparse_pca": sparse_pca,
}

CHECK_FAMILIES: dict[str, Callable[..., Family]] = {
    "huber_fit": huber_fit,
    "max_entropy": max_entropy,
    "degenerate_lp": degenerate_lp,
    "active_set_qp": active_set_qp,
}
"""The check set: families written to test the automatic training recipe (``amortcvx.training.recipe``) on
problems it was not tuned on. They differ in kind from :data:`FAMILIES` (a parameter inside the data matrix, the
exponential cone, a degenerate LP, an active set that changes with every instance) and are never used to choose
anything in the recipe; :func:`make` builds them like the others, :func:`names` does not list them."""


def check_names() -> list[str]:
    """Registry keys of the check families (:data:`CHECK_FAMILIES`), sorted."""
    return sorted(CHECK_FAMILIES)


def names() -> list[str]:
    """Registry keys of all families, sorted."""
    return sorted(FAMILIES)


def make(name: str, size: str = "small", seed: int = 0) -> Family:
    """Build the family ``name`` at the given size.

    Args:
        name: a key of :data:`FAMILIES` or of :data:`CHECK_FAMILIES`.
        size: ``"small"`` or ``"large"``.
        seed: fixes the family's constant data.

    Raises:
        ValueError: for an unknown name or size (the message lists the valid ones).
    """
    registry = {**FAMILIES, **CHECK_FAMILIES}
    if name not in registry:
        raise ValueError(f"unknown problem family {name!r}; valid names: {names()} (check families: "
                         f"{check_names()})")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for family {name!r}; valid sizes: {list(SIZES)}")
    return registry[name](size=size, seed=seed)


__all__ = [
    "CHECK_FAMILIES",
    "FAMILIES",
    "KINDS",
    "SIZES",
    "Family",
    "MPCSystem",
    "active_set_qp",
    "check_names",
    "degenerate_lp",
    "huber_fit",
    "kalman",
    "lasso",
    "make",
    "max_entropy",
    "mpc",
    "mpc_next_state",
    "mpc_param_dyn",
    "names",
    "portfolio",
    "robust_ls",
    "simulate_closed_loop",
    "sparse_pca",
    "transport",
]
