"""A portfolio layer inside a network, trained end to end: amortcvx's CvxpyLayer beside cvxpylayers.

A small network maps market features to expected returns ``mu``; the layer turns them into weights

    w* = argmin_w  -mu'w + gamma ||w||^2   s.t.  sum(w) = 1,  0 <= w <= 0.3

and the loss is the negative realized return of ``w*`` (plus nothing else: the constraints live in the layer).
The same model, data, seed and optimizer are trained with both layers; the script prints the training time of
each, the first and last loss, and the largest difference between the two loss curves (cvxpylayers' default
tolerance leaves errors of about 1e-3 in its answers and gradients, so the two training paths drift apart).

    python examples/layer_portfolio.py [--steps 30] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import cvxpy as cp
import numpy as np
import torch
from torch import nn

from amortcvx.layers import CvxpyLayer


def portfolio_problem(assets: int, gamma: float = 0.5):
    mu, w = cp.Parameter(assets, name="mu"), cp.Variable(assets, name="w")
    prob = cp.Problem(cp.Minimize(-mu @ w + gamma * cp.sum_squares(w)), [cp.sum(w) == 1, w >= 0, w <= 0.3])
    return prob, mu, w


def train(layer_fn, features: torch.Tensor, returns: torch.Tensor, steps: int, batch: int, seed: int = 0):
    """Adam on the negative realized return; returns (seconds, losses)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features.shape[1], 32), nn.ReLU(), nn.Linear(32, returns.shape[1])).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.as_tensor(rng.choice(features.shape[0], batch, replace=False))
        (weights,) = layer_fn(model(features[idx]))
        loss = -(weights * returns[idx]).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--assets", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    features = torch.tensor(rng.normal(size=(2000, 5)))
    loadings = rng.normal(size=(5, args.assets))
    returns = torch.tensor(0.1 * (features.numpy() @ loadings) + rng.normal(scale=0.5, size=(2000, args.assets)))
    prob, mu, w = portfolio_problem(args.assets)

    ours = CvxpyLayer(prob, [mu], [w], eps=1e-6, warm_start="previous")
    layers = {"amortcvx CvxpyLayer (warm start: previous call)": ours}
    try:
        from cvxpylayers.torch import CvxpyLayer as Reference

        layers["cvxpylayers (DIFFCP, defaults)"] = Reference(prob, [mu], [w])
    except ImportError:
        print("cvxpylayers is not installed: training with amortcvx only")
    results = {}
    for name, layer in layers.items():
        seconds, losses = train(layer, features, returns, args.steps, args.batch)
        results[name] = losses
        print(f"{name:48s} {args.steps} steps of batch {args.batch}: {seconds:6.2f} s, "
              f"loss {losses[0]:+.4f} -> {losses[-1]:+.4f}")
    if len(results) == 2:
        a, b = results.values()
        print(f"largest difference between the two loss curves: {max(abs(x - y) for x, y in zip(a, b)):.1e}")


if __name__ == "__main__":
    main()
