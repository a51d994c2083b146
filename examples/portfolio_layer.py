"""A convex layer inside a network trained end to end: a learned portfolio, with amortcvx and with cvxpylayers.

A linear model predicts expected returns ``mu`` from features ``z``; the layer turns them into the portfolio

    w*(mu) = argmax_w  mu'w - gamma ||F'w||^2 - delta ||w||^2   s.t.  sum(w) = 1,  w >= 0

and the model is trained on the realized return of ``w*`` (the decision, not the forecast: "predict, then
optimize" trained end to end through the optimization). The same model, data, seeds and optimizer are trained
with ``amortcvx.CvxpyLayer`` (cold, and warm-started from the previous call's solution: consecutive mini-batch
passes see slowly moving parameters) and with ``cvxpylayers.torch.CvxpyLayer`` (its default, and Moreau when it
is installed). The script prints the machine, the sizes and settings, the training time of each, the test
return each reaches, and how far the portfolios of the layers are apart.

Usage: ``python examples/portfolio_layer.py [--assets 20] [--features 5] [--samples 512] [--batch 64]
[--epochs 5] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cvxpy as cp
import numpy as np
import torch

import amortcvx as ac


def portfolio_problem(n: int, factors: int, seed: int):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, factors)) / np.sqrt(n)
    mu = cp.Parameter(n, name="mu")
    w = cp.Variable(n, name="w")
    prob = cp.Problem(cp.Maximize(mu @ w - 2.0 * cp.sum_squares(F.T @ w) - 0.05 * cp.sum_squares(w)),
                      [cp.sum(w) == 1, w >= 0])
    return prob, mu, w


def data(n: int, d: int, num: int, seed: int):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, n)) * 0.3
    z = rng.normal(size=(num, d))
    r = z @ W + 0.5 * rng.normal(size=(num, n))
    return torch.tensor(z), torch.tensor(r)


def train(layer, z, r, epochs: int, batch: int, seed: int):
    """Train a linear forecaster through ``layer`` on the realized return; returns (model, seconds, losses)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(z.shape[1], r.shape[1]).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        for start in range(0, z.shape[0], batch):
            zb, rb = z[start:start + batch], r[start:start + batch]
            (w,) = layer(model(zb))
            loss = -(w * rb).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return model, time.perf_counter() - t0, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=20)
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--factors", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.epochs, args.batch = 64, 1, 32
    torch.set_num_threads(1)
    prob, mu, w = portfolio_problem(args.assets, args.factors, seed=0)
    z, r = data(args.assets, args.features, args.samples, seed=1)
    z_test, r_test = data(args.assets, args.features, 256, seed=2)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, 1 thread, float64, cpu; portfolio QP with "
          f"{args.assets} assets, {args.factors} factors; linear forecaster of {args.features} features; "
          f"{args.samples} training samples, batch {args.batch}, {args.epochs} epochs, Adam lr 0.05; layer "
          f"tolerance eps {args.eps:g}", flush=True)

    layers = {"amortcvx (cold)": ac.CvxpyLayer(prob, [mu], [w], eps=args.eps),
              "amortcvx (previous solution)": ac.CvxpyLayer(prob, [mu], [w], eps=args.eps, warm_start="previous")}
    try:
        from cvxpylayers.torch import CvxpyLayer as ReferenceLayer

        layers["cvxpylayers (default)"] = ReferenceLayer(prob, parameters=[mu], variables=[w])
        try:
            import moreau  # noqa: F401

            layers["cvxpylayers (MOREAU)"] = ReferenceLayer(prob, parameters=[mu], variables=[w], solver="MOREAU")
        except ImportError:
            print("moreau is not installed: cvxpylayers' MOREAU backend is left out", flush=True)
    except ImportError:
        print("cvxpylayers is not installed: only amortcvx is trained", flush=True)

    results = {}
    for name, layer in layers.items():
        model, seconds, losses = train(layer, z, r, args.epochs, args.batch, seed=3)
        with torch.no_grad():
            (w_test,) = layer(model(z_test))
            test_return = float((w_test * r_test).sum(dim=1).mean())
        results[name] = (seconds, test_return, w_test, losses)
        violation = max(float((-w_test).clamp(min=0).max()), float((w_test.sum(dim=1) - 1).abs().max()))
        print(f"{name:30s} training {seconds:7.2f} s  final train loss {losses[-1]:+.4f}  test return "
              f"{test_return:+.4f}  max constraint violation on the test set {violation:.1e}", flush=True)

    base = results["amortcvx (cold)"]
    for name, (seconds, _, w_test, _) in results.items():
        if name == "amortcvx (cold)":
            continue
        gap = "" if w_test.shape != base[2].shape else f", max |w - w_amortcvx| on the test set with its own " \
            f"model {float((w_test - base[2]).abs().max()):.1e}"
        print(f"{name}: {seconds / base[0]:.2f}x the training time of amortcvx (cold){gap}", flush=True)


if __name__ == "__main__":
    main()
