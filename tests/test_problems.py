"""Tests of the parametric problem families in ``problems/``."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest

from amortcvx import problems
from amortcvx.problems import Family
from amortcvx.problems.mpc import lqr_trajectories, mass_chain, mpc_next_state, simulate_closed_loop

NAMES = problems.names()

# Where each family's parameters land in SCS's canonical data: "A" (constraint matrix), "b" (right-hand
# side), "c" (linear cost), "P" (quadratic cost). Checked against CVXPY's parameter tensors below.
EXPECTED_LANDING = {
    "portfolio": {"c"},
    "mpc": {"b"},
    "mpc_param_dyn": {"A", "b"},
    "lasso": {"b"},
    "transport": {"b", "c"},
    "kalman": {"b"},
    "robust_ls": {"A", "b"},
    "sparse_pca": {"c"},
}


@pytest.fixture(scope="module")
def small_families() -> dict[str, Family]:
    return {name: problems.make(name) for name in NAMES}


def _solve(family: Family, values: dict[str, np.ndarray], index: int, solver: str) -> str:
    family.assign(values, index)
    kwargs = {"max_iter": 50_000} if solver == cp.OSQP else {}
    family.problem.solve(solver=solver, **kwargs)
    return family.problem.status


def _landing(problem: cp.Problem) -> tuple[set[str], float]:
    """Which canonical blocks depend on parameters, and the error of rebuilding [A | b] from the tensor.

    ``param_prob.A`` has one row per entry of ``[A | b]`` in column-major order (``m * (n + 1)`` rows) and
    one column per parameter entry plus a constant column. The rebuild error validates that reading.
    """
    data, _, _ = problem.get_problem_data(cp.SCS)
    pp = data["param_prob"]
    m, n = data["A"].shape
    assert pp.A.shape == (m * (n + 1), pp.total_param_size + 1)
    theta = np.zeros(pp.total_param_size + 1)
    theta[-1] = 1.0
    for p in problem.parameters():
        col = pp.param_id_to_col[p.id]
        theta[col:col + p.size] = np.asarray(p.value, dtype=float).flatten(order="F")
    ab = (pp.A @ theta).reshape((m, n + 1), order="F")
    dense_a = data["A"].toarray()
    err = min(np.abs(ab[:, :n] - dense_a).max(), np.abs(ab[:, :n] + dense_a).max())
    err = max(err, min(np.abs(ab[:, n] - data["b"]).max(), np.abs(ab[:, n] + data["b"]).max()))

    found = set()
    tensor = pp.A.tocoo()
    is_param = tensor.col < pp.total_param_size
    block_col = tensor.row[is_param] // m
    if np.any(block_col < n):
        found.add("A")
    if np.any(block_col == n):
        found.add("b")
    q = pp.q.tocoo()
    if np.any((q.col < pp.total_param_size) & (q.row < n) & (q.data != 0)):
        found.add("c")
    if pp.P is not None:
        P = pp.P.tocoo()
        if np.any((P.col < pp.total_param_size) & (P.data != 0)):
            found.add("P")
    return found, err


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_at_least_seven_families_covering_all_kinds(small_families):
    assert NAMES == sorted(problems.FAMILIES)
    assert len(NAMES) >= 7
    assert {f.kind for f in small_families.values()} == {"qp", "lp", "socp", "sdp"}
    assert any(f.sequential for f in small_families.values())


def test_make_rejects_unknown_name_and_size():
    with pytest.raises(ValueError, match="portfolio"):
        problems.make("no_such_family")
    with pytest.raises(ValueError, match="small"):
        problems.make("portfolio", size="huge")
    with pytest.raises(ValueError, match="small"):
        problems.portfolio(size="medium")


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_family_is_dpp_with_named_unique_parameters(name, small_families):
    fam = small_families[name]
    assert isinstance(fam, Family)
    assert fam.name == name
    assert fam.size == "small"
    assert fam.kind in problems.KINDS
    assert fam.description
    assert fam.problem.is_dpp()
    params = fam.problem.parameters()
    names = [p.name() for p in params]
    assert len(names) == len(set(names))
    assert set(names) == set(fam.parameters)
    for p in params:
        assert fam.parameters[p.name()] is p
        assert not any(v for v in p.attributes.values() if v not in (False, None))


@pytest.mark.parametrize("name", NAMES)
def test_sample_shapes_and_reproducibility(name, small_families):
    fam = small_families[name]
    a = fam.sample(5, seed=3)
    b = fam.sample(5, seed=3)
    c = fam.sample(5, seed=4)
    d = fam.sample(5, seed=np.random.default_rng(3))
    assert set(a) == set(fam.parameters)
    for key, p in fam.parameters.items():
        assert a[key].shape == (5, *p.shape)
        assert a[key].dtype == np.float64
        assert np.all(np.isfinite(a[key]))
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], d[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    # Instances of one batch differ from each other.
    for key in a:
        assert not np.allclose(a[key][0], a[key][1])


@pytest.mark.parametrize("name", NAMES)
def test_seed_fixes_constant_data(name):
    f1, f2 = problems.make(name, seed=0), problems.make(name, seed=0)
    np.testing.assert_array_equal(f1.sample(3, 1)[next(iter(f1.parameters))],
                                  f2.sample(3, 1)[next(iter(f2.parameters))])


@pytest.mark.parametrize("name", NAMES)
def test_small_instances_solve_to_optimality(name, small_families):
    fam = small_families[name]
    values = fam.sample(3, seed=11)
    solvers = [cp.SCS, cp.OSQP] if fam.kind in ("qp", "lp") else [cp.SCS]
    for solver in solvers:
        objectives = []
        for i in range(3):
            assert _solve(fam, values, i, solver) == cp.OPTIMAL, (name, solver, i)
            objectives.append(fam.problem.value)
        assert len({round(v, 6) for v in objectives}) > 1, "sampled instances should differ"


@pytest.mark.parametrize("name", ["portfolio", "lasso", "transport", "mpc"])
def test_scs_and_osqp_agree_on_the_optimal_value(name, small_families):
    fam = small_families[name]
    values = fam.sample(2, seed=5)
    for i in range(2):
        fam.assign(values, i)
        fam.problem.solve(solver=cp.OSQP, eps_abs=1e-8, eps_rel=1e-8, max_iter=100_000)
        v_osqp = fam.problem.value
        fam.problem.solve(solver=cp.SCS, eps_abs=1e-8, eps_rel=1e-8)
        v_scs = fam.problem.value
        assert v_osqp == pytest.approx(v_scs, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_large_size_builds_dpp_problem(name):
    fam = problems.make(name, size="large")
    assert fam.size == "large"
    assert fam.problem.is_dpp()
    small = problems.make(name)
    assert fam.problem.size_metrics.num_scalar_variables > small.problem.size_metrics.num_scalar_variables
    values = fam.sample(2, seed=0)
    for key, p in fam.parameters.items():
        assert values[key].shape == (2, *p.shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_large_instances_solve(name):
    fam = problems.make(name, size="large")
    values = fam.sample(2, seed=0)
    solvers = [cp.SCS, cp.OSQP] if fam.kind in ("qp", "lp") else [cp.SCS]
    for solver in solvers:
        for i in range(2):
            assert _solve(fam, values, i, solver) == cp.OPTIMAL, (name, solver, i)


# ---------------------------------------------------------------------------------- parameters in A / P


@pytest.mark.parametrize("name", NAMES)
def test_parameters_land_where_documented(name, small_families):
    fam = small_families[name]
    fam.assign(fam.sample(1, seed=2), 0)
    found, rebuild_err = _landing(fam.problem)
    assert rebuild_err < 1e-9
    assert found == EXPECTED_LANDING[name]


def test_some_qp_and_some_cone_family_have_a_parameter_in_the_constraint_matrix(small_families):
    with_a = {n for n, f in small_families.items() if "A" in _landing_after_assign(f)}
    assert any(small_families[n].kind == "qp" for n in with_a)
    assert any(small_families[n].kind in ("socp", "sdp") for n in with_a)


def _landing_after_assign(fam: Family) -> set[str]:
    fam.assign(fam.sample(1, seed=0), 0)
    return _landing(fam.problem)[0]


def test_landing_detects_a_parameter_in_the_quadratic_cost():
    # The detector itself must be able to see P (and not only A): a parameter scaling a quadratic term.
    x = cp.Variable(3)
    g = cp.Parameter(name="g", value=2.0, nonneg=True)  # a toy, not a family: attributes are fine here
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + g * x[0] ** 2 + x[1]), [x >= -1])
    found, _ = _landing(prob)
    assert "P" in found


# ---------------------------------------------------------------------------------- family validation


def _toy(param: cp.Parameter, objective=None) -> cp.Problem:
    x = cp.Variable(2)
    return cp.Problem(objective if objective is not None else cp.Minimize(cp.sum_squares(x - param)))


def _sampler(num, rng):
    return {"p": rng.standard_normal((num, 2))}


def test_family_rejects_bad_construction():
    p = cp.Parameter(2, name="p")
    Family("toy", _toy(p), {"p": p}, "qp", "small", _sampler)  # valid
    with pytest.raises(ValueError, match="kind"):
        Family("toy", _toy(p), {"p": p}, "milp", "small", _sampler)
    with pytest.raises(ValueError, match="size"):
        Family("toy", _toy(p), {"p": p}, "qp", "tiny", _sampler)
    with pytest.raises(ValueError, match="differ"):
        Family("toy", _toy(p), {}, "qp", "small", _sampler)
    unnamed = cp.Parameter(2)
    with pytest.raises(ValueError, match="explicit name"):
        Family("toy", _toy(unnamed), {unnamed.name(): unnamed}, "qp", "small", _sampler)
    sym = cp.Parameter((2, 2), symmetric=True, name="S")
    x = cp.Variable(2)
    with pytest.raises(ValueError, match="attributes"):
        Family("toy", cp.Problem(cp.Minimize(cp.sum(sym @ x)), [x >= 0, x <= 1]), {"S": sym}, "lp", "small",
               _sampler)
    a, b = cp.Parameter(name="a"), cp.Parameter(name="b")
    not_dpp = cp.Problem(cp.Minimize(a * b * cp.sum(x)), [x >= 0, x <= 1])
    with pytest.raises(ValueError, match="DPP"):
        Family("toy", not_dpp, {"a": a, "b": b}, "lp", "small", _sampler)


def test_family_copies_the_callers_dicts():
    p = cp.Parameter(2, name="p")
    params = {"p": p}
    extras = {"k": 1}
    fam = Family("toy", _toy(p), params, "qp", "small", _sampler, extras=extras)
    params.clear()
    extras["k"] = 2
    assert "p" in fam.parameters
    assert fam.extras["k"] == 1
    with pytest.raises(TypeError):
        fam.extras["k"] = 3  # read-only


def test_sample_validates_the_sampler_output():
    p = cp.Parameter(2, name="p")
    bad_shape = Family("toy", _toy(p), {"p": p}, "qp", "small", lambda n, r: {"p": np.zeros((n, 3))})
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*'p'"):
        bad_shape.sample(4)
    bad_keys = Family("toy", _toy(p), {"p": p}, "qp", "small", lambda n, r: {"q": np.zeros((n, 2))})
    with pytest.raises(ValueError, match="keys"):
        bad_keys.sample(4)
    good = Family("toy", _toy(p), {"p": p}, "qp", "small", _sampler)
    with pytest.raises(ValueError, match="num"):
        good.sample(0)
    with pytest.raises(ValueError, match="shape"):
        good.assign({"p": np.zeros(3)})
    good.assign({"p": np.ones((4, 2))}, index=2)
    np.testing.assert_array_equal(p.value, np.ones(2))


# ---------------------------------------------------------------------------------- family-specific


def test_transport_samples_are_balanced_feasible(small_families):
    v = small_families["transport"].sample(500, seed=0)
    assert np.all(v["supply"].sum(axis=1) >= 1.05 * v["demand"].sum(axis=1) - 1e-9)
    assert np.all(v["cost"] > 0) and np.all(v["demand"] > 0) and np.all(v["supply"] > 0)


def test_sparse_pca_samples_are_symmetric_psd(small_families):
    A = small_families["sparse_pca"].sample(50, seed=0)["A"]
    np.testing.assert_allclose(A, np.swapaxes(A, 1, 2), atol=1e-12)
    assert np.linalg.eigvalsh(A).min() > -1e-9


def test_mass_chain_matches_a_fine_euler_integration():
    # Two masses between walls, unit springs, one tension actuator, written out by hand.
    Ac = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [-2, 1, -0.1, 0], [1, -2, 0, -0.1]], dtype=float)
    Bc = np.array([[0], [0], [1], [-1]], dtype=float)
    dt, k = 0.5, 20
    h = dt / 2**k
    step = np.eye(5)
    step[:4, :4] += h * Ac
    step[:4, 4:] = h * Bc
    for _ in range(k):  # (I + h M)^(2^k) by repeated squaring: Euler with 2^k steps, error O(h)
        step = step @ step
    A, B = mass_chain(2, dt=dt, damping=0.1)
    np.testing.assert_allclose(A, step[:4, :4], atol=1e-5)
    np.testing.assert_allclose(B, step[:4, 4:], atol=1e-5)


def test_mpc_sampler_forms_closed_loop_trajectories(small_families):
    fam = small_families["mpc"]
    assert fam.sequential
    system = fam.extras["system"]
    states = lqr_trajectories(system, 2 * system.episode_length, np.random.default_rng(0))
    np.testing.assert_array_equal(states, fam.sample(2 * system.episode_length, seed=0)["x0"])
    m = system.nx // 2
    x, x_next = states[:-1], states[1:]
    u = np.clip(-x @ system.K.T, -system.u_max, system.u_max)
    resid = x_next - mpc_next_state(system, x, u)
    within = np.arange(len(x)) % system.episode_length != system.episode_length - 1
    # Within an episode only the velocity disturbance separates consecutive states.
    np.testing.assert_allclose(resid[within][:, :m], 0.0, atol=1e-12)
    assert 0.03 < resid[within][:, m:].std() < 0.3
    # Across the boundary a fresh episode starts.
    assert np.abs(resid[~within]).max() > 0.1


def test_mpc_closed_loop_simulation(small_families):
    fam = small_families["mpc"]
    system = fam.extras["system"]
    x0 = np.concatenate([np.ones(system.nx // 2), np.zeros(system.nx // 2)])
    states, inputs = simulate_closed_loop(fam, x0, 12, disturbance=False)
    assert states.shape == (12, system.nx) and inputs.shape == (12, system.nu)
    np.testing.assert_array_equal(states[0], x0)
    np.testing.assert_allclose(states[1:], mpc_next_state(system, states[:-1], inputs[:-1]), atol=1e-12)
    assert np.all(np.abs(inputs) <= system.u_max + 1e-9)
    assert np.abs(inputs).max() > 0.45  # the input bound is active at the start
    # The controller removes energy: the state shrinks over the run.
    assert np.linalg.norm(states[-1]) < 0.5 * np.linalg.norm(states[0])
    with pytest.raises(ValueError, match="x0"):
        simulate_closed_loop(fam, np.zeros(3), 2)
    with pytest.raises(ValueError, match="MPC"):
        simulate_closed_loop(small_families["lasso"], np.zeros(3), 2)


def test_mpc_param_dyn_samples_are_stable_chain_dynamics(small_families):
    fam = small_families["mpc_param_dyn"]
    A = fam.sample(20, seed=0)["A_dyn"]
    radius = np.abs(np.linalg.eigvals(A)).max(axis=1)
    assert np.all(radius <= 1.0 + 1e-9)  # springs and nonnegative damping: no growth
    nominal = fam.extras["system"].A
    assert np.all(np.abs(A - nominal).max(axis=(1, 2)) > 1e-3)
