"""Canonicalization: batched torch data equal CVXPY's get_problem_data, inverse maps, validation."""

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from amortcvx import problems
from amortcvx.canon import ConeData, ParametricProblem, QPData

FORMS_BY_KIND = {"qp": ("cone", "qp"), "lp": ("cone", "qp"), "socp": ("cone",), "sdp": ("cone",)}
CASES = [(name, form) for name in problems.names() for form in FORMS_BY_KIND[problems.make(name).kind]]


def reference_data(prob: cp.Problem, form: str) -> dict:
    """CVXPY's own canonical data for the current parameter values, in our container's convention."""
    if form == "cone":
        data, _, _ = prob.get_problem_data(cp.SCS)
        return {"A": data["A"].toarray(), "b": data["b"], "c": data["c"],
                "P": data["P"].toarray() if "P" in data else None}
    data, _, _ = prob.get_problem_data(cp.OSQP)
    a = sp.vstack([data["A"], data["F"]]).toarray()
    lower = np.concatenate([data["b"], -np.inf * np.ones(data["G"].shape)])
    upper = np.concatenate([data["b"], data["G"]])
    return {"A": a, "l": lower, "u": upper, "q": data["q"], "P": data["P"].toarray()}


def assert_same(ours: np.ndarray, ref: np.ndarray, what: str):
    ours, ref = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    assert ours.shape == ref.shape, what
    assert np.array_equal(np.isinf(ours), np.isinf(ref)), what
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], atol=1e-9, rtol=1e-9, err_msg=what)


@pytest.mark.parametrize("name,form", CASES)
def test_batched_data_equal_cvxpy(name, form):
    fam = problems.make(name)
    pp = ParametricProblem(fam.problem, form)
    batch = fam.sample(3, seed=1)
    data = pp.canonicalize(batch)
    assert isinstance(data, ConeData if form == "cone" else QPData)
    assert data.batch_size == 3
    for i in range(3):
        for pname, par in fam.parameters.items():
            par.value = batch[pname][i]
        ref = reference_data(fam.problem, form)
        assert_same(data.A.matrix(i).toarray(), ref["A"], f"{name}/{form} A[{i}]")
        if form == "cone":
            assert_same(data.b[i], ref["b"], "b")
            assert_same(data.c[i], ref["c"], "c")
        else:
            assert_same(data.q[i], ref["q"], "q")
            assert_same(data.l[i], ref["l"], "l")
            assert_same(data.u[i], ref["u"], "u")
        if ref["P"] is not None and np.abs(ref["P"]).sum() > 0:
            assert data.P is not None
            assert_same(data.P.matrix(i).toarray(), ref["P"], "P")
        else:
            assert data.P is None or np.abs(data.P.matrix(i).toarray()).sum() == 0


def test_some_family_has_parameter_in_matrix():
    dependent = [ParametricProblem(problems.make(n).problem, "cone").dependent for n in problems.names()]
    assert any(d["A"] or d["P"] for d in dependent)


def _toy():
    a = cp.Parameter((2, 3), name="a")
    b = cp.Parameter(2, name="b")
    x = cp.Variable(3, name="x")
    cons = [x >= -1, cp.sum(x) == 1]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(a @ x - b) + cp.norm1(x)), cons)
    return prob, a, b, x


def test_fast_path_shares_matrices():
    b = cp.Parameter(2, name="b")
    x = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(np.ones((2, 3)) @ x - b)), [x >= 0])
    pp = ParametricProblem(prob, "qp")
    assert pp.dependent == {"c": False, "A": False, "b": True, "P": False}
    data = pp.canonicalize({"b": np.random.default_rng(0).normal(size=(5, 2))})
    assert data.A.shared and data.A.values.stride(0) == 0  # one copy, expanded over the batch


def test_gradients_flow_to_parameters():
    prob, *_ = _toy()
    pp = ParametricProblem(prob, "cone")
    a = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def f(a, b):
        d = pp.canonicalize({"a": a, "b": b})
        return d.A.values.sum(1) + (d.b ** 2).sum(1)

    assert torch.autograd.gradcheck(f, (a, b))


def test_unbatched_and_dtype_device():
    prob, *_ = _toy()
    pp = ParametricProblem(prob, "cone")
    d = pp.canonicalize({"a": torch.ones(2, 3, dtype=torch.float32), "b": np.zeros(2)})
    assert d.batch_size == 1 and d.b.dtype == torch.float32 and d.A.values.dtype == torch.float32


