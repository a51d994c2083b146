"""Parameter batch -> canonical data: amortcvx's batched map against CVXPY's get_problem_data per instance.

Prints, per family and form, the time to canonicalize N instances in one batched call (tensors, the torch path a
layer takes: on the CPU in float64 they carry a graph, since tensors without one are read as numpy arrays there;
then per instance for the same batch as numpy arrays, the path the solvers take, on the CPU in float64), the latency
of one call with one instance given as numpy arrays (the low-latency path an MPC loop takes; median over ``--ref``
calls), and the time per instance of ``problem.get_problem_data`` (set parameter values, call, repeated over
``--ref`` instances), and their ratio.

    python benchmarks/bench_canon.py                      # all families, 10,000 instances, small size
    python benchmarks/bench_canon.py --families lasso --batch 1000 --ref 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cvxpy as cp
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.solvers import SOLVERS, solver_for_form


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--ref", type=int, default=1_000, help="instances timed with get_problem_data")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the batched map (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"cvxpy {cp.__version__}; device {args.device}, dtype {args.dtype}, batch {args.batch}, "
          f"get_problem_data reference over {args.ref} instances (time per instance scaled to the batch)")
    print(f"{'family':<14}{'form':<6}{'batched [s]':>12}{'per inst [us]':>15}{'numpy [us]':>12}{'one call [us]':>15}"
          f"{'cvxpy/inst [us]':>17}{'ratio':>9}  dependent")
    for name in args.families or problems.names():
        fam = problems.make(name, args.size)
        forms = tuple(dict.fromkeys(d.form for d in SOLVERS.values() if d.accepts(fam.problem)))
        params = fam.sample(args.batch, seed=0)
        for form in forms:
            pp = ParametricProblem(fam.problem, form)
            host_path = args.device == "cpu" and dtype == torch.float64  # where tensors without a graph go to numpy
            tparams = {k: torch.as_tensor(v, dtype=dtype, device=args.device).requires_grad_(host_path)
                       for k, v in params.items()}
            pp.canonicalize({k: v[:2] for k, v in tparams.items()})  # warm-up (device caches)
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pp.canonicalize(tparams)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            batched = statistics.median(times)
            host = []  # the same batch as numpy arrays (the solvers' path: validated and flattened in numpy)
            for _ in range(args.repeats if host_path else 0):
                t0 = time.perf_counter()
                pp.canonicalize(params)
                host.append(time.perf_counter() - t0)
            numpy_per = statistics.median(host) / args.batch * 1e6 if host else float("nan")
            nref = min(args.ref, args.batch)
            single = []
            for i in range(nref):
                one = {k: v[i] for k, v in params.items()}
                t0 = time.perf_counter()
                pp.canonicalize(one)
                single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(nref):
                for pname, par in fam.parameters.items():
                    par.value = params[pname][i]
                fam.problem.get_problem_data(solver_for_form(form).cvxpy_name)
            ref = (time.perf_counter() - t0) / nref
            per = batched / args.batch
            dep = ",".join(k for k, v in pp.dependent.items() if v)
            print(f"{name:<14}{form:<6}{batched:>12.4f}{per * 1e6:>15.2f}{numpy_per:>12.2f}"
                  f"{statistics.median(single) * 1e6:>15.1f}"
                  f"{ref * 1e6:>17.1f}{ref / per:>9.0f}  {dep}")


if __name__ == "__main__":
    main()
