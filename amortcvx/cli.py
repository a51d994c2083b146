"""Command line: ``python -m amortcvx run ...`` (one end-to-end experiment) and ``python -m amortcvx families``.

``run`` trains a warm-start predictor for one problem family and compares it with the cold start, the
nearest-neighbour and previous-solution baselines and the optimum on held-out instances, with exact C solver
iteration counts, then prints the table (details: ``docs/evaluation.md``). The defaults finish in a few minutes
on a 2-core CPU::

    python -m amortcvx run                                     # mpc (small), SCS
    python -m amortcvx run --family portfolio --algorithm osqp --n-train 2000 --epochs 100
    python -m amortcvx families
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The embedded default of ``run``: small enough to finish end to end in a few minutes on a 2-core CPU, with
#: solves that cost enough (model predictive control, n = 88, m = 232) for the time saving to show.
DEFAULTS = {
    "family": "mpc",
    "size": "small",
    "algorithm": "scs",
    "n_train": 2000,
    "n_test": 200,
    "k": 10,
    "epochs": 100,
    "out": "runs/{family}-{size}-{algorithm}",
    "data_root": "data",
    "eps": 1e-4,
    "seed": 0,
    "regression": 1.0,
    "residual": 0.0,
    "distance": 0.0,
    "torch_threads": 1,
}


def _k_list(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out or any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected nonnegative ints, got {text!r}")
    return out


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive (and finite), got {text}")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m amortcvx``."""
    parser = argparse.ArgumentParser(prog="amortcvx", description="Amortized convex optimization: learned warm "
                                     "starts for parametric CVXPY problems, finished by SCS / OSQP.")
    sub = parser.add_subparsers(dest="command", metavar="{run,families}")
    sub.required = True

    run = sub.add_parser("run", help="train a predictor and compare warm starts on held-out instances",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    run.add_argument("--family", default=d["family"], help="problem family (see `amortcvx families`)")
    run.add_argument("--size", default=d["size"], help="family size: small or large")
    run.add_argument("--algorithm", default=d["algorithm"], help="scs (any family) or osqp (qp / lp families)")
    run.add_argument("--n-train", type=int, default=d["n_train"], help="training instances (10%% validation)")
    run.add_argument("--n-test", type=int, default=d["n_test"], help="held-out test instances")
    run.add_argument("--k", type=int, default=d["k"], help="torch refinement steps (and unrolled training steps)")
    run.add_argument("--eval-k", type=_k_list, default=None,
                     help="comma-separated refinement steps to evaluate, e.g. 0,5 (default: 0 and --k)")
    run.add_argument("--anderson", type=int, default=0, metavar="M",
                     help="allow Anderson acceleration of memory M for the refinement steps: calibration on the "
                          "validation split chooses plain or accelerated steps (0: plain steps)")
    run.add_argument("--polish", action="store_true",
                     help="polish the refined warm starts on their guessed active sets (LP / QP families only)")
    run.add_argument("--epochs", type=int, default=d["epochs"], help="maximum training epochs")
    run.add_argument("--batch-size", type=int, default=64, help="training mini-batch size")
    run.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    run.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    run.add_argument("--regression", type=float, default=d["regression"], help="weight of the regression loss")
    run.add_argument("--residual", type=float, default=d["residual"],
                     help="weight of the fixed-point residual after k steps")
    run.add_argument("--distance", type=float, default=d["distance"],
                     help="weight of the distance to the optimum after k steps")
    run.add_argument("--eps", type=_positive_float, default=d["eps"],
                     help="C solver tolerance (eps_abs = eps_rel)")
    run.add_argument("--seed", type=int, default=d["seed"], help="seed of sampling, split and training")
    run.add_argument("--out", default=d["out"], help="output folder ({family}, {size}, {algorithm} are filled in)")
    run.add_argument("--data-root", default=d["data_root"], help="cache folder of the solved datasets")
    run.add_argument("--workers", type=int, default=None, help="processes for the C solves (default: all cores)")
    run.add_argument("--device", default="cpu", help="torch device for training and prediction")
    run.add_argument("--dtype", default="float64", choices=("float32", "float64"), help="torch dtype")
    run.add_argument("--torch-threads", type=int, default=d["torch_threads"],
                     help="torch intra-op threads during the run (0: leave torch's setting)")
    run.add_argument("--timing-batch", type=int, default=1024, help="large batch of the end-to-end timing")
    run.add_argument("--timing-single", type=int, default=50, help="instances timed at batch 1")
    run.add_argument("--no-safeguard", action="store_true", help="turn off the residual safeguard")
    run.add_argument("--safeguard-reference", default="cold", choices=("cold", "refined_cold"),
                     help="compare refined predictions with the cold start's first step (default) or with the "
                          "cold start refined by the same steps (twice the torch work)")
    run.add_argument("--no-calibrate", action="store_true",
                     help="do not switch the predictor off when it loses to the cold start on the validation set")
    run.add_argument("--no-resume", action="store_true",
                     help="train from scratch instead of continuing the interrupted training saved in --out "
                          "(checkpoint.pt.state)")
    run.add_argument("--quiet", action="store_true", help="no stage messages or progress bars")

    sub.add_parser("families", help="list the problem families")
    return parser


def families_table() -> str:
    """One line per family: name, kind, sequential, description (of the small size)."""
    from amortcvx import problems
    from amortcvx.evaluation import format_rows

    rows = []
    for name in problems.names():
        fam = problems.make(name, size="small")
        algos = "scs, osqp" if fam.kind in ("qp", "lp") else "scs"
        rows.append((name, fam.kind, "yes" if fam.sequential else "no", algos, fam.description))
    return format_rows(("family", "kind", "sequential", "algorithms", "description (size small)"), rows,
                       left=range(5))


def _out_dir(args: argparse.Namespace) -> str:
    return args.out.replace("{family}", args.family).replace("{size}", args.size).replace("{algorithm}", args.algorithm)


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


def _check_run(args: argparse.Namespace) -> None:
    """What can be checked before any work: device, output folders."""
    check_device(args.device)
    check_writable(_out_dir(args), "--out")
    check_writable(args.data_root, "--data-root")


def _run(args: argparse.Namespace) -> int:
    from amortcvx import problems
    from amortcvx.evaluation import ExperimentConfig, check_family_algorithm, run_experiment, torch_threads
    from amortcvx.training import LossWeights

    family = problems.make(args.family, size=args.size)  # ValueError names the valid families / sizes
    check_family_algorithm(family, args.algorithm)
    _check_run(args)  # before any work
    out = _out_dir(args)
    eval_k = args.eval_k if args.eval_k is not None else tuple(sorted({0, args.k}))
    config = ExperimentConfig(
        family=args.family, size=args.size, algorithm=args.algorithm, n_train=args.n_train, n_test=args.n_test,
        k=args.k, eval_k=eval_k, anderson_memory=args.anderson, polish=args.polish,
        weights=LossWeights(args.regression, args.residual, args.distance),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience, seed=args.seed,
        eps=args.eps, data_root=args.data_root, out_dir=out, workers=args.workers, device=args.device,
        dtype=args.dtype, safeguard=not args.no_safeguard, safeguard_reference=args.safeguard_reference,
        calibrate=not args.no_calibrate,
        timing_batch=args.timing_batch, timing_single=args.timing_single, progress=not args.quiet,
        resume=not args.no_resume)
    with torch_threads(args.torch_threads):
        result = run_experiment(config)
    print(result.table)
    print(f"\noutputs in {out}/")
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
