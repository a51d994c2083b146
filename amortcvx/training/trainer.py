"""Train a warm-start predictor through the torch solver layers.

One epoch shuffles the training instances (with a seeded generator), and for each mini-batch: canonicalizes
its parameters (:meth:`ParametricProblem.canonicalize_vector`, differentiable), binds the algorithm to that
data, predicts ``z0``, computes :func:`~amortcvx.training.losses.losses` and takes an Adam step. After each
epoch the same losses on the validation set decide early stopping; the best model so far is written
atomically to ``TrainConfig.checkpoint`` (weights, normalization, meta), so an interrupted run keeps it.
Next to it, ``<checkpoint>.state`` holds the state at the end of the last finished epoch (model, optimizer,
shuffling generator, history, best model); with ``TrainConfig.resume`` a rerun continues from there and ends
with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import FixedPointAlgorithm
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors.fixed_point import output_space
from amortcvx.predictors.model import SETTINGS, PredictorMeta, WarmStartPredictor, atomic_torch_save
from amortcvx.solvers import get_solver
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
        checkpoint: path of the best model so far (written atomically), or None. The training state of the
            last finished epoch goes to ``<checkpoint>.state`` (see :func:`train_state_path`).
        resume: continue from ``<checkpoint>.state`` when it exists (it must come from the same problem,
            algorithm, settings, data and training settings; ``epochs`` and ``patience`` may differ).
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
    resume: bool = False

    def __post_init__(self):
        if not 0 <= self.k <= 60:
            raise ValueError(f"k must be in 0..60; got {self.k}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")


class TrainResult(NamedTuple):
    """The best model (by validation loss) and the per-epoch history (dicts of mean losses).

    ``start_epoch`` is the first epoch this call trained: 0, or the epoch after the last finished one of the
    resumed training state (``config.epochs`` when the saved run had already finished or stopped early).
    """

    model: WarmStartPredictor
    history: list[dict[str, float]]
    best_epoch: int
    start_epoch: int = 0


def settings_dict(settings) -> dict:
    """Plain-dict form of algorithm settings (for the predictor's meta)."""
    return {} if settings is None else dataclasses.asdict(settings)


def _batch_losses(pp, algorithm, settings, space, model, batch: SolvedSet, config: TrainConfig,
                  factors: FactorCache | None = None, target: torch.Tensor | None = None):
    """The losses of one mini-batch. ``target``: the batch's fixed-point targets where computed beforehand
    (:func:`targets`); the algorithm (and, where parameters enter ``A`` or ``P``, its factorization) is then
    built only when a loss unrolls steps."""
    alg = None
    if target is None or config.weights.needs_unroll:
        alg = make_algorithm(algorithm, pp.canonicalize_vector(batch.theta), settings, cache=factors)
    if target is None:
        target = space.target(alg, batch.x, batch.y, batch.s)
    z0 = model(batch.theta)
    return losses(alg, space, z0, target.detach(), model.out_std, config.k, config.weights,
                  checkpoint=config.unroll_checkpoint)


@torch.no_grad()
def targets(pp: ParametricProblem, algorithm: str, settings, solved: SolvedSet, batch_size: int,
            factors: FactorCache | None = None) -> torch.Tensor:
    """The fixed-point targets ``z*`` of a solved set (B, d), computed once, in chunks of ``batch_size``: they
    do not change during training, and building the algorithm for them factors ``A`` / ``P`` where parameters
    enter them."""
    space = output_space(algorithm)
    return torch.cat([space.target(alg, part.x, part.y, part.s)
                      for part, alg in chunk_algorithms(pp, algorithm, settings, solved, batch_size, factors)])


def chunk_algorithms(pp: ParametricProblem, algorithm: str, settings, solved: SolvedSet, size: int,
                     factors: FactorCache | None = None) -> Iterator[tuple[SolvedSet, FixedPointAlgorithm]]:
    """``(part, alg)`` for consecutive chunks of ``size`` instances of ``solved``: the chunk and the algorithm bound
    to its canonical data (set up per chunk: with parameters in ``A`` / ``P``, a factorization per instance)."""
    for start in range(0, len(solved), size):
        part = solved.subset(torch.arange(start, min(start + size, len(solved))))
        yield part, make_algorithm(algorithm, pp.canonicalize_vector(part.theta), settings, cache=factors)


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

    form = get_solver(algorithm, "algorithm").form
    if form != pp.form:
        raise ValueError(f"algorithm {algorithm!r} needs a ParametricProblem of form {form!r}; this one has form "
                         f"{pp.form!r}")
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
    factors = FactorCache()  # A and P without parameters: one factorization for the whole training
    train_targets = targets(pp, algorithm, settings, train_set, config.batch_size, factors)
    val_targets = targets(pp, algorithm, settings, val_set, config.batch_size, factors)
    model.fit_normalization(train_set.theta, train_targets)  # normalization from the training targets
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best, best_epoch, best_state = math.inf, -1, None
    state_path = train_state_path(config.checkpoint) if config.checkpoint else None
    run_key = _run_key(meta, config, train_set, val_set) if state_path is not None else None
    first_epoch = 0
    if config.resume and state_path is not None and state_path.exists():
        saved = _read_train_state(state_path, run_key, device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        history = saved["info"]["history"]
        best, best_epoch = float(saved["info"]["best"]), int(saved["info"]["best_epoch"])
        best_state = saved["best_model"]
        first_epoch = int(saved["info"]["epoch"]) + 1
        if first_epoch > 0 and first_epoch - best_epoch >= config.patience:
            first_epoch = config.epochs  # the saved run had stopped early
    first_epoch = min(first_epoch, config.epochs)
    bar = tqdm(range(first_epoch, config.epochs), initial=first_epoch, total=config.epochs, disable=not config.progress,
               desc=f"train {algorithm} k={config.k}")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train_set), generator=gen)
        sums: dict[str, float] = {}
        for start in range(0, len(train_set), config.batch_size):
            idx = perm[start:start + config.batch_size]
            batch = train_set.subset(idx)
            out = _batch_losses(pp, algorithm, settings, space, model, batch, config, factors,
                                train_targets[idx.to(train_targets.device)])
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            opt.step()
            for key, val in out.items():
                sums[key] = sums.get(key, 0.0) + float(val.detach()) * len(batch)
        record = {f"train_{k}": v / len(train_set) for k, v in sums.items()}
        record.update({f"val_{k}": v for k, v in evaluate_losses(pp, algorithm, settings, model, val_set,
                                                                 config, factors, val_targets).items()})
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
        if state_path is not None:
            _write_train_state(state_path, run_key, epoch, history, best, best_epoch, model, best_state, opt, gen)
        bar.set_postfix(train=f"{record['train_total']:.3g}", val=f"{val:.3g}", best=best_epoch)
        if epoch - best_epoch >= config.patience:
            break
    bar.close()
    if best_state is None:
        raise ValueError("no epoch was trained (epochs <= the epoch of the resumed training state)")
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch, start_epoch=first_epoch)