def test_recover_matches_solve():
    prob, a, b, x = _toy()
    rng = np.random.default_rng(3)
    a.value, b.value = rng.normal(size=(2, 3)), rng.normal(size=2)
    for form, solver in (("cone", cp.SCS), ("qp", cp.OSQP)):
        pp = ParametricProblem(prob, form)
        prob.solve(solver=solver, eps_abs=1e-9, eps_rel=1e-9)
        raw = prob.solution.attr["solver_specific_stats"]
        xs, ys = (raw["x"], raw["y"]) if form == "cone" else (raw.x, raw.y)
        sol = pp.recover(xs, ys, value=prob.value)
        np.testing.assert_allclose(sol.variables["x"], x.value, atol=1e-12)
        for dual, con in zip(sol.duals, prob.constraints):
            np.testing.assert_allclose(dual, con.dual_value, atol=1e-12)
        # forward map of the CVXPY-space values gives back the canonical x on the original columns
        xc = pp.canonical_primal({"x": x.value})
        col = pp._prog.var_id_to_col[x.id]
        np.testing.assert_allclose(xc[col:col + 3], xs[col:col + 3], atol=1e-12)


def test_batched_variable_views_project_attributes_as_cvxpy_does():
    from amortcvx.canon.recover import project_recovered, variable_maps

    c = cp.Parameter(3, name="c")
    t = cp.Variable(nonneg=True, name="t")
    u = cp.Variable(3, bounds=[-1.0, 2.0], name="u")
    v = cp.Variable(2, name="v")
    prob = cp.Problem(cp.Minimize(c @ u + t + cp.sum_squares(v)), [t >= cp.norm1(u) - 1, cp.sum(v) == 1])
    pp = ParametricProblem(prob, "cone")
    x = np.random.default_rng(0).normal(scale=3.0, size=(6, pp.n))  # values outside the attributes' sets
    maps = variable_maps(pp, prob.variables())
    for var, amap in zip(prob.variables(), maps):
        batched = project_recovered(var, amap.apply(torch.from_numpy(x)).numpy())
        for i in range(6):
            expected = pp.recover(x[i], np.zeros(pp.m)).variables[var.name()]
            np.testing.assert_array_equal(batched[i], expected)
    assert (project_recovered(t, np.array([-1.0, 2.0])) == [0.0, 2.0]).all()
    free = np.array([[-5.0, 5.0]])
    assert project_recovered(v, free) is free  # no attribute: left as it is


def test_fingerprint_stable_and_sensitive():
    p1, *_ = _toy()
    p2, *_ = _toy()
    assert ParametricProblem(p1).fingerprint == ParametricProblem(p2).fingerprint
    assert ParametricProblem(p1, "cone").fingerprint != ParametricProblem(p1, "qp").fingerprint
    a = cp.Parameter((2, 3), name="a")
    b = cp.Parameter(2, name="b")
    x = cp.Variable(3, name="x")
    p3 = cp.Problem(cp.Minimize(cp.sum_squares(a @ x - b) + 2 * cp.norm1(x)), [x >= -1, cp.sum(x) == 1])
    assert ParametricProblem(p3).fingerprint != ParametricProblem(p1).fingerprint


def test_errors_are_clear():
    prob, a, b, x = _toy()
    pp = ParametricProblem(prob)
    with pytest.raises(ValueError, match="missing.*'b'"):
        pp.canonicalize({"a": np.ones((2, 3))})
    with pytest.raises(ValueError, match="unknown parameter 'c'"):
        pp.canonicalize({"a": np.ones((2, 3)), "b": np.ones(2), "c": 1.0})
    with pytest.raises(ValueError, match="'a' expects shape \\(2, 3\\)"):
        pp.canonicalize({"a": np.ones((3, 2)), "b": np.ones(2)})
    with pytest.raises(ValueError, match="batch size"):
        pp.canonicalize({"a": np.ones((4, 2, 3)), "b": np.ones((5, 2))})
    with pytest.raises(ValueError, match="'b' contains NaN"):
        pp.canonicalize({"a": np.ones((2, 3)), "b": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="not DPP"):  # convex (DCP) for every value, but not DPP
        p = cp.Parameter(name="p", nonneg=True)
        ParametricProblem(cp.Problem(cp.Minimize(p * p * cp.sum_squares(x))))
    with pytest.raises(ValueError, match="not convex"):  # p * p has no known sign: not DCP
        p = cp.Parameter(name="p")
        ParametricProblem(cp.Problem(cp.Minimize(p * p * cp.sum_squares(x))))
    with pytest.raises(ValueError, match="not a QP"):
        ParametricProblem(cp.Problem(cp.Minimize(cp.norm(a @ x - b))), "qp")
    with pytest.raises(ValueError, match="no cp.Parameter"):
        ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(x))))
    with pytest.raises(ValueError, match="unique"):
        q1, q2 = cp.Parameter(name="q"), cp.Parameter(name="q")
        ParametricProblem(cp.Problem(cp.Minimize(q1 * cp.sum(x) + q2 * x[0]), [x >= 0, x <= 1]))


