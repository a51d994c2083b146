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

from .base import KINDS, SIZES, Family
from .kalman import kalman
from .lasso import lasso
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


def names() -> list[str]:
    """Registry keys of all families, sorted."""
    return sorted(FAMILIES)


def make(name: str, size: str = "small", seed: int = 0) -> Family:
    """Build the family ``name`` at the given size.

    Args:
        name: a key of :data:`FAMILIES`.
        size: ``"small"`` or ``"large"``.
        seed: fixes the family's constant data.

    Raises:
        ValueError: for an unknown name or size (the message lists the valid ones).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown problem family {name!r}; valid names: {names()}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for family {name!r}; valid sizes: {list(SIZES)}")
    return FAMILIES[name](size=size, seed=seed)


__all__ = [
    "FAMILIES",
    "KINDS",
    "SIZES",
    "Family",
    "MPCSystem",
    "kalman",
    "lasso",
    "make",
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
