"""``AmortizedSolver.fit``: from a CVXPY problem and a parameter sampler to a ready, calibrated solver.

The steps, each resumable where it costs time::

    problem --compile (the solver's form)--> ParametricProblem
    sampler(n, rng) or arrays --> parameter batch --solve at high accuracy, cached on disk--> dataset
    dataset --split (train / validation)--> predictor trained through k unrolled solver steps (checkpointed)
    validation --calibrate--> refinement, C solver modes and whether the predictor pays; --> AmortizedSolver

The dataset folder is keyed by the problem's fingerprint, the solver and a hash of the parameter values, so a
second ``fit`` with the same problem and samples reuses it (and an interrupted one resumes it), and different
samples never mix. The training checkpoint sits next to it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import cvxpy as cp
import numpy as np
import torch

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.datasets import generate_dataset
from amortcvx.deploy.solver import newton_choices, polish_choices
from amortcvx.iterations.loop import AndersonSettings
from amortcvx.solvers import get_solver
from amortcvx.training import SolvedSet, TrainConfig, train

Sampler = Callable[[int, np.random.Generator], Mapping[str, Any]]
"""``sampler(n, rng) -> {parameter name: array with leading dimension n}``."""

DEFAULT_INSTANCES = 1000
"""Instances drawn from a sampler when ``num`` is not given (training + validation)."""

VALIDATION_FRACTION = 0.2
"""Share of the solved instances held out for validation (early stopping and calibration)."""


def cache_root() -> Path:
    """Where ``fit`` keeps datasets and checkpoints by default: ``$AMORTCVX_CACHE``, else
    ``$XDG_CACHE_HOME/amortcvx``, else ``~/.cache/amortcvx``."""
    if os.environ.get("AMORTCVX_CACHE"):
        return Path(os.environ["AMORTCVX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "amortcvx"


def draw(pp: ParametricProblem, data: Sampler | Mapping[str, Any], num: int | None,
         seed: int | list[int]) -> dict[str, np.ndarray]:
    """The parameter batch: ``data(num, rng)`` for a sampler, else ``data`` itself; checked against ``pp``.

    Raises:
        TypeError: ``data`` is neither a callable nor a mapping, or the sampler returns something else than a
            mapping.
        ValueError: missing or unknown parameter names, or arrays whose shape is not ``(N, *parameter shape)``
            with one ``N`` for all (the message names the parameter).
    """
    shapes = pp.parameter_shapes
    if callable(data) and not isinstance(data, Mapping):
        num = DEFAULT_INSTANCES if num is None else int(num)
        if num < 2:
            raise ValueError(f"num must be at least 2 (training and validation); got {num}")
        name = getattr(data, "__qualname__", type(data).__name__)
        out = data(num, np.random.default_rng(seed))
        if not isinstance(out, Mapping):
            raise TypeError(f"the sampler {name} must return a dict {{parameter name: array (n, *shape)}}; "
                            f"got {type(out).__name__}")
        source = f"the sampler {name}"
    elif isinstance(data, Mapping):
        out, source = data, "data"
    else:
        raise TypeError("data must be a sampler (n, rng) -> {name: array} or a dict {name: array (N, *shape)}; "
                        f"got {type(data).__name__}")
    keys = {k.name() if isinstance(k, cp.Parameter) else k: v for k, v in out.items()}
    missing, unknown = sorted(set(shapes) - set(keys)), sorted(set(keys) - set(shapes))
    if missing or unknown:
        raise ValueError(f"{source} must give every parameter of the problem by name; missing {missing}, "
                         f"unknown {unknown} (the problem's parameters: {sorted(shapes)})")
    params, sizes = {}, set()
    for pname, shape in shapes.items():
        arr = np.asarray(keys[pname], dtype=np.float64)
        if arr.shape[1:] != shape or arr.ndim != len(shape) + 1:
            raise ValueError(f"{source}: parameter {pname!r} must have shape (N, *{shape}) with N instances; got "
                             f"{arr.shape}")
        params[pname] = arr
        sizes.add(arr.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"{source}: the parameters have different numbers of instances: "
                         f"{ {k: v.shape[0] for k, v in params.items()} }")
    if num is not None and sizes != {num}:
        raise ValueError(f"{source} returned {sizes.pop()} instances; {num} were asked for")
    if sizes.pop() < 2:
        raise ValueError(f"{source}: at least 2 instances are needed (training and validation)")
    return params


def params_digest(params: Mapping[str, np.ndarray]) -> str:
    """A short hash of parameter values (names, shapes and bytes), keying the dataset folder."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name], dtype=np.float64)
        h.update(repr((name, arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:12]


CHUNK = 250
"""Instances drawn per call of the sampler when the recipe asks for more (``budget`` given)."""


class SolvedSource:
    """``get_solved(n)`` for :func:`amortcvx.training.recipe.fit_predictor`: the first ``n`` optimally solved
    instances, drawn from the sampler in chunks of :data:`CHUNK` (chunk ``j`` from ``numpy.random.default_rng([seed,
    j])``, so a prefix never changes) and solved on first use into cached, resumable datasets. From a dict of
    arrays, its rows in order (all solved at once)."""

    def __init__(self, pp: ParametricProblem, solver: str, data: Sampler | Mapping[str, Any], seed: int,
                 root: Path, workers: int | None, progress: bool):
        self.pp, self.solver, self.data, self.seed = pp, solver, data, seed
        self.root, self.workers, self.progress = root, workers, progress
        self.chunks: list = []  # the optimally solved rows of each chunk's dataset
        self.sets: list[SolvedSet] = []  # the same rows as SolvedSets, converted once
        self.exhausted = False

    def _more(self) -> None:
        if callable(self.data) and not isinstance(self.data, Mapping):
            params = draw(self.pp, self.data, CHUNK, [self.seed, len(self.chunks)])
        elif not self.chunks:
            params = draw(self.pp, self.data, None, self.seed)
        else:
            self.exhausted = True
            return
        ds = generate_dataset(self.pp, params, self.solver, self.root, name=f"fit-{params_digest(params)}",
                              workers=self.workers, progress=self.progress)
        self.chunks.append(ds.subset(np.flatnonzero(ds.ok)))
        self.sets.append(SolvedSet.from_dataset(self.pp, self.chunks[-1]))

    def _rows(self, n: int) -> list:
        while sum(len(c) for c in self.chunks) < n and not self.exhausted:
            self._more()
        return self.chunks

    def __call__(self, n: int) -> SolvedSet:
        self._rows(n)
        sets = self.sets
        joined = SolvedSet(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*sets)))
        return joined.subset(range(min(n, len(joined))))

    def params(self, n: int) -> dict[str, np.ndarray]:
        """The parameter values of the first ``n`` solved instances (the rows ``__call__(n)`` returns)."""
        chunks = self._rows(n)
        return {name: np.concatenate([c.params[name] for c in chunks])[:n] for name in self.pp.parameter_shapes}


