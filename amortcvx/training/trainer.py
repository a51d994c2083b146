"""Train a warm-start predictor through the torch solver layers.

One epoch shuffles the training instances (with a seeded generator), and for each mini-batch: canonicalizes
its parameters (:meth:`ParametricProblem.canonicalize_vector`, differentiable), binds the algorithm to that
data, predicts ``z0``, computes :func:`~amortcvx.training.losses.losses` and takes an Adam step. After each
epoch the same losses on the validation set decide early stopping; the best model so far is written
atomically to ``TrainConfig.checkpoint`` (weights, normalization, meta), so an interrupted run keeps it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations.registry import DATA_FORMS, make_algorithm
from amortcvx.predictors.fixed_point import output_space
from amortcvx.predictors.model import SETTINGS, PredictorMeta, WarmStartPredictor
from amortcvx.training.losses import LossWeights, losses


class SolvedSet(NamedTuple):
    """Parameters and optimal canonical solutions of a set of instances (all float64 numpy or torch).

    Attributes:
        theta: flattened parameter vectors (N, num_params) (see ``ParametricProblem.parameter_vector``).
        x, y: optimal primal / dual solutions (N, n), (N, m).
        s: SCS slacks (N, m), or None for OSQP.
    """

    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    @classmethod
    def from_dataset(cls, pp: ParametricProblem, dataset) -> SolvedSet:
        """The optimally solved instances of an ``amortcvx.datasets.Dataset`` (others are left out)."""
        if dataset.fingerprint != pp.fingerprint:
            raise ValueError(f"the dataset is for problem {dataset.fingerprint}, not this one ({pp.fingerprint})")
        ok = np.flatnonzero(dataset.ok)
        sub = dataset.subset(ok)
        x, y, s = sub.torch_solution()
        return cls(pp.parameter_vector(sub.params), x, y, s)

    def subset(self, idx) -> SolvedSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return SolvedSet(*(None if t is None else t[idx] for t in self))

    def to(self, device, dtype) -> SolvedSet:
        return SolvedSet(*(None if t is None else torch.as_tensor(t).to(device=device, dtype=dtype) for t in self))


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Attributes:
        k: unrolled torch solver steps for the residual / distance losses (0..60).
        weights: which losses, and their weights.
        epochs: maximum number of epochs.
        batch_size: mini-batch size.
        lr, weight_decay: Adam settings.
        patience: stop after this many epochs without a validation improvement.
        seed: seeds the model initialization and the shuffling (same seed, same numbers).
        device, dtype: where and in which precision training runs ("cpu", "cuda", ...; "float32"/"float64").
        checkpoint: path of the best model so far (written atomically), or None.
        unroll_checkpoint: steps per checkpointed block of the unroll (memory-light mode), or None.
        hidden: hidden widths of the default MLP.
        progress: show a progress bar with the losses.
    """

    k: int = 0
    weights: LossWeights = LossWeights()
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    checkpoint: str | None = None
    unroll_checkpoint: int | None = None
    hidden: tuple[int, ...] = (256, 256)
    progress: bool = True

    def __post_init__(self):
        if not 0 <= self.k <= 60:
            raise ValueError(f"k must be in 0..60; got {self.k}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")


class TrainResult(NamedTuple):
    """The best model (by validation loss) and the per-epoch history (dicts of mean losses)."""

    model: WarmStartPredictor
    history: list[dict[str, float]]
    best_epoch: int


def settings_dict(settings) -> dict:
    """Plain-dict form of algorithm settings (for the predictor's meta)."""
    return {} if settings is None else dataclasses.asdict(settings)


def _batch_losses(pp, algorithm, settings, space, model, batch: SolvedSet, config: TrainConfig):
    data = pp.canonicalize_vector(batch.theta)
    alg = make_algorithm(algorithm, data, settings)
    target = space.target(alg, batch.x, batch.y, batch.s).detach()
    z0 = model(batch.theta)
    return losses(alg, space, z0, target, model.out_std, config.k, config.weights,
                  checkpoint=config.unroll_checkpoint)


