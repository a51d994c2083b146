"""The experiment pipeline, in stages that the command line can also run one at a time on a run directory.

:func:`run_experiment` = :func:`prepare` + :func:`fit` + :func:`evaluate`, for one problem (a bundled family or
the user's file, :mod:`amortcvx.evaluation.sources`) and one solver (``"scs"`` or ``"osqp"``):

1. ``prepare``: sample ``n_train`` training parameters (seed ``2 seed``) and ``n_test`` held-out test parameters
   (seed ``2 seed + 1``), and solve both at high accuracy with the C backend (``amortcvx.datasets``; cached and
   resumable under ``data_root``); split the training set (validation ``val_fraction``);
2. ``fit``: train a :class:`~amortcvx.predictors.WarmStartPredictor` on the training split (``amortcvx.training``;
   resumable from the run directory's ``checkpoint.pt.state``) and save it (``model.pt``, ``history.csv``);
3. ``evaluate``: build the strategies on the test set (cold, nearest neighbour, previous solution for sequential
   problems, learned with ``k`` torch steps for each ``k`` of ``eval_k`` (calibrated on the validation split),
   the control "cold + k torch steps", the optimum); :func:`~amortcvx.evaluation.compare` them at tolerance
   ``eps`` with exact iteration counts; measure end-to-end time per instance against the cold start at batch 1
   and at a large batch (:mod:`amortcvx.evaluation.timing`); write the table, CSV files, plots and the record.

:func:`report` rebuilds the text report of a finished run from its files. The run directory's layout is
:data:`RUN_FILES` (``docs/cli.md``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from amortcvx.canon import ParametricProblem
from amortcvx.datasets import Dataset, generate_dataset
from amortcvx.deploy import AmortizedSolver, Calibration
from amortcvx.deploy.solver import newton_choices, option_label
from amortcvx.evaluation.baselines import (
    NearestNeighbor,
    cold_warm_starts,
    optimum_warm_starts,
    previous_solution_warm_starts,
)
from amortcvx.evaluation.compare import Comparison, compare
from amortcvx.evaluation.config import ExperimentConfig
from amortcvx.evaluation.machine import environment, torch_threads
from amortcvx.evaluation.reports import (
    format_table,
    plot_iterations_cdf,
    plot_medians,
    read_instances_csv,
    write_instances_csv,
    write_summary_csv,
)
from amortcvx.evaluation.sources import ProblemSource, bundled_family, check_solver, load_problem_file
from amortcvx.evaluation.timing import (
    TimingResult,
    format_timings,
    measure_end_to_end,
    params_rows,
    read_timings_csv,
    write_timings_csv,
)
from amortcvx.iterations.polish import check_polish_choice
from amortcvx.predictors import WarmStartPredictor
from amortcvx.solvers import get_solver
from amortcvx.training import SolvedSet, TrainResult, train, train_state_path

RUN_FILES: Mapping[str, str] = {
    "config": "config.json",
    "checkpoint": "checkpoint.pt",
    "model": "model.pt",
    "history": "history.csv",
    "table": "table.txt",
    "summary_csv": "summary.csv",
    "instances_csv": "instances.csv",
    "timing_csv": "timing.csv",
    "cdf_png": "iterations_cdf.png",
    "medians_png": "medians.png",
}
"""What a run directory holds: key -> file name (``config.json`` records the configuration, the machine, the
counts, the training outcome and, after ``evaluate``, the calibration and safeguard numbers)."""


def learned_name(k: int) -> str:
    """Name of the learned strategy with ``k`` refinement steps."""
    return f"learned k={k}"


def cold_refined_name(k: int) -> str:
    """Name of the control strategy: ``k`` torch steps from the cold start, no predictor."""
    return f"cold + {k} torch steps"


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


class Prepared(NamedTuple):
    """The data stage of a run: the problem, its compiled form and the solved datasets with the split.

    Attributes:
        source: the problem and its sampler.
        pp: the problem compiled for the solver's form.
        train_ds, test_ds: the solved training and test sets (as generated, unsolved rows included).
        ok_train: the training instances solved to optimal (training, validation, nearest neighbour).
        train_rows, val_rows: rows of ``ok_train`` used for training and for validation / calibration.
        seconds: wall seconds of this stage.
    """

    source: ProblemSource
    pp: ParametricProblem
    train_ds: Dataset
    test_ds: Dataset
    ok_train: Dataset
    train_rows: np.ndarray
    val_rows: np.ndarray
    seconds: float


def _log_fn(config: ExperimentConfig, log: Callable[[str], None] | None) -> Callable[[str], None]:
    if log is not None:
        return log
    if not config.progress:
        return lambda msg: None
    start = time.perf_counter()

    def emit(msg: str) -> None:
        print(f"[amortcvx {time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return emit


def load_source(config: ExperimentConfig) -> ProblemSource:
    """The configuration's problem (``problem`` file, else the bundled ``family``), checked against its solver.

    Raises:
        ValueError: unknown family or size, a faulty problem file (named), or a solver that cannot take it.
    """
    if config.problem is not None:
        source = load_problem_file(config.problem, name=config.name)
    else:
        source = bundled_family(config.family, config.size, config.family_seed)
    check_solver(source, config.solver)
    return source


def _solved_set(pp: ParametricProblem, ds: Dataset, dtype: torch.dtype) -> SolvedSet:
    theta = pp.parameter_vector(params_rows(ds.params, slice(None)), dtype=dtype)
    x, y, s = ds.torch_solution(dtype=dtype)
    return SolvedSet(theta=theta, x=x, y=y, s=s)


def _dataset_name(config: ExperimentConfig, split: str, num: int, seed: int) -> str:
    prefix = config.name if config.problem is not None else f"{config.family}-{config.size}"
    return f"{prefix}-{split}-n{num}-seed{seed}"


def prepare(config: ExperimentConfig, *, log: Callable[[str], None] | None = None,
            source: ProblemSource | None = None) -> Prepared:
    """Stage 1: compile the problem, sample and solve (or reload) the training and test sets, split.

    Raises:
        ValueError: see :func:`load_source`; polishing asked for a problem with other cones than zero /
            nonnegative; fewer than 2 training instances solved to optimal.
    """
    emit = _log_fn(config, log)
    t0 = time.perf_counter()
    source = source if source is not None else load_source(config)
    form = get_solver(config.solver).form
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    emit(f"compiling {source.origin} (kind {source.kind}) for {config.solver} (form {form!r})")
    pp = ParametricProblem(source.problem, form=form)
    check_polish_choice(form, pp.cones, config.polish)  # before any work
    emit(f"n = {pp.n}, m = {pp.m}, parameters = {pp.num_params}, fingerprint {pp.fingerprint}")
    sets = {}
    for split, num, seed in (("train", config.n_train, 2 * config.seed), ("test", config.n_test, 2 * config.seed + 1)):
        emit(f"{split} set: sampling {num} instances (seed {seed}) and solving them at high accuracy "
             f"(cached under {config.data_root})")
        sets[split] = generate_dataset(pp, source.sample(num, seed), config.solver, config.data_root,
                                       name=_dataset_name(config, split, num, seed), workers=workers,
                                       progress=config.progress)
    train_ds, test_ds = sets["train"], sets["test"]
    ok_train = train_ds.subset(train_ds.ok)
    if len(ok_train) < 2:
        raise ValueError(f"only {len(ok_train)} of {len(train_ds)} training instances were solved to optimal; "
                         "need at least 2")
    test_ok = int(test_ds.ok.sum())
    if test_ok < len(test_ds):
        emit(f"warning: {len(test_ds) - test_ok} test instances were not solved to optimal at high accuracy; "
             "their optimum / previous-solution warm starts are cold starts")
    tr_idx, va_idx = ok_train.split((1.0 - config.val_fraction, config.val_fraction), seed=config.seed)
    if len(va_idx) == 0:
        tr_idx, va_idx = tr_idx[:-1], tr_idx[-1:]
    return Prepared(source, pp, train_ds, test_ds, ok_train, np.asarray(tr_idx), np.asarray(va_idx),
                    time.perf_counter() - t0)


def _counts(prep: Prepared) -> dict[str, int]:
    return {"train": len(prep.train_rows), "val": len(prep.val_rows), "test": len(prep.test_ds),
            "dropped_train": len(prep.train_ds) - len(prep.ok_train),
            "dropped_test": len(prep.test_ds) - int(prep.test_ds.ok.sum())}


def _write_record(run_dir: Path, config: ExperimentConfig, prep: Prepared, **entries: Any) -> Path:
    """(Re)write ``config.json``: the configuration, machine, counts, problem sizes, plus ``entries``
    (kept from an earlier stage's record unless given again)."""
    path = run_dir / RUN_FILES["config"]
    record: dict[str, Any] = {}
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    record.update({"config": config.to_dict(), "environment": environment(config.device, config.dtype),
                   "counts": _counts(prep), "n": prep.pp.n, "m": prep.pp.m, "fingerprint": prep.pp.fingerprint,
                   "problem": prep.source.origin, "kind": prep.source.kind})
    record.update(entries)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def fit(config: ExperimentConfig, *, log: Callable[[str], None] | None = None,
        prepared: Prepared | None = None) -> TrainResult:
    """Stage 2: train the predictor on the training split, resuming an interrupted training in the run directory.

    Writes ``model.pt``, ``history.csv`` and ``config.json`` (with ``best_epoch`` and the stage's seconds) into
    ``config.run_dir``.

    Raises:
        ValueError: see :func:`prepare`; a training state in the run directory from another run (the message
            says how to start over).
    """
    emit = _log_fn(config, log)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepared if prepared is not None else prepare(config, log=emit)
    t0 = time.perf_counter()
    full = _solved_set(prep.pp, prep.ok_train, getattr(torch, config.dtype))
    train_set, val_set = full.subset(prep.train_rows), full.subset(prep.val_rows)
    emit(f"training the {config.solver} predictor on {len(train_set)} instances (validation {len(val_set)}), "
         f"k = {config.k}, weights {config.weights}, up to {config.epochs} epochs")
    tcfg = config.train_config(checkpoint=str(run_dir / RUN_FILES["checkpoint"]))
    state_path = train_state_path(tcfg.checkpoint)
    if config.resume and state_path.exists():
        emit(f"resuming training from {state_path} (its last finished epoch)")
    try:
        trained = train(prep.pp, config.solver, train_set, val_set, tcfg)
    except ValueError as exc:
        if str(exc).startswith("cannot resume from"):  # another run's (or a damaged) state in this run directory
            raise ValueError(f"{exc} (here: ExperimentConfig(resume=False), or --no-resume on the command "
                             "line, or another out_dir)") from None
        raise
    if trained.start_epoch:
        emit(f"training resumed at epoch {trained.start_epoch}")
    best = trained.history[trained.best_epoch]
    emit(f"best epoch {trained.best_epoch} of {len(trained.history)}: "
         + ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k != "epoch"))
    trained.model.save(run_dir / RUN_FILES["model"])
    _write_history(trained.history, run_dir / RUN_FILES["history"])
    _write_record(run_dir, config, prep, best_epoch=trained.best_epoch,
                  seconds={"data": prep.seconds, "train": time.perf_counter() - t0})
    return trained


