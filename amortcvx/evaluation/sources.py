"""Where an experiment's problem comes from: a bundled family or the user's own file, behind one interface.

A :class:`ProblemSource` is a CVXPY problem, a seeded sampler of its parameters and, for sequential problems,
the episode of each sampled row. :func:`load_problem_file` reads ``path/to/file.py:function`` where
``function()`` returns either

* ``(problem, sampler)`` with ``sampler(n: int, rng: numpy.random.Generator) -> {parameter name: array (n, ...)}``,
* or a family-like object: ``.problem`` and ``.sample(num, seed) -> {parameter name: array (num, ...)}`` (an
  ``amortcvx.problems.Family`` is one; ``.name``, ``.kind``, ``.sequential`` and ``.extras`` are read when
  present).

Every error names the file and function at fault, and the sampler's output is checked against the problem's
parameters (names, shapes, finite real values) on a first small draw, before any solve.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import cvxpy as cp
import numpy as np

from amortcvx.evaluation.baselines import episode_ids
from amortcvx.solvers import get_solver

Sampler = Callable[[int, int], dict[str, np.ndarray]]


class ProblemSource(NamedTuple):
    """A parametric problem and its parameter distribution.

    Attributes:
        name: short name (dataset and output folder names).
        problem: the DPP CVXPY problem.
        sample: ``sample(num, seed) -> {parameter name: array (num, ...)}`` (same seed, same draws).
        kind: the family kind (``qp``, ``lp``, ``socp``, ``sdp``) or ``"custom"`` for a problem file.
        episodes: ``episodes(num)`` -> episode id of each sampled row for sequential problems, or None.
        origin: where it came from, for messages (``family mpc (small)``, ``problem.py:make``).
    """

    name: str
    problem: cp.Problem
    sample: Sampler
    kind: str
    episodes: Callable[[int], np.ndarray] | None
    origin: str


def family_episodes(family, num: int) -> np.ndarray | None:
    """Episode id of each of the first ``num`` sampled rows of a sequential family (None if not sequential)."""
    if not getattr(family, "sequential", False):
        return None
    system = getattr(family, "extras", {}).get("system")
    length = getattr(system, "episode_length", None)
    if length is None:
        raise ValueError(f"family {family.name!r} is sequential but declares no episode length "
                         "(extras['system'].episode_length)")
    return episode_ids(num, int(length))


def from_family(family, origin: str | None = None) -> ProblemSource:
    """A :class:`ProblemSource` of a family object (``amortcvx.problems.Family`` or one like it)."""
    name = str(getattr(family, "name", "problem"))
    episodes = (lambda num: family_episodes(family, num)) if getattr(family, "sequential", False) else None
    return ProblemSource(name=name, problem=family.problem, sample=family.sample,
                         kind=str(getattr(family, "kind", "custom")), episodes=episodes,
                         origin=origin or f"family {name}")


def bundled_family(name: str, size: str, seed: int = 0) -> ProblemSource:
    """The bundled family ``name`` (``amortcvx.problems``; a ValueError names the valid families / sizes)."""
    from amortcvx import problems

    return from_family(problems.make(name, size=size, seed=seed), origin=f"family {name} ({size})")


def _split_spec(spec: str) -> tuple[Path, str]:
    path, sep, func = spec.rpartition(":")
    if not sep or not path or "/" in func or "\\" in func:  # no function given (or a Windows drive letter only)
        path, func = spec, "make"
    return Path(path), func or "make"


def _load_module(path: Path, spec: str):
    if not path.is_file():
        raise ValueError(f"problem file {spec!r}: {path} does not exist" if not path.exists()
                         else f"problem file {spec!r}: {path} is not a file")
    mod_name = f"amortcvx_user_problem_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"problem file {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # so that pickling / dataclasses in the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ValueError(f"problem file {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _rng_sampler(sampler: Callable, where: str) -> Sampler:
    def sample(num: int, seed: int) -> dict[str, np.ndarray]:
        return sampler(num, np.random.default_rng(seed))

    sample.__doc__ = f"{where}'s sampler(n, numpy.random.default_rng(seed))"
    return sample


def check_sample(problem: cp.Problem, params: Any, num: int, where: str) -> dict[str, np.ndarray]:
    """Check one draw ``params`` of ``num`` rows against ``problem``'s parameters; returns it as float arrays.

    Raises:
        ValueError: not a mapping, missing or unknown parameter names, a wrong shape (the leading dimension
            must be ``num``, the rest the parameter's shape), non-numeric or non-finite values. The message
            names ``where`` (the file and function).
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: the sampler must return a dict {{parameter name: array}}; got "
                         f"{type(params).__name__}")
    expected = {p.name(): p for p in problem.parameters()}
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ValueError(f"{where}: the sampler's names do not match the problem's parameters "
                         f"{sorted(expected)}: " + "; ".join(
                             ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])))
    out = {}
    for name, param in expected.items():
        try:
            value = np.asarray(params[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: parameter {name!r}: the sampler returned non-numeric values") from None
        shape = (num, *param.shape)
        if value.shape != shape:
            raise ValueError(f"{where}: parameter {name!r}: the sampler returned shape {value.shape} for n = {num}; "
                             f"expected {shape} (n, then the parameter's shape {param.shape})")
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: parameter {name!r}: the sampler returned NaN or infinite values")
        out[name] = value
    return out


def _checked(source: ProblemSource, where: str) -> ProblemSource:
    """Wrap ``source.sample`` so that every draw is checked (:func:`check_sample`), and check one draw now."""
    raw = source.sample

    def sample(num: int, seed: int) -> dict[str, np.ndarray]:
        try:
            params = raw(num, seed)
        except Exception as exc:
            raise ValueError(f"{where}: the sampler raised {type(exc).__name__}: {exc}") from exc
        return check_sample(source.problem, params, num, where)

    sample(2, 0)
    return source._replace(sample=sample)


def load_problem_file(spec: str, name: str | None = None) -> ProblemSource:
    """The :class:`ProblemSource` of ``path/to/file.py:function`` (``:make`` when no function is given).

    Raises:
        ValueError: a missing file, an import error in it, no such function, a function that raises or returns
            something else than ``(problem, sampler)`` or a family-like object, a problem that is not a DPP
            ``cp.Problem`` with parameters, or a sampler whose output has the wrong names / shapes. The message
            names the file and function.
    """
    from amortcvx.evaluation.config import problem_name

    path, func_name = _split_spec(spec)
    where = f"{path}:{func_name}"
    module = _load_module(path, spec)
    func = getattr(module, func_name, None)
    if func is None:
        funcs = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"problem file {spec!r}: {path} has no function {func_name!r}"
                         + (f" (its functions: {', '.join(funcs)})" if funcs else ""))
    if not callable(func):
        raise ValueError(f"problem file {spec!r}: {func_name!r} in {path} is not a function")
    try:
        made = func()
    except Exception as exc:
        raise ValueError(f"{where}() raised {type(exc).__name__}: {exc}") from exc
    name = name or problem_name(spec)
    if isinstance(made, tuple):
        if len(made) != 2 or not isinstance(made[0], cp.Problem) or not callable(made[1]):
            raise ValueError(f"{where}() must return (problem, sampler) with a cp.Problem and a callable "
                             f"sampler(n, rng), or a family object; got a tuple of "
                             f"({', '.join(type(v).__name__ for v in made)})")
        source = ProblemSource(name=name, problem=made[0], sample=_rng_sampler(made[1], where), kind="custom",
                               episodes=None, origin=where)
    elif isinstance(getattr(made, "problem", None), cp.Problem) and callable(getattr(made, "sample", None)):
        source = from_family(made, origin=where)._replace(name=name)
    else:
        raise ValueError(f"{where}() must return (problem, sampler) or a family object with .problem (a "
                         f"cp.Problem) and .sample(num, seed); got {type(made).__name__}")
    if not source.problem.parameters():
        raise ValueError(f"{where}: the problem has no cp.Parameter; there is nothing to learn from")
    if not source.problem.is_dpp():
        raise ValueError(f"{where}: the problem is not DPP (CVXPY's disciplined parametrized programming); "
                         "see https://www.cvxpy.org/tutorial/dpp/")
    return _checked(source, where)


def check_solver(source: ProblemSource, solver: str) -> None:
    """Raise a ValueError, naming the problem, when ``solver`` cannot take it (OSQP: QPs and LPs only)."""
    what = source.origin if source.kind == "custom" else f"{source.origin} (kind {source.kind!r})"
    get_solver(solver).check_problem(source.problem, what=what)


def check_family_algorithm(family, algorithm: str) -> None:
    """Raise a ValueError when solver ``algorithm`` cannot take ``family``'s problem (OSQP: QPs and LPs only)."""
    get_solver(algorithm).check_problem(
        family.problem, what=f"family {getattr(family, 'name', '?')!r} (kind {getattr(family, 'kind', '?')!r})")
