"""End-to-end wall time per instance, from parameter values to answers at the tolerance.

For each family and solver: train a predictor (data generated and cached under ``--data-root``), calibrate it
on validation instances, then time on held-out instances, in interleaved rounds (medians):

* (b) ``loop``: the hand-written persistent cold loop on the solver's own Python API
  (:class:`amortcvx.evaluation.PersistentColdLoop`): the best a user does without amortcvx.
* (a) ``package cold``: ``AmortizedSolver`` without predictor, ``k = 0``, ``finish="c"``, calibrated on the
  validation instances (OSQP's initial rho and check interval, SCS's object modes and scale).
* (c) ``nearest neighbour``: the solution of the nearest training instance (standardized parameters) as a warm
  start on a persistent solver object: the stateless object calibrated for (a) (SCS: fixed scale, no
  acceleration; OSQP: fixed rho), as the package uses for warm starts; (d) and the floor too.
* ``learned k=0`` and ``learned k=K``: ``AmortizedSolver`` with the trained predictor (certified finish, the
  rest warm-started on the persistent objects; calibrated: predictor on/off, plain/Anderson refinement, SCS
  object modes, OSQP check interval).
* ``learned k=0, forced on``: where calibration switched the predictor off at ``k = 0``, the same solver with the
  learned start forced on (the calibrated refinement, Newton steps, modes and intervals kept): what the model's
  own path costs.
* ``learned k=0, 1 thread``: the same calibrated path with its C solves on one thread (shown when the package
  uses more: ``--threads``, default every core; a batch of 16 or more is then cut into parts solved
  concurrently, :class:`amortcvx.backends.persistent.ThreadedSolver`), to separate what the threads add.
* ``control k=K``: the same refinement from the cold start, no predictor.
* (d) ``previous solution`` (sequential families, e.g. MPC, whose held-out rows are closed-loop episodes): each
  instance warm-started, on one persistent solver object, from the answer the same object returned for the
  previous instance of its episode (cold at an episode start): what an MPC user writes by hand.
* ``floor``: warm-started at the optimum (solved beforehand at eps 1e-9) on the warm-start object (OSQP checks
  termination at every iteration there, so it stops after the first; at OSQP's default interval of 25 a start at
  the optimum still costs 25 iterations, about half a cold solve on mpc large).

Usage: ``python benchmarks/bench_endtoend.py [--families ...] [--size small|large] [--batch 1 256]
[--instances 256] [--rounds 3] [--warmup 5] [--k 10] [--train 1000] [--kind mlp] [--uncorrected] [--choices 8]
[--epochs 60] [--threads N] [--json PATH] [--plot PATH.png] [--smoke]``;
``--from-json PATH --plot PATH.png`` redraws the plot of a saved run without running anything.
Prints machine, load, sizes, dtype and settings beside the numbers. The plot (matplotlib) shows, per batch size,
each pair's time per instance as a ratio to (b) on a log axis, with the targets 1/2 and 1/3 of (b) marked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from amortcvx import problems
from amortcvx.backends import PersistentSolver, solve_batch
from amortcvx.backends.persistent import RACE_CALLS, default_threads
from amortcvx.canon import ParametricProblem
from amortcvx.datasets import DEFAULT_SETTINGS as DATASET_SETTINGS
from amortcvx.datasets import generate_dataset
from amortcvx.deploy import AmortizedSolver
from amortcvx.deploy.solver import NEWTON_STEPS, newton_choices, option_label, polish_choices
from amortcvx.evaluation import NearestNeighbor, PersistentColdLoop
from amortcvx.evaluation.options import add_dataclass_arguments, config_from_args
from amortcvx.evaluation.reports import new_figure, save_figure
from amortcvx.iterations import AndersonSettings
from amortcvx.solvers import NAMES, get_solver
from amortcvx.training import LossWeights, SolvedSet, TrainConfig, train
from amortcvx.training.recipe import KINDS, NEIGHBOR_CHOICES, Candidate, candidate_core, uncorrected_model


def _rows(params, start, stop):
    return {k: v[start:stop] for k, v in params.items()}


class TooFewSolved(RuntimeError):
    """A pair whose training instances the solver could not solve: reported and skipped."""


class WarmLoop:
    """Persistent solver object warm-started from given solutions (nearest neighbour, optimum); ``check``: OSQP's
    termination-check interval (None: the object's)."""

    def __init__(self, pp, alg, settings, reference, lookup, check=None):
        self.pp, self.lookup, self.check = pp, lookup, check
        self.solver = PersistentSolver(alg, pp.canonicalize(reference).instance(0), settings)

    def solve(self, params):
        data = self.pp.canonicalize(params)
        return self.solver.solve(data, self.lookup(params), check_termination=self.check)


class PreviousLoop:
    """(d): one persistent solver object; each instance warm-started from the previous instance's answer.

    Rows are taken in order (the caller resets ``row`` before a pass); row ``i`` starts an episode when
    ``i % episode_length == 0`` and then starts cold, as it does when the previous answer has no solution.
    """

    def __init__(self, pp, alg, settings, reference, episode_length):
        self.pp, self.length, self.row, self.prev = pp, episode_length, 0, None
        self.fields = ("x", "y", "s") if alg == "scs" else ("x", "y")
        self.solver = PersistentSolver(alg, pp.canonicalize(reference).instance(0), settings)

    def solve(self, params):
        data = self.pp.canonicalize(params)
        out = []
        for i in range(data.batch_size):
            warm = self.prev is not None and self.row % self.length != 0 and self.prev.status.has_solution
            arrays = {f: getattr(self.prev, f)[None] for f in self.fields} if warm else None
            (r,) = self.solver.solve(data.take(np.array([i])), arrays)
            out.append(r)
            self.prev, self.row = r, self.row + 1
        return out


def bench_pair(name, alg, args, tol):
    fam = problems.make(name, size=args.size)
    pp = ParametricProblem(fam.problem, get_solver(alg).form)
    t0 = time.perf_counter()
    train_params = fam.sample(args.train, seed=0)
    dataset_tol = None if args.dataset_eps is None else {"eps_abs": args.dataset_eps, "eps_rel": args.dataset_eps}
    ds = generate_dataset(pp, train_params, alg, args.data_root, name=f"train{args.train}", workers=args.workers,
                          settings=dataset_tol, progress=False)
    solved = SolvedSet.from_dataset(pp, ds)
    n_val = max(8, len(solved) // 10)
    if len(solved) < 2 * n_val:
        raise TooFewSolved(f"{name} {alg}: only {len(solved)} of {args.train} training instances were solved to the "
                           f"dataset's tolerance; training and validation need at least {2 * n_val}: skipped")
    tr, va = solved.subset(range(n_val, len(solved))), solved.subset(range(n_val))
    cfg = config_from_args(TrainConfig, args, k=0, weights=LossWeights(regression=1.0), progress=False)
    cand = Candidate(kind=args.kind, hidden=tuple(args.hidden), correction=not args.uncorrected,
                     choices=args.choices)
    if cand.correction:
        model = train(pp, alg, tr, va, cfg, core=candidate_core(cand, pp, alg, None, tr)).model
    else:  # nothing to train
        model = uncorrected_model(cand, pp, alg, None, tr)
    val_params = {k: v[:n_val] for k, v in ds.subset(np.flatnonzero(ds.ok)).params.items()}
    train_seconds = time.perf_counter() - t0

    ref = {k: v.mean(axis=0) for k, v in train_params.items()}
    learned = {}
    threads = {"threads": args.threads}
    for k in sorted({0, args.k}):
        solver = AmortizedSolver(pp, model, k=k, solver_settings=tol, **threads)
        cal = solver.calibrate(val_params, refinements=(None, AndersonSettings()) if k > 2 else None,
                               newton_steps=newton_choices(pp), polish=polish_choices(pp))
        learned[f"learned k={k}"] = (solver, cal)
    chosen = learned[f"learned k={args.k}"][0]
    cal0 = learned["learned k=0"][1]
    if cal0.strategy != "learned":  # switched off: what the model's own path costs, beside the calibrated one
        forced = AmortizedSolver(pp, model, k=0, solver_settings=tol, **threads)
        on = cal0._replace(strategy="learned", enabled=True, seconds=None)  # no timed choice: always learned
        forced.configure(on)
        learned["learned k=0, forced on"] = (forced, on)
    one_thread = None
    if chosen.threads > 1:  # the same calibrated path on one thread: what the threads add, apart
        one_thread = AmortizedSolver(pp, model, k=0, solver_settings=tol, threads=1)
        one_thread.configure(learned["learned k=0"][1])
    control = AmortizedSolver(pp, algorithm=alg, k=args.k, anderson=chosen.anderson, newton=chosen.newton,
                              solver_settings=tol, reference_params=ref, **threads)
    package = AmortizedSolver(pp, algorithm=alg, k=0, solver_settings=tol, finish="c", reference_params=ref,
                              **threads)
    package.calibrate(val_params)  # what fit gives without a predictor: rho / scale, check interval, modes
    loop = PersistentColdLoop(pp, alg, tol)
    warm_settings = package.object_settings("stateless")  # the baselines' warm starts: the package's stateless object
    near = NearestNeighbor(tr.theta.numpy(), tr.x.numpy(), tr.y.numpy(), None if tr.s is None else tr.s.numpy())

    def nn_lookup(params):
        rows, _ = near.query(pp.parameter_vector(params).numpy())
        out = {"x": near.x[rows], "y": near.y[rows]}
        if near.s is not None:
            out["s"] = near.s[rows]
        return out

    test = fam.sample(args.instances, seed=11)
    opt = solve_batch(pp.canonicalize(test).instances(), alg, settings={"eps_abs": 1e-9, "eps_rel": 1e-9},
                      workers=args.workers)
    opt_arrays = {"x": np.stack([r.x for r in opt]), "y": np.stack([r.y for r in opt])}
    if alg == "scs":
        opt_arrays["s"] = np.stack([r.s for r in opt])
    position = {"start": 0}

    def opt_lookup(params):  # the optimum of the rows being timed (they are taken in order)
        size = next(iter(params.values())).shape[0]
        s = position["start"]
        position["start"] = s + size
        return {k: v[s:s + size] for k, v in opt_arrays.items()}

    strategies = {"loop (b)": loop.solve, "package cold (a)": package.solve,
                  "nearest neighbour (c)": WarmLoop(pp, alg, warm_settings, ref, nn_lookup).solve}
    strategies.update({label: s.solve for label, (s, _) in learned.items()})
    if one_thread is not None:
        strategies["learned k=0, 1 thread"] = one_thread.solve
    strategies[f"control k={args.k}"] = control.solve
    system = fam.extras.get("system")
    previous = None
    if system is not None and getattr(system, "episode_length", None):
        previous = PreviousLoop(pp, alg, warm_settings, ref, system.episode_length)
        strategies["previous solution (d)"] = previous.solve
    # a start at the optimum is best checked at once: OSQP at its first iteration (SCS checks at iteration 0)
    strategies["floor (optimum)"] = WarmLoop(pp, alg, warm_settings, ref, opt_lookup,
                                             check=1 if alg == "osqp" else None).solve

    def rewind():  # the lookups that follow the rows in order start again at row 0
        position["start"] = 0
        if previous is not None:
            previous.row, previous.prev = 0, None

    for batch in args.batch:
        times = {s: [] for s in strategies}
        for fn in strategies.values():  # warm-up: first setups, caches, and the threads' race (docs/backends.md)
            for _ in range(args.warmup):
                rewind()
                fn(_rows(test, 0, batch))
        calls = max(1, args.instances // batch)
        for _ in range(args.rounds):
            for label, fn in strategies.items():
                rewind()
                t = time.perf_counter()
                for c in range(calls):
                    fn(_rows(test, c * batch, (c + 1) * batch))
                times[label].append((time.perf_counter() - t) / (calls * batch) * 1e3)
        med = {s: float(np.median(v)) for s, v in times.items()}
        extra = {}
        for label, (solver, cal) in learned.items():
            out = solver.solve(_rows(test, 0, calls * batch))
            extra[label] = {"certified": float(np.mean(out.certified)),
                            "median C iterations (timed)": float(np.median([r.iterations for r in out.results])),
                            "enabled": cal.enabled, "strategy": cal.strategy,
                            "strategy at this batch": solver.strategy_for(batch),
                            "refinement": option_label(solver.anderson, solver.newton, solver.polish),
                            "c_modes": cal.c_modes, "check_termination": solver.check_termination,
                            "c_setup": solver.c_setup}
        yield {"family": name, "algorithm": alg, "size": args.size, "n": pp.n, "m": pp.m, "batch": batch,
               "instances": calls * batch, "ms_per_instance": med, "train_seconds": train_seconds,
               "ratio_to_loop": {s: med[s] / med["loop (b)"] for s in med},
               "ratio_to_nn": {s: med[s] / med["nearest neighbour (c)"] for s in med}, "learned": extra}


def targets(row: dict, k: int) -> dict[str, dict]:
    """The performance targets of the package's paths in ``row`` (one pair and batch size). At the large size: the
    learned paths (k = 0 and ``k``, the model's path as calibration left it) at most 1/2 of (b) at batch 1 and 1/3
    at a larger batch, at most 1/2 of (c), and (a) within 1.2x of (b); at the small size, (a) and the learned path
    never slower than (b). Each ``{"value": ratio, "bound": bound, "met": value <= bound}``."""
    to_b, to_c = row["ratio_to_loop"], row["ratio_to_nn"]
    checks = {}
    if row["size"] == "small":
        for label in ("package cold (a)", "learned k=0"):
            checks[f"{label} / (b)"] = (to_b[label], 1.0)
    else:
        for label in dict.fromkeys(("learned k=0", f"learned k={k}")):
            checks[f"{label} / (b)"] = (to_b[label], 0.5 if row["batch"] == 1 else 1 / 3)
            checks[f"{label} / (c)"] = (to_c[label], 0.5)
        checks["package cold (a) / (b)"] = (to_b["package cold (a)"], 1.2)
    return {name: {"value": v, "bound": b, "met": bool(v <= b)} for name, (v, b) in checks.items()}


PLOTTED = (("package cold (a)", "o"), ("nearest neighbour (c)", "s"), ("learned k=0", "D"),
           ("floor (optimum)", "|"))
"""The strategies of the plot and their markers (the learned one is the package's calibrated path)."""


def plot_ratios(rows: list[dict], path: str) -> None:
    """Per batch size, one panel: each (family, solver) pair's time per instance of :data:`PLOTTED`, as a ratio
    to (b), on a log axis; the ratio 1 and the targets 1/2 and 1/3 are marked."""
    batches = sorted({r["batch"] for r in rows})
    pairs = list(dict.fromkeys(f"{r['family']} {r['algorithm'].upper()}" for r in rows))
    fig = new_figure((4.0 * len(batches) + 2.6, 0.3 * len(pairs) + 1.7))
    first = None
    for j, batch in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), j + 1)
        first = first or ax
        for k, (label, marker) in enumerate(PLOTTED):
            points = [(r["ratio_to_loop"][label], pairs.index(f"{r['family']} {r['algorithm'].upper()}"))
                      for r in rows if r["batch"] == batch and label in r["ratio_to_loop"]]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, marker=marker, s=28, color=f"C{k}", label=label, zorder=3)
        ax.axvline(1.0, color="black", linewidth=1.0)
        for target, style in ((0.5, "--"), (1 / 3, ":")):
            ax.axvline(target, color="grey", linestyle=style, linewidth=0.9)
        ax.set_xscale("log")
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels(pairs if j == 0 else [], fontsize=8)
        ax.set_ylim(len(pairs) - 0.5, -0.5)
        ax.grid(True, axis="x", which="both", alpha=0.25)
        ax.set_xlabel("time per instance / hand-written loop (b)", fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=9)
    size = sorted({r["size"] for r in rows})
    fig.suptitle(f"End to end, {', '.join(size)} sizes (lines: 1, 1/2, 1/3 of (b))", fontsize=10)
    handles, labels = first.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=problems.names())
    ap.add_argument("--solvers", "--algorithms", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--size", default="small", choices=problems.SIZES)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--instances", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=RACE_CALLS,
                    help="untimed calls per strategy and batch size first (setups, caches, the threads' race: a stream "
                         "of calls is what is measured)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--train", type=int, default=1000, help="instances solved for training (10%% validation)")
    ap.add_argument("--kind", default="mlp", choices=KINDS,
                    help="predictor kind (training.recipe.KINDS): an MLP, or a correction (an MLP of --hidden) on top "
                         "of the nearest training solution, plain or moved along the solution map's derivative; "
                         "neighbor_active_set (LPs and QPs, with --uncorrected): the nearest training instances' "
                         "active sets, solved on the query's data")
    ap.add_argument("--uncorrected", action="store_true",
                    help="with a neighbour --kind: no correction trained (the neighbour's answer, its first-order "
                         "expansion, or its active set, as it is)")
    ap.add_argument("--choices", type=int, default=NEIGHBOR_CHOICES,
                    help="with --uncorrected: the nearest training instances it predicts from (the candidate of "
                         "smallest optimality residual is used)")
    # training options: TrainConfig's fields (flags, help), at this benchmark's scale
    add_dataclass_arguments(ap.add_argument_group("training"), TrainConfig,
                            only=("epochs", "batch_size", "lr", "patience", "hidden"),
                            defaults={"epochs": 60, "batch_size": 64, "patience": 15})
    ap.add_argument("--eps", type=float, default=1e-4)
    ap.add_argument("--dataset-eps", type=float, default=None,
                    help="tolerance of the training set's solves (default: the dataset default, "
                         f"{DATASET_SETTINGS['osqp']['eps_abs']:g}; OSQP reaches it on few large LPs within its "
                         "iteration limit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the package's C solves (default: every core); the loops (b), (c), (d) and the "
                         "floor run on one object, as a hand-written loop does")
    ap.add_argument("--workers", type=int, default=2, help="processes for the dataset solves")
    ap.add_argument("--data-root", default="data/bench_endtoend")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="draw the ratios to (b) into this PNG (needs matplotlib)")
    ap.add_argument("--from-json", default=None, help="with --plot: redraw a saved run (--json) and stop")
    ap.add_argument("--smoke", action="store_true", help="portfolio only, tiny sizes, 1 round (for CI)")
    args = ap.parse_args()
    if args.from_json:
        if not args.plot:
            ap.error("--from-json needs --plot")
        with open(args.from_json) as fh:
            plot_ratios(json.load(fh), args.plot)
        return
    if args.smoke:
        args.families, args.instances, args.rounds, args.batch, args.warmup = ["portfolio"], 16, 1, [1, 16], 1
        args.train, args.epochs, args.k = 120, 5, 3
    torch.set_num_threads(1)
    tol = {"eps_abs": args.eps, "eps_rel": args.eps}
    dataset_eps = (f"{args.dataset_eps:g}" if args.dataset_eps is not None
                   else "/".join(sorted({f"{DATASET_SETTINGS[a]['eps_abs']:g}" for a in args.solvers})))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; device cpu, float64, torch threads 1; C solvers eps_abs = eps_rel = "
          f"{args.eps:g}, other settings default (SCS qdldl, OSQP adaptive_rho_interval 50); size {args.size}; "
          f"{args.instances} held-out instances; medians of {args.rounds} interleaved rounds; predictor: {args.kind} "
          f"{'uncorrected (nothing trained)' if args.uncorrected else args.hidden}, regression loss, {args.train} "
          "solved instances (10% validation, solved at eps "
          f"{dataset_eps}), {args.epochs} epochs; "
          f"refinement k = {args.k}; Newton finish: calibration chooses among {NEWTON_STEPS} steps and none (dense "
          f"linear algebra only); SCS checks termination every 25 iterations (compiled in), OSQP's floor object at "
          f"every iteration; the package's C solves "
          f"on {args.threads or default_threads()} thread(s) (batches of 16 and more are cut into parts), the loops "
          f"on one object", flush=True)
    rows = []
    for name in args.families:
        for alg in args.solvers:
            if not get_solver(alg).accepts(problems.make(name).problem):
                continue
            try:
                for r in bench_pair(name, alg, args, tol):
                    rows.append(r)
                    print(f"{name} {alg} n={r['n']} m={r['m']} batch {r['batch']} ({r['instances']} instances; "
                          f"training {r['train_seconds']:.0f} s):", flush=True)
                    for s, v in r["ms_per_instance"].items():
                        print(f"    {s:24s} {v:9.3f} ms  {r['ratio_to_loop'][s]:6.2f}x loop  "
                              f"{r['ratio_to_nn'][s]:6.2f}x NN", flush=True)
                    for label, e in r["learned"].items():
                        print(f"    {label}: {e}", flush=True)
                    r["targets"] = targets(r, args.k)
                    caveat = " (a smoke run: one round after one warm-up call, not a measurement)" if args.smoke else ""
                    print(f"    targets{caveat}: " + "; ".join(f"{t} {c['value']:.2f} (<= {c['bound']:.2g}: "
                                                    f"{'met' if c['met'] else 'MISSED'})"
                                                    for t, c in r["targets"].items()), flush=True)
            except TooFewSolved as e:
                print(e, flush=True)
            if args.json:  # after every pair, atomically: an interrupted run keeps what it measured
                with open(args.json + ".tmp", "w") as fh:
                    json.dump(rows, fh, indent=1)
                os.replace(args.json + ".tmp", args.json)
    if args.plot and rows:
        plot_ratios(rows, args.plot)


if __name__ == "__main__":
    main()
