"""The end-to-end experiment: data, training, every warm-start strategy on the C solver, reports, timings.

:func:`run_experiment` does, for one family and one algorithm (``"scs"`` or ``"osqp"``):

1. sample ``n_train`` training parameters (seed ``2 seed``) and ``n_test`` held-out test parameters
   (seed ``2 seed + 1``), and solve both at high accuracy with the C backend (``amortcvx.datasets``; cached and
   resumable under ``data_root``);
2. train a :class:`~amortcvx.predictors.WarmStartPredictor` on the training set minus a validation split
   (``amortcvx.training``);
3. build the strategies on the test set: cold, nearest neighbour (from the whole training set), previous
   solution (sequential families), learned (``AmortizedSolver.predict_warm_start`` with ``k`` torch steps, for
   each ``k`` of ``eval_k``) and the optimum (the test instance's own high-accuracy solution);
4. run :func:`~amortcvx.evaluation.compare` at tolerance ``eps`` with exact iteration counts;
5. measure end-to-end time per instance (prediction + refinement + C solve in timed mode, plus the
   canonicalization every path needs) of each learned strategy against the cold start, at batch 1 and at a
   large batch;
6. write the table, CSV files, plots, the model and the configuration into ``out_dir``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from amortcvx.canon import ParametricProblem
from amortcvx.datasets import BACKEND_FORMS, Dataset, generate_dataset
from amortcvx.deploy import AmortizedSolver, Calibration
from amortcvx.deploy.solver import SAFEGUARD_REFERENCES, refinement_label
from amortcvx.evaluation.baselines import (
    NearestNeighbor,
    PersistentColdLoop,
    cold_warm_starts,
    episode_ids,
    optimum_warm_starts,
    previous_solution_warm_starts,
)
from amortcvx.evaluation.compare import Comparison, compare
from amortcvx.evaluation.reports import (
    format_rows,
    format_table,
    plot_iterations_cdf,
    plot_medians,
    write_instances_csv,
    write_summary_csv,
)
from amortcvx.iterations import AndersonSettings
from amortcvx.iterations.polish import check_polishable
from amortcvx.training import LossWeights, SolvedSet, TrainConfig, train, train_state_path

ALGORITHMS = ("scs", "osqp")
QP_KINDS = ("qp", "lp")
"""Family kinds OSQP can solve (zero and nonnegative cones only)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything an experiment depends on.

    Attributes:
        family: a ``problems`` family name (``problems.names()``).
        size: ``"small"`` or ``"large"``.
        algorithm: ``"scs"`` (any family) or ``"osqp"`` (families of kind qp / lp only); the torch iteration the
            predictor is trained through and the C solver that finishes.
        n_train: training instances sampled and solved (a ``val_fraction`` of them is held out for early
            stopping; the nearest-neighbour baseline searches all of them).
        n_test: held-out test instances (another sampling seed).
        val_fraction: fraction of the training instances used for validation.
        k: unrolled torch steps in training (residual / distance losses) and refinement steps at deployment.
        eval_k: refinement steps to evaluate the trained model with (one learned strategy each); None: ``(k,)``.
        anderson_memory: 0 for plain refinement steps; ``M > 0`` allows safeguarded Anderson acceleration of
            memory ``M`` (:class:`~amortcvx.iterations.AndersonSettings`): with calibration on, each learned
            strategy with ``k > 2`` keeps plain or accelerated refinement, whichever needs fewer C iterations on
            the validation split; without calibration it is accelerated. The control "cold + k torch steps"
            uses the learned strategy's refinement. Training always unrolls plain steps.
        polish: polish every refined warm start (learned strategies and the control) on its guessed active set
            and keep the better point (``AmortizedSolver(polish=True)``, :mod:`amortcvx.iterations.polish`); LPs
            and QPs only (a ValueError names the other cones).
        weights: training loss weights.
        epochs, batch_size, lr, weight_decay, patience, hidden: training settings (``TrainConfig``).
        seed: seeds the sampling (train ``2 seed``, test ``2 seed + 1``), the split and the training.
        family_seed: seed of the family's constant data (``problems.make(..., seed=)``).
        eps: tolerance of the C solves that are compared (``eps_abs = eps_rel``).
        data_root: folder where the solved datasets are cached (resumable).
        out_dir: folder for the table, CSV files, plots, model and configuration.
        workers: processes for the C solves (None: all cores; 1: in this process).
        device, dtype: where and in which precision training, prediction and refinement run.
        safeguard: deployment safeguard of ``AmortizedSolver`` (cold start where the refined prediction's
            fixed-point residual exceeds the cold start's).
        safeguard_reference: ``"cold"`` (compare with the cold start's first step) or ``"refined_cold"``
            (compare with the cold start refined by the same ``k`` steps: twice the torch work); see
            ``amortcvx.deploy``.
        calibrate: with the safeguard on, also calibrate each learned strategy on the validation instances
            (``AmortizedSolver.calibrate``): the predictor is switched off if its median C iteration count there
            is above the (refined) cold start's. The test instances are never used for this.
        refine_cold: add, for each ``k > 0`` of ``eval_k``, the control strategy "cold + k torch steps" (the same
            refinement from the cold start, without the predictor): it separates the effect of the learned
            prediction from that of the torch steps.
        timing_batch: the large batch size of the end-to-end timing; 0 skips it.
        timing_single: instances timed one at a time (batch 1); 0 skips it. Timing needs parameters only: when
            more than ``n_test`` are needed, ``max(timing_batch, timing_single)`` are drawn with the test seed.
        progress: print stage messages and progress bars (to stderr).
        resume: continue an interrupted training from ``out_dir/checkpoint.pt.state`` (the state of its last
            finished epoch, written by :func:`~amortcvx.training.train`); False starts training over (and
            overwrites that state). The datasets are always reused from ``data_root``.
    """

    family: str = "portfolio"
    size: str = "small"
    algorithm: str = "scs"
    n_train: int = 1000
    n_test: int = 200
    val_fraction: float = 0.1
    k: int = 0
    eval_k: tuple[int, ...] | None = None
    anderson_memory: int = 0
    polish: bool = False
    weights: LossWeights = LossWeights()
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    hidden: tuple[int, ...] = (256, 256)
    seed: int = 0
    family_seed: int = 0
    eps: float = 1e-4
    data_root: str = "data"
    out_dir: str = "runs/experiment"
    workers: int | None = None
    device: str = "cpu"
    dtype: str = "float64"
    safeguard: bool = True
    safeguard_reference: str = "cold"
    calibrate: bool = True
    refine_cold: bool = True
    timing_batch: int = 1024
    timing_single: int = 50
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {self.algorithm!r}")
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
        for name in ("polish", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.safeguard_reference not in SAFEGUARD_REFERENCES:
            raise ValueError(f"safeguard_reference must be one of {SAFEGUARD_REFERENCES}; "
                             f"got {self.safeguard_reference!r}")
        if not isinstance(self.weights, LossWeights):
            raise TypeError(f"weights must be a LossWeights; got {type(self.weights).__name__}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ValueError(f"workers must be None or a positive int; got {self.workers!r}")
        for name in ("timing_batch", "timing_single"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be nonnegative; got {getattr(self, name)}")
        object.__setattr__(self, "hidden", tuple(self.hidden))

    @property
    def refine_steps(self) -> tuple[int, ...]:
        """The refinement steps evaluated: ``eval_k`` or ``(k,)``."""
        return self.eval_k if self.eval_k is not None else (self.k,)

    @property
    def anderson(self) -> AndersonSettings | None:
        """The refinement's acceleration: None, or ``AndersonSettings(memory=anderson_memory)``."""
        return AndersonSettings(memory=self.anderson_memory) if self.anderson_memory else None

    @property
    def solver_settings(self) -> dict[str, float]:
        """C solver settings of the compared solves: ``eps_abs = eps_rel = eps`` over the backend defaults."""
        return {"eps_abs": float(self.eps), "eps_rel": float(self.eps)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        out = dataclasses.asdict(self)
        out["weights"] = dataclasses.asdict(self.weights)
        return out


class TimingResult(NamedTuple):
    """End-to-end time per instance of one strategy at one batch size (wall clock, timed-mode C solves).

    Attributes:
        strategy: ``"cold"`` or a learned strategy's name.
        batch_size: instances per call.
        instances: instances timed in all.
        total_ms: wall milliseconds per instance: canonicalization + prediction + refinement + C solves.
        predict_ms: of which prediction + refinement + conversion (0 for cold).
        solve_ms: of which the C solves (``solve_batch``, timed mode).
        speedup: cold ``total_ms`` / this ``total_ms``.
        workers: processes of the C solves.
    """

    strategy: str
    batch_size: int
    instances: int
    total_ms: float
    predict_ms: float
    solve_ms: float
    speedup: float
    workers: int


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` produced.

    Attributes:
        config: the configuration.
        comparison: the exact-count comparison of all strategies on the test set.
        timings: end-to-end timings (cold and learned, per batch size).
        history: training history (one dict of mean losses per epoch).
        best_epoch: the epoch of the kept model.
        fallback: learned strategy -> instances the safeguard sent to a cold start.
        calibration: learned strategy -> :class:`~amortcvx.deploy.Calibration` on the validation instances.
        counts: instances used: ``train``, ``val``, ``test`` and ``dropped_train`` / ``dropped_test`` (not solved
            to optimal at high accuracy).
        seconds: wall seconds per stage.
        files: name -> path of each file written.
        environment: machine, library versions, device and dtype.
        table: the text report (comparison table and timing table).
    """

    config: ExperimentConfig
    comparison: Comparison
    timings: tuple[TimingResult, ...]
    history: list[dict[str, float]]
    best_epoch: int
    fallback: Mapping[str, int]
    counts: Mapping[str, int]
    seconds: Mapping[str, float]
    calibration: Mapping[str, Calibration] = field(default_factory=dict)
    files: Mapping[str, Path] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    table: str = ""


def environment(device: str = "cpu", dtype: str = "float64") -> dict[str, Any]:
    """Machine and versions to print beside measured numbers."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "scs": version("scs"), "osqp": version("osqp"), "cvxpy": version("cvxpy"), "device": dev,
            "dtype": dtype}


def learned_name(k: int) -> str:
    """Name of the learned strategy with ``k`` refinement steps."""
    return f"learned k={k}"


def cold_refined_name(k: int) -> str:
    """Name of the control strategy: ``k`` torch steps from the cold start, no predictor."""
    return f"cold + {k} torch steps"


def check_family_algorithm(family, algorithm: str) -> None:
    """Raise ValueError when ``algorithm`` cannot solve ``family`` (OSQP takes qp / lp kinds only)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")
    if algorithm == "osqp" and family.kind not in QP_KINDS:
        raise ValueError(f"algorithm 'osqp' solves QPs and LPs only (zero / nonnegative cones), but family "
                         f"{family.name!r} is of kind {family.kind!r}; use algorithm 'scs'")


def family_episodes(family, num: int) -> np.ndarray | None:
    """Episode id of each of the first ``num`` sampled rows of a sequential family (None if not sequential)."""
    if not family.sequential:
        return None
    system = family.extras.get("system")
    length = getattr(system, "episode_length", None)
    if length is None:
        raise ValueError(f"family {family.name!r} is sequential but declares no episode length "
                         "(extras['system'].episode_length)")
    return episode_ids(num, int(length))


def _log_fn(config: ExperimentConfig, log: Callable[[str], None] | None) -> Callable[[str], None]:
    if log is not None:
        return log
    if not config.progress:
        return lambda msg: None
    start = time.perf_counter()

    def emit(msg: str) -> None:
        print(f"[amortcvx {time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return emit


def _params_rows(params: Mapping[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a parameter batch, as writable copies (dataset arrays are read-only; torch warns on those)."""
    return {k: np.array(v[rows]) for k, v in params.items()}


@contextlib.contextmanager
def torch_threads(num: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block, restoring it after (None or 0: leave it).

    On a small shared CPU, torch's default of one thread per core competes with the solver processes and
    other jobs; small batched operations then wait on spinning threads (we saw 0.8 ms become 140 ms on a loaded
    2-core machine), so benchmarks there use 1.
    """
    if not num:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(num))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solved_set(pp: ParametricProblem, ds: Dataset, dtype: torch.dtype) -> SolvedSet:
    theta = pp.parameter_vector(_params_rows(ds.params, slice(None)), dtype=dtype)
    x, y, s = ds.torch_solution(dtype=dtype)
    return SolvedSet(theta=theta, x=x, y=y, s=s)


def _time_cold(loop: PersistentColdLoop, params) -> tuple[float, float]:
    t0 = time.perf_counter()
    loop.solve(params)
    total = time.perf_counter() - t0
    return total, total


def _time_learned(solver: AmortizedSolver, params) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    out = solver.solve(params, exact_iterations=False)
    total = time.perf_counter() - t0
    return total, out.predict_seconds, out.solve_seconds


def measure_end_to_end(pp: ParametricProblem, params: Mapping[str, np.ndarray], solvers: Mapping[str, AmortizedSolver],
                       backend: str, *, settings: Mapping[str, Any], batch_size: int, instances: int,
                       workers: int) -> list[TimingResult]:
    """Wall time per instance of cold starts and of each learned solver, in calls of ``batch_size`` instances.

    Each call starts from parameter values and ends with answers at the tolerance (timed mode,
    ``exact_iterations=False``): cold = canonicalize + the hand-written persistent loop on the solver's own API
    (:class:`~amortcvx.evaluation.baselines.PersistentColdLoop`, the best a user has without amortcvx);
    learned = ``AmortizedSolver.solve`` (parameter vector, canonicalization, prediction, ``k`` torch steps,
    safeguard, certificate, C solves on the persistent solver object, cold retry of failures).
    The first ``instances`` rows of ``params`` are used, in ``instances // batch_size`` calls; one untimed
    warm-up call of each path comes first (imports, worker pool start, first-touch allocations), and within
    each call index the paths run back to back so that machine load affects them alike.

    Returns:
        One :class:`TimingResult` for ``"cold"`` and one per entry of ``solvers``.
    """
    total_rows = next(iter(params.values())).shape[0]
    calls = max(1, min(instances, total_rows) // batch_size)
    if batch_size > total_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the {total_rows} instances available")
    first = _params_rows(params, slice(0, batch_size))
    loop = PersistentColdLoop(pp, backend, settings)
    _time_cold(loop, first)  # warm-up (and the loop's one setup)
    for solver in solvers.values():
        _time_learned(solver, first)
    sums = {name: np.zeros(3) for name in ["cold", *solvers]}
    for c in range(calls):
        chunk = _params_rows(params, slice(c * batch_size, (c + 1) * batch_size))
        total, solve = _time_cold(loop, chunk)
        sums["cold"] += (total, 0.0, solve)
        for name, solver in solvers.items():
            sums[name] += _time_learned(solver, chunk)
    count = calls * batch_size
    cold_ms = sums["cold"][0] / count * 1e3
    out = []
    for name, (total, predict, solve) in sums.items():
        ms = total / count * 1e3
        out.append(TimingResult(strategy=name, batch_size=batch_size, instances=count, total_ms=ms,
                                predict_ms=predict / count * 1e3, solve_ms=solve / count * 1e3,
                                speedup=cold_ms / ms if ms > 0 else float("nan"), workers=workers))
    return out


def format_timings(timings: tuple[TimingResult, ...] | list[TimingResult], title: str | None = None) -> str:
    """Aligned text table of :class:`TimingResult` rows."""
    header = ("strategy", "batch", "instances", "workers", "total ms/inst", "predict ms", "C solve ms",
              "speedup vs cold")
    rows = [(t.strategy, str(t.batch_size), str(t.instances), str(t.workers), f"{t.total_ms:.3f}",
             f"{t.predict_ms:.3f}", f"{t.solve_ms:.3f}", f"{t.speedup:.2f}x") for t in timings]
    return format_rows(header, rows, title=title)


def write_timings_csv(timings, path: str | os.PathLike) -> Path:
    """Write the timings, one row each, to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TimingResult._fields)
        for t in timings:
            writer.writerow(list(t))
    return path


def run_experiment(config: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> ExperimentResult:
    """Run the whole pipeline described in the module docstring and write its outputs to ``config.out_dir``.

    Args:
        config: the experiment.
        log: receives one line per stage; default: printed to stderr when ``config.progress``.

    Returns:
        An :class:`ExperimentResult` (its ``table`` is the text report).

    Raises:
        ValueError: unknown family or size, an algorithm that cannot solve the family (OSQP on SOCP / SDP), or
            too few training instances solved to optimal.
    """
    from amortcvx import problems

    emit = _log_fn(config, log)
    seconds: dict[str, float] = {}
    family = problems.make(config.family, size=config.size, seed=config.family_seed)
    check_family_algorithm(family, config.algorithm)
    backend = config.algorithm
    form = BACKEND_FORMS[backend]
    dtype = getattr(torch, config.dtype)
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(config.device, config.dtype)

    # 1. data ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    emit(f"compiling {config.family} ({config.size}, kind {family.kind}) for {backend} (form {form!r})")
    pp = ParametricProblem(family.problem, form=form)
    if config.polish and form == "cone":
        check_polishable(pp.cones)  # before any work
    emit(f"n = {pp.n}, m = {pp.m}, parameters = {pp.num_params}, fingerprint {pp.fingerprint}")
    seed_train, seed_test = 2 * config.seed, 2 * config.seed + 1
    sets = {}
    for split, num, seed in (("train", config.n_train, seed_train), ("test", config.n_test, seed_test)):
        emit(f"{split} set: sampling {num} instances (seed {seed}) and solving them at high accuracy "
             f"(cached under {config.data_root})")
        sets[split] = generate_dataset(
            pp, family.sample(num, seed), backend, config.data_root,
            name=f"{config.family}-{config.size}-{split}-n{num}-seed{seed}", workers=workers,
            progress=config.progress)
    train_ds, test_ds = sets["train"], sets["test"]
    seconds["data"] = time.perf_counter() - t0
    ok_train = train_ds.subset(train_ds.ok)
    if len(ok_train) < 2:
        raise ValueError(f"only {len(ok_train)} of {len(train_ds)} training instances were solved to optimal; "
                         "need at least 2")
    test_ok = int(test_ds.ok.sum())
    if test_ok < len(test_ds):
        emit(f"warning: {len(test_ds) - test_ok} test instances were not solved to optimal at high accuracy; "
             "their optimum / previous-solution warm starts are cold starts")

    # 2. training --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tr_idx, va_idx = ok_train.split((1.0 - config.val_fraction, config.val_fraction), seed=config.seed)
    if len(va_idx) == 0:
        tr_idx, va_idx = tr_idx[:-1], tr_idx[-1:]
    full = _solved_set(pp, ok_train, dtype)
    train_set, val_set = full.subset(tr_idx), full.subset(va_idx)
    emit(f"training the {backend} predictor on {len(train_set)} instances (validation {len(val_set)}), "
         f"k = {config.k}, weights {config.weights}, up to {config.epochs} epochs")
    tcfg = TrainConfig(k=config.k, weights=config.weights, epochs=config.epochs, batch_size=config.batch_size,
                       lr=config.lr, weight_decay=config.weight_decay, patience=config.patience, seed=config.seed,
                       device=config.device, dtype=config.dtype, hidden=config.hidden, progress=config.progress,
                       checkpoint=str(out_dir / "checkpoint.pt"), resume=config.resume)
    state_path = train_state_path(tcfg.checkpoint)
    if config.resume and state_path.exists():
        emit(f"resuming training from {state_path} (its last finished epoch)")
    try:
        trained = train(pp, backend, train_set, val_set, tcfg)
    except ValueError as exc:
        if str(exc).startswith("cannot resume from"):  # another run's (or a damaged) state in this out_dir
            raise ValueError(f"{exc} (here: ExperimentConfig(resume=False), or --no-resume on the command "
                             "line, or another out_dir)") from None
        raise
    if trained.start_epoch:
        emit(f"training resumed at epoch {trained.start_epoch}")
    model = trained.model
    best = trained.history[trained.best_epoch]
    emit(f"best epoch {trained.best_epoch} of {len(trained.history)}: "
         + ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k != "epoch"))
    seconds["train"] = time.perf_counter() - t0

    # 3. strategies ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    num_test = len(test_ds)
    test_params = _params_rows(test_ds.params, slice(None))
    theta_test = pp.parameter_vector(test_params)
    strategies: dict[str, list] = {"cold": cold_warm_starts(num_test)}
    emit("building warm starts: nearest neighbour")
    train_theta = pp.parameter_vector(_params_rows(ok_train.params, slice(None)))
    nn = NearestNeighbor(train_theta, ok_train.x, ok_train.y, ok_train.s)
    strategies["nearest neighbour"] = nn.warm_starts(theta_test)
    episodes = family_episodes(family, num_test)
    if episodes is not None:
        emit("building warm starts: previous solution (closed-loop episodes)")
        strategies["previous solution"] = previous_solution_warm_starts(test_ds.x, test_ds.y, test_ds.s,
                                                                        episodes=episodes)
    fallback: dict[str, int] = {}
    calibration: dict[str, Calibration] = {}
    solvers: dict[str, AmortizedSolver] = {}
    val_params = _params_rows(ok_train.params, va_idx)

    def make_solver(model_or_none, k: int, procs: int | None, anderson) -> AmortizedSolver:
        return AmortizedSolver(pp, model_or_none, algorithm=backend, k=k, anderson=anderson, polish=config.polish,
                               solver_settings=config.solver_settings, safeguard=config.safeguard,
                               safeguard_reference=config.safeguard_reference, device=config.device, dtype=dtype,
                               workers=procs)

    for k in config.refine_steps:
        name = learned_name(k)
        emit(f"building warm starts: {name} (prediction + {k} torch {backend} steps"
             f"{', Anderson-accelerated' if config.anderson else ''}{', polished' if config.polish else ''}, safeguard "
             f"{'on' if config.safeguard else 'off'})")
        solver = make_solver(model, k, workers, config.anderson)
        if config.safeguard and config.calibrate:
            # with acceleration asked for, the validation medians also choose plain or accelerated refinement
            choices = (None, config.anderson) if config.anderson is not None and k > 2 else None
            cal = calibration[name] = solver.calibrate(val_params, refinements=choices)
            emit(f"calibration of {name} on {len(va_idx)} validation instances: median {cal.learned_median:g} "
                 f"vs {cal.cold_median:g} from the (refined) cold start -> predictor "
                 f"{'kept' if cal.enabled else 'switched off'}; refinement {refinement_label(solver.anderson)}"
                 + (f" (medians {dict(cal.candidates)})" if len(cal.candidates) > 1 else ""))
        pred = solver.predict_warm_start(test_params)
        strategies[name] = pred.warm_starts
        fallback[name] = int(np.sum(pred.fallback))
        solvers[name] = solver
    if config.refine_cold:
        for k in (k for k in config.refine_steps if k > 0):
            name = cold_refined_name(k)
            emit(f"building warm starts: {name} (control: {k} torch {backend} steps from the cold start, no model)")
            # the same refinement as the learned strategy with this k
            control = make_solver(None, k, workers, solvers[learned_name(k)].anderson)
            pred = control.predict_warm_start(test_params)
            strategies[name] = pred.warm_starts
            fallback[name] = int(np.sum(pred.fallback))
    strategies["optimum"] = optimum_warm_starts(test_ds.x, test_ds.y, test_ds.s)
    seconds["strategies"] = time.perf_counter() - t0

    # 4. comparison ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    instances = pp.canonicalize(test_params, dtype=torch.float64, device="cpu").instances()
    emit(f"comparing {len(strategies)} strategies on {num_test} test instances with {backend} at eps "
         f"{config.eps:g} (exact iteration counts, fresh solver per solve)")
    comparison = compare(instances, backend, strategies, settings=config.solver_settings, workers=workers,
                         progress=config.progress)
    seconds["compare"] = time.perf_counter() - t0
    bad = {k: v for k, v in comparison.non_optimal.items() if v}
    if bad:
        emit(f"warning: solves that did not end optimal: {bad}")

    # 5. end-to-end timing -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    timings: list[TimingResult] = []
    n_timing = max(config.timing_batch, config.timing_single)
    if n_timing > num_test:  # timing needs parameters only: held-out draws of the test distribution
        timing_params = _params_rows(family.sample(n_timing, seed_test), slice(None))
    else:
        timing_params = test_params
    for batch, count, procs in ((1, config.timing_single, 1), (config.timing_batch, config.timing_batch, workers)):
        if batch < 1 or count < 1:
            continue
        emit(f"timing end to end at batch {batch} ({count} instances, {procs} solver process(es))")
        timed = {name: make_solver(model, s.k, procs, s.anderson) for name, s in solvers.items()}
        for name, s in timed.items():
            s.enabled = solvers[name].enabled  # as calibrated
        timings += measure_end_to_end(pp, timing_params, timed, backend, settings=config.solver_settings,
                                      batch_size=batch, instances=count, workers=procs)
    seconds["timing"] = time.perf_counter() - t0

    # 6. outputs ---------------------------------------------------------------------------------------
    title = (f"{config.family} ({config.size}, {family.kind}) | {backend} eps {config.eps:g} | "
             f"{num_test} held-out instances | train {len(train_set)} (+{len(val_set)} val) | exact iterations")
    text = format_table(comparison, title=title)
    if fallback:
        text += "\nsafeguard fallbacks to cold start: " + ", ".join(f"{k}: {v}/{num_test}" for k, v in fallback.items())
    if calibration:
        text += "\ncalibration on the validation set (median C iterations, learned vs refined cold): " + ", ".join(
            f"{k}: {c.learned_median:g} vs {c.cold_median:g} ({'kept' if c.enabled else 'switched off'}"
            + (f"; refinement {refinement_label(c.anderson)} of {dict(c.candidates)}" if len(c.candidates) > 1
               else "") + ")"
            for k, c in calibration.items())
    if timings:
        text += "\n\n" + format_timings(timings, title=f"end-to-end time per instance (device {config.device}, "
                                                       f"{config.dtype}, timed-mode C solves)")
    files = {
        "table": out_dir / "table.txt",
        "summary_csv": write_summary_csv(comparison, out_dir / "summary.csv"),
        "instances_csv": write_instances_csv(comparison, out_dir / "instances.csv"),
        "timing_csv": write_timings_csv(timings, out_dir / "timing.csv"),
        "model": out_dir / "model.pt",
        "config": out_dir / "config.json",
        "history": out_dir / "history.csv",
    }
    files["table"].write_text(text + "\n")
    model.save(files["model"])
    counts = {"train": len(train_set), "val": len(val_set), "test": num_test,
              "dropped_train": len(train_ds) - len(ok_train), "dropped_test": num_test - test_ok}
    files["config"].write_text(json.dumps({"config": config.to_dict(), "environment": env, "counts": counts,
                                           "seconds": seconds, "best_epoch": trained.best_epoch,
                                           "fallback": fallback, "n": pp.n, "m": pp.m,
                                           "calibration": {k: c._asdict() for k, c in calibration.items()},
                                           "fingerprint": pp.fingerprint}, indent=2, default=str) + "\n")
    _write_history(trained.history, files["history"])
    try:
        files["cdf_png"] = plot_iterations_cdf(comparison, out_dir / "iterations_cdf.png",
                                               title=f"{config.family} ({config.size}), {backend} eps {config.eps:g}")
        files["medians_png"] = plot_medians(comparison, out_dir / "medians.png",
                                            title=f"{config.family} ({config.size}), {backend} eps {config.eps:g}")
    except ImportError as exc:
        emit(f"plots skipped: {exc}")
    emit(f"wrote {', '.join(str(p) for p in files.values())}")
    return ExperimentResult(config=config, comparison=comparison, timings=tuple(timings),
                            history=trained.history, best_epoch=trained.best_epoch, fallback=fallback,
                            counts=counts, seconds=seconds, calibration=calibration, files=files, environment=env,
                            table=text)


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for h in history:
            writer.writerow([h.get(k, "") for k in keys])
