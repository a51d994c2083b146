"""CvxpyLayer against cvxpylayers 1.2 (DIFFCP default, MOREAU when installed): time and accuracy per batch.

Problems (issue 12):
  QP:   minimize 1/2 ||F x||^2 + q'x  s.t.  G x <= h,  n = 20, m = 40, parameters q, h (F, G Gaussian).
  SOCP: minimize ||A x - b||_2 + 0.1 ||x||_1  s.t.  ||x||_inf <= 1,  A 30 x 10, parameter b.
  SDP:  minimize ||X - C||_F^2  s.t.  diag(X) = 1, X PSD (nearest correlation matrix), X 8 x 8, parameter C
        (symmetric). cvxpylayers' MOREAU interface passes no PSD cones to moreau: skipped there, saying so.

For each problem and batch size, every method is timed forward and forward+backward (backward of the sum of
the outputs), interleaved (method after method within each repeat, so that load changes hit all of them), and
the median of ``--repeats`` is reported with max |x - x*| against CVXPY + Clarabel at tight tolerance, the
largest relative objective excess ``(f(x) - f*) / (1 + |f*|)`` (negative where x beats the reference) and
constraint violation, and the gradient error: for the first ``GRAD_INSTANCES`` instances, the directional
derivative of the sum of the outputs along a random direction, from each method's backward, against central
differences (step ``FD_STEP``) of forward solutions refined to an optimality residual of ``1e-12`` (our cold
layer at ``eps = 1e-9`` with 4 refinement passes per Newton step, whose answers the accuracy columns check against
Clarabel), as
``|g'd - fd| / (1 + |fd|)``. ``--warmup`` rounds (5: a training loop's steady state, once the layer's races
between the torch iterations and the C solver and between one solver object and threads have been timed, see
docs/layers.md) run before the timed ones, untimed, the same for every method. The
parameters move by a small step between repeats (as in a training loop), which is what the "previous" warm
start of our layer uses; the learned warm start comes from a predictor that ``AmortizedSolver.fit`` trains on
``--train`` instances of the same distribution (its fit time is printed, not counted). Prints the machine,
torch threads, device, dtype and solver settings beside the numbers.

On a GPU (``--device cuda``) the parameters live on the device, so our layer takes its CUDA path (the batched
torch iterations, then Newton refinement, then the C solver for what is left) and cvxpylayers' MOREAU its CUDA
solver; DIFFCP solves on the host. Large batches: ``--check`` caps the instances checked against Clarabel (the
first ones of the batch), and ``--baseline-max-batch DIFFCP=4096 MOREAU=16384`` skips a baseline above that
batch (DIFFCP's time per instance does not fall with the batch size: it solves instance by instance on the host's
cores; MOREAU's CUDA solver took 16 s per forward on the SOCP at 16384 and failed on the QP at 65536).

    python benchmarks/bench_layer.py                 # batches 64 and 1024, 5 warm-up rounds, 3 repeats
    python benchmarks/bench_layer.py --smoke         # batch 16, 1 repeat, a small predictor (CI)
    python benchmarks/bench_layer.py --json out.json
    python benchmarks/bench_layer.py --problems socp --batches 1024 --train 0   # one problem, no predictor
    python benchmarks/bench_layer.py --device cuda --batches 1024 16384 65536 --check 256 \
        --baseline-max-batch DIFFCP=4096 MOREAU=16384
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import cvxpy as cp
import numpy as np
import torch

from amortcvx.layers import CvxpyLayer

EPS = 1e-5  # our layer's tolerance (CVXPY's default); its answers are Newton-refined well beyond it
STEP = 1e-2  # relative move of the parameters between repeats
REFERENCES = ((cp.CLARABEL, {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}), (cp.CLARABEL, {}),
              (cp.SCS, {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 200000}))
"""Reference solvers for x*, tried in order per instance."""
GRAD_INSTANCES = 4
CALIBRATION_SEED = 7  # the fresh instances on which the learned row's predictor is calibrated (reported only)
FD_STEP = 1e-6


def qp_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, m = 20, 40
    F, G = rng.normal(size=(n, n)), rng.normal(size=(m, n))
    q, h, x = cp.Parameter(n, name="q"), cp.Parameter(m, name="h"), cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + q @ x), [G @ x <= h])

    def sample(B: int, rng) -> list[torch.Tensor]:
        return [torch.tensor(rng.normal(size=(B, n))), torch.tensor(rng.uniform(0.5, 1.5, size=(B, m)))]
    return "QP (n=20, m=40; q, h)", prob, [q, h], [x], sample


def socp_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(30, 10))
    b, x = cp.Parameter(30, name="b"), cp.Variable(10, name="x")
    prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + 0.1 * cp.norm1(x)), [cp.norm(x, "inf") <= 1])

    def sample(B: int, rng) -> list[torch.Tensor]:
        return [torch.tensor(rng.normal(size=(B, 30)))]
    return "SOCP (A 30x10; b)", prob, [b], [x], sample


def sdp_problem(seed: int = 0):
    k = 8
    C, X = cp.Parameter((k, k), name="C", symmetric=True), cp.Variable((k, k), name="X", symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [cp.diag(X) == 1, X >> 0])

    def sample(B: int, rng) -> list[torch.Tensor]:
        F = rng.normal(size=(B, k, 2 * k)) / np.sqrt(2 * k)
        S = F @ F.transpose(0, 2, 1)  # a correlation-like matrix plus symmetric noise: some eigenvalues < 0
        N = rng.normal(size=(B, k, k)) * 0.3
        return [torch.tensor(S + N + N.transpose(0, 2, 1))]
    return "SDP (X 8x8; C)", prob, [C], [X], sample


def reference(prob, params, variables, values) -> tuple[np.ndarray, np.ndarray]:
    """x* and the optimal values per instance by CVXPY + Clarabel (tight tolerances)."""
    xs, vals = [], []
    for i in range(values[0].shape[0]):
        for p, v in zip(params, values):
            p.value = v[i].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Clarabel may call its tight-tolerance answers inaccurate
            for solver, settings in REFERENCES:  # Clarabel sometimes gives up: the next one then
                try:
                    prob.solve(solver=solver, **settings)
                    break
                except cp.error.SolverError:
                    continue
        xs.append(np.asarray(variables[0].value))
        vals.append(prob.value)
    return np.stack(xs), np.asarray(vals)


def objective_excess(prob, params, variables, values, x: np.ndarray, best: np.ndarray) -> tuple[float, float]:
    """Largest relative objective excess ``(f(x_i) - f*_i) / (1 + |f*_i|)`` over the instances (negative: x is
    better than the reference) and the largest constraint violation of the ``x_i``."""
    excess, violation = [], []
    for i in range(x.shape[0]):
        for p, v in zip(params, values):
            p.value = v[i].numpy()
        variables[0].value = x[i]
        violation.append(max(float(np.max(c.violation())) for c in prob.constraints))
        excess.append((prob.objective.value - best[i]) / (1 + abs(best[i])))
    return float(max(excess)), float(max(violation))


def ours_path(device: str) -> str:
    """The start of our layers' settings label: on CUDA the torch iterations come first (``method="auto"``)."""
    return "torch iterations on CUDA, then " if device.startswith("cuda") else ""


