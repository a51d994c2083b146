"""Safeguarded Anderson acceleration of the refinement loop (``run(..., anderson=AndersonSettings())``)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import Status, WarmStart, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.iterations import AndersonSettings, FixedPointAlgorithm, make_algorithm, run
from amortcvx.predictors import output_space
from amortcvx.solvers import FORMS


class ToyState(NamedTuple):
    z: torch.Tensor
    k: int


def toy_algorithm(step_fn) -> FixedPointAlgorithm:
    """``z <- step_fn(z)`` as a FixedPointAlgorithm (state = the point itself)."""
    return FixedPointAlgorithm(
        name="toy", work=None, init=lambda z: ToyState(z, 0), step=lambda s: ToyState(step_fn(s.z), s.k + 1),
        fixed_point=lambda s: s.z, residual=lambda old, new: torch.linalg.vector_norm(new.z - old.z, dim=1),
        solution=lambda s: s.z, embed=lambda z: ToyState(z, 1))


def test_linear_map_converges_in_dimension_plus_two_steps():
    # on an affine contraction, type-II Anderson with enough memory is GMRES: exact after d + 1 differences
    gen = torch.Generator().manual_seed(0)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    M = q @ torch.diag(torch.linspace(-0.95, 0.95, d, dtype=torch.float64)) @ q.T
    b = torch.randn(3, d, dtype=torch.float64, generator=gen)
    alg = toy_algorithm(lambda z: z @ M.T + b)
    z0 = torch.zeros(3, d, dtype=torch.float64)
    steps = d + 4
    plain = run(alg, alg.init(z0), steps)
    acc = run(alg, alg.init(z0), steps, anderson=AndersonSettings(memory=10, regularization=0.0))
    assert acc.residuals.shape == plain.residuals.shape == (3, steps)
    assert float(acc.residuals[:, -1].max()) < 1e-9
    assert float(plain.residuals[:, -1].min()) > 1e-3


def test_rejected_extrapolations_leave_no_trace():
    # a nonlinear contraction where extrapolation never gains 12 orders of magnitude: with that safeguard every
    # extrapolated point is rejected, so the result must be a plain iterate T^j(z0) of the start
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    T = lambda z: 0.9 * torch.tanh(2.0 * z) + b  # noqa: E731
    alg = toy_algorithm(T)
    z0 = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    out = run(alg, alg.init(z0), 12, anderson=AndersonSettings(memory=3, safeguard=1e-12))
    iterates, z = [], z0
    for _ in range(12):
        z = T(z)
        iterates.append(z)
    dist = torch.stack([torch.linalg.vector_norm(out.state.z - it, dim=1) for it in iterates], dim=1)
    assert float(dist.min(dim=1).values.max()) < 1e-12
    # and with the default safeguard, acceleration does reach a lower residual than the plain steps
    plain = run(alg, alg.init(z0), 12)
    fast = run(alg, alg.init(z0), 12, anderson=AndersonSettings(memory=3))
    assert float(fast.residuals[:, -1].median()) < 0.5 * float(plain.residuals[:, -1].median())


def test_few_steps_are_plain_and_settings_are_checked():
    alg = toy_algorithm(lambda z: 0.5 * z + 1.0)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    for k in (0, 1, 2):
        a = run(alg, alg.init(z0), k, anderson=AndersonSettings())
        p = run(alg, alg.init(z0), k)
        assert torch.equal(a.state.z, p.state.z)
    for bad in ({"memory": 0}, {"memory": True}, {"regularization": -1.0}, {"safeguard": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AndersonSettings(**bad)
    no_embed = alg._replace(embed=None)
    with pytest.raises(ValueError, match="embed"):
        run(no_embed, no_embed.init(z0), 5, anderson=AndersonSettings())


@functools.cache
def _family(name: str, form: str, batch: int = 8):
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, form)
    return pp.canonicalize(fam.sample(batch, seed=3), dtype=torch.float64)


@pytest.mark.parametrize("algo, name", [("scs", "kalman"), ("osqp", "lasso")])
def test_embed_continues_the_iteration_exactly(algo, name):
    data = _family(name, FORMS[algo], 3)
    alg = make_algorithm(algo, data)
    state = run(alg, alg.init(), 4).state
    direct = alg.step(state)
    via = alg.step(alg.embed(alg.fixed_point(state)))
    torch.testing.assert_close(alg.fixed_point(via), alg.fixed_point(direct), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alg.solution(via)[0], alg.solution(direct)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo, name", [("scs", "mpc_param_dyn"), ("osqp", "lasso")])
def test_accelerated_refinement_needs_fewer_c_iterations(algo, name):
    data = _family(name, FORMS[algo])
    alg = make_algorithm(algo, data)
    space = output_space(algo)
    settings = {"eps_abs": 1e-4, "eps_rel": 1e-4}
    counts = {}
    for label, anderson in (("plain", None), ("anderson", AndersonSettings())):
        out = run(alg, alg.init(), 30, anderson=anderson)
        ws = {k: v.numpy() for k, v in space.warm_start(alg, out.state).items()}
        warm = [WarmStart(x=ws["x"][i], y=ws["y"][i], s=ws["s"][i] if "s" in ws else None)
                for i in range(data.batch_size)]
        results = solve_batch(data.instances(), algo, warm_starts=warm, settings=settings, workers=1)
        assert all(r.status == Status.OPTIMAL for r in results)
        counts[label] = (float(np.median([r.iterations for r in results])),
                         float(out.residuals[:, -1].median()))
    assert counts["anderson"][1] < 0.5 * counts["plain"][1]
    assert counts["anderson"][0] <= 0.5 * counts["plain"][0]


def test_float32_and_degenerate_memory_stay_finite():
    # float32 and an all-zero difference memory (a start at a fixed point) must not raise or produce NaN
    fam = problems.make("kalman", "small", seed=0)
    data = ParametricProblem(fam.problem, "cone").canonicalize(fam.sample(3, seed=3), dtype=torch.float32)
    alg = make_algorithm("scs", data)
    out = run(alg, alg.init(), 30, anderson=AndersonSettings())
    assert torch.isfinite(out.state.v).all() and torch.isfinite(out.residuals).all()
    toy = toy_algorithm(lambda z: z)  # every point is a fixed point: all differences are zero
    z0 = torch.ones(2, 3, dtype=torch.float64)
    still = run(toy, toy.init(z0), 10, anderson=AndersonSettings())
    assert torch.equal(still.state.z, z0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algo, name", [("scs", "kalman"), ("osqp", "lasso")])
def test_cuda_matches_cpu(algo, name):
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, FORMS[algo])
    theta = fam.sample(4, seed=1)
    cpu = pp.canonicalize(theta)
    gpu = pp.canonicalize({k: torch.tensor(v, device="cuda") for k, v in theta.items()})
    outs = []
    for data in (cpu, gpu):
        alg = make_algorithm(algo, data)
        outs.append(alg.fixed_point(run(alg, alg.init(), 30, anderson=AndersonSettings()).state))
    assert outs[1].is_cuda
    assert float((outs[1].cpu() - outs[0]).abs().max()) < 1e-7
