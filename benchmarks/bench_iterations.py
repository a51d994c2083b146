"""Throughput of the torch SCS / OSQP iterations against the C solvers' iterations, per problem family.

For each family (``problems.names()``), algorithm and batch size ``B``, time ``k`` torch steps on a batch of
``B`` instances (after a warm-up; fastest of ``--repeats``) and report instance-steps per second. Next to it,
time C SCS / C OSQP solves with a fixed iteration count and the same algorithm settings (SCS: no
normalization, no adaptive scale, no acceleration; OSQP: no scaling, no adaptive rho, no termination checks),
using the solvers' own solve timers (setup/factorization excluded on both sides), and report iterations per
second of one instance. ``ratio`` is torch's cost per instance-step over C's cost per iteration (lower is
better; below 1 the batch beats C).

Usage::

    python benchmarks/bench_iterations.py --families portfolio,lasso --batch-sizes 1,64,1024 --dtype float64
    python benchmarks/bench_iterations.py --device cuda --dtype float32
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.iterations import OsqpSettings, ScsSettings, make_osqp, make_scs, run
from amortcvx.solvers import get_solver


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_torch(alg, steps: int, repeats: int, device: torch.device) -> float:
    """Fastest of ``repeats`` timings of ``steps`` steps (CUDA events on a GPU, perf_counter otherwise), after
    a warm-up (the minimum is the least disturbed by other load on a shared machine)."""
    state = run(alg, alg.init(), 2).state
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(alg, state, steps)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run(alg, state, steps)
            times.append(time.perf_counter() - t0)
    return min(times)


def _csc32(mat) -> sp.csc_matrix:
    mat = sp.csc_matrix(mat)
    return sp.csc_matrix((mat.data, mat.indices.astype(np.int32), mat.indptr.astype(np.int32)),
                         shape=mat.shape)


def time_c(algorithm: str, data, steps: int, settings, repeats: int) -> float:
    """C seconds per iteration (the solver's own solve timer), per instance the fastest of ``repeats`` solves,
    averaged over the instances of ``data``."""
    total, iters = 0.0, 0
    for i in range(data.batch_size):
        inst = data.instance(i)
        best = float("inf")
        for _ in range(repeats):
            if algorithm == "scs":
                import scs

                d = {"A": inst.A, "b": inst.b, "c": inst.c}
                if inst.P is not None:
                    d["P"] = sp.triu(inst.P, format="csc")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    solver = scs.SCS(d, inst.cones.to_scs(), max_iters=steps, eps_abs=1e-15, eps_rel=1e-15,
                                     eps_infeas=1e-15, verbose=False, **settings.c_settings())
                    out = solver.solve(warm_start=False)
                best = min(best, out["info"]["solve_time"] / 1e3)
                it = out["info"]["iter"]
            else:
                import osqp

                n = inst.q.shape[0]
                P = inst.P if inst.P is not None else sp.csc_matrix((n, n))
                solver = osqp.OSQP()
                solver.setup(_csc32(sp.triu(P)), inst.q, _csc32(inst.A), inst.l, inst.u, max_iter=steps,
                             check_termination=0, eps_abs=1e-15, eps_rel=1e-15, verbose=False,
                             **settings.c_settings())
                out = solver.solve(raise_error=False)
                best = min(best, out.info.solve_time)
                it = out.info.iter
        total += best
        iters += it
    return total / iters


def estimate_bytes(data, batch: int, itemsize: int) -> int:
    """Rough peak memory of a torch run: iterate-sized tensors plus the dense factorizations."""
    n, m = data.n, data.m
    shared = data.A.shared and (data.P is None or data.P.shared)
    vec = 16 * batch * (n + m + 1) * itemsize
    fact = (n + m + 1) ** 2 * itemsize * 3 if shared else batch * (n * n + m * n) * 8 * 2
    return vec + fact


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(problems.names()))
    ap.add_argument("--algorithms", default="scs,osqp")
    ap.add_argument("--batch-sizes", default="1,64,1024,16384")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--size", default="small", choices=list(problems.SIZES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--linsys", default="auto")
    ap.add_argument("--c-instances", type=int, default=16, help="instances timed with the C solvers")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="skip batch sizes estimated above this (default: 60%% of RAM / of GPU memory)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_gb is not None:
        budget = args.memory_gb * 2**30
    elif device.type == "cuda":
        budget = 0.6 * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    scs_settings, osqp_settings = ScsSettings(linsys=args.linsys), OsqpSettings(linsys=args.linsys)
    import osqp
    import scs

    print(f"# machine: {platform.node()} | {_cpu_name()} | {os.cpu_count()} CPUs | "
          f"python {sys.version.split()[0]}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__} | device {device} ({dev_name}) | dtype {args.dtype} | "
          f"torch threads {torch.get_num_threads()} | scs {scs.__version__} | osqp {osqp.__version__}")
    print(f"# torch: {args.steps} steps per timing, fastest of {args.repeats}; {scs_settings}; "
          f"{osqp_settings}")
    print(f"# C: max_iters = {args.steps}, eps 1e-15 (never stops early), solver timers, fastest of "
          f"{args.repeats} per instance, mean over {args.c_instances} instances; "
          f"SCS {scs_settings.c_settings()}; OSQP {osqp_settings.c_settings()} check_termination=0; "
          "C runs in float64 on one CPU thread")
    header = (f"{'family':<14}{'alg':<5}{'n':>5}{'m':>5}{'B':>7}  {'linsys':<9}{'setup_ms':>9}{'ms/step':>10}"
              f"{'inst-steps/s':>14}{'C it/s':>11}{'ratio':>7}")
    print(header)
    for name in args.families.split(","):
        fam = problems.make(name, args.size, seed=0)
        for algorithm in args.algorithms.split(","):
            if not get_solver(algorithm).accepts(fam.problem):
                continue
            pp = ParametricProblem(fam.problem, get_solver(algorithm).form)
            settings = scs_settings if algorithm == "scs" else osqp_settings
            c_data = pp.canonicalize(fam.sample(args.c_instances, seed=1))
            c_per_iter = time_c(algorithm, c_data, args.steps, settings, args.repeats)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                prefix = f"{name:<14}{algorithm:<5}{pp.n:>5}{pp.m:>5}{batch:>7}  "
                need = estimate_bytes(c_data, batch, dtype.itemsize)
                if need > budget:
                    print(prefix + f"skipped: needs about {need / 2**30:.1f} GB "
                          f"(> {budget / 2**30:.1f} GB budget)")
                    continue
                try:
                    theta = {k: torch.as_tensor(v, dtype=dtype, device=device)
                             for k, v in fam.sample(batch, seed=2).items()}
                    data = pp.canonicalize(theta)
                    t0 = time.perf_counter()
                    alg = make_scs(data, settings) if algorithm == "scs" else make_osqp(data, settings)
                    _sync(device)
                    setup = time.perf_counter() - t0
                    sec = time_torch(alg, args.steps, args.repeats, device)
                except (RuntimeError, MemoryError) as exc:  # out of memory on the device or host
                    print(prefix + f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                    continue
                rate = batch * args.steps / sec
                ratio = (sec / (batch * args.steps)) / c_per_iter
                print(prefix + f"{alg.work.solver.method:<9}{setup * 1e3:>9.1f}"
                      f"{sec / args.steps * 1e3:>10.3f}{rate:>14.3g}{1.0 / c_per_iter:>11.3g}{ratio:>7.2f}")
                del alg, data
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
