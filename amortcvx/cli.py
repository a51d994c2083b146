"""Command line: ``amortcvx run | fit | evaluate | report | families`` (also ``python -m amortcvx ...``).

``run`` trains a warm-start predictor for one problem (a bundled family, or your own file with ``--problem
path/to/file.py:make``) and compares it on held-out instances with the cold start, the nearest-neighbour and
previous-solution baselines and the optimum, with exact C solver iteration counts and end-to-end times; ``fit``,
``evaluate`` and ``report`` run its stages one at a time on a run directory, which an interrupted command
resumes. Every flag of ``run`` / ``fit`` / ``evaluate`` is a field of
:class:`~amortcvx.evaluation.ExperimentConfig` (defaults and help come from there). Details: ``docs/cli.md``::

    amortcvx run                                           # mpc (small), SCS
    amortcvx run --family portfolio --solver osqp --n-train 2000 --epochs 100
    amortcvx run --problem my_problem.py:make --solver osqp --out runs/mine
    amortcvx fit --problem my_problem.py:make --out runs/mine     # then, separately:
    amortcvx evaluate runs/mine && amortcvx report runs/mine
    amortcvx families
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from amortcvx.evaluation.config import ExperimentConfig
from amortcvx.evaluation.options import add_dataclass_arguments, config_from_args

#: The flags of each subcommand, by group: every field of ExperimentConfig is in exactly one group.
GROUPS: Mapping[str, tuple[str, ...]] = {
    "problem": ("family", "problem", "size", "family_seed", "solver"),
    "data": ("n_train", "n_test", "val_fraction", "seed", "data_root"),
    "training": ("k", "weights", "epochs", "batch_size", "lr", "weight_decay", "patience", "hidden", "resume"),
    "evaluation": ("eval_k", "anderson_memory", "polish", "eps", "safeguard", "safeguard_reference", "calibrate",
                   "refine_cold", "timing_batch", "timing_single"),
    "machine and outputs": ("out_dir", "workers", "device", "dtype", "torch_threads", "progress"),
}
#: The groups each subcommand takes (``evaluate`` reads the rest from the run directory).
COMMAND_GROUPS: Mapping[str, tuple[str, ...]] = {
    "run": tuple(GROUPS),
    "fit": tuple(GROUPS),  # the evaluation flags are recorded for a later `evaluate`
    "evaluate": ("evaluation", "machine and outputs"),
}
#: Fields ``evaluate`` may not change (they fix the run directory and the problem its model was trained on).
_FIXED_ON_EVALUATE = ("out_dir",)

# A number in exponent notation, e.g. -1e-4: argparse takes a token starting with '-' for an option unless it
# looks like a plain negative number (-1, -0.5), so `--eps -1e-4` would read as a missing value.
_EXP_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--eps", "-1e-4"]`` -> ``["--eps=-1e-4"]``, so that argparse passes the value to the option's type."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if (arg.startswith("--") and "=" not in arg and arg != "--" and i + 1 < len(args)
                and _EXP_NUMBER.match(args[i + 1])):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    suppress = command == "evaluate"  # only the flags given override the run directory's configuration
    for group in COMMAND_GROUPS[command]:
        fields = [f for f in GROUPS[group] if not (suppress and f in _FIXED_ON_EVALUATE)]
        add_dataclass_arguments(parser.add_argument_group(group), ExperimentConfig, only=fields,
                                suppress_defaults=suppress)
    parser.add_argument("--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no stage messages or progress bars (same as --no-progress)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``amortcvx`` / ``python -m amortcvx``."""
    parser = argparse.ArgumentParser(prog="amortcvx", description="Amortized convex optimization: learned warm "
                                     "starts for parametric CVXPY problems, finished by SCS / OSQP.")
    sub = parser.add_subparsers(dest="command", metavar="{run,fit,evaluate,report,families}")
    sub.required = True
    run = sub.add_parser("run", help="fit, evaluate and report in one go (resumes an interrupted run in --out)")
    _add_config_flags(run, "run")
    fit = sub.add_parser("fit", help="sample, solve and train: a run directory with a model (resumable)")
    _add_config_flags(fit, "fit")
    evaluate = sub.add_parser("evaluate", help="compare the warm starts of a fitted run directory on held-out "
                              "instances and time them; flags given here replace the run's settings")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `amortcvx fit` or `run`")
    _add_config_flags(evaluate, "evaluate")
    report = sub.add_parser("report", help="print the report of an evaluated run directory")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `amortcvx evaluate` or `run`")
    sub.add_parser("families", help="list the bundled problem families")
    return parser


