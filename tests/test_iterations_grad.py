"""Gradients through unrolled SCS / OSQP steps: gradcheck (float64) w.r.t. the iterate and the parameters."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from amortcvx.canon import ConeData, ParametricProblem, SparseBatch
from amortcvx.iterations import OsqpSettings, ScsSettings, make_osqp, make_scs, run, unroll
from amortcvx.solvers import FORMS

K = 8


def tiny_problem(with_soc: bool) -> cp.Problem:
    """A 3-variable QP (plus an SOC when ``with_soc``) with parameters in A (F), b (g) and c (q)."""
    x = cp.Variable(3, name="x")
    F = cp.Parameter((2, 3), name="F")
    g = cp.Parameter(2, name="g")
    q = cp.Parameter(3, name="q")
    cons = [F @ x <= g, x[0] + x[1] == 0.3, x >= -2.0]
    if with_soc:
        cons.append(cp.norm(x, 2) <= 1.5)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), cons)


def tiny_params(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    vals = {"F": rng.standard_normal((batch, 2, 3)), "g": 0.5 + rng.random((batch, 2)),
            "q": rng.standard_normal((batch, 3))}
    return {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}


def test_scs_gradcheck_wrt_initial_iterate():
    pp = ParametricProblem(tiny_problem(with_soc=True), "cone")
    assert pp.cones.zero and pp.cones.nonneg and pp.cones.soc
    params = {k: v.detach() for k, v in tiny_params().items()}
    alg = make_scs(pp.canonicalize(params))
    v_star = run(alg, alg.init(), 30).state.v  # a generic point along the trajectory, tau > 0
    v0 = (v_star + 0.05 * torch.randn(v_star.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=v_star.dtype)).requires_grad_(True)

    def f(v):
        return unroll(alg, alg.init(v=v), K).state.v

    assert gradcheck(f, (v0,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("linsys", ["auto", "kkt", "cholesky"])
def test_scs_gradcheck_wrt_parameters_in_A_b_c(linsys):
    pp = ParametricProblem(tiny_problem(with_soc=True), "cone")
    assert pp.dependent["A"] and pp.dependent["b"] and pp.dependent["c"]
    params = tiny_params()

    def f(F, g, q):
        alg = make_scs(pp.canonicalize({"F": F, "g": g, "q": q}), ScsSettings(linsys=linsys))
        sol = alg.solution(unroll(alg, alg.init(), K).state)
        return torch.cat([sol.x, sol.y, sol.s], dim=1)

    assert gradcheck(f, (params["F"], params["g"], params["q"]), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_scs_gradcheck_wrt_P_values():
    pp = ParametricProblem(tiny_problem(with_soc=False), "cone")
    data = pp.canonicalize({k: v.detach() for k, v in tiny_params().items()})
    p_vals = data.P.values.detach().clone().contiguous().requires_grad_(True)

    def f(vals):
        P = SparseBatch(data.P.indices, data.P.indptr, data.P.shape, vals, shared=False)
        d = ConeData(P=P, A=data.A, b=data.b, c=data.c, cones=data.cones, offset=data.offset)
        alg = make_scs(d)
        return alg.solution(unroll(alg, alg.init(), K).state).x

    assert gradcheck(f, (p_vals,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_scs_sparse_linear_system_carries_gradients_to_b_and_c():
    pp = ParametricProblem(tiny_problem(with_soc=True), "cone")
    data = pp.canonicalize({k: v.detach()[:1] for k, v in tiny_params().items()})
    # Freeze A as shared constant data so the sparse (host SuperLU) path applies.
    a = SparseBatch(data.A.indices, data.A.indptr, data.A.shape, data.A.values.detach(), shared=True)
    b0 = data.b.detach().clone().requires_grad_(True)
    c0 = data.c.detach().clone().requires_grad_(True)

    def f(b, c, method):
        d = ConeData(P=data.P, A=a, b=b, c=c, cones=data.cones, offset=data.offset)
        alg = make_scs(d, ScsSettings(linsys=method))
        return alg.solution(unroll(alg, alg.init(), K).state).x

    assert gradcheck(lambda b, c: f(b, c, "sparse"), (b0, c0), eps=1e-6, atol=1e-5, rtol=1e-3)
    gs = torch.autograd.grad(f(b0, c0, "sparse").sum(), (b0, c0))
    gd = torch.autograd.grad(f(b0, c0, "inverse").sum(), (b0, c0))
    assert all(torch.allclose(x, y, atol=1e-9) for x, y in zip(gs, gd, strict=True))


def test_osqp_gradcheck_wrt_initial_iterate_and_parameters():
    pp = ParametricProblem(tiny_problem(with_soc=False), "qp")
    params = tiny_params(seed=1)
    alg = make_osqp(pp.canonicalize({k: v.detach() for k, v in params.items()}))
    mid = run(alg, alg.init(), 20).state
    x0 = mid.x.clone().requires_grad_(True)
    y0 = (mid.y + 0.01).requires_grad_(True)

    def f_init(x, y):
        st = unroll(alg, alg.init(x, y), K).state
        return torch.cat([st.x, st.y], dim=1)

    assert gradcheck(f_init, (x0, y0), eps=1e-6, atol=1e-5, rtol=1e-3)

    def f_params(F, g, q):
        a = make_osqp(pp.canonicalize({"F": F, "g": g, "q": q}), OsqpSettings(rho=0.5))
        st = unroll(a, a.init(), K).state
        return torch.cat([st.x, st.y], dim=1)

    assert gradcheck(f_params, (params["F"], params["g"], params["q"]), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["scs", "osqp"])
def test_checkpointed_unroll_gives_the_same_gradients_with_less_saved_memory(algorithm):
    form = FORMS[algorithm]
    pp = ParametricProblem(tiny_problem(with_soc=algorithm == "scs"), form)
    params = tiny_params()
    steps = 24

    def loss(checkpoint):
        data = pp.canonicalize(params)
        alg = make_scs(data) if algorithm == "scs" else make_osqp(data)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = unroll(alg, alg.init(), steps, checkpoint=checkpoint)
        out = alg.solution(res.state).x.square().sum() + res.residuals[:, -1].sum()
        return torch.autograd.grad(out, list(params.values())), saved[0]

    plain, mem_plain = loss(None)
    blocked, mem_blocked = loss(6)
    for a, b in zip(plain, blocked, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert mem_blocked < 0.5 * mem_plain


def test_run_keeps_no_graph_and_unroll_does():
    pp = ParametricProblem(tiny_problem(with_soc=True), "cone")
    params = tiny_params()
    alg = make_scs(pp.canonicalize(params))
    assert not run(alg, alg.init(), 3).state.v.requires_grad
    assert unroll(alg, alg.init(), 3).state.v.requires_grad