def load_config(run_dir: str | os.PathLike, **overrides: Any) -> ExperimentConfig:
    """The configuration recorded in ``run_dir/config.json`` (``overrides`` replace fields; ``out_dir`` is
    ``run_dir``).

    Raises:
        ValueError: no or a damaged ``config.json`` there.
    """
    path = Path(run_dir) / RUN_FILES["config"]
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {RUN_FILES['config']}); start one with "
                         "`amortcvx fit` or `amortcvx run`")
    try:
        data = json.loads(path.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
    return ExperimentConfig.from_dict(data, **{"out_dir": str(run_dir), **overrides})


def _read_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_FILES["config"]).read_text())


def _load_fitted(config: ExperimentConfig, prep: Prepared) -> tuple[WarmStartPredictor, list[dict[str, float]], int]:
    run_dir = config.run_dir
    path = run_dir / RUN_FILES["model"]
    if not path.is_file():
        raise ValueError(f"{run_dir} has no trained model ({RUN_FILES['model']}); run `amortcvx fit` on it first")
    model = WarmStartPredictor.load(path, fingerprint=prep.pp.fingerprint, algorithm=config.solver)
    return model, _read_history(run_dir / RUN_FILES["history"]), int(_read_record(run_dir).get("best_epoch", -1))


def predictor_off(c: Calibration) -> bool:
    """Whether calibration turned the predictor off (by C iterations, or by wall time when it chose a strategy)."""
    return c.strategy != "learned" if getattr(c, "strategy", None) else not c.enabled


