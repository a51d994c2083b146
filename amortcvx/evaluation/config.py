"""The configuration of an experiment (:class:`ExperimentConfig`): every option, its default and its meaning, once.

The command line (``amortcvx run / fit / evaluate``) and the benchmarks build their flags from these fields
(:mod:`amortcvx.evaluation.options`); the training options take their defaults from
:class:`~amortcvx.training.TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amortcvx.deploy.solver import SAFEGUARD_REFERENCES
from amortcvx.iterations import AndersonSettings
from amortcvx.solvers import NAMES, get_solver
from amortcvx.training import LossWeights, TrainConfig

_TRAIN = TrainConfig()  # the training defaults, read from their one definition

DTYPES = ("float32", "float64")


def problem_name(spec: str) -> str:
    """A short name of a problem file spec ``path/to/file.py:function``: the file's stem, plus ``-function``
    unless the function is ``make`` (used in dataset and output folder names)."""
    path, _, func = spec.rpartition(":") if ":" in spec else (spec, "", "make")
    stem = Path(path).stem or "problem"
    return stem if func in ("", "make") else f"{stem}-{func}"


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything an experiment depends on.

    Attributes:
        family: a bundled problem family (``amortcvx families`` lists them); ignored when ``problem`` is given.
        problem: your own problem instead of a family: ``path/to/file.py:function``, where ``function()`` returns
            ``(problem, sampler)`` with ``sampler(n, rng) -> {parameter name: array (n, ...)}``, or a
            family-like object (``.problem``, ``.sample(num, seed)``).
        size: family size, ``small`` or ``large`` (families only).
        solver: ``scs`` (any problem) or ``osqp`` (QPs and LPs): the C solver that finishes and the torch
            iteration the predictor is trained through.
        n_train: training instances sampled and solved (a val_fraction of them is held out for early stopping and
            calibration; the nearest-neighbour baseline searches all of them).
        n_test: held-out test instances (another sampling seed).
        val_fraction: fraction of the training instances used for validation.
        k: unrolled torch steps in training (residual / distance losses) and refinement steps at deployment.
        eval_k: refinement steps to evaluate the trained model with, one learned strategy each (default: 0 and k).
        anderson_memory: 0 for plain refinement steps; M > 0 allows safeguarded Anderson acceleration of memory M:
            with calibration on, each learned strategy with k > 2 keeps plain or accelerated refinement, whichever
            needs fewer C iterations on the validation split. Training always unrolls plain steps.
        polish: polish every refined warm start on its guessed active set and keep the better point (LPs and QPs
            only).
        weights: training loss weights: regression to the optimum, fixed-point residual after k steps, distance to
            the optimum after k steps.
        epochs: maximum training epochs.
        batch_size: training mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        patience: early stopping after this many epochs without a validation improvement.
        hidden: hidden widths of the predictor's MLP.
        seed: seeds the sampling (train 2 seed, test 2 seed + 1), the split and the training.
        family_seed: seed of the family's constant data (families only).
        eps: tolerance of the compared C solves (eps_abs = eps_rel).
        data_root: folder where the solved datasets are cached (resumable).
        out_dir: the run directory: configuration, checkpoints, model, tables, CSV files, plots ({name}, {size},
            {solver} are filled in).
        workers: processes for the C solves (default: all cores; 1: in this process).
        device: torch device of training, prediction and refinement.
        dtype: torch dtype of training, prediction and refinement.
        torch_threads: torch intra-op threads during the run (0: leave torch's setting).
        safeguard: send an instance to the cold start when its refined prediction's fixed-point residual exceeds
            the reference's.
        safeguard_reference: what the safeguard compares with: the cold start's first step (cold) or the cold
            start refined by the same k steps (refined_cold, twice the torch work).
        calibrate: switch the predictor off when its median C iterations on the validation split are above the
            (refined) cold start's; the test instances are never used for this.
        refine_cold: add, for each k > 0 of eval_k, the control "cold + k torch steps" (the same refinement
            without the predictor).
        timing_batch: the large batch of the end-to-end timing (0 skips it).
        timing_single: instances timed at batch 1 (0 skips it).
        progress: stage messages and progress bars on stderr.
        resume: continue an interrupted training from the run directory's checkpoint.pt.state (False: train from
            scratch and replace it); the datasets are always reused from data_root.
    """

    family: str = "mpc"
    problem: str | None = field(default=None, metadata={"metavar": "FILE.py:FUNCTION"})
    size: str = "small"
    solver: str = field(default="scs", metadata={"choices": NAMES, "aliases": ("--algorithm",)})
    n_train: int = 2000
    n_test: int = 200
    val_fraction: float = 0.1
    k: int = 10
    eval_k: tuple[int, ...] | None = None
    anderson_memory: int = field(default=0, metadata={"flag": "--anderson", "metavar": "M"})
    polish: bool = False
    weights: LossWeights = _TRAIN.weights
    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    lr: float = field(default=_TRAIN.lr, metadata={"positive": True})
    weight_decay: float = _TRAIN.weight_decay
    patience: int = _TRAIN.patience
    hidden: tuple[int, ...] = field(default=_TRAIN.hidden, metadata={"positive": True})
    seed: int = 0
    family_seed: int = 0
    eps: float = field(default=1e-4, metadata={"positive": True})
    data_root: str = "data"
    out_dir: str = field(default="runs/{name}-{size}-{solver}", metadata={"flag": "--out"})
    workers: int | None = None
    device: str = _TRAIN.device
    dtype: str = field(default=_TRAIN.dtype, metadata={"choices": DTYPES})
    torch_threads: int = 1
    safeguard: bool = True
    safeguard_reference: str = field(default="cold", metadata={"choices": SAFEGUARD_REFERENCES})
    calibrate: bool = True
    refine_cold: bool = True
    timing_batch: int = 1024
    timing_single: int = 50
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        get_solver(self.solver)  # ValueError listing the known solvers
        if self.problem is not None and (not isinstance(self.problem, str) or not self.problem.strip()):
            raise ValueError(f"problem must be 'path/to/file.py:function' or None; got {self.problem!r}")
        for name in ("n_train", "n_test", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.n_train < 2:
            raise ValueError(f"n_train must be at least 2 (training and validation); got {self.n_train}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number; got {self.eps!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 <= self.k <= 60:
            raise ValueError(f"k must be an int in 0..60; got {self.k!r}")
        if self.eval_k is not None:
            object.__setattr__(self, "eval_k", tuple(self.eval_k))
            if not self.eval_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.eval_k):
                raise ValueError(f"eval_k must be a non-empty tuple of nonnegative ints; got {self.eval_k!r}")
        if isinstance(self.anderson_memory, bool) or not isinstance(self.anderson_memory, int) \
                or self.anderson_memory < 0:
            raise ValueError(f"anderson_memory must be a nonnegative int; got {self.anderson_memory!r}")
        for name in ("polish", "resume", "safeguard", "calibrate", "refine_cold", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.safeguard_reference not in SAFEGUARD_REFERENCES:
            raise ValueError(f"safeguard_reference must be one of {SAFEGUARD_REFERENCES}; "
                             f"got {self.safeguard_reference!r}")
        if not isinstance(self.weights, LossWeights):
            raise TypeError(f"weights must be a LossWeights; got {type(self.weights).__name__}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ValueError(f"workers must be None or a positive int; got {self.workers!r}")
        for name in ("timing_batch", "timing_single", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be nonnegative; got {getattr(self, name)}")
        object.__setattr__(self, "hidden", tuple(self.hidden))

    @property
    def algorithm(self) -> str:
        """The former name of :attr:`solver`."""
        return self.solver

    @property
    def name(self) -> str:
        """The problem's short name: the family, or :func:`problem_name` of the problem file."""
        return problem_name(self.problem) if self.problem is not None else self.family

    @property
    def run_dir(self) -> Path:
        """``out_dir`` with ``{name}`` (``{family}``), ``{size}``, ``{solver}`` (``{algorithm}``) filled in."""
        text = self.out_dir
        for key, value in (("name", self.name), ("family", self.name), ("size", self.size),
                           ("solver", self.solver), ("algorithm", self.solver)):
            text = text.replace("{" + key + "}", value)
        return Path(text)

    @property
    def refine_steps(self) -> tuple[int, ...]:
        """The refinement steps evaluated: ``eval_k``, or 0 and ``k``."""
        return self.eval_k if self.eval_k is not None else tuple(sorted({0, self.k}))

    @property
    def anderson(self) -> AndersonSettings | None:
        """The refinement's acceleration: None, or ``AndersonSettings(memory=anderson_memory)``."""
        return AndersonSettings(memory=self.anderson_memory) if self.anderson_memory else None

    @property
    def solver_settings(self) -> dict[str, float]:
        """C solver settings of the compared solves: ``eps_abs = eps_rel = eps`` over the backend defaults."""
        return {"eps_abs": float(self.eps), "eps_rel": float(self.eps)}

    def train_config(self, checkpoint: str | None = None) -> TrainConfig:
        """The :class:`~amortcvx.training.TrainConfig` of this experiment's training."""
        return TrainConfig(k=self.k, weights=self.weights, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, patience=self.patience, seed=self.seed,
                           device=self.device, dtype=self.dtype, hidden=self.hidden, progress=self.progress,
                           checkpoint=checkpoint, resume=self.resume)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (:meth:`from_dict` reads it back)."""
        out = dataclasses.asdict(self)
        out["weights"] = dataclasses.asdict(self.weights)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> ExperimentConfig:
        """The configuration saved by :meth:`to_dict` (an older file's ``algorithm`` reads as ``solver``)."""
        values = dict(data)
        if "algorithm" in values:
            values.setdefault("solver", values.pop("algorithm"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        if isinstance(values.get("weights"), dict):
            values["weights"] = LossWeights(**values["weights"])
        for key in ("eval_k", "hidden"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        values.update(overrides)
        return cls(**values)