@torch.no_grad()
def evaluate_losses(pp: ParametricProblem, algorithm: str, settings, model: WarmStartPredictor, solved: SolvedSet,
                    config: TrainConfig, factors: FactorCache | None = None,
                    solved_targets: torch.Tensor | None = None) -> dict[str, float]:
    """Mean losses of ``model`` on ``solved`` (in mini-batches, no gradients; ``factors`` keeps the
    parameter-independent factorizations across batches and calls; ``solved_targets``: the set's
    :func:`targets`, where computed beforehand)."""
    model.eval()
    space = output_space(algorithm)
    sums: dict[str, float] = {}
    for start in range(0, len(solved), config.batch_size):
        idx = torch.arange(start, min(start + config.batch_size, len(solved)))
        batch = solved.subset(idx)
        target = None if solved_targets is None else solved_targets[idx.to(solved_targets.device)]
        out = _batch_losses(pp, algorithm, settings, space, model, batch, config, factors, target)
        for key, val in out.items():
            sums[key] = sums.get(key, 0.0) + float(val) * len(batch)
    return {k: v / len(solved) for k, v in sums.items()}


def load_checkpoint(path: str | Path, pp: ParametricProblem, algorithm: str, settings=None) -> WarmStartPredictor:
    """Load a checkpoint written by :func:`train`, checking problem and settings."""
    settings = SETTINGS[algorithm]() if settings is None else settings
    return WarmStartPredictor.load(path, fingerprint=pp.fingerprint, algorithm=algorithm,
                                   settings=settings_dict(settings))


# ---------------------------------------------------------------------- resumable training state
TRAIN_STATE_FORMAT = "amortcvx.TrainState"
TRAIN_STATE_VERSION = 1


def train_state_path(checkpoint: str | os.PathLike) -> Path:
    """Where :func:`train` keeps the state of its last finished epoch: ``<checkpoint>.state``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".state")


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_key(meta: PredictorMeta, config: TrainConfig, train_set: SolvedSet, val_set: SolvedSet) -> dict:
    """What a training state must match to be resumed (epochs, patience, device and progress may change)."""
    return {"meta": dataclasses.asdict(meta), "k": config.k, "weights": dataclasses.asdict(config.weights),
            "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
            "seed": config.seed, "dtype": config.dtype, "hidden": list(config.hidden),
            "unroll_checkpoint": config.unroll_checkpoint,
            "train_data": _digest(*train_set), "val_data": _digest(*val_set)}


def _write_train_state(path: Path, key: dict, epoch: int, history: list, best: float, best_epoch: int,
                       model: nn.Module, best_state: dict | None, opt: torch.optim.Optimizer,
                       gen: torch.Generator) -> None:
    info = {"key": key, "epoch": epoch, "history": history, "best": best, "best_epoch": best_epoch}
    atomic_torch_save({"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "info": json.dumps(info),
                       "model": dict(model.state_dict()), "best_model": best_state, "optimizer": opt.state_dict(),
                       "generator": gen.get_state()}, path)


def _read_train_state(path: Path, key: dict, device: torch.device) -> dict:
    """Load a training state (``weights_only=True``: never code) and check that it belongs to this run."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"no {TRAIN_STATE_FORMAT!r} marker")
        if saved.get("version") != TRAIN_STATE_VERSION:
            raise ValueError(f"version {saved.get('version')!r}, this amortcvx reads {TRAIN_STATE_VERSION}")
        info = json.loads(saved["info"])
        for name in ("model", "best_model", "optimizer", "generator"):
            if name not in saved:
                raise ValueError(f"no {name!r} entry")
    except Exception as exc:  # noqa: BLE001 - damaged, truncated or foreign file: one clear error
        raise ValueError(f"cannot resume from {path}: the training state is damaged or not one "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); delete it to start over"
                         ) from None
    saved_key = json.loads(json.dumps(info.get("key")))
    want = json.loads(json.dumps(key))
    if saved_key != want:
        diff = sorted(k for k in set(want) | set(saved_key or {}) if (saved_key or {}).get(k) != want.get(k))
        raise ValueError(f"cannot resume from {path}: it belongs to another training run (differing: {diff}); "
                         "delete it, use another checkpoint path, or train with resume=False")
    saved["info"] = info
    saved["generator"] = saved["generator"].cpu()
    return saved