def calibration_notice(calibration: Mapping[str, Calibration], num_val: int | None = None) -> str:
    """A prominent paragraph for every learned strategy whose predictor calibration switched off ("" if none).

    It gives the numbers (median C iterations on the validation split, learned vs the (refined) cold start, and
    the wall times when calibration chose by time) and says what the strategy's rows then measure.
    """
    off = {name: c for name, c in calibration.items() if predictor_off(c)}
    if not off:
        return ""
    where = f"the {num_val} validation instances" if num_val else "the validation instances"
    lines = textwrap.wrap(f"PREDICTOR SWITCHED OFF by calibration for {len(off)} of {len(calibration)} learned "
                          f"strategies (decided on {where}): the learned warm start needed more C iterations or "
                          "more time than the cold start, so these strategies' rows in the table measure the cold "
                          "start named below, not the model:", width=100)
    for name, c in off.items():
        lines += textwrap.wrap(f"{name}: {_decision(c)}", width=100, initial_indent="  ", subsequent_indent="    ")
    width = max(len(line) for line in lines)
    return "\n".join(["!" * width, *lines, "!" * width])


def _decision(c: Calibration) -> str:
    """What calibration decided, with its numbers (``Calibration.describe`` where the calibration has one)."""
    if getattr(c, "strategy", None):
        return c.describe()
    return (f"{'predictor ON' if c.enabled else 'PREDICTOR OFF'} (median exact C iterations learned "
            f"{c.learned_median:g} vs cold {c.cold_median:g})")