def _attribute_problem(n: int = 4):
    S = cp.Parameter((n, n), PSD=True, name="S")
    D = cp.Parameter((n, n), diag=True, name="D")
    Y = cp.Parameter((n, n), symmetric=True, name="Y")
    q = cp.Parameter(n, nonneg=True, name="q")
    x = cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(D @ x) + q @ x), [cp.sum(x) == 1, x >= -1, S @ x <= 1, Y @ x >= -3])
    return prob, (S, D, Y, q)


@pytest.mark.parametrize("form", ["cone", "qp"])
def test_parameters_with_dimension_reducing_attributes(form):
    """PSD / symmetric / diag parameters (which CVXPY replaces by reduced ones) give CVXPY's data exactly."""
    n = 4
    prob, (S, D, Y, q) = _attribute_problem(n)
    pp = ParametricProblem(prob, form=form)
    assert pp.num_params == 10 + 4 + 10 + 4 and pp.parameter_shapes["S"] == (n, n)
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(3):
        G = rng.normal(size=(n, n))
        vals = {"S": G @ G.T, "D": np.diag(rng.uniform(1, 2, n)), "Y": G + G.T, "q": rng.uniform(0, 1, n)}
        batch.append(vals)
    stacked = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
    data = pp.canonicalize(stacked)
    for i, vals in enumerate(batch):
        for par in (S, D, Y, q):
            par.value = vals[par.name()]
        ref, _, _ = prob.get_problem_data(cp.SCS if form == "cone" else cp.OSQP)
        inst = data.instance(i)
        np.testing.assert_allclose(inst.P.toarray(), ref["P"].toarray(), atol=1e-12)
        if form == "cone":
            np.testing.assert_allclose(inst.A.toarray(), ref["A"].toarray(), atol=1e-12)
            np.testing.assert_allclose(inst.c, ref["c"], atol=1e-12)
    good = {k: v[0] for k, v in stacked.items()}
    asym = rng.normal(size=(n, n))
    for name, bad, what in (("S", -np.eye(n), "PSD=True"), ("D", np.ones((n, n)), "diag=True"),
                            ("Y", asym, "symmetric"), ("S", asym @ asym.T + np.triu(np.ones((n, n)), 1), "symmetric")):
        with pytest.raises(ValueError, match=f"parameter '{name}' is declared {what}.*batch position"):
            pp.parameter_vector({**good, name: bad})


@pytest.mark.parametrize("form", ["cone", "qp"])
def test_numpy_and_tensor_values_give_the_same_parameter_vector(form):
    """Numpy values take the numpy path (validation and flattening in numpy, one tensor at the end), so do CPU float64
    tensors without a graph; tensors with one the torch path: the same vector, also with reduced (PSD, diag,
    symmetric) parameters, a mix of batched and unbatched values, and a copy that later changes to the caller's
    arrays do not reach."""
    n = 4
    prob, _ = _attribute_problem(n)
    pp = ParametricProblem(prob, form=form)
    rng = np.random.default_rng(3)
    G = rng.normal(size=(3, n, n))
    values = {"S": G @ G.transpose(0, 2, 1), "D": np.diag(rng.uniform(1, 2, n)), "Y": G + G.transpose(0, 2, 1),
              "q": rng.uniform(0, 1, n)}
    from_numpy = pp.parameter_vector(values)
    from_tensors = pp.parameter_vector({k: torch.as_tensor(v) for k, v in values.items()})  # read as numpy
    from_torch = pp.parameter_vector({k: torch.tensor(v, requires_grad=True) for k, v in values.items()})
    assert from_numpy.shape == (3, pp.num_params) and from_numpy.dtype == torch.float64
    assert from_torch.requires_grad and not from_tensors.requires_grad
    torch.testing.assert_close(from_numpy, from_tensors, rtol=0, atol=0)
    torch.testing.assert_close(from_numpy, from_torch.detach(), rtol=0, atol=0)
    kept = from_numpy.clone()
    values["q"][:] = 7.0
    torch.testing.assert_close(from_numpy, kept, rtol=0, atol=0)
    bad = {**values, "S": -np.eye(n)}
    with pytest.raises(ValueError, match="parameter 'S' is declared PSD=True"):
        pp.parameter_vector(bad)
    with pytest.raises(ValueError, match="parameter 'q' contains NaN"):
        pp.parameter_vector({**values, "q": np.full(n, np.nan)})