def learned_layer(prob, params, variables, sample, train: int, epochs: int, root: str, device: str = "cpu"):
    """Our layer warm-started by a predictor that ``AmortizedSolver.fit`` trains on ``train`` sampled instances."""
    from amortcvx.deploy import AmortizedSolver

    solver = CvxpyLayer(prob, params, variables).solver

    def sampler(n: int, rng) -> dict[str, np.ndarray]:
        return {p.name(): v.numpy() for p, v in zip(params, sample(n, rng))}

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amortized = AmortizedSolver.fit(prob, sampler, solver=solver, num=train, eps=EPS, epochs=epochs, root=root,
                                        calibrate=False, progress=False, device=device)
    seconds = time.perf_counter() - start
    layer = CvxpyLayer.from_solver(amortized, params, variables, eps=EPS)
    settings = (f"{ours_path(device)}{solver} C, eps {EPS:g}, learned warm start ({train} instances, {epochs} "
                f"epochs, trained on {device} in {seconds:.0f} s; {calibration_verdict(amortized, sampler, train)})")
    return layer, settings


def calibration_verdict(amortized, sampler, train: int) -> str:
    """What ``AmortizedSolver.fit``'s default calibration says of the predictor that the learned row uses forced on
    (the row measures the learned start itself; ``amortized.layer()`` after a default fit uses the predictor only
    where calibration keeps it): on ``max(32, train // 10)`` fresh instances, the solver left unchanged."""
    val = sampler(max(32, train // 10), np.random.default_rng(CALIBRATION_SEED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = amortized.calibrated(val)
    times = ", ".join(f"{k} {a:.3g}" for k, (a, _) in (cal.seconds or {}).items())
    verdict = "keeps this predictor" if cal.enabled else "switches this predictor off"
    return f"fit's default calibration {verdict}, start {cal.strategy} (ms per instance at batch 1: {times})"


def methods(prob, params, variables, learned=None, device: str = "cpu", skip: frozenset = frozenset(),
            ) -> dict[str, tuple[Callable, str]]:
    """name -> (callable(*values) -> tuple of outputs, settings description); the cvxpylayers baselines not in
    ``skip`` (``"DIFFCP"``, ``"MOREAU"``): MOREAU only where its interface passes every cone of the problem to
    moreau (not PSD cones); DIFFCP given host copies of the values (it solves on the host; the copies are timed
    with it)."""
    from cvxpylayers.torch import CvxpyLayer as Reference

    out = {}
    path = ours_path(device)
    ours_cold = CvxpyLayer(prob, params, variables, eps=EPS)
    loose = ours_cold.loose_eps("torch" if path else "c")
    out["ours cold"] = (ours_cold, f"{path}{ours_cold.solver} C, eps {EPS:g}, first stage to {loose:g}")
    ours_prev = CvxpyLayer(prob, params, variables, eps=EPS, warm_start="previous")
    out["ours previous"] = (ours_prev, f"{path}{ours_prev.solver} C, eps {EPS:g}, warm start: previous call")
    if not path:  # the C solver alone at eps (the forward for calls that need no gradient; CPU only)
        ours_direct = CvxpyLayer(prob, params, variables, eps=EPS, refine_steps=0)
        out["ours no refinement"] = (ours_direct, f"{ours_direct.solver} C at eps {EPS:g}, no refinement "
                                                  "(refine_steps=0)")
    if learned is not None:
        out["ours learned"] = learned
    if "DIFFCP" not in skip:
        reference_layer = Reference(prob, params, variables)
        out["cvxpylayers DIFFCP"] = (lambda *v: reference_layer(*[t.cpu() for t in v]),
                                     "SCS via diffcp (host), cvxpylayers defaults")
    psd = any(isinstance(c, cp.constraints.PSD) for c in prob.constraints)
    cuda = device.startswith("cuda")
    if "MOREAU" in skip:
        return out
    why = None
    if importlib.util.find_spec("moreau") is None:
        why = "moreau is not installed (the bench extra)"
    elif psd:
        why = "its interface passes no PSD cones to moreau (cvxpylayers 1.2)"
    elif cuda and not importlib.import_module("moreau").device_available("cuda"):
        why = "moreau has no CUDA backend here (moreau-cuda12/13 not installed)"
    if why is not None:
        print(f"cvxpylayers MOREAU: skipped, {why}")
        return out
    moreau = Reference(prob, params, variables, solver="MOREAU")
    out["cvxpylayers MOREAU"] = (moreau, f"moreau ({'CUDA' if cuda else 'CPU'}), cvxpylayers defaults")
    return out


def timed(fn: Callable, values: list[torch.Tensor], backward: bool,
          ) -> tuple[float, np.ndarray, list[torch.Tensor] | None]:
    """Seconds of one call (with the backward of the sum of the outputs), the first output, the gradients."""
    vals = [v.clone().requires_grad_(backward) for v in values]
    synchronize(vals[0].device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = fn(*vals)
        if backward:
            sum(o.sum() for o in outs).backward()
    synchronize(vals[0].device)
    seconds = time.perf_counter() - start
    return seconds, outs[0].detach().cpu().numpy(), [v.grad for v in vals] if backward else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finite_differences(prob, params, variables, values: list[torch.Tensor], direction: list[torch.Tensor],
                       ) -> np.ndarray:
    """Central differences of the sum of the outputs along ``direction`` for the first ``GRAD_INSTANCES``."""
    exact = CvxpyLayer(prob, params, variables, eps=1e-9, refine_passes=4)
    k = GRAD_INSTANCES

    def total(sign: float) -> np.ndarray:
        with torch.no_grad():
            outs = exact(*[v[:k] + sign * FD_STEP * d[:k] for v, d in zip(values, direction)])
        return sum(o.reshape(k, -1).sum(dim=1) for o in outs).cpu().numpy()
    return (total(1.0) - total(-1.0)) / (2 * FD_STEP)


def gradient_error(grads: list[torch.Tensor] | None, direction: list[torch.Tensor], fd: np.ndarray) -> float:
    """``max |g'd - fd| / (1 + |fd|)`` over the first ``GRAD_INSTANCES`` instances (NaN without gradients)."""
    if grads is None or any(g is None for g in grads):
        return float("nan")
    k = GRAD_INSTANCES
    dd = sum((g[:k] * d[:k]).reshape(k, -1).sum(dim=1) for g, d in zip(grads, direction)).cpu().numpy()
    return float(np.max(np.abs(dd - fd) / (1 + np.abs(fd))))


def machine(device: str = "cpu") -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "device": f"{device} ({name})", "dtype": "float64"}


PROBLEMS = {"qp": qp_problem, "socp": socp_problem, "sdp": sdp_problem}


def run(batches: list[int], repeats: int, train: int, epochs: int, problems: tuple[str, ...] = tuple(PROBLEMS),
        device: str = "cpu", check: int | None = None, max_batch: dict[str, int] | None = None,
        save: Callable[[list[dict]], None] = lambda rows: None, warmup: int = 1) -> list[dict]:
    """Every row; ``save(rows)`` after each batch size (an interrupted run keeps what it measured)."""
    rows = []
    for make in (PROBLEMS[p] for p in problems):
        name, prob, params, variables, sample = make()
        learned = None
        if train > 0:
            with tempfile.TemporaryDirectory() as root:
                try:
                    learned = learned_layer(prob, params, variables, sample, train, epochs, root, device)
                except Exception:  # a failed fit on the device: say so, train on the host instead
                    traceback.print_exc()
                    print(f"{name}: training on {device} failed (above); training on the host", flush=True)
                    learned = learned_layer(prob, params, variables, sample, train, epochs, root, "cpu")
        for B in batches:
            rng = np.random.default_rng(B)
            base = [t.to(device) for t in sample(B, rng)]
            direction = [t.to(device) for t in sample(B, rng)]
            skip = frozenset(k for k, v in (max_batch or {}).items() if B > v)
            impls = methods(prob, params, variables, learned, device, skip)
            times = {k: {"fwd": [], "fwdbwd": []} for k in impls}
            last, grads = {}, {}
            for r in range(warmup + repeats):  # the first warm up (and give "previous" its first solution)
                # every call sees new parameters (one step further), so "previous" never starts at the answer
                fwd_values = [b + STEP * (2 * r + 1) * d for b, d in zip(base, direction)]
                values = [b + STEP * (2 * r + 2) * d for b, d in zip(base, direction)]
                for key, (fn, _) in list(impls.items()):
                    try:
                        tf, _, _ = timed(fn, fwd_values, backward=False)
                        tb, x, g = timed(fn, values, backward=True)
                    except Exception as exc:  # e.g. a baseline that fails at this batch size: the others go on
                        print(f"{name:24s} B={B:5d} {key}: failed, dropped for this batch: "
                              f"{type(exc).__name__}: {exc}", flush=True)
                        del impls[key], times[key]
                        last.pop(key, None)
                        grads.pop(key, None)
                        continue
                    if r >= warmup:
                        times[key]["fwd"].append(tf)
                        times[key]["fwdbwd"].append(tb)
                    last[key], grads[key] = x, g
            k = B if check is None else min(B, check)  # instances checked against the reference
            checked = [v[:k].cpu() for v in values]
            xstar, fstar = reference(prob, params, variables, checked)
            probe = [p.to(device) for p in sample(B, rng)]
            probe = [p / (1 + p.abs().amax()) for p in probe]  # a random direction of each parameter's shape
            fd = finite_differences(prob, params, variables, values, probe)
            for key, (_, settings) in impls.items():
                row = {"problem": name, "batch": B, "method": key, "settings": settings, "device": device,
                       "fwd_ms": 1e3 * statistics.median(times[key]["fwd"]),
                       "fwdbwd_ms": 1e3 * statistics.median(times[key]["fwdbwd"]),
                       "max_err": float(np.abs(last[key][:k] - xstar).max()), "checked": k,
                       "grad_err": gradient_error(grads[key], probe, fd), "repeats": repeats, "warmup": warmup}
                row["objective_excess"], row["violation"] = objective_excess(prob, params, variables, checked,
                                                                             last[key][:k], fstar)
                rows.append(row)
                print(f"{name:24s} B={B:5d} {key:20s} fwd {row['fwd_ms']:9.1f} ms  fwd+bwd {row['fwdbwd_ms']:9.1f} ms"
                      f"  max|x-x*| {row['max_err']:.1e}  f-f* {row['objective_excess']:+.1e}"
                      f"  grad err {row['grad_err']:.1e}"
                      f"  viol {row['violation']:.1e}   [{settings}]",
                      flush=True)
            for k in sorted(skip):
                print(f"{name:24s} B={B:5d} cvxpylayers {k}: skipped above batch {max_batch[k]} "
                      "(--baseline-max-batch)", flush=True)
            batch_rows = [r for r in rows if r["problem"] == name and r["batch"] == B]
            add_speedups(batch_rows)
            for line in speedup_lines(batch_rows):
                print(f"{name:24s} B={B:5d} {line}", flush=True)
            save(rows)
    return rows


DIFFCP_TARGET = 10.0
"""The target against cvxpylayers' default (docs/layers.md): ours at least this much faster, forward and
forward+backward."""


def add_speedups(batch_rows: list[dict]) -> None:
    """Give each of our rows (one problem and batch size) ``speedup[baseline] = {"fwd": ..., "fwdbwd": ...}``: the
    baseline's median time over ours, for each cvxpylayers baseline measured beside it."""
    baselines = [r for r in batch_rows if r["method"].startswith("cvxpylayers")]
    for r in batch_rows:
        if r["method"].startswith("ours"):
            r["speedup"] = {b["method"]: {t: b[f"{t}_ms"] / r[f"{t}_ms"] for t in ("fwd", "fwdbwd")}
                            for b in baselines}


def speedup_lines(batch_rows: list[dict]) -> list[str]:
    """One line per baseline: each of our methods' speedup forward+backward (forward), and which of them reach the
    targets (DIFFCP: :data:`DIFFCP_TARGET` forward+backward, and forward) or (MOREAU) are faster forward+backward."""
    ours = [r for r in batch_rows if "speedup" in r]
    lines = []

    def short(row: dict) -> str:
        return row["method"].removeprefix("ours ")

    for base in sorted({b for r in ours for b in r["speedup"]}):
        cells = ", ".join(f"{short(r)} {r['speedup'][base]['fwdbwd']:.1f}x ({r['speedup'][base]['fwd']:.1f}x)"
                          for r in ours)
        if base.endswith("DIFFCP"):
            goals = [(f"{DIFFCP_TARGET:g}x forward+backward", "fwdbwd", DIFFCP_TARGET),
                     (f"{DIFFCP_TARGET:g}x forward", "fwd", DIFFCP_TARGET)]
        else:
            goals = [("faster forward+backward (the target at batch 1024, learned start)", "fwdbwd", 1.0)]
        verdicts = []
        for goal, t, bound in goals:
            met = [short(r) for r in ours if r["speedup"][base][t] >= bound]
            verdicts.append(f"{goal}: {'met by ' + ', '.join(met) if met else 'missed by every method'}")
        lines.append(f"{base} / ours, forward+backward (forward): {cells}; " + "; ".join(verdicts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (at least 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", type=int, default=1000, help="instances to train the predictor on (0: none)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="batch 16, 1 repeat, a 100-instance predictor")
    parser.add_argument("--json", type=str, default=None, help="write the rows and the machine to this file")
    parser.add_argument("--device", default="cpu", help="where the parameters live: cpu, cuda, cuda:1, ...")
    parser.add_argument("--check", type=int, default=None,
                        help="instances of each batch checked against Clarabel (the first ones; default: all)")
    parser.add_argument("--baseline-max-batch", nargs="*", default=[], metavar="NAME=B",
                        help="skip a cvxpylayers baseline (DIFFCP, MOREAU) above batch size B")
    args = parser.parse_args()
    max_batch = {}
    for item in args.baseline_max_batch:
        name, _, size = item.partition("=")
        if name not in ("DIFFCP", "MOREAU") or not size.isdigit():
            parser.error(f"--baseline-max-batch takes DIFFCP=B or MOREAU=B (B a batch size); got {item!r}")
        max_batch[name] = int(size)
    torch.set_num_threads(args.threads)
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1 (the first call sets the layers up); got {args.warmup}")
    batches, repeats, warmup = ([16], 1, 1) if args.smoke else (args.batches, args.repeats, args.warmup)
    train, epochs = (min(args.train, 100), min(args.epochs, 3)) if args.smoke else (args.train, args.epochs)
    info = machine(args.device)
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"medians of {repeats} interleaved repeats after {warmup} untimed; forward+backward = backward of the "
          "sum of the outputs")

    def save(rows: list[dict]) -> None:
        if args.json:
            info["load_average_end"] = os.getloadavg()
            with open(args.json + ".tmp", "w") as fh:
                json.dump({"machine": info, "rows": rows}, fh, indent=2)
            os.replace(args.json + ".tmp", args.json)

    run(batches, repeats, train, epochs, args.problems, args.device, args.check, max_batch, save, warmup)
    if args.json:
        print("wrote", args.json)


if __name__ == "__main__":
    main()
