"""Exponential-cone projection: accuracy and cost, and the cost of SCS torch refinement on an exp-cone problem.

Prints, with the machine, load, torch threads and dtype beside the numbers:

1. accuracy of ``project_exp`` / ``project_exp_dual`` for several ``newton_iters`` against a high-accuracy
   reference (the same method with 60 steps, which agrees with a 40-digit mpmath reference to ~5e-16, see
   docs/cones.md) and the optimality conditions of the projection (``p in K``, ``p - v in K°``,
   ``<p, p - v> = 0``), on random points with magnitudes ``e^U(-10, 10)`` and on points next to the boundaries
   of ``K`` and of its polar (within ``e^-30`` .. 1 relative);
2. median time per call at batch 1 and 1024 (CPU float64);
3. median time of 10 SCS torch steps at batch 1 on ``max_entropy`` small (20 exp cones), against a cold
   solve of the SCS C solver on the same instance (fresh object, eps 1e-4).

``--baseline PATH`` loads another implementation of ``amortcvx/iterations/cones.py`` from a file (e.g. an
older commit's, ``git show <rev>:amortcvx/iterations/cones.py > old.py``) and reports it beside the current one.

Usage: ``python benchmarks/bench_exp_cone.py [--smoke] [--baseline old.py] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from types import ModuleType

import numpy as np
import torch

from amortcvx.iterations import cones as current


def test_points(num: int, seed: int = 0) -> np.ndarray:
    """Random triples of all signs and magnitudes, plus points next to the boundaries of K and of its polar."""
    rng = np.random.default_rng(seed)
    wide = rng.standard_normal((num, 3)) * np.exp(rng.uniform(-10, 10, (num, 3)))
    q = num // 4
    rho = rng.uniform(-20, 20, q)
    a = np.exp(rng.uniform(-5, 5, q))
    on_k = np.stack([a * rho, a, a * np.exp(rho)], 1)                              # boundary of K
    normal = np.stack([np.ones(q), 1 - rho, -np.exp(-rho)], 1) * np.exp(rng.uniform(-5, 5, q))[:, None]
    near_k = on_k + normal * np.exp(rng.uniform(-30, 0, q))[:, None]               # just outside K
    near_polar = normal + on_k * np.exp(rng.uniform(-30, 0, q))[:, None]           # just outside the polar
    pts = np.concatenate([wide, near_k, near_polar])
    return pts[np.all(np.isfinite(pts), 1) & (np.abs(pts).max(1) < 1e30)]


def kkt_error(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Relative violation of the projection's optimality conditions, per point (reference-free).

    ``dist(p, K) + dist(p - v, K*) + |<p, p - v>| / ||v||``, all over ``max(||v||, 1)`` (Moreau:
    ``v - p`` lies in the polar ``K° = -K*``); distances by the projections themselves at 60 steps.
    """
    d = p - v
    dist_p = (p - current.project_exp(p, newton_iters=60)).norm(dim=1)
    dist_d = (d - current.project_exp_dual(d, newton_iters=60)).norm(dim=1)
    scale = v.norm(dim=1).clamp_min(1)
    return (dist_p + dist_d + (p * d).sum(1).abs() / scale) / scale


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_cones", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def projection_table(impls: dict[str, ModuleType], num: int, reps: int) -> list[dict]:
    x = torch.as_tensor(test_points(num))
    ref = current.project_exp(x, newton_iters=60)
    ref_d = current.project_exp_dual(x, newton_iters=60)
    scale = x.norm(dim=1).clamp_min(1)
    rows = []
    for label, mod in impls.items():
        for iters in (4, 6, 12):
            p = mod.project_exp(x, newton_iters=iters)
            d = mod.project_exp_dual(x, newton_iters=iters)
            row = {"impl": label, "newton_iters": iters, "points": int(x.shape[0]),
                   "max_err_exp": float(((p - ref).norm(dim=1) / scale).max()),
                   "max_err_dual": float(((d - ref_d).norm(dim=1) / scale).max()),
                   "max_kkt_exp": float(kkt_error(x, p).max())}
            for batch in (1, 1024):
                z = x[:batch]
                row[f"ms_b{batch}"] = median_ms(functools.partial(mod.project_exp_dual, z, newton_iters=iters),
                                                reps)
            rows.append(row)
    return rows


def refinement_table(impls: dict[str, ModuleType], reps: int) -> list[dict]:
    from amortcvx import problems
    from amortcvx.backends import solve as c_solve
    from amortcvx.canon.parametric import ParametricProblem
    from amortcvx.iterations import scs as scs_iter
    from amortcvx.iterations.loop import run
    from amortcvx.iterations.registry import make_algorithm

    fam = problems.make("max_entropy", "small", seed=0)
    pp = ParametricProblem(fam.problem, "cone")
    theta = pp.parameter_vector(fam.sample(1, seed=1), dtype=torch.float64)
    data = pp.canonicalize_vector(theta)
    inst = data.instance(0)
    settings = {"eps_abs": 1e-4, "eps_rel": 1e-4}
    cold_ms = median_ms(lambda: c_solve(inst, "scs", settings=settings, exact_iterations=False), reps)
    rows = []
    saved = scs_iter.project_dual_cone
    try:
        for label, mod in impls.items():
            scs_iter.project_dual_cone = mod.project_dual_cone
            alg = make_algorithm("scs", data)
            ms = median_ms(lambda alg=alg: run(alg, alg.init(), 10), reps)
            rows.append({"impl": label, "family": "max_entropy small", "exp_cones": pp.cones.exp,
                         "refine10_ms_b1": ms, "cold_c_ms": cold_ms})
        # The rest of the step: the same 10 steps with the exp rows merely clipped (wrong iterates, cost only).
        scs_iter.project_dual_cone = lambda z, cones, **_: z.clamp_min(0)
        alg = make_algorithm("scs", data)
        rows.append({"impl": "no exp projection (cost of the rest)", "family": "max_entropy small",
                     "exp_cones": pp.cones.exp, "refine10_ms_b1": median_ms(lambda: run(alg, alg.init(), 10), reps),
                     "cold_c_ms": cold_ms})
    finally:
        scs_iter.project_dual_cone = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="few points and repetitions")
    ap.add_argument("--baseline", help="path of another cones.py to compare with")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    impls = {"current": current}
    if args.baseline:
        impls = {"baseline": load_module(args.baseline), **impls}
    num, reps = (2000, 5) if args.smoke else (200_000, 50)
    env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load": os.getloadavg(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": "float64", "device": "cpu"}
    print(f"# {env}")
    proj = projection_table(impls, num, reps)
    print("impl      iters  points  max_err_exp  max_err_dual  max_kkt  ms(b=1)  ms(b=1024)")
    for r in proj:
        print(f"{r['impl']:9s} {r['newton_iters']:5d} {r['points']:7d} {r['max_err_exp']:12.2e} "
              f"{r['max_err_dual']:13.2e} {r['max_kkt_exp']:8.1e} {r['ms_b1']:8.3f} {r['ms_b1024']:11.3f}")
    ref = refinement_table(impls, reps)
    print("impl      family              exp cones  10 SCS torch steps, batch 1 (ms)  cold C solve (ms, eps 1e-4)")
    for r in ref:
        print(f"{r['impl']:9s} {r['family']:19s} {r['exp_cones']:9d} {r['refine10_ms_b1']:33.2f} "
              f"{r['cold_c_ms']:28.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "projection": proj, "refinement": ref}, fh, indent=1)


if __name__ == "__main__":
    main()
