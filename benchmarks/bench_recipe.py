"""The automatic training recipe against the targets of issue 13, on the check families and the bundled ones.

Per family (small size, SCS, C tolerance eps 1e-4 abs/rel, exact C iteration counts on fresh solver objects):

1. ``fit_predictor`` with the given budget on instances drawn from the family's sampler (seed 0; 200 validation
   rows drawn among the first 700, ``RecipeSettings.validation_rows``, the others training, solved at eps 1e-8 on
   demand inside the budget);
2. on 200 held-out test instances (a seeded random draw among ``TEST_SPREAD`` times as many drawn with seed
   12345, so that a sampler of closed-loop episodes, mpc's, is tested on as many episodes as instances), median
   C iterations of: the cold start; the nearest
   neighbour among the recipe's training instances; the learned prediction alone (k = 0, deployed through
   ``AmortizedSolver``: certified finish and safeguard included); the learned prediction with the refinement
   that calibration picks (k in ``--refine``, default 0, 10 or 30, and plain/Anderson, chosen by
   ``AmortizedSolver.calibrate``'s validation median, the fastest of ties by wall time, on the validation
   instances; measured with the predictor on even where calibration
   turned it off, which the table says); and the control (the cold start with that same refinement, no model);
3. the ratios against the targets: k=0 <= 1/2 cold and <= 2/3 nearest neighbour; refined <= 1/5 cold; the
   model's own share, control / refined, >= 2. Calibration also chooses the Newton steps of the certified finish
   (none or ``NEWTON_STEPS``, where the dense linear algebra applies: ``newton_choices``) and, on LPs and QPs of
   that size, whether to polish (``polish_choices``); the control gets the same. A last column gives the
   learned k = 0 start with that finish (Newton steps and, where offered, polishing; certified instances count
   0 C iterations) against cold, the nearest neighbour (without it) and its own control (the cold start after
   one torch step, with the same finish).

Prints the machine, load, torch threads, dtype, sizes, solver settings and budget beside the numbers; with
``--plot-dir DIR`` also each family's learning curve (``DIR/learning-curve-FAMILY.png``,
:func:`amortcvx.evaluation.plot_learning_curve`).
Usage: ``python benchmarks/bench_recipe.py [--families a,b] [--budget 600] [--smoke] [--json out.json]
[--plot-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch

from amortcvx import problems
from amortcvx.backends import solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.deploy.solver import AmortizedSolver, newton_choices, polish_choices
from amortcvx.evaluation import plot_learning_curve
from amortcvx.evaluation.baselines import NearestNeighbor
from amortcvx.iterations.loop import AndersonSettings
from amortcvx.training.recipe import RecipeSettings, fit_predictor, solved_prefix, solved_source

EPS = {"eps_abs": 1e-4, "eps_rel": 1e-4}
TARGETS = {"k0_vs_cold": 0.5, "k0_vs_nn": 2 / 3, "refined_vs_cold": 0.2, "control_over_refined": 2.0,
           "k0_newton_vs_cold": 0.5, "k0_newton_vs_nn": 2 / 3, "control_over_k0_newton": 2.0}


TEST_SPREAD = 20
"""The test instances are drawn at random among this many times as many sampled ones (mpc's episodes have 20
states: 200 consecutive instances would be 10 episodes, and their medians depend on which)."""


def rows(params: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in params.items()}


def medians(out) -> float:
    return float(np.median([r.iterations for r in out.results]))


def solved_rows(pp: ParametricProblem, params: dict[str, np.ndarray], source, count: int):
    """The first ``count`` solved rows of ``source`` (the recipe's rows: they count solved instances, fewer than
    those asked for where some failed, e.g. sparse_pca) and the rows of ``params`` they were solved from."""
    solved, asked = solved_prefix(source, count, count)
    theta = pp.parameter_vector(rows(params, slice(0, asked)), dtype=torch.float64)
    index, j = [], 0
    for t in solved.theta[:count]:  # the solved rows are the asked ones in order, without the failed ones
        while not torch.equal(theta[j], t):
            j += 1
        index.append(j)
        j += 1
    return solved, np.asarray(index)


def run_family(name: str, budget: float, recipe: RecipeSettings, num_test: int, refine: tuple[int, ...],
               seed: int = 0, plot_dir: str | None = None) -> dict:
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, "cone")
    pool = recipe.max_size + recipe.val_size  # drawn now, solved only as the recipe asks for them
    params = fam.sample(pool, seed=seed)
    source = solved_source(pp, "scs", params)
    t0 = time.perf_counter()
    res = fit_predictor(pp, "scs", source, budget_seconds=budget, solver_settings=EPS, recipe=recipe, seed=seed)
    recipe_s = time.perf_counter() - t0
    if plot_dir:
        plot_learning_curve(res, os.path.join(plot_dir, f"learning-curve-{name}.png"),
                            title=f"{name} (small, SCS): {len(res.trials)} trainings in {res.seconds:.0f} s of a "
                                  f"{budget:.0f} s budget")
    test = rows(fam.sample(TEST_SPREAD * num_test, seed=12345),
                np.random.default_rng(12345).choice(TEST_SPREAD * num_test, num_test, replace=False))
    train = res.training_rows()
    solved, index = solved_rows(pp, params, source, int(max(train.max(), max(res.val_rows))) + 1)
    val = rows(params, index[np.asarray(res.val_rows)])

    cold = medians(AmortizedSolver(pp, None, algorithm="scs", k=0, solver_settings=EPS).solve(
        test, exact_iterations=True))
    nn = NearestNeighbor(solved.theta[train].numpy(), solved.x[train].numpy(), solved.y[train].numpy(),
                         solved.s[train].numpy())
    theta_test = pp.parameter_vector(test, dtype=torch.float64).numpy()
    nn_its = [r.iterations for r in solve_batch(pp.canonicalize_vector(torch.as_tensor(theta_test)).instances(),
                                                 "scs", nn.warm_starts(theta_test), settings=EPS,
                                                 exact_iterations=True, workers=1)]
    learned0 = medians(AmortizedSolver(pp, res.model, k=0, solver_settings=EPS).solve(test, exact_iterations=True))
    # the certified finish with Newton steps (where the problem is of dense size): the prediction alone, and the
    # control for it, the cold start after one torch step (the plain cold start offers no point to refine)
    newton, polish = max(newton_choices(pp)), max(polish_choices(pp))
    learned0n = control0n = None
    if newton or polish:
        learned0n = medians(AmortizedSolver(pp, res.model, k=0, newton=newton, polish=polish,
                                            solver_settings=EPS).solve(test, exact_iterations=True))
        control0n = medians(AmortizedSolver(pp, None, algorithm="scs", k=1, newton=newton, polish=polish,
                                            solver_settings=EPS).solve(test, exact_iterations=True))

    # the refinement calibration picks: by the validation median; among ties, the fastest (timed; the fewest steps
    # among those within OPTION_TIE of it)
    solver = AmortizedSolver(pp, res.model, k=max(refine), solver_settings=EPS)
    cal = solver.calibrate(val, refinements=(None, AndersonSettings()), newton_steps=newton_choices(pp),
                           polish=polish_choices(pp), refine_steps=refine)
    k = solver.k
    strategy = solver.strategy  # what calibration left on (by iterations, then wall time)
    solver.use_strategy("learned")  # the model with the refinement calibration picked, even where it was turned off
    refined = medians(solver.solve(test, exact_iterations=True))
    control = medians(AmortizedSolver(pp, None, algorithm="scs", k=k, anderson=solver.anderson, newton=solver.newton,
                                      polish=solver.polish, solver_settings=EPS).solve(test, exact_iterations=True))
    nn_med = float(np.median(nn_its))
    out = {
        "family": name, "kind": fam.kind, "n": pp.n, "m": pp.m, "num_params": pp.num_params,
        "check_family": name in problems.CHECK_FAMILIES, "budget_s": budget, "recipe_s": recipe_s,
        "chosen": res.label(), "num_train": res.num_train, "trainings": len(res.trials),
        "curve": [(p.num_train, p.val_regression, p.val_median_iterations, p.configuration) for p in res.curve],
        "trials": [(t.label(), t.num_train, t.val_regression, t.val_median_iterations,
                    t.val_mean_iterations, t.epochs, t.seconds) for t in res.trials],
        "val_cold_median": res.cold_median_iterations,
        "cold": cold, "nearest_neighbor": nn_med, "learned_k0": learned0,
        "learned_k0_newton": learned0n, "control_k0_newton": control0n, "newton_steps": newton, "polish": polish,
        "refine": {"k": k, "anderson": solver.anderson is not None, "newton": solver.newton, "polish": solver.polish,
                   "enabled": bool(cal.enabled), "strategy": strategy, "val_learned_median": cal.learned_median,
                   "val_cold_median": cal.cold_median},
        "learned_refined": refined, "control": control,
    }
    def over(a: float, b: float) -> float:  # a / b, with 0 / 0 = 1 (both certified at once) and a / 0 = inf
        return 1.0 if a == b else (a / b if b > 0 else math.inf)

    out["ratios"] = {"k0_vs_cold": learned0 / cold, "k0_vs_nn": learned0 / max(nn_med, 1e-12),
                     "refined_vs_cold": refined / cold,
                     # both 0 (each certified at once): the model adds nothing over the control, ratio 1
                     "control_over_refined": over(control, refined)}
    if learned0n is not None:
        out["ratios"].update({"k0_newton_vs_cold": learned0n / cold, "k0_newton_vs_nn": learned0n / max(nn_med, 1e-12),
                              "control_over_k0_newton": over(control0n, learned0n)})
    out["met"] = {key: (val <= TARGETS[key]) if not key.startswith("control_over") else (val >= TARGETS[key])
                  for key, val in out["ratios"].items()}
    return out


def format_row(r: dict) -> str:
    rt, met = r["ratios"], r["met"]

    def cell(key: str) -> str:
        return f"{rt[key]:.2f} {'met' if met[key] else 'MISSED'}"

    ref = (f"k={r['refine']['k']}{' anderson' if r['refine']['anderson'] else ''}"
           f"{' + polish' if r['refine'].get('polish') else ''}"
           f"{' + newton ' + str(r['refine']['newton']) if r['refine'].get('newton') else ''}")
    if not r["refine"]["enabled"]:
        ref += "; calibration switched the predictor off"
    if r["refine"]["strategy"] != "learned":
        ref += f"; kept: {r['refine']['strategy']}"
    newton = "not offered (matrix-free size: newton_choices)"
    if r.get("learned_k0_newton") is not None:
        finish = (f"newton {r['newton_steps']}" if r["newton_steps"] else "") + (
            (" + " if r["newton_steps"] else "") + "polish" if r.get("polish") else "")
        newton = (f"{r['learned_k0_newton']:g} with {finish} (control {r['control_k0_newton']:g}): "
                  f"/cold {cell('k0_newton_vs_cold')}, /NN {cell('k0_newton_vs_nn')}, "
                  f"control/k0 {cell('control_over_k0_newton')}")
    return (f"| {r['family']}{' (check)' if r['check_family'] else ''} | {r['cold']:g} | {r['nearest_neighbor']:g} | "
            f"{r['learned_k0']:g} | {r['learned_refined']:g} ({ref}) | {r['control']:g} | {cell('k0_vs_cold')} | "
            f"{cell('k0_vs_nn')} | {cell('refined_vs_cold')} | {cell('control_over_refined')} | {newton} | "
            f"{r['chosen']}, n={r['num_train']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(problems.check_names() + problems.names()))
    ap.add_argument("--budget", type=float, default=600.0, help="recipe budget per family, seconds")
    ap.add_argument("--test", type=int, default=200, help="held-out test instances")
    ap.add_argument("--refine", default="0,10,30", help="refinement steps calibration chooses among")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and budget (checks that it runs)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot-dir", help="write each family's learning curve here (learning-curve-FAMILY.png)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = RecipeSettings()
    budget, num_test = args.budget, args.test
    if args.smoke:
        recipe = RecipeSettings(val_size=30, eval_size=20, search_size=40, sizes=(40, 80), max_size=80, epochs=5,
                                patience=3)
        budget, num_test = min(budget, 20.0), min(num_test, 20)
    refine = tuple(int(k) for k in args.refine.split(","))
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": recipe.dtype, "device": "cpu", "solver": "scs",
           "solver_settings": EPS, "budget_s": budget, "test": num_test, "test_spread": TEST_SPREAD, "refine": refine,
           "recipe": {"val_size": recipe.val_size, "eval_size": recipe.eval_size, "search_size": recipe.search_size,
                      "sizes": recipe.sizes, "max_size": recipe.max_size, "epochs": recipe.epochs,
                      "patience": recipe.patience}}
    print(f"# {env}", flush=True)
    results = []
    for name in args.families.split(","):
        r = run_family(name, budget, recipe, num_test, refine, plot_dir=args.plot_dir)
        results.append(r)
        print(format_row(r), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"env": env, "results": results}, fh, indent=1)
    print("| family | cold | nearest neighbour | learned k=0 | learned refined (calibrated) | control | k0/cold <= 0.5 "
          "| k0/NN <= 0.67 | refined/cold <= 0.2 | control/refined >= 2 | learned k=0 + finish: Newton, polish on "
          "LPs / QPs (control: cold + 1 step + the same) | chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(format_row(r))


if __name__ == "__main__":
    main()
