"""The torch SCS iteration against C SCS 3, iterate by iterate and to tolerance, on every problem family."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scs
import torch

from amortcvx import problems
from amortcvx.canon import ConeData, ConeDims, ParametricProblem, SparseBatch
from amortcvx.iterations import (
    ALGORITHMS,
    DATA_FORMS,
    ScsSettings,
    make_algorithm,
    make_scs,
    run,
    run_to_tolerance,
    scs_init,
    scs_setup,
    unroll,
)
from amortcvx.iterations.convert import scs_v_from_xys, scs_xys_from_state, scs_xys_from_v, to_numpy_rows
from amortcvx.iterations.scs import scs_c_output

KS = (1, 2, 5, 17, 50)
FAMILIES = problems.names()


@functools.cache
def family_data(name: str, batch: int = 2) -> tuple[ParametricProblem, ConeData]:
    fam = problems.make(name, "small", seed=0)
    pp = ParametricProblem(fam.problem, "cone")
    return pp, pp.canonicalize(fam.sample(batch, seed=1))


def c_scs(inst, settings: ScsSettings | None = None, warm: dict | None = None, **kw) -> dict:
    """Solve one instance with C SCS (fresh object); ``settings`` None means SCS's own defaults."""
    d = {"A": inst.A, "b": inst.b, "c": inst.c}
    if inst.P is not None:
        d["P"] = sp.triu(inst.P, format="csc")
    opts = {"verbose": False, **({} if settings is None else settings.c_settings()), **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SCS warns about complementary slackness of unfinished iterates
        solver = scs.SCS(d, inst.cones.to_scs(), **opts)
        return solver.solve(warm_start=True, **warm) if warm is not None else solver.solve(warm_start=False)


def c_optimum(inst) -> dict:
    return c_scs(inst, eps_abs=1e-8, eps_rel=1e-8, max_iters=100_000)


def objective(inst, x: np.ndarray) -> float:
    return float(inst.c @ x + (0.0 if inst.P is None else 0.5 * x @ (inst.P @ x)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def warm_points(data: ConeData, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The C optimum of every instance, perturbed by ``scale`` relative noise."""
    rng = np.random.default_rng(seed)
    out = {"x": [], "y": [], "s": []}
    for i in range(data.batch_size):
        sol = c_scs(data.instance(i), eps_abs=1e-6, eps_rel=1e-6)
        for key in out:
            val = sol[key]
            out[key].append(val + scale * max(1.0, np.abs(val).max()) * rng.standard_normal(val.shape))
    return {k: torch.tensor(np.stack(v)) for k, v in out.items()}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name", FAMILIES)
def test_matches_c_scs_iterate_by_iterate(name, warm):
    _, data = family_data(name)
    settings = ScsSettings()
    alg = make_scs(data, settings)
    start = warm_points(data, 1e-2, seed=3) if warm else None
    state = alg.init(**start) if warm else alg.init()
    worst = 0.0
    for k in range(1, max(KS) + 1):
        state = run(alg, state, 1).state
        if k not in KS:
            continue
        out = scs_c_output(alg.work, state)
        for i in range(data.batch_size):
            warm_i = None if start is None else {key: start[key][i].numpy() for key in start}
            ref = c_scs(data.instance(i), settings, warm_i, max_iters=k, eps_abs=1e-15, eps_rel=1e-15,
                        eps_infeas=1e-15)
            # At max_iters C returns (u_x, u_y, rsk_s)/tau when tau > kappa, else a scaled certificate.
            assert int(out.status[i]) == ref["info"]["status_val"], (k, i, ref["info"]["status"])
            for key in ("x", "y", "s"):
                mine = getattr(out, key)[i].numpy()
                assert np.array_equal(np.isnan(mine), np.isnan(ref[key])), (k, i, key)
                if np.isnan(mine).all():
                    continue
                err = rel_err(mine, ref[key])
                worst = max(worst, err)
                assert err < 1e-8, f"{name} k={k} instance {i}: {key} differs from C SCS by {err:.2e}"
    assert worst < 1e-8


@pytest.mark.parametrize("name", FAMILIES)
def test_run_to_tolerance_reaches_c_solution(name):
    _, data = family_data(name)
    alg = make_scs(data)
    res = run_to_tolerance(alg, alg.init(), tol=1e-9, max_steps=20_000, check_every=50)
    assert bool(res.converged.all()), res.iterations
    sol = alg.solution(res.state)
    for i in range(data.batch_size):
        inst = data.instance(i)
        ref = c_optimum(inst)
        assert ref["info"]["status_val"] == 1, ref["info"]["status"]
        x = sol.x[i].numpy()
        assert rel_err(x, ref["x"]) < 1e-5, name
        f_ref = objective(inst, ref["x"])
        assert abs(objective(inst, x) - f_ref) <= 1e-5 * max(1.0, abs(f_ref))


def test_warm_start_at_optimum_is_a_fixed_point():
    _, data = family_data("portfolio")
    alg = make_scs(data)
    opt = run_to_tolerance(alg, alg.init(), tol=1e-11, max_steps=20_000, check_every=50)
    x, y, s = scs_xys_from_state(alg.work, opt.state)
    # From the optimum (x, y, s) the fixed-point residual is zero up to the optimum's own accuracy...
    res = run(alg, alg.init(x, y, s), 5)
    assert float(res.residuals.max()) < 1e-8
    # ...whereas the cold start is far from it.
    cold = run(alg, alg.init(), 5)
    assert float(cold.residuals[:, -1].min()) > 1e-3
    # v -> (x, y, s) recovers the optimum from the fixed-point variable alone.
    x2, y2, s2 = scs_xys_from_v(alg.work, opt.state.v)
    for a, b in ((x2, x), (y2, y), (s2, s)):
        assert float((a - b).abs().max()) < 1e-7


def test_init_conversions_round_trip():
    _, data = family_data("kalman")
    alg = make_scs(data)
    point = warm_points(data, 1e-1, seed=0)
    state = alg.init(**point)
    assert torch.equal(state.v, scs_v_from_xys(point["x"], point["y"], point["s"], data.cones))
    x, y, s = scs_xys_from_state(alg.work, state)
    assert torch.allclose(x, point["x"]) and torch.allclose(y, point["y"]) and torch.allclose(s, point["s"])
    zero = alg.init(torch.zeros(data.n), torch.zeros(data.m), torch.zeros(data.m))
    cold = alg.init()
    assert all(torch.equal(a, b) for a, b in zip(zero[:3], cold[:3], strict=True))
    rows = to_numpy_rows(x=x, y=y, s=s)
    assert len(rows) == data.batch_size and np.array_equal(rows[1]["y"], y[1].numpy())


@pytest.mark.parametrize("name", ["mpc", "mpc_param_dyn", "robust_ls"])
def test_linear_system_methods_agree(name):
    _, data = family_data(name)
    ref = run(make_scs(data, ScsSettings(linsys="inverse")), scs_init(scs_setup(data)), 30).state.v
    methods = ["kkt", "cholesky"] + (["sparse"] if data.A.shared else [])
    for method in methods:
        alg = make_scs(data, ScsSettings(linsys=method))
        v = run(alg, alg.init(), 30).state.v
        assert float((v - ref).abs().max()) < 1e-9, method
    if not data.A.shared:
        with pytest.raises(ValueError, match="sparse"):
            make_scs(data, ScsSettings(linsys="sparse"))


def test_batch_equals_instances_with_parameters_in_A():
    _, data = family_data("mpc_param_dyn", batch=3)
    assert not data.A.shared
    batched = run(make_scs(data), make_scs(data).init(), 20).state.v
    for i in range(3):
        one = ConeData(P=data.P, A=SparseBatch(data.A.indices, data.A.indptr, data.A.shape,
                                                data.A.values[i:i + 1], False),
                       b=data.b[i:i + 1], c=data.c[i:i + 1], cones=data.cones, offset=data.offset[i:i + 1])
        alg = make_scs(one)
        v = run(alg, alg.init(), 20).state.v
        assert float((v[0] - batched[i]).abs().max()) < 1e-12


def test_run_to_tolerance_freezes_finished_instances():
    _, data = family_data("portfolio", batch=4)
    alg = make_scs(data)
    res = run_to_tolerance(alg, alg.init(), tol=1e-6, max_steps=5000, check_every=7)
    its = res.iterations.tolist()
    assert bool(res.converged.all()) and len(set(its)) > 1
    assert res.residuals.shape == (4, max(its)) or res.residuals.shape[1] >= max(its)
    for i, k in enumerate(its):
        alone = run(alg, alg.init(), k).state
        assert float((alone.v[i] - res.state.v[i]).abs().max()) < 1e-12
        assert float(res.residuals[i, k - 1]) <= 1e-6 < float(res.residuals[i, k - 2])
        assert float(res.residuals[i, -1]) == float(res.residuals[i, k - 1])


def test_run_to_tolerance_stops_at_a_fraction_of_the_batch():
    """``stopped=f``: the loop ends at the first check where at least a fraction f of the instances have stopped;
    the stopped ones are those of the full run, the others keep stepping until then."""
    _, data = family_data("portfolio", batch=8)
    alg = make_scs(data)
    full = run_to_tolerance(alg, alg.init(), tol=1e-6, max_steps=5000, check_every=1)
    its = sorted(full.iterations.tolist())
    assert its[5] < its[-1]  # a tail to cut
    part = run_to_tolerance(alg, alg.init(), tol=1e-6, max_steps=5000, check_every=1, stopped=0.75)
    assert part.residuals.shape[1] == its[5]  # 6 of 8 stopped at the 6th smallest count
    assert int(part.converged.sum()) >= 6 and int((~part.converged).sum()) >= 1
    done = part.converged
    assert torch.equal(part.iterations[done], full.iterations[done])
    assert float((part.state.v[done] - full.state.v[done]).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="stopped"):
        run_to_tolerance(alg, alg.init(), tol=1e-6, max_steps=10, stopped=0.0)


def test_residuals_are_the_step_lengths():
    _, data = family_data("lasso")
    alg = make_scs(data)
    res = run(alg, alg.init(), 10)
    assert res.residuals.shape == (data.batch_size, 10) and res.converged is None
    a = run(alg, alg.init(), 9).state
    b = alg.step(a)
    assert torch.allclose(res.residuals[:, -1], alg.residual(a, b))
    # alpha ||u - u~|| form: independent of the scale of v (normalization happens inside the step).
    assert torch.allclose(alg.residual(a, b), torch.linalg.vector_norm(b.v - a.v * (
        (data.n + data.m + 1) ** 0.5 / torch.linalg.vector_norm(a.v, dim=1, keepdim=True)), dim=1))


def test_float32_follows_float64():
    _, data = family_data("portfolio")
    d32 = ConeData(P=data.P.to(torch.float32), A=data.A.to(torch.float32), b=data.b.float(), c=data.c.float(),
                   cones=data.cones, offset=data.offset.float())
    alg64, alg32 = make_scs(data), make_scs(d32)
    x64 = alg64.solution(run(alg64, alg64.init(), 50).state).x
    st32 = run(alg32, alg32.init(), 50).state
    assert st32.v.dtype == torch.float32
    x32 = alg32.solution(st32).x
    assert float((x32.double() - x64).abs().max()) < 1e-3 * max(1.0, float(x64.abs().max()))


def test_registry():
    _, data = family_data("portfolio")
    assert set(ALGORITHMS) == {"scs", "osqp"} and DATA_FORMS == {"scs": "cone", "osqp": "qp"}
    alg = make_algorithm("scs", data, ScsSettings(alpha=1.2))
    assert alg.name == "scs" and alg.work.settings.alpha == 1.2
    assert alg.fixed_point(alg.init()).shape == (data.batch_size, data.n + data.m + 1)
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_algorithm("ecos", data)
    with pytest.raises(TypeError, match="ConeData"):
        make_algorithm("osqp", data)


def test_bad_inputs_name_the_culprit():
    _, data = family_data("portfolio")
    bad_cones = ConeData(P=data.P, A=data.A, b=data.b, c=data.c, cones=ConeDims(zero=1), offset=data.offset)
    with pytest.raises(ValueError, match="cones"):
        make_scs(bad_cones)
    with pytest.raises(ValueError, match="alpha"):
        ScsSettings(alpha=2.0)
    with pytest.raises(ValueError, match="linsys"):
        ScsSettings(linsys="qr")
    alg = make_scs(data)
    with pytest.raises(ValueError, match="warm start x"):
        alg.init(torch.zeros(data.n + 1))
    with pytest.raises(ValueError, match="not both"):
        alg.init(torch.zeros(data.n), v=torch.zeros(data.n + data.m + 1))
    with pytest.raises(ValueError, match="num_steps"):
        run(alg, alg.init(), -1)
    with pytest.raises(ValueError, match="checkpoint"):
        unroll(alg, alg.init(), 3, checkpoint=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["portfolio", "kalman", "mpc_param_dyn", "sparse_pca"])
def test_cuda_matches_cpu(name):
    pp, _ = family_data(name)
    fam = problems.make(name, "small", seed=0)
    theta = fam.sample(2, seed=1)
    cpu = pp.canonicalize(theta)
    gpu = pp.canonicalize({k: torch.tensor(v, device="cuda") for k, v in theta.items()})
    assert gpu.b.is_cuda
    ref = run(make_scs(cpu), make_scs(cpu).init(), 50).state
    alg = make_scs(gpu)
    out = run(alg, alg.init(), 50).state
    assert out.v.is_cuda
    assert float((out.v.cpu() - ref.v).abs().max()) < 1e-8


def _random_kkt(batch: int, shared: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    m, n = 14, 9
    pattern = sp.random(m, n, density=0.15, random_state=seed, format="csc")
    pattern = (pattern + sp.eye(m, n, format="csc")).tocsc()  # full column rank pattern
    pattern.sort_indices()
    vals = rng.standard_normal((1 if shared else batch, pattern.nnz))
    values = torch.tensor(vals).expand(batch, -1) if shared else torch.tensor(vals)
    A = SparseBatch(pattern.indices.astype(np.int64), pattern.indptr.astype(np.int64), (m, n), values, shared)
    F = rng.standard_normal((n, n))
    p_full = sp.csc_array(F @ F.T)
    p_vals = torch.tensor(p_full.data).expand(batch, -1)
    P = SparseBatch(p_full.indices.astype(np.int64), p_full.indptr.astype(np.int64), (n, n), p_vals, True)
    d_y = torch.tensor(rng.uniform(0.5, 2.0, m))
    return A, P, d_y


@pytest.mark.parametrize("shared", [True, False])
def test_kkt_solver_methods_match_a_dense_solve(shared, monkeypatch):
    from amortcvx.iterations import linalg

    A, P, d_y = _random_kkt(3, shared)
    rhs = torch.randn(3, A.shape[0] + A.shape[1], dtype=torch.float64)
    a, p = A.to_dense(), P.to_dense()
    n, m = A.shape[1], A.shape[0]
    K = torch.cat([torch.cat([p + 1e-3 * torch.eye(n, dtype=torch.float64), a.mT], 2),
                   torch.cat([a, -torch.diag_embed(d_y).expand(3, m, m)], 2)], 1)
    ref = torch.linalg.solve(K, rhs)
    methods = ["kkt", "inverse", "cholesky"] + (["sparse"] if shared else [])
    monkeypatch.setattr(linalg, "_DENSE_SHARED_A", 0)  # also exercise the gather / scatter products
    for method in methods:
        solver = linalg.KKTSolver(A, P, 1e-3, d_y, dtype=torch.float64, method=method)
        assert solver.batch_size == (1 if shared else 3)
        if method in ("inverse", "cholesky"):
            assert solver.A_op is not None
        out = solver.solve_packed(rhs)
        assert float((out - ref).abs().max()) < 1e-10, method


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("method", ["inverse", "cholesky"])
@pytest.mark.parametrize("dense_a", [True, False])
def test_a_taken_kkt_solver_solves_its_instances_as_the_batch_does(shared, method, dense_a, monkeypatch):
    """``KKTSolver.take(index)`` (any order, repeats): the batch's own solves on those rows, with per-instance
    factors and ``A`` (dense or as gathered products) taken from the batch on the first solve, not before; a take of
    a take is the take of the composed rows; a shared factorization is the solver itself."""
    from amortcvx.iterations import linalg

    if not dense_a:
        monkeypatch.setattr(linalg, "_DENSE_SHARED_A", 0)
    A, P, d_y = _random_kkt(4, shared, seed=2)
    solver = linalg.KKTSolver(A, P, 1e-3, d_y, dtype=torch.float64, method=method)
    assert (solver.A_op is None) == (dense_a and (shared or 4 * A.nnz >= A.shape[0] * A.shape[1]))
    rhs = torch.randn(4, A.shape[0] + A.shape[1], dtype=torch.float64)
    whole = solver.solve_packed(rhs)
    index = torch.tensor([3, 1, 3, 0, 2])
    part = solver.take(index)
    if shared:
        assert part is solver
    else:
        assert part.batch_size == 5 and part.L is None and part.S_inv is None  # nothing gathered before a solve
        assert bool((part.failed == solver.failed[index]).all())
    torch.testing.assert_close(part.solve_packed(rhs[index]), whole[index], rtol=0, atol=1e-12)
    again = solver.take(index).take(torch.tensor([4, 0]))
    torch.testing.assert_close(again.solve_packed(rhs[[2, 3]]), whole[[2, 3]], rtol=0, atol=1e-12)


def test_kkt_solver_gradients_through_sparse_products():
    from amortcvx.iterations import linalg

    A, P, d_y = _random_kkt(2, shared=False, seed=1)
    vals = A.values.clone().requires_grad_(True)
    rhs = torch.randn(2, A.shape[0] + A.shape[1], dtype=torch.float64, requires_grad=True)

    def f(values, r):
        a = SparseBatch(A.indices, A.indptr, A.shape, values, False)
        solver = linalg.KKTSolver(a, P, 1e-2, d_y, dtype=torch.float64, method="inverse")
        assert solver.A_op is not None
        return solver.solve_packed(r)

    assert torch.autograd.gradcheck(f, (vals, rhs))


@pytest.mark.parametrize("name", FAMILIES + ["max_entropy"])
def test_optimality_residual_reads_the_point_of_v_and_is_nil_only_at_the_solution(name):
    """``optimality`` of the state made from ``v = [x; y + s / r_y; 1]`` (no step): at C SCS's tight optimum it
    recovers the optimum's slack and dual and is the optimality conditions' normal map there (``kkt.residual_norm``
    at ``w = y - s``, within the optimum's own accuracy); at the optimum perturbed it is a hundred times larger. On
    every bundled family and max_entropy: zero, nonnegative, second-order, PSD and exponential cones."""
    from amortcvx.iterations import kkt

    pp, data = family_data(name)
    alg = make_scs(data)
    d = kkt.sparse(data)
    sols = [c_optimum(data.instance(i)) for i in range(data.batch_size)]
    opt = {key: torch.tensor(np.stack([sol[key] for sol in sols])) for key in ("x", "y", "s")}
    values = {}
    for label, point in (("optimum", opt), ("perturbed", warm_points(data, 0.1, seed=1))):
        v = scs_v_from_xys(point["x"], point["y"], point["s"], data.cones, alg.work.settings)
        values[label] = alg.optimality(alg.init(v=v))
    at_opt = kkt.residual_norm(d, kkt.point_from_solution(d, opt["x"], opt["y"], opt["s"]))
    scale = 1.0 + data.b.abs().amax(dim=1) + data.c.abs().amax(dim=1)
    assert bool((values["optimum"] <= 1e-5 * scale).all()), values
    torch.testing.assert_close(values["optimum"], at_opt, rtol=0, atol=1e-5 * float(scale.max()))
    assert bool((values["perturbed"] > 100 * values["optimum"]).all()), values
