"""Warm-start benchmark: exact C solver iterations and end-to-end time, learned vs baselines, per family.

For every family (default size ``small``) and every algorithm that can solve it (SCS always; OSQP for qp / lp
families), one :func:`amortcvx.evaluation.run_experiment`:

* training set: ``--n-train`` instances (seed 0; 10% validation), solved at eps 1e-8 by the same C solver;
* test set: ``--n-test`` (>= 200) held-out instances (seed 1);
* predictor: MLP (``--hidden``, default 256,256) on the flattened parameters, regression loss to the optimal
  fixed-point variable (``--residual`` / ``--distance`` add the losses after ``--k`` unrolled steps), Adam,
  ``--epochs``;
* strategies, each solved by the C solver from a fresh solver object at eps_abs = eps_rel = ``--eps``
  (default settings otherwise), exact iteration counts: cold, nearest neighbour (training set, standardized
  parameters), previous solution (sequential families), learned with k = 0 and k = ``--k`` torch refinement
  steps (``--anderson M``: Anderson-accelerated; ``--polish``: active-set polish on LP / QP families), the
  control "cold + k torch steps" (same refinement without the predictor), and the optimum;
* end-to-end time per instance (canonicalization + prediction + refinement + C solve in timed mode) of the
  learned strategies against cold starts, at batch 1 and at batch ``--timing-batch``.

The last table checks the targets (learned median <= 1/5 of cold and <= 1/2 of nearest neighbour).

    python benchmarks/bench_warmstart.py                                    # every family, SCS and OSQP
    python benchmarks/bench_warmstart.py --families portfolio kalman --solvers scs --epochs 50
    python benchmarks/bench_warmstart.py --k 30 --anderson 10                # the configuration of our notes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from amortcvx import problems
from amortcvx.backends import get_backend
from amortcvx.datasets import DEFAULT_SETTINGS as DATASET_SETTINGS
from amortcvx.evaluation import ExperimentConfig, environment, format_rows, learned_name, run_experiment
from amortcvx.evaluation.options import add_dataclass_arguments, config_from_args
from amortcvx.solvers import NAMES, get_solver


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=None, help="families (default: all)")
    ap.add_argument("--solvers", "--algorithms", nargs="*", default=list(NAMES), choices=NAMES,
                    help="solvers (default: all)")
    # every other option is an ExperimentConfig field: its flag, type, help and default come from there
    add_dataclass_arguments(ap, ExperimentConfig, exclude=("family", "problem", "solver", "eval_k"),
                            defaults={"out_dir": "runs/bench_warmstart", "progress": False})
    args = ap.parse_args()
    if args.n_test < 200:
        print(f"note: --n-test {args.n_test} < 200; the project's measuring rules ask for at least 200")

    families = args.families or problems.names()
    base = config_from_args(ExperimentConfig, args)
    weights = base.weights
    env = environment(args.device, args.dtype)
    print("machine:", json.dumps(env))
    print(f"load average at start: {os.getloadavg()[0]:.2f} (shared machine)")
    print(f"torch threads: {args.torch_threads or 'default'}; C solver processes: {args.workers or os.cpu_count()}")
    for algo in args.solvers:
        c_settings = dict(get_backend(algo).default_settings)
        c_settings.update({"eps_abs": args.eps, "eps_rel": args.eps})
        print(f"{algo} settings of the compared solves: {c_settings} (exact iteration counts; timings in timed "
              "mode, no exact counting)")
        print(f"{algo} settings of the training / optimum solutions: "
              f"{ {**get_backend(algo).default_settings, **DATASET_SETTINGS[algo]} }")
    print(f"training: n_train {args.n_train} (10% validation), MLP {args.hidden}, loss weights {weights}, "
          f"unrolled k {args.k if weights.needs_unroll else '- (regression only)'}, epochs {args.epochs}, "
          f"batch {args.batch_size}, Adam lr {args.lr}, patience {args.patience}, seed {args.seed}, "
          f"device {args.device}, dtype {args.dtype}")
    print(f"evaluation: {args.n_test} held-out instances; learned k = 0 and k = {args.k} ("
          + (f"plain or Anderson-accelerated (memory {args.anderson_memory}) refinement, chosen per strategy on the "
             "validation split" if args.anderson_memory else "plain refinement steps")
          + ("; active-set polish on LP / QP families" if args.polish else "")
          + f"; the cold + k control refines the same way); safeguard reference {args.safeguard_reference}; "
          f"timing batch 1 ({args.timing_single} instances) and batch {args.timing_batch}")

    summary = []
    for fam_name in families:
        fam = problems.make(fam_name, size=args.size)
        for algo in args.solvers:
            try:
                get_solver(algo).check_problem(fam.problem, what=f"family {fam_name} (kind {fam.kind})")
            except ValueError as exc:
                print(f"\n== {fam_name} / {algo}: skipped ({exc})")
                continue
            print(f"\n== {fam_name} ({args.size}, {fam.kind}) / {algo}", flush=True)
            cfg = dataclasses.replace(
                base, family=fam_name, solver=algo, eval_k=(0, args.k), polish=args.polish and fam.problem.is_qp(),
                out_dir=os.path.join(args.out_dir, f"{fam_name}-{args.size}-{algo}"))
            t0 = time.perf_counter()
            try:
                res = run_experiment(cfg)  # with torch's thread count set to cfg.torch_threads
            except Exception as exc:  # noqa: BLE001 - report and go on with the other families
                print(f"FAILED: {type(exc).__name__}: {exc}")
                summary.append((fam_name, algo, "FAILED"))
                continue
            print(res.table)
            best = res.history[res.best_epoch]
            print(f"training: best epoch {res.best_epoch} of {len(res.history)}, "
                  + ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k != "epoch")
                  + f"; stage seconds { {k: round(v, 1) for k, v in res.seconds.items()} }; "
                  f"wall {time.perf_counter() - t0:.0f} s")
            sums = {s.name: s for s in res.comparison.summaries}
            cold, nn, learned = sums["cold"], sums["nearest neighbour"], sums[learned_name(args.k)]
            prev = sums.get("previous solution")
            speed = {(t.strategy, t.batch_size): t.speedup for t in res.timings}
            meets = learned.median <= cold.median / 5 and learned.median <= nn.median / 2
            summary.append((
                fam_name, algo, f"{cold.median:g}/{cold.p90:g}", f"{nn.median:g}/{nn.p90:g}",
                "-" if prev is None else f"{prev.median:g}/{prev.p90:g}",
                f"{sums[learned_name(0)].median:g}/{sums[learned_name(0)].p90:g}",
                f"{learned.median:g}/{learned.p90:g}", _ratio(learned.median, cold.median),
                _ratio(learned.median, nn.median), "yes" if meets else "no",
                f"{speed.get((learned_name(args.k), 1), float('nan')):.2f}x",
                f"{speed.get((learned_name(args.k), args.timing_batch), float('nan')):.2f}x",
                str(sum(res.comparison.non_optimal.values()))))

    header = ("family", "algo", "cold med/p90", "NN med/p90", "prev med/p90", "k=0 med/p90",
              f"k={args.k} med/p90", "k/cold", "k/NN", "target met", "e2e b=1", f"e2e b={args.timing_batch}",
              "non-opt")
    rows = [r if len(r) == len(header) else (*r, *["-"] * (len(header) - len(r))) for r in summary]
    print("\n" + format_rows(header, rows, title=f"summary: exact iterations (median/p90) at eps {args.eps:g}; "
                             f"target: learned k={args.k} median <= 1/5 cold and <= 1/2 NN; e2e = end-to-end "
                             "speedup over cold (wall time per instance)"))


if __name__ == "__main__":
    main()