def families_table() -> str:
    """One line per bundled family: name, kind, sequential, solvers, description (of the small size)."""
    from amortcvx import problems
    from amortcvx.evaluation import format_rows
    from amortcvx.solvers import SOLVERS

    rows = []
    for name in problems.names():
        fam = problems.make(name, size="small")
        solvers = ", ".join(d.name for d in SOLVERS.values() if d.accepts(fam.problem))
        rows.append((name, fam.kind, "yes" if fam.sequential else "no", solvers, fam.description))
    return format_rows(("family", "kind", "sequential", "solvers", "description (size small)"), rows,
                       left=range(5))


def check_device(device: str) -> None:
    """Raise ValueError (one line) unless ``device`` names a torch device that exists on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({' '.join(str(exc).split())})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}"
                             f", CUDA build {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Raise a ValueError naming ``option`` unless ``folder`` can be written (or created) by this process.

    An existing folder gets a test file written and deleted in it; for a missing one, its nearest existing
    ancestor must be a folder this process may write into. Nothing is created.
    """
    path = Path(folder).absolute()
    try:
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(20, "it is not a folder")
            fd, probe = tempfile.mkstemp(prefix=".amortcvx-write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
            return
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(20, f"{parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(13, f"no permission to create folders in {parent}")
    except OSError as exc:
        raise ValueError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from None


def _absolute_problem(spec: str | None) -> str | None:
    """``file.py:make`` with the file's absolute path, so that a run directory works from any folder later."""
    if spec is None:
        return None
    path, sep, func = spec.rpartition(":")
    if not sep or not path or "/" in func or "\\" in func:
        path, func = spec, "make"
    return f"{Path(path).absolute()}:{func or 'make'}" if Path(path).exists() else spec


def _config(args: argparse.Namespace) -> ExperimentConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "run_dir")}
    if args.command == "evaluate":
        from amortcvx.evaluation import load_config

        return load_config(args.run_dir, **{k: v for k, v in values.items()
                                            if k in {f.name for f in dataclasses.fields(ExperimentConfig)}})
    config = config_from_args(ExperimentConfig, values)
    # absolute paths in the recorded configuration: `evaluate RUN_DIR` then works from any folder
    return dataclasses.replace(config, problem=_absolute_problem(config.problem),
                               data_root=str(Path(config.data_root).absolute()))


def _checked_config(args: argparse.Namespace) -> ExperimentConfig:
    """The command's configuration, with everything checked that can be before any work: the problem (file,
    function, sampler), the solver against it, the device and the output folders."""
    from amortcvx.evaluation import load_source

    config = _config(args)
    load_source(config)  # a faulty problem file / family / solver: ValueError naming it
    check_device(config.device)
    check_writable(config.run_dir, "--out")
    check_writable(config.data_root, "--data-root")
    return config


def _print_outcome(result) -> None:
    from amortcvx.evaluation import calibration_notice

    print(result.table)
    notice = calibration_notice(result.calibration, result.counts.get("val"))
    if notice:  # also on stderr, where the stage messages went: it must not be missed
        print(notice, file=sys.stderr)
    print(f"\noutputs in {result.config.run_dir}/")


def _run(args: argparse.Namespace) -> int:
    import amortcvx.evaluation as evaluation

    if args.command == "report":
        print(evaluation.report(args.run_dir))
        return 0
    config = _checked_config(args)
    with evaluation.torch_threads(config.torch_threads):
        if args.command == "run":
            _print_outcome(evaluation.run_experiment(config))
        elif args.command == "fit":
            trained = evaluation.fit(config)
            best = trained.history[trained.best_epoch]
            print(f"trained {len(trained.history)} epochs; best epoch {trained.best_epoch}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k != "epoch"))
            print(f"model in {config.run_dir}/; next: amortcvx evaluate {config.run_dir}")
        else:
            _print_outcome(evaluation.evaluate(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m amortcvx`` and of the ``amortcvx`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "families":
            print(families_table())
            return 0
        return _run(args)
    except ValueError as exc:
        print(f"amortcvx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amortcvx {args.command}: interrupted; finished dataset chunks are kept and reused by a rerun, "
              "which also continues training from its last finished epoch (--no-resume: start training over)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
