"""The torch OSQP iteration against C OSQP 1, iterate by iterate and to tolerance, on the QP/LP families."""

from __future__ import annotations

import functools

import numpy as np
import osqp
import pytest
import scipy.sparse as sp
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem, QPData, SparseBatch
from amortcvx.iterations import OsqpSettings, make_osqp, run, run_to_tolerance
from amortcvx.iterations.convert import (
    osqp_fixed_point_from_state,
    osqp_state_from_fixed_point,
    osqp_state_from_xy,
    osqp_xy_from_state,
)
from amortcvx.iterations.osqp import osqp_rho

KS = (1, 2, 5, 17, 50)
QP_FAMILIES = [name for name in problems.names() if problems.make(name, "small", seed=0).kind in ("qp", "lp")]


@functools.cache
def family_data(name: str, batch: int = 2) -> QPData:
    fam = problems.make(name, "small", seed=0)
    return ParametricProblem(fam.problem, "qp").canonicalize(fam.sample(batch, seed=1))


def _csc32(mat) -> sp.csc_matrix:
    mat = sp.csc_matrix(mat)
    return sp.csc_matrix((mat.data, mat.indices.astype(np.int32), mat.indptr.astype(np.int32)),
                         shape=mat.shape)


def c_osqp(inst, settings: OsqpSettings | None = None, warm: dict | None = None, **kw):
    """Solve one instance with a fresh C OSQP object; ``settings`` None means OSQP's own defaults."""
    n = inst.q.shape[0]
    P = inst.P if inst.P is not None else sp.csc_matrix((n, n))
    solver = osqp.OSQP()
    opts = {"verbose": False, **({} if settings is None else settings.c_settings()), **kw}
    solver.setup(_csc32(sp.triu(P)), inst.q, _csc32(inst.A), inst.l, inst.u, **opts)
    if warm is not None:
        solver.warm_start(**warm)
    return solver.solve(raise_error=False)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def warm_points(data: QPData, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The C optimum of every instance, perturbed by ``scale`` relative noise."""
    rng = np.random.default_rng(seed)
    out = {"x": [], "y": []}
    for i in range(data.batch_size):
        sol = c_osqp(data.instance(i), eps_abs=1e-6, eps_rel=1e-6)
        for key in out:
            val = getattr(sol, key)
            out[key].append(val + scale * max(1.0, np.abs(val).max()) * rng.standard_normal(val.shape))
    return {k: torch.tensor(np.stack(v)) for k, v in out.items()}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name", QP_FAMILIES)
def test_matches_c_osqp_iterate_by_iterate(name, warm):
    data = family_data(name)
    settings = OsqpSettings()
    alg = make_osqp(data, settings)
    start = warm_points(data, 1e-2, seed=3) if warm else None
    state = alg.init(**start) if warm else alg.init()
    for k in range(1, max(KS) + 1):
        state = run(alg, state, 1).state
        if k not in KS:
            continue
        for i in range(data.batch_size):
            warm_i = None if start is None else {key: start[key][i].numpy() for key in start}
            ref = c_osqp(data.instance(i), settings, warm_i, max_iter=k, check_termination=0, eps_abs=1e-15,
                         eps_rel=1e-15, eps_prim_inf=1e-15, eps_dual_inf=1e-15)
            assert ref.info.iter == k
            for key in ("x", "y"):
                err = rel_err(getattr(state, key)[i].numpy(), getattr(ref, key))
                assert err < 1e-8, f"{name} k={k} instance {i}: {key} differs from C OSQP by {err:.2e}"


@pytest.mark.parametrize("name", QP_FAMILIES)
def test_run_to_tolerance_reaches_c_solution(name):
    data = family_data(name)
    alg = make_osqp(data)
    res = run_to_tolerance(alg, alg.init(), tol=1e-9, max_steps=20_000, check_every=50)
    assert bool(res.converged.all()), res.iterations
    sol = alg.solution(res.state)
    for i in range(data.batch_size):
        inst = data.instance(i)
        ref = c_osqp(inst, eps_abs=1e-9, eps_rel=1e-9, max_iter=200_000, polishing=True)
        assert ref.info.status == "solved", ref.info.status
        assert rel_err(sol.x[i].numpy(), ref.x) < 1e-5, name
        assert rel_err(sol.y[i].numpy(), ref.y) < 1e-5, name


def test_rho_per_row_follows_c_rules():
    inf = float("inf")
    l = torch.tensor([[0.0, -inf, -inf, 1.0, -1e27], [0.0, -inf, -inf, 1.0, -1e27]])
    u = torch.tensor([[0.0, inf, 2.0, 1.00001, 1e27], [0.0, inf, 2.0, 1.00001, 1e27]])
    rho = osqp_rho(l, u, OsqpSettings(rho=0.2))
    assert rho.shape == (1, 5)  # same row types in every instance: one factorization for the batch
    assert torch.allclose(rho[0], torch.tensor([200.0, 1e-6, 0.2, 200.0, 1e-6]))
    u2 = u.clone()
    u2[1, 0] = 1.0  # row 0 of instance 1 becomes an inequality
    rho2 = osqp_rho(l, u2, OsqpSettings(rho=0.2))
    assert rho2.shape == (2, 5) and float(rho2[1, 0]) == pytest.approx(0.2) and float(rho2[0, 0]) == 200.0


def test_row_types_differing_across_batch_factor_per_instance():
    data = family_data("portfolio", batch=2)
    l, u = data.l.clone(), data.u.clone()
    eq = torch.nonzero(l[0] == u[0])[0, 0]
    u[1, eq] = u[1, eq] + 1.0  # instance 1: that equality becomes an inequality
    mixed = QPData(P=data.P, q=data.q, A=data.A, l=l, u=u, offset=data.offset)
    alg = make_osqp(mixed)
    assert alg.work.rho.shape[0] == 2 and alg.work.solver.batch_size == 2
    state = run(alg, alg.init(), 17).state
    for i in range(2):
        ref = c_osqp(mixed.instance(i), OsqpSettings(), max_iter=17, check_termination=0, eps_abs=1e-15,
                     eps_rel=1e-15, eps_prim_inf=1e-15, eps_dual_inf=1e-15)
        assert rel_err(state.x[i].numpy(), ref.x) < 1e-8


def test_conversions():
    data = family_data("lasso")
    alg = make_osqp(data)
    point = warm_points(data, 1e-1, seed=0)
    state = osqp_state_from_xy(alg.work, point["x"], point["y"])
    a = data.A.to_dense()
    assert torch.allclose(state.z, (a @ point["x"].unsqueeze(-1)).squeeze(-1))
    x, y = osqp_xy_from_state(state)
    assert torch.equal(x, point["x"]) and torch.equal(y, point["y"])
    # After a step the state is a function of the fixed-point variable [x; z + y / rho].
    stepped = alg.step(state)
    back = osqp_state_from_fixed_point(alg.work, osqp_fixed_point_from_state(alg.work, stepped))
    for f in ("x", "z", "y"):
        assert torch.allclose(getattr(back, f), getattr(stepped, f), atol=1e-12)
    zero = alg.init(torch.zeros(data.n), torch.zeros(data.m))
    assert all(torch.equal(p, q) for p, q in zip(zero[:3], alg.init()[:3], strict=True))


def test_first_step_residual_sees_z_and_y():
    # mpc has q = 0: from the cold start only z and y move in the first step; the residual must not be zero.
    data = family_data("mpc")
    alg = make_osqp(data)
    res = run(alg, alg.init(), 1)
    assert float(res.residuals.min()) > 1e-3


@pytest.mark.parametrize("name", ["mpc", "mpc_param_dyn"])
def test_linear_system_methods_agree(name):
    data = family_data(name)
    ref = run(make_osqp(data, OsqpSettings(linsys="inverse")), make_osqp(data).init(), 30).state
    methods = ["kkt", "cholesky"] + (["sparse"] if data.A.shared else [])
    for method in methods:
        alg = make_osqp(data, OsqpSettings(linsys=method))
        out = run(alg, alg.init(), 30).state
        assert float((out.x - ref.x).abs().max()) < 1e-9, method
        assert float((out.y - ref.y).abs().max()) < 1e-7 * max(1.0, float(ref.y.abs().max())), method


def test_batch_equals_instances_with_parameters_in_A():
    data = family_data("mpc_param_dyn", batch=3)
    assert not data.A.shared
    alg = make_osqp(data)
    batched = run(alg, alg.init(), 20).state
    for i in range(3):
        one = QPData(P=data.P, q=data.q[i:i + 1], A=SparseBatch(data.A.indices, data.A.indptr, data.A.shape,
                                                                   data.A.values[i:i + 1], False),
                     l=data.l[i:i + 1], u=data.u[i:i + 1], offset=data.offset[i:i + 1])
        a1 = make_osqp(one)
        x = run(a1, a1.init(), 20).state.x
        assert float((x[0] - batched.x[i]).abs().max()) < 1e-12


def test_float32_follows_float64():
    data = family_data("lasso")
    d32 = QPData(P=data.P.to(torch.float32), q=data.q.float(), A=data.A.to(torch.float32), l=data.l.float(),
                 u=data.u.float(), offset=data.offset.float())
    alg64, alg32 = make_osqp(data), make_osqp(d32)
    x64 = run(alg64, alg64.init(), 50).state.x
    x32 = run(alg32, alg32.init(), 50).state.x
    assert x32.dtype == torch.float32
    assert float((x32.double() - x64).abs().max()) < 1e-3 * max(1.0, float(x64.abs().max()))


def test_bad_inputs_name_the_culprit():
    data = family_data("portfolio")
    with pytest.raises(ValueError, match="alpha"):
        OsqpSettings(alpha=0.0)
    with pytest.raises(ValueError, match="sigma"):
        OsqpSettings(sigma=-1.0)
    bad = QPData(P=data.P, q=data.q, A=data.A, l=data.u + 1.0, u=data.u, offset=data.offset)
    with pytest.raises(ValueError, match="l > u"):
        make_osqp(bad)
    short = QPData(P=data.P, q=data.q[:, :-1], A=data.A, l=data.l, u=data.u, offset=data.offset)
    with pytest.raises(ValueError, match="QPData.A"):
        make_osqp(short)
    alg = make_osqp(data)
    with pytest.raises(ValueError, match="warm start y"):
        alg.init(None, torch.zeros(3, data.m))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["portfolio", "mpc_param_dyn", "transport"])
def test_cuda_matches_cpu(name):
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, "qp")
    theta = fam.sample(2, seed=1)
    cpu = pp.canonicalize(theta)
    gpu = pp.canonicalize({k: torch.tensor(v, device="cuda") for k, v in theta.items()})
    ref = run(make_osqp(cpu), make_osqp(cpu).init(), 50).state
    alg = make_osqp(gpu)
    out = run(alg, alg.init(), 50).state
    assert out.x.is_cuda
    assert float((out.x.cpu() - ref.x).abs().max()) < 1e-8


@pytest.mark.parametrize("name", QP_FAMILIES)
def test_optimality_residual_is_the_normal_map_and_nil_only_at_the_solution(name):
    """``optimality`` of a state is the inf-norm of the optimality conditions' normal map (``kkt.residual_norm`` at
    ``w = clip(Ax, l, u) + y``): within the solver's tolerance at C OSQP's optimum (eps 1e-6), a hundred times
    more at that optimum perturbed, and exactly the normal map at either."""
    from amortcvx.iterations import kkt

    data = family_data(name)
    alg = make_osqp(data)
    tight = warm_points(data, 0.0, seed=0)
    off = warm_points(data, 0.1, seed=1)
    d = kkt.sparse(data)
    values = {}
    for label, point in (("optimum", tight), ("perturbed", off)):
        got = alg.optimality(alg.init(**point))
        want = kkt.residual_norm(d, kkt.point_from_solution(d, point["x"], point["y"], None))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        values[label] = got
    scale = 1.0 + data.q.abs().amax(dim=1)
    assert bool((values["optimum"] <= 1e-4 * scale).all()), values
    assert bool((values["perturbed"] > 100 * values["optimum"]).all()), values