def format_report(*, title: str, comparison: Comparison, fallback: Mapping[str, int],
                  calibration: Mapping[str, Calibration], timings, device: str, dtype: str,
                  num_val: int | None = None) -> str:
    """The text report: calibration notice (if any), comparison table, safeguard and calibration lines, timing."""
    num_test = len(next(iter(comparison.strategies.values())).iterations)
    text = format_table(comparison, title=title)
    notice = calibration_notice(calibration, num_val)
    if notice:
        text = notice + "\n\n" + text
    if fallback:
        text += "\nsafeguard fallbacks to cold start: " + ", ".join(f"{k}: {v}/{num_test}" for k, v in fallback.items())
    if calibration:
        text += "\ncalibration on the validation set (median C iterations, learned vs refined cold): " + ", ".join(
            f"{k}: {c.learned_median:g} vs {c.cold_median:g} ({'SWITCHED OFF' if predictor_off(c) else 'kept'}"
            + (f"; refinement {option_label(c.anderson, c.newton)} of {dict(c.candidates)}" if len(c.candidates) > 1
               else "") + ")"
            for k, c in calibration.items())
    if timings:
        text += "\n\n" + format_timings(timings, title=f"end-to-end time per instance (device {device}, "
                                                       f"{dtype}, timed-mode C solves)")
    return text