def train(pp: ParametricProblem, algorithm: str, train_set: SolvedSet, val_set: SolvedSet,
          config: TrainConfig = TrainConfig(), *, settings=None, core: nn.Module | None = None) -> TrainResult:
    """Fit a :class:`WarmStartPredictor` for ``pp`` and ``algorithm`` (``"scs"`` or ``"osqp"``).

    Args:
        pp: the compiled problem; its form must match the algorithm (cone for SCS, qp for OSQP).
        algorithm: the fixed-point algorithm whose variable the predictor outputs and whose steps are unrolled.
        train_set, val_set: solved instances (see :class:`SolvedSet`); validation drives early stopping.
        config: training settings.
        settings: the algorithm's settings (``ScsSettings`` / ``OsqpSettings``; defaults if None).
        core: optional custom ``nn.Module`` (num_params -> d, in normalized units) instead of the MLP.

    Returns:
        :class:`TrainResult` with the best model on the validation set.
    """
    from tqdm.auto import tqdm

    if DATA_FORMS.get(algorithm) != pp.form:
        raise ValueError(f"algorithm {algorithm!r} needs a ParametricProblem of form "
                         f"{DATA_FORMS.get(algorithm)!r}; this one has form {pp.form!r}")
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("the training and validation sets must be non-empty")
    settings = SETTINGS[algorithm]() if settings is None else settings
    space = output_space(algorithm)
    dtype = getattr(torch, config.dtype)
    device = torch.device(config.device)
    train_set, val_set = train_set.to(device, dtype), val_set.to(device, dtype)
    meta = PredictorMeta(fingerprint=pp.fingerprint, algorithm=algorithm, settings=settings_dict(settings),
                         num_params=pp.num_params, out_dim=space.dim(pp.n, pp.m))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = WarmStartPredictor(meta, core=core, hidden=config.hidden)
    model = model.to(device=device, dtype=dtype)
    with torch.no_grad():  # normalization from the training targets
        data = pp.canonicalize_vector(train_set.theta)
        alg = make_algorithm(algorithm, data, settings)
        model.fit_normalization(train_set.theta, space.target(alg, train_set.x, train_set.y, train_set.s))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best, best_epoch, best_state = math.inf, -1, None
    bar = tqdm(range(config.epochs), disable=not config.progress, desc=f"train {algorithm} k={config.k}")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train_set), generator=gen)
        sums: dict[str, float] = {}
        for start in range(0, len(train_set), config.batch_size):
            batch = train_set.subset(perm[start:start + config.batch_size])
            out = _batch_losses(pp, algorithm, settings, space, model, batch, config)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            opt.step()
            for key, val in out.items():
                sums[key] = sums.get(key, 0.0) + float(val.detach()) * len(batch)
        record = {f"train_{k}": v / len(train_set) for k, v in sums.items()}
        record.update({f"val_{k}": v for k, v in evaluate_losses(pp, algorithm, settings, model, val_set,
                                                                 config).items()})
        record["epoch"] = epoch
        history.append(record)
        val = record["val_total"]
        if not np.isfinite(val):
            raise FloatingPointError(f"validation loss is {val} at epoch {epoch}; lower the learning rate")
        if val < best:
            best, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if config.checkpoint:
                model.save(config.checkpoint)
        bar.set_postfix(train=f"{record['train_total']:.3g}", val=f"{val:.3g}", best=best_epoch)
        if epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch)


@torch.no_grad()
def evaluate_losses(pp: ParametricProblem, algorithm: str, settings, model: WarmStartPredictor, solved: SolvedSet,
                    config: TrainConfig) -> dict[str, float]:
    """Mean losses of ``model`` on ``solved`` (in mini-batches, no gradients)."""
    model.eval()
    space = output_space(algorithm)
    sums: dict[str, float] = {}
    for start in range(0, len(solved), config.batch_size):
        batch = solved.subset(torch.arange(start, min(start + config.batch_size, len(solved))))
        out = _batch_losses(pp, algorithm, settings, space, model, batch, config)
        for key, val in out.items():
            sums[key] = sums.get(key, 0.0) + float(val) * len(batch)
    return {k: v / len(solved) for k, v in sums.items()}


def load_checkpoint(path: str | Path, pp: ParametricProblem, algorithm: str, settings=None) -> WarmStartPredictor:
    """Load a checkpoint written by :func:`train`, checking problem and settings."""
    settings = SETTINGS[algorithm]() if settings is None else settings
    return WarmStartPredictor.load(path, fingerprint=pp.fingerprint, algorithm=algorithm,
                                   settings=settings_dict(settings))