def test_overflowing_qp_data_name_the_piece_and_lower_bounds_stay_infinite():
    x = cp.Variable(2)
    p = cp.Parameter(2, name="p")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x <= 1e10 * p, cp.sum(x) == p[0]])
    pp = ParametricProblem(prob, form="qp")
    data = pp.canonicalize({"p": np.array([[1.0, 2.0], [3.0, 4.0]])})
    eq = data.eq
    assert eq == 1 and np.isinf(data.l[:, eq:].numpy()).all() and (data.l[:, eq:] < 0).all()
    np.testing.assert_array_equal(data.l[:, :eq].numpy(), data.u[:, :eq].numpy())
    with pytest.raises(ValueError, match=r"instance 1: the canonical data \(u\) are not finite.*parameter 'p'"):
        pp.canonicalize({"p": np.array([[1.0, 2.0], [1.0, 1e300]])})


def test_sparse_parameter():
    A = cp.Parameter((3, 3), sparsity=([0, 1, 2], [0, 2, 1]), name="A")
    x = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - 1) + cp.sum_squares(x)))
    pp = ParametricProblem(prob)
    value = np.zeros((3, 3))
    value[0, 0], value[1, 2], value[2, 1] = 1.0, 2.0, 3.0
    assert pp.parameter_vector({"A": value}).tolist() == [[1.0, 2.0, 3.0]]  # the entries of the pattern, in its order
    A.value = value
    ref, _, _ = prob.get_problem_data(cp.SCS)
    np.testing.assert_allclose(pp.canonicalize({"A": value}).instance(0).A.toarray(), ref["A"].toarray())
    with pytest.raises(ValueError, match="'A' is declared sparsity="):
        pp.parameter_vector({"A": np.ones((3, 3))})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    prob, *_ = _toy()
    pp = ParametricProblem(prob)
    vals = {"a": torch.randn(4, 2, 3, dtype=torch.float64), "b": torch.randn(4, 2, dtype=torch.float64)}
    cpu = pp.canonicalize(vals)
    gpu = pp.canonicalize({k: v.cuda() for k, v in vals.items()})
    torch.testing.assert_close(gpu.A.values.cpu(), cpu.A.values)
    torch.testing.assert_close(gpu.b.cpu(), cpu.b)


def test_numpy_values_are_written_in_column_major_order_with_broadcasting():
    """The numpy path writes each parameter straight into its columns: scalars, vectors and matrices, batched or a
    batch of one broadcast, give CVXPY's column-major vector, as the torch path does."""
    a, v, s = cp.Parameter((3, 2), name="a"), cp.Parameter(3, name="v"), cp.Parameter(name="s")
    x = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(a @ x - v) + s * cp.sum(x)))
    pp = ParametricProblem(prob)
    rng = np.random.default_rng(0)
    values = {"a": rng.normal(size=(4, 3, 2)), "v": rng.normal(size=3), "s": rng.normal(size=4)}
    theta = pp.parameter_vector(values).numpy()
    expected = {"a": values["a"].transpose(0, 2, 1).reshape(4, 6), "v": np.tile(values["v"], (4, 1)),
                "s": values["s"][:, None]}
    order = [name for name, *_ in pp._layout]  # the parameters' column blocks, in order
    np.testing.assert_array_equal(theta, np.concatenate([expected[name] for name in order], axis=1))
    from_torch = pp.parameter_vector({k: torch.tensor(val, requires_grad=True) for k, val in values.items()})
    np.testing.assert_array_equal(theta, from_torch.detach().numpy())


def test_selection_maps_equal_the_sparse_product():
    """A map whose rows each hold at most one parameter is applied as a gather of columns: the same values as the
    sparse product, parameter-free rows at their constant even where theta's first column is not finite; maps with
    a row of two parameters, or with fewer parameters than half the rows, keep the product."""
    from amortcvx.canon.affine import AffineMap, _selection

    rng = np.random.default_rng(1)
    rows, cols = np.array([0, 1, 3, 4, 5]), np.array([2, 0, 1, 3, 2])
    dep = sp.csr_array((rng.normal(size=5), (rows, cols)), shape=(6, 4))
    const = rng.normal(size=(6, 1))
    amap = AffineMap(sp.hstack([dep, const]))
    assert amap._select is not None and amap._select.free.tolist() == [2]
    theta = torch.as_tensor(rng.normal(size=(5, 4)))
    expected = theta.numpy() @ dep.toarray().T + const[:, 0]
    np.testing.assert_allclose(amap(theta).numpy(), expected, rtol=1e-15, atol=1e-15)
    theta[1, 0] = np.nan
    out = amap(theta).numpy()
    assert out[1, 2] == const[2, 0] and np.isnan(out[1, 1]) and np.isfinite(out[0]).all()
    two = sp.csr_array(([1.0, 2.0], ([0, 0], [0, 1])), shape=(1, 2))
    assert _selection(two) is None
    few = sp.csr_array(([1.0], ([0], [0])), shape=(4, 1))  # one parameter, four rows
    assert _selection(few) is None
