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

import contextlib
import dataclasses
import importlib
import json
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amortcvx.iterations.registry import ITERATIONS


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


SETTINGS: dict[str, type] = {name: info.settings for name, info in ITERATIONS.items()}
"""Algorithm name -> its settings dataclass (from the iterations' registry)."""

CORE_KINDS: dict[str, Callable[[dict], nn.Module]] = {}
"""Core kinds of this package that a saved predictor file names and :meth:`WarmStartPredictor.load` rebuilds
without ``core=``: kind -> ``from_config(config)``. A registered core class has a ``core_kind`` attribute and a
``config()`` method returning JSON data (sizes, widths); its weights and buffers are the file's tensors."""


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

    def _normalized(self, theta: torch.Tensor) -> torch.Tensor:
        """``u = (theta - in_mean) / in_std``, the core's input, after checking ``theta``'s shape."""
        if theta.ndim != 2 or theta.shape[1] != self.meta.num_params:
            raise ValueError(f"theta must have shape (B, {self.meta.num_params}); got {tuple(theta.shape)}")
        return (theta.to(self.in_mean) - self.in_mean) / self.in_std

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return self.out_mean + self.out_std * self.core(self._normalized(theta))

    @property
    def choices(self) -> int:
        """``K``, the predictions per instance :meth:`candidates` gives (the core's ``choices``, else 1)."""
        return int(getattr(self.core, "choices", 1))

    def candidates(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, K, out_dim): several predictions per instance where the core offers them (a core with
        ``candidate_groups`` and ``choices > 1``, e.g. :class:`~amortcvx.predictors.NeighborTangent` from its
        ``choices`` nearest instances; the first is :meth:`forward`'s), else ``K = 1``. Which one to use needs the
        problem's data: :func:`~amortcvx.predictors.fixed_point.predict`, which takes them a group at a time
        (:meth:`candidate_groups`)."""
        return torch.cat(list(self.candidate_groups(theta, self.choices)), dim=1)

    def candidate_groups(self, theta: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        """The predictions of :meth:`candidates` in groups of ``size`` (the last may be smaller), (B, g, out_dim)
        each, first :meth:`forward`'s."""
        if self.choices <= 1:
            yield self(theta)[:, None]
            return
        for z in self.core.candidate_groups(self._normalized(theta), size):
            yield self.out_mean + self.out_std * z

    @property
    def splits(self) -> bool:
        """Whether the core predicts active sets (:meth:`split_groups`; a
        :class:`~amortcvx.predictors.NeighborActiveSet`), which :func:`~amortcvx.predictors.predict` solves on the
        problem's data."""
        return hasattr(self.core, "split_groups")

    def split_groups(self, theta: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        """The core's ``choices`` candidate active sets per instance in groups of ``size`` (the last may be smaller),
        (B, g, m) int8 each (:class:`~amortcvx.iterations.polish.ActiveSets`)."""
        return self.core.split_groups(self._normalized(theta), size)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save weights, normalization and meta atomically (a temp file renamed over ``path``).

        The file is a ``torch.save`` archive holding only tensors and strings: ``state_dict`` (the weights
        and normalization buffers) and ``meta`` (JSON: :class:`PredictorMeta` and how to rebuild the core).
        :meth:`load` reads it with ``weights_only=True``, so loading a file never runs code from it. A
        custom core is stored as its weights only; :meth:`load` needs ``core=`` or ``core_factory=`` for it.
        """
        meta = {"meta": dataclasses.asdict(self.meta), "core": describe_core(self.core)}
        state = {"format": FILE_FORMAT, "version": FILE_VERSION,
                 "meta": json.dumps(meta, sort_keys=True, allow_nan=False),
                 "state_dict": {k: v.detach() for k, v in self.state_dict().items()}}
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, fingerprint: str | None = None, algorithm: str | None = None,
             settings: dict | None = None, map_location: Any = "cpu", core: nn.Module | None = None,
             core_factory: str | Callable[[int, int], nn.Module] | None = None) -> WarmStartPredictor:
        """Load a saved predictor; a model for another problem or settings is a clear ValueError.

        The file is read with ``torch.load(weights_only=True)``: tensors and plain data only, never code.

        Args:
            fingerprint: the problem's ``ParametricProblem.fingerprint`` to check against (recommended).
            algorithm, settings: the algorithm and settings that will use the prediction, to check against.
            map_location: where to put the tensors (``torch.load``'s argument).
            core: a freshly built core module to load the saved weights into (needed for a custom core, i.e.
                one that was not the default MLP; optional otherwise).
            core_factory: instead of ``core``: a callable, or the import path ``"package.module:function"``
                of one, called as ``core_factory(num_params, out_dim)`` to build the core. Only a path you
                name is imported; nothing in the file is.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is damaged, truncated, not a predictor file (or one of an amortcvx that pickled
                whole modules), lacks its metadata, holds weights that do not fit the core, needs ``core=`` /
                ``core_factory=``, or was made for another problem / algorithm / settings (the message names
                the file and what is wrong).
        """
        state = _read_predictor_file(path, map_location)
        info = state["meta"]
        meta = info["meta"]
        if fingerprint is not None and meta.fingerprint != fingerprint:
            raise ValueError(f"{path} holds a predictor for problem {meta.fingerprint}, not for this problem "
                             f"({fingerprint}); the problem's structure, shapes or constant data differ")
        if algorithm is not None and meta.algorithm != algorithm:
            raise ValueError(f"{path} holds a predictor for algorithm {meta.algorithm!r}, not {algorithm!r}")
        if settings is not None and dict(settings) != meta.settings:
            diff = sorted(k for k in set(settings) | set(meta.settings) if settings.get(k) != meta.settings.get(k))
            raise ValueError(f"{path} was trained with other {meta.algorithm} settings (differing: {diff})")
        if core is not None and core_factory is not None:
            raise ValueError("pass core= or core_factory=, not both")
        if core is None and core_factory is not None:
            core = _build_core(core_factory, meta)
        kind = info["core"].get("kind")
        if core is None and kind in CORE_KINDS:
            core = CORE_KINDS[kind](info["core"]["config"])
        if core is None and kind != "mlp":
            raise ValueError(
                f"{path} holds a predictor with a custom core module ({info['core'].get('class', '?')}); its code "
                "is not stored in the file: pass core= (a new instance of that module) or "
                "core_factory='package.module:function' (called as function(num_params, out_dim))")
        hidden = tuple(int(h) for h in info["core"].get("hidden") or (256, 256))
        model = cls(meta, core=core, hidden=hidden)
        weights = state["state_dict"]
        model = model.to(dtype=weights["in_mean"].dtype)  # keep the saved precision
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"{path}: the saved weights do not fit the core module ({exc})") from None
        return model


FILE_FORMAT = "amortcvx.WarmStartPredictor"
"""Marker in a saved predictor file (``WarmStartPredictor.save``)."""
FILE_VERSION = 2


def _read_predictor_file(path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    """Load and check the structure of a predictor file; every defect is one ValueError naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        if isinstance(exc, pickle.UnpicklingError):
            detail = "it holds pickled objects other than tensors and plain data, which are never loaded"
        else:
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise ValueError(
            f"{path} is not a readable amortcvx predictor file ({detail}): it is damaged or truncated, not a "
            "predictor file, or was saved by an older amortcvx that pickled whole modules (retrain, or re-save "
            "it with that version's save)") from None
    if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not an amortcvx predictor file (no {FILE_FORMAT!r} marker)")
    if state.get("version") != FILE_VERSION:
        raise ValueError(f"{path} has predictor file version {state.get('version')!r}; this amortcvx reads "
                         f"version {FILE_VERSION}")
    text = state.get("meta")
    if not isinstance(text, str):
        raise ValueError(f"{path} lacks its metadata (the 'meta' entry)")
    try:
        info = json.loads(text)
        meta = PredictorMeta(**info["meta"])
        if info["core"].get("kind") not in ("mlp", "custom", *CORE_KINDS):
            raise ValueError(f"unknown core kind {info['core'].get('kind')!r}")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} holds damaged metadata ({type(exc).__name__}: {exc})") from None
    if meta.algorithm not in SETTINGS:
        raise ValueError(f"{path} holds a predictor for unknown algorithm {meta.algorithm!r}")
    weights = state.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} lacks its weights (the 'state_dict' entry of tensors)")
    if "in_mean" not in weights:
        raise ValueError(f"{path} lacks the normalization buffers (in_mean, ...)")
    info["meta"] = meta
    return {"meta": info, "state_dict": weights}


def _build_core(factory: str | Callable[[int, int], nn.Module], meta: PredictorMeta) -> nn.Module:
    """``factory(num_params, out_dim)``, with ``factory`` a callable or an import path ``"pkg.mod:attr"``."""
    if isinstance(factory, str):
        mod_name, sep, attr = factory.partition(":")
        if not sep or not mod_name or not attr:
            raise ValueError(f"core_factory must look like 'package.module:function'; got {factory!r}")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"core_factory {factory!r} cannot be imported ({exc})") from None
        factory = obj
    if not callable(factory):
        raise ValueError(f"core_factory must be callable; got {type(factory).__name__}")
    core = factory(meta.num_params, meta.out_dim)
    if not isinstance(core, nn.Module):
        raise ValueError(f"core_factory returned {type(core).__name__}, not a torch.nn.Module")
    return core