def fit(cls, problem: cp.Problem, data: Sampler | Mapping[str, Any], *, solver: str = "scs", num: int | None = None,
        k: int = 10, eps: float = 1e-4, solver_settings: Mapping[str, Any] | None = None,
        train_config: TrainConfig | None = None, epochs: int | None = None, budget: float | None = None,
        root: str | os.PathLike | None = None, seed: int = 0, device: str = "cpu", workers: int | None = 1,
        calibrate: bool = True, progress: bool = True, **solver_options: Any):
    """See :meth:`amortcvx.deploy.AmortizedSolver.fit` (``cls`` is the class it builds)."""
    description = get_solver(solver)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    if isinstance(problem, ParametricProblem):
        pp = problem
        if pp.form != description.form:
            raise ValueError(f"solver {solver!r} needs a problem compiled in form {description.form!r}; got "
                             f"{pp.form!r}")
    else:
        description.check_problem(problem)
        pp = ParametricProblem(problem, form=description.form)
    root = cache_root() if root is None else Path(root)
    settings = {"eps_abs": float(eps), "eps_rel": float(eps), **dict(solver_settings or {})}
    if budget is not None:
        return _fit_recipe(cls, pp, solver, data, k=k, settings=settings, budget=budget, root=root, seed=seed,
                           device=device, workers=workers, calibrate=calibrate, progress=progress,
                           **solver_options)
    params = draw(pp, data, num, seed)
    ds = generate_dataset(pp, params, solver, root, name=f"fit-{params_digest(params)}", workers=workers,
                          progress=progress)
    ok = np.flatnonzero(ds.ok)
    if ok.size < 2:
        raise ValueError(f"only {ok.size} of {len(ds)} sampled instances could be solved to optimality "
                         f"(statuses: {sorted(set(map(str, ds.status)))}); check the sampler")
    perm = np.random.default_rng(seed).permutation(ok)
    n_val = min(max(1, round(VALIDATION_FRACTION * ok.size)), ok.size - 1)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    train_set = SolvedSet.from_dataset(pp, ds.subset(train_idx))
    val_ds = ds.subset(val_idx)
    val_set = SolvedSet.from_dataset(pp, val_ds)
    config = train_config or TrainConfig(k=min(k, 60), seed=seed, device=device, progress=progress)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    config = replace(config, checkpoint=str(ds.path / f"model-{_config_digest(config)}.pt"), resume=True)
    model = train(pp, solver, train_set, val_set, config).model
    out = cls(pp, model, k=k, solver_settings=settings, device=device, **solver_options)
    if calibrate:
        out.calibrate(val_ds.params, refinements=(None, AndersonSettings()), newton_steps=newton_choices(pp),
                      polish=_polish_options(pp, solver_options), refine_steps=refine_choices(k), progress=progress)
    return out


