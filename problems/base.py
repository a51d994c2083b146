"""The ``Family`` container shared by all parametric problem families.

A family is a DPP problem ``P(theta)`` written in CVXPY, where ``theta`` is the collection of its
``cp.Parameter`` objects, together with a seeded sampler of realistic parameter values::

    theta ~ sampler(num, rng)            (a dict name -> array of shape (num, *param.shape))
    x*(theta) = argmin P(theta)

The problem's constant data (matrices that do not change between instances) are fixed by the ``seed`` of the
family constructor; the parameter draws are fixed by the generator given to :meth:`Family.sample`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cvxpy as cp
import numpy as np

SIZES: tuple[str, ...] = ("small", "large")
KINDS: tuple[str, ...] = ("qp", "lp", "socp", "sdp", "exp")

Sampler = Callable[[int, np.random.Generator], dict[str, np.ndarray]]

# CVXPY names a parameter "param<id>" when no name is given; such names are not stable across sessions.
_AUTO_NAME = re.compile(r"^param\d+$")


def check_size(size: str, sizes: Mapping[str, Any] | tuple[str, ...] = SIZES) -> None:
    """Raise ``ValueError`` when ``size`` is not one of ``sizes``.

    Args:
        size: the requested size name.
        sizes: the valid size names (or a mapping keyed by them).
    """
    valid = tuple(sizes)
    if size not in valid:
        raise ValueError(f"size must be one of {list(valid)}, got {size!r}")


def as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy generator: ``seed`` itself if it is one, else ``np.random.default_rng(seed)``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


@dataclass(frozen=True, eq=False)
class Family:
    """A parametric convex problem with a sampler of its parameters.

    Instances compare and hash by identity (``eq=False``): they hold a ``cp.Problem`` and dicts, which have
    no meaningful value equality.

    Attributes:
        name: registry key, e.g. ``"portfolio"``.
        problem: a DPP problem (``problem.is_dpp()`` is True).
        parameters: every ``cp.Parameter`` of the problem, keyed by its (unique, explicit) name.
        kind: ``"qp"``, ``"lp"``, ``"socp"``, ``"sdp"`` or ``"exp"`` (exponential cones).
        size: ``"small"`` or ``"large"``.
        sampler: ``(num, rng) -> {name: array of shape (num, *param.shape)}``.
        sequential: True when consecutive sampled instances form trajectories (e.g. MPC in closed loop).
        description: one line.
        extras: read-only mapping of family-specific constants (system matrices, variables, ...).
    """

    name: str
    problem: cp.Problem
    parameters: dict[str, cp.Parameter]
    kind: str
    size: str
    sampler: Sampler
    sequential: bool = False
    description: str = ""
    extras: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Family {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        check_size(self.size)
        # Own copies, so the caller's dicts are never aliased or mutated.
        object.__setattr__(self, "parameters", dict(self.parameters))
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))
        problem_params = self.problem.parameters()
        names = [p.name() for p in problem_params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Family {self.name!r}: parameter names are not unique: {duplicates}")
        auto = sorted(n for n in names if _AUTO_NAME.match(n))
        if auto:
            raise ValueError(f"Family {self.name!r}: parameters without an explicit name=: {auto}")
        if set(names) != set(self.parameters):
            raise ValueError(
                f"Family {self.name!r}: `parameters` keys {sorted(self.parameters)} differ from the "
                f"problem's parameters {sorted(names)}")
        for p in problem_params:
            if self.parameters[p.name()] is not p:
                raise ValueError(
                    f"Family {self.name!r}: parameters[{p.name()!r}] is not the problem's parameter")
        for key, p in self.parameters.items():
            attrs = sorted(a for a, v in p.attributes.items() if v not in (False, None))
            if attrs:
                raise ValueError(
                    f"Family {self.name!r}: parameter {key!r} has attributes {attrs}; use plain parameters")
        if not self.problem.is_dpp():
            raise ValueError(f"Family {self.name!r}: the problem is not DPP")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter, by name."""
        return {k: tuple(p.shape) for k, p in self.parameters.items()}

    def sample(self, num: int, seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
        """Seeded batch of realistic parameter values.

        Args:
            num: number of instances (>= 1).
            seed: an int seed or a numpy ``Generator`` (consumed).

        Returns:
            A new dict ``name -> float64 array of shape (num, *param.shape)``, one entry per parameter.
            For ``sequential`` families, consecutive rows follow trajectories (see the family's docs).
        """
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        num = int(num)
        values = self.sampler(num, as_generator(seed))
        if set(values) != set(self.parameters):
            raise ValueError(
                f"Family {self.name!r}: sampler returned keys {sorted(values)}, "
                f"expected {sorted(self.parameters)}")
        out: dict[str, np.ndarray] = {}
        for key, p in self.parameters.items():
            arr = np.asarray(values[key], dtype=np.float64)
            expected = (num, *p.shape)
            if arr.shape != expected:
                raise ValueError(
                    f"Family {self.name!r}: sampler returned shape {arr.shape} for parameter {key!r}, "
                    f"expected {expected}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Family {self.name!r}: sampler returned non-finite values for {key!r}")
            out[key] = arr
        return out

    def assign(self, values: Mapping[str, np.ndarray], index: int | None = None) -> None:
        """Set the problem's parameter values (``param.value``) from a sample.

        Args:
            values: ``name -> array``; either a batch from :meth:`sample` (then ``index`` picks the row) or
                single values of shape ``param.shape`` (``index=None``).
            index: row of the batch to assign, or None for unbatched values.
        """
        missing = sorted(set(self.parameters) - set(values))
        if missing:
            raise ValueError(f"Family {self.name!r}: values lack parameters {missing}")
        for key, p in self.parameters.items():
            arr = np.asarray(values[key], dtype=np.float64)
            if index is not None:
                arr = arr[index]
            if arr.shape != tuple(p.shape):
                raise ValueError(
                    f"Family {self.name!r}: value for parameter {key!r} has shape {arr.shape}, "
                    f"expected {tuple(p.shape)}")
            p.value = arr