def evaluate(config: ExperimentConfig, *, log: Callable[[str], None] | None = None,
             prepared: Prepared | None = None, trained: TrainResult | None = None) -> ExperimentResult:
    """Stage 3: every strategy on the held-out instances, end-to-end timing, and the outputs in the run directory.

    Without ``trained``, the model saved by :func:`fit` in ``config.run_dir`` is used.

    Raises:
        ValueError: see :func:`prepare`; no trained model in the run directory.
    """
    emit = _log_fn(config, log)
    seconds: dict[str, float] = {}
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepared if prepared is not None else prepare(config, log=emit)
    pp, backend, test_ds, ok_train = prep.pp, config.solver, prep.test_ds, prep.ok_train
    if trained is not None:
        model, history, best_epoch = trained.model, trained.history, trained.best_epoch
    else:
        model, history, best_epoch = _load_fitted(config, prep)
    dtype = getattr(torch, config.dtype)
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    env = environment(config.device, config.dtype)

    # strategies -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    num_test = len(test_ds)
    test_params = params_rows(test_ds.params, slice(None))
    theta_test = pp.parameter_vector(test_params)
    strategies: dict[str, list] = {"cold": cold_warm_starts(num_test)}
    emit("building warm starts: nearest neighbour")
    train_theta = pp.parameter_vector(params_rows(ok_train.params, slice(None)))
    nn = NearestNeighbor(train_theta, ok_train.x, ok_train.y, ok_train.s)
    strategies["nearest neighbour"] = nn.warm_starts(theta_test)
    if prep.source.episodes is not None:
        emit("building warm starts: previous solution (closed-loop episodes)")
        strategies["previous solution"] = previous_solution_warm_starts(
            test_ds.x, test_ds.y, test_ds.s, episodes=prep.source.episodes(num_test))
    fallback: dict[str, int] = {}
    calibration: dict[str, Calibration] = {}
    solvers: dict[str, AmortizedSolver] = {}
    val_params = params_rows(ok_train.params, prep.val_rows)

    def make_solver(model_or_none, k: int, procs: int | None, anderson, newton: int = 0) -> AmortizedSolver:
        return AmortizedSolver(pp, model_or_none, algorithm=backend, k=k, anderson=anderson, polish=config.polish,
                               solver_settings=config.solver_settings, safeguard=config.safeguard,
                               safeguard_reference=config.safeguard_reference, device=config.device, dtype=dtype,
                               workers=procs, newton=newton)

    for k in config.refine_steps:
        name = learned_name(k)
        emit(f"building warm starts: {name} (prediction + {k} torch {backend} steps"
             f"{', Anderson-accelerated' if config.anderson else ''}{', polished' if config.polish else ''}, safeguard "
             f"{'on' if config.safeguard else 'off'})")
        solver = make_solver(model, k, workers, config.anderson)
        if config.safeguard and config.calibrate:
            # with acceleration asked for, the validation medians also choose plain or accelerated refinement
            choices = (None, config.anderson) if config.anderson is not None and k > 2 else None
            # and the Newton steps of the certified finish (none, or NEWTON_STEPS on problems of dense size)
            cal = calibration[name] = solver.calibrate(val_params, refinements=choices, newton_steps=newton_choices(pp),
                                                       progress=config.progress)
            emit(f"calibration of {name} on {len(prep.val_rows)} validation instances: median {cal.learned_median:g} "
                 f"vs {cal.cold_median:g} from the (refined) cold start -> predictor "
                 f"{'kept' if cal.enabled else 'SWITCHED OFF'}; refinement "
                 f"{option_label(solver.anderson, solver.newton)}"
                 + (f" (medians {dict(cal.candidates)})" if len(cal.candidates) > 1 else ""))
        pred = solver.predict_warm_start(test_params)
        strategies[name] = pred.warm_starts
        fallback[name] = int(np.sum(pred.fallback))
        solvers[name] = solver
    if config.refine_cold:
        for k in (k for k in config.refine_steps if k > 0):
            name = cold_refined_name(k)
            emit(f"building warm starts: {name} (control: {k} torch {backend} steps from the cold start, no model)")
            # the same refinement (and Newton finish) as the learned strategy with this k
            control = make_solver(None, k, workers, solvers[learned_name(k)].anderson, solvers[learned_name(k)].newton)
            pred = control.predict_warm_start(test_params)
            strategies[name] = pred.warm_starts
            fallback[name] = int(np.sum(pred.fallback))
    strategies["optimum"] = optimum_warm_starts(test_ds.x, test_ds.y, test_ds.s)
    seconds["strategies"] = time.perf_counter() - t0

    # comparison -----------------------------------------------------------------------------------------
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

    # end-to-end timing ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    timings: list[TimingResult] = []
    n_timing = max(config.timing_batch, config.timing_single)
    if n_timing > num_test:  # timing needs parameters only: held-out draws of the test distribution
        timing_params = params_rows(prep.source.sample(n_timing, 2 * config.seed + 1), slice(None))
    else:
        timing_params = test_params
    for batch, count in ((1, config.timing_single), (config.timing_batch, config.timing_batch)):
        if batch < 1 or count < 1:
            continue
        emit(f"timing end to end at batch {batch} ({count} instances)")
        # the calibrated solvers themselves: every decision calibration took applies (timed solves run in this
        # process on their persistent C objects, on their threads, whatever their ``workers``)
        timings += measure_end_to_end(pp, timing_params, solvers, backend, settings=config.solver_settings,
                                      batch_size=batch, instances=count)
    seconds["timing"] = time.perf_counter() - t0

    # outputs --------------------------------------------------------------------------------------------
    title = _title(config, prep.source.kind, num_test, len(prep.train_rows), len(prep.val_rows))
    text = format_report(title=title, comparison=comparison, fallback=fallback, calibration=calibration,
                         timings=timings, device=config.device, dtype=config.dtype, num_val=len(prep.val_rows))
    files = {key: run_dir / name for key, name in RUN_FILES.items() if key not in ("checkpoint", "cdf_png",
                                                                                   "medians_png")}
    files["table"].write_text(text + "\n")
    write_summary_csv(comparison, files["summary_csv"])
    write_instances_csv(comparison, files["instances_csv"])
    write_timings_csv(timings, files["timing_csv"])
    if trained is not None or not files["model"].exists():
        model.save(files["model"])
        _write_history(history, files["history"])
    counts = _counts(prep)
    record = _read_record(run_dir) if files["config"].exists() else {}
    all_seconds = {**record.get("seconds", {}), "data": prep.seconds, **seconds}
    _write_record(run_dir, config, prep, seconds=all_seconds, best_epoch=best_epoch, fallback=fallback,
                  calibration={k: _calibration_dict(c) for k, c in calibration.items()}, title=title,
                  backend=backend, settings=config.solver_settings, timed=comparison.timed,
                  baseline=comparison.baseline)
    try:
        plot_title = f"{config.name} ({config.size}), {backend} eps {config.eps:g}"
        files["cdf_png"] = plot_iterations_cdf(comparison, run_dir / RUN_FILES["cdf_png"], title=plot_title)
        files["medians_png"] = plot_medians(comparison, run_dir / RUN_FILES["medians_png"], title=plot_title)
    except ImportError as exc:
        emit(f"plots skipped: {exc}")
    emit(f"wrote {', '.join(str(p) for p in files.values())}")
    return ExperimentResult(config=config, comparison=comparison, timings=tuple(timings), history=history,
                            best_epoch=best_epoch, fallback=fallback, counts=counts, seconds=all_seconds,
                            calibration=calibration, files=files, environment=env, table=text)