def refine_choices(k: int) -> tuple[int, ...]:
    """The refinement steps calibration chooses among after ``fit``: none, or the ``k`` asked for (a prediction
    that is exact alone needs no steps; calibration keeps the fastest of the options tied at the fewest C
    iterations)."""
    return tuple(sorted({0, k}))


def _polish_options(pp: ParametricProblem, solver_options: dict) -> tuple[bool, ...] | None:
    """What calibration chooses ``polish`` among: :func:`polish_choices`, unless the caller set ``polish``."""
    return None if "polish" in solver_options else polish_choices(pp)


def _fit_recipe(cls, pp: ParametricProblem, solver: str, data, *, k: int, settings: dict, budget: float, root: Path,
                seed: int, device: str, workers: int | None, calibrate: bool, progress: bool, **solver_options: Any):
    """``fit`` with the automatic recipe (:func:`amortcvx.training.recipe.fit_predictor`) choosing the number of
    instances, the model and its training within ``budget`` seconds; the recipe's validation instances calibrate."""
    from amortcvx.training.recipe import RecipeSettings, fit_predictor

    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget must be a positive number of seconds; got {budget!r}")
    source = SolvedSource(pp, solver, data, seed, root, workers, progress)
    result = fit_predictor(pp, solver, source, budget_seconds=float(budget), k=min(k, 60), seed=seed, device=device,
                           solver_settings=settings, recipe=RecipeSettings(), progress=progress)
    out = cls(pp, result.model, k=k, solver_settings=settings, device=device, **solver_options)
    out.recipe = result
    if calibrate:
        rows = np.asarray(result.val_rows)
        val_params = {name: v[rows] for name, v in source.params(int(rows.max()) + 1).items()}
        out.calibrate(val_params, refinements=(None, AndersonSettings()), newton_steps=newton_choices(pp),
                      polish=_polish_options(pp, solver_options), refine_steps=refine_choices(k), progress=progress)
    return out


def _config_digest(config: TrainConfig) -> str:
    """A short hash of the training settings that shape the model (so another configuration gets another file)."""
    keep = {k: v for k, v in vars(config).items() if k not in ("checkpoint", "resume", "progress", "epochs",
                                                                "patience")}
    return hashlib.sha256(repr(sorted(keep.items())).encode()).hexdigest()[:8]
