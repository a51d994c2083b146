"""Warm-start predictors: torch modules ``theta -> z0`` in an algorithm's fixed-point variable.

A :class:`WarmStartPredictor` wraps any ``nn.Module`` core with input and output normalization fitted on the
training set::

    z0 = out_mean + out_std * core((theta - in_mean) / in_std)

where ``theta`` is the flattened parameter vector of a :class:`~amortcvx.canon.ParametricProblem` and ``z0``
the fixed-point variable of the chosen algorithm (SCS: ``v`` without its last entry, which is fixed to 1;
OSQP: ``(x, z, y)``). The predictor carries a :class:`PredictorMeta` (problem fingerprint, algorithm and its
settings) that is saved with the weights, so a model can only be loaded for the problem and settings it was
trained for.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amortcvx.iterations.osqp import OsqpSettings
from amortcvx.iterations.scs import ScsSettings


@dataclass(frozen=True)
class PredictorMeta:
    """What a predictor was trained for.

    Attributes:
        fingerprint: ``ParametricProblem.fingerprint`` of the problem.
        algorithm: name of the fixed-point algorithm (``"scs"`` or ``"osqp"``).
        settings: the algorithm settings as a plain dict (they define the fixed-point variable's scaling).
        num_params: length of the flattened parameter vector (input size).
        out_dim: length of the predicted vector (output size).
    """

    fingerprint: str
    algorithm: str
    settings: dict
    num_params: int
    out_dim: int

    def algorithm_settings(self):
        """The settings as the algorithm's frozen dataclass (``ScsSettings`` / ``OsqpSettings``)."""
        return SETTINGS[self.algorithm](**self.settings)


SETTINGS: dict[str, type] = {"scs": ScsSettings, "osqp": OsqpSettings}
"""Algorithm name -> its settings dataclass."""


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256), activation: Callable[[], nn.Module] = nn.ReLU,
        ) -> nn.Sequential:
    """A plain multilayer perceptron ``in_dim -> hidden... -> out_dim`` (linear output layer)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), activation()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class WarmStartPredictor(nn.Module):
    """``theta -> z0`` with fitted normalization around a core module (an MLP by default).

    Args:
        meta: what the predictor is for (sizes, problem fingerprint, algorithm settings).
        core: any module mapping (B, num_params) -> (B, out_dim) in normalized units; default :func:`mlp`.
        hidden: hidden widths of the default MLP.
    """

    def __init__(self, meta: PredictorMeta, core: nn.Module | None = None, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.meta = meta
        self.core = core if core is not None else mlp(meta.num_params, meta.out_dim, hidden)
        self.register_buffer("in_mean", torch.zeros(meta.num_params))
        self.register_buffer("in_std", torch.ones(meta.num_params))
        self.register_buffer("out_mean", torch.zeros(meta.out_dim))
        self.register_buffer("out_std", torch.ones(meta.out_dim))

    @torch.no_grad()
    def fit_normalization(self, theta: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> None:
        """Set the normalization to the mean / standard deviation of training inputs and targets.

        Entries with (near) zero spread get unit scale, so constant inputs and outputs pass through unchanged.
        """
        for x, mean, std in ((theta, self.in_mean, self.in_std), (target, self.out_mean, self.out_std)):
            if x.shape[1] != mean.shape[0]:
                raise ValueError(f"expected {mean.shape[0]} columns, got {x.shape[1]}")
            mean.copy_(x.mean(0).to(mean))
            s = x.std(0).to(std) if x.shape[0] > 1 else torch.ones_like(std)
            std.copy_(torch.where(s > eps, s, torch.ones_like(s)))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if theta.ndim != 2 or theta.shape[1] != self.meta.num_params:
            raise ValueError(f"theta must have shape (B, {self.meta.num_params}); got {tuple(theta.shape)}")
        out = self.core((theta.to(self.in_mean) - self.in_mean) / self.in_std)
        return self.out_mean + self.out_std * out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save weights, normalization and meta atomically (a temp file renamed over ``path``)."""
        state = {"meta": dataclasses.asdict(self.meta), "state_dict": self.state_dict(),
                 "core": self.core if not _is_default_mlp(self.core) else None,
                 "hidden": _mlp_hidden(self.core)}
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, fingerprint: str | None = None, algorithm: str | None = None,
             settings: dict | None = None, map_location: Any = "cpu") -> WarmStartPredictor:
        """Load a saved predictor; a model for another problem or settings is a clear ValueError.

        Args:
            fingerprint: the problem's ``ParametricProblem.fingerprint`` to check against (recommended).
            algorithm, settings: the algorithm and settings that will use the prediction, to check against.
        """
        state = torch.load(path, map_location=map_location, weights_only=False)
        meta = PredictorMeta(**state["meta"])
        if fingerprint is not None and meta.fingerprint != fingerprint:
            raise ValueError(f"{path} holds a predictor for problem {meta.fingerprint}, not for this problem "
                             f"({fingerprint}); the problem's structure, shapes or constant data differ")
        if algorithm is not None and meta.algorithm != algorithm:
            raise ValueError(f"{path} holds a predictor for algorithm {meta.algorithm!r}, not {algorithm!r}")
        if settings is not None and dict(settings) != meta.settings:
            diff = sorted(k for k in set(settings) | set(meta.settings) if settings.get(k) != meta.settings.get(k))
            raise ValueError(f"{path} was trained with other {meta.algorithm} settings (differing: {diff})")
        core = state["core"]
        model = cls(meta, core=core, hidden=state["hidden"] or (256, 256))
        model = model.to(dtype=state["state_dict"]["in_mean"].dtype)  # keep the saved precision
        model.load_state_dict(state["state_dict"])
        return model


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_default_mlp(core: nn.Module) -> bool:
    return isinstance(core, nn.Sequential) and all(isinstance(m, nn.Linear | nn.ReLU) for m in core)


def _mlp_hidden(core: nn.Module) -> tuple[int, ...] | None:
    if not _is_default_mlp(core):
        return None
    return tuple(m.out_features for m in core if isinstance(m, nn.Linear))[:-1]