@contextlib.contextmanager
def _interrupts_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and deliver it when the block ends.

    ``torch.save`` interrupted inside its zip writer raises a second error while unwinding (``RuntimeError:
    unexpected pos``), so an interrupted run ended with that error instead of a clean interruption (seen as a
    rare failure of the SIGINT resume test). Only the main thread sets signal handlers; elsewhere the block runs
    as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(*held[0])  # the default handler raises KeyboardInterrupt now, after the block


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``; a Ctrl-C during the
    write takes effect once the file is complete and in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _interrupts_after():
            with os.fdopen(fd, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def describe_core(core: nn.Module) -> dict:
    """How a saved file names a core: ``{"kind": "mlp", "hidden": [...]}``, ``{"kind": k, "config": {...}}`` for a
    registered kind (:data:`CORE_KINDS`), or ``{"kind": "custom", "class": ...}`` (weights only)."""
    kind = getattr(core, "core_kind", None)
    if kind in CORE_KINDS:
        return {"kind": kind, "config": core.config()}
    if _is_default_mlp(core):
        return {"kind": "mlp", "hidden": list(_mlp_hidden(core))}
    return {"kind": "custom", "class": f"{type(core).__module__}.{type(core).__qualname__}"}


def core_from_description(description: dict, num_params: int, out_dim: int) -> nn.Module:
    """A new core (untrained weights) of the kind :func:`describe_core` wrote; a custom core is a ValueError."""
    kind = description.get("kind")
    if kind == "mlp":
        return mlp(num_params, out_dim, tuple(int(h) for h in description["hidden"]))
    if kind in CORE_KINDS:
        return CORE_KINDS[kind](description["config"])
    raise ValueError(f"a core of kind {kind!r} cannot be rebuilt from its description (its code is not stored)")


def _is_default_mlp(core: nn.Module) -> bool:
    return isinstance(core, nn.Sequential) and all(isinstance(m, nn.Linear | nn.ReLU) for m in core)


def _mlp_hidden(core: nn.Module) -> tuple[int, ...] | None:
    if not _is_default_mlp(core):
        return None
    return tuple(m.out_features for m in core if isinstance(m, nn.Linear))[:-1]