def _title(config: ExperimentConfig, kind: str, num_test: int, num_train: int, num_val: int) -> str:
    what = f"{config.name} ({config.size}, {kind})" if config.problem is None else f"{config.name} ({kind})"
    return (f"{what} | {config.solver} eps {config.eps:g} | {num_test} held-out instances | train {num_train} "
            f"(+{num_val} val) | exact iterations")


def _calibration_dict(c: Calibration) -> dict[str, Any]:
    return {**c.to_dict(), "refinement": option_label(c.anderson, c.newton)}


def _calibration_from_dict(d: Mapping[str, Any]) -> Calibration:
    return Calibration.from_dict(d)


def run_experiment(config: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> ExperimentResult:
    """The whole pipeline (module docstring): :func:`prepare`, :func:`fit`, :func:`evaluate`, with torch's
    thread count set to ``config.torch_threads`` for the run.

    Returns:
        An :class:`ExperimentResult` (its ``table`` is the text report).

    Raises:
        ValueError: unknown family or size, a faulty problem file, a solver that cannot take the problem (OSQP on
            SOCP / SDP), or too few training instances solved to optimal.
    """
    emit = _log_fn(config, log)
    with torch_threads(config.torch_threads):
        prep = prepare(config, log=emit)
        trained = fit(config, log=emit, prepared=prep)
        return evaluate(config, log=emit, prepared=prep, trained=trained)


def report(run_dir: str | os.PathLike) -> str:
    """The text report of a finished run, rebuilt from its files (``config.json``, ``instances.csv``,
    ``timing.csv``): the same text as its ``table.txt``.

    Raises:
        ValueError: not a run directory, or a run that was not evaluated yet.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    record = _read_record(run_dir)
    instances = run_dir / RUN_FILES["instances_csv"]
    if "title" not in record or not instances.is_file():
        raise ValueError(f"{run_dir} has not been evaluated yet (no results); run `amortcvx evaluate {run_dir}`")
    comparison = read_instances_csv(instances, backend=record["backend"], settings=record["settings"],
                                    baseline=record.get("baseline"), timed=bool(record.get("timed")))
    calibration = {k: _calibration_from_dict(v) for k, v in record.get("calibration", {}).items()}
    text = format_report(title=record["title"], comparison=comparison, fallback=record.get("fallback", {}),
                         calibration=calibration, timings=read_timings_csv(run_dir / RUN_FILES["timing_csv"]),
                         device=config.device, dtype=config.dtype, num_val=record.get("counts", {}).get("val"))
    return text


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for h in history:
            writer.writerow([h.get(k, "") for k in keys])


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
                for row in csv.DictReader(fh)]
