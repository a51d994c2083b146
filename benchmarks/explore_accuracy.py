"""How accurate must a warm start be to save SCS iterations? A measurement for the learning issue (13).

The bare prediction's target (k = 0: at most half the cold start's median C iterations) asks for a point close
to the optimum; this script measures how close, per family, and where a trained predictor lands:

1. ``--train`` instances (sampler seed 0; the first ``--val`` are the validation instances, as in
   ``bench_recipe.py``) solved by SCS at ``1e-8``; the predictor's normalization (``WarmStartPredictor``:
   per-output mean and standard deviation of the fixed-point targets) fitted on the rest.
2. Warm starts at the validation optima perturbed by Gaussian noise of standard deviation ``sigma`` in those
   normalized units (``sigma^2`` is the regression loss such a point has: the recipe's ``val_regression``),
   handed to SCS as the bare prediction is (``OutputSpace.prediction_warm_start``); the median exact C
   iterations (fresh solver objects, eps ``1e-4``) per ``sigma``, beside the cold start's.
3. With ``--fit-epochs E`` (> 0), also an MLP (256, 256) trained by regression on the training instances for at
   most ``E`` epochs (early stopping on the validation loss): its validation regression loss and median C
   iterations, to place a real predictor among the noise levels.

Prints the machine, load, sizes and settings beside the numbers.

    python benchmarks/explore_accuracy.py                         # every family, noise levels only
    python benchmarks/explore_accuracy.py --families kalman,lasso --fit-epochs 200
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.evaluation.machine import environment
from amortcvx.iterations.registry import ITERATIONS
from amortcvx.predictors.model import WarmStartPredictor
from amortcvx.training.recipe import _normalization, c_iterations, solved_source
from amortcvx.training.trainer import TrainConfig, targets, train

EPS = {"eps_abs": 1e-4, "eps_rel": 1e-4}
SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3)


class Fixed(nn.Module):
    """A core that returns given normalized outputs (the perturbed optima of the validation instances)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.z


def measure(name: str, num: int, val_size: int, fit_epochs: int) -> dict:
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, "cone")
    solved = solved_source(pp, "scs", fam.sample(num, seed=0))(num)
    val = solved.subset(torch.arange(val_size))
    tr = solved.subset(torch.arange(val_size, len(solved)))
    settings = ITERATIONS["scs"].settings()
    shell, _ = _normalization(pp, "scs", settings, tr)
    z = (targets(pp, "scs", settings, val, len(val)) - shell.out_mean) / shell.out_std
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=z.dtype)
    out = {"family": name, "n": pp.n, "m": pp.m, "num_params": pp.num_params, "train": len(tr),
           "cold": float(np.median(c_iterations(pp, "scs", None, val, solver_settings=EPS)))}
    for sigma in SIGMAS:
        model = WarmStartPredictor(shell.meta, core=Fixed(z + sigma * noise)).to(z.dtype)
        model.load_state_dict({**model.state_dict(), **shell.state_dict()})
        out[f"sigma {sigma:g}"] = float(np.median(c_iterations(pp, "scs", model, val, solver_settings=EPS)))
    if fit_epochs > 0:
        res = train(pp, "scs", tr, val, TrainConfig(epochs=fit_epochs, progress=False), settings=settings)
        with torch.no_grad():
            pred = (res.model(val.theta) - shell.out_mean) / shell.out_std
        out["mlp_val_regression"] = float(((pred - z) ** 2).mean())
        out["mlp_iterations"] = float(np.median(c_iterations(pp, "scs", res.model, val, solver_settings=EPS)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(problems.names() + problems.check_names()))
    ap.add_argument("--train", type=int, default=1200, help="solved instances, validation included")
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--fit-epochs", type=int, default=0, help="also train an MLP for at most this many epochs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("machine:", environment(), "load", os.getloadavg())
    print(f"small sizes; SCS form; C eps {EPS}; exact C iterations on fresh objects; {args.val} validation "
          f"instances; normalization and MLP on {args.train - args.val} training instances; float64; noise "
          f"seed 0")
    cols = [f"sigma {s:g}" for s in SIGMAS]
    print("| family | n, m, params | cold | " + " | ".join(f"sigma {s:g} (loss {s * s:.0e})" for s in SIGMAS)
          + (" | MLP: val loss, iterations" if args.fit_epochs else "") + " |")
    for name in args.families.split(","):
        start = time.perf_counter()
        r = measure(name, args.train, args.val, args.fit_epochs)
        cells = " | ".join(f"{r[c]:g} ({r[c] / r['cold']:.2f})" for c in cols)
        mlp = (f" | {r['mlp_val_regression']:.3f}, {r['mlp_iterations']:g} ({r['mlp_iterations'] / r['cold']:.2f})"
               if args.fit_epochs else "")
        print(f"| {name}{' (check)' if name in problems.CHECK_FAMILIES else ''} | {r['n']}, {r['m']}, "
              f"{r['num_params']} | {r['cold']:g} | {cells}{mlp} |  ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
