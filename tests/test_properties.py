"""Property-based tests (hypothesis): any parameter input gives a clear error or a correct answer.

Random shapes, dtypes (float32 / float64 / int / bool / complex, numpy, torch, lists), NaN / inf, values
that break a parameter's sign, missing / unknown parameters, mismatched, empty and large batches are thrown at
``ParametricProblem.parameter_vector`` / ``canonicalize`` and at ``AmortizedSolver.solve`` (no predictor,
``k = 0``). Accepted outcomes: a ``ValueError`` / ``TypeError`` whose message names the parameter at fault (or
says the batch is empty), or, for valid input, a result per instance: canonical data consistent with a
float64, one-instance-at-a-time canonicalization, and ``optimal`` solves whose objective equals CVXPY's
(Clarabel) within 1e-3 relative. (There is no torch layer to test yet.)
"""

from __future__ import annotations

import os

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver

pytest.importorskip("hypothesis", reason="hypothesis is not installed (the README's install has no extras; "
                                         "`pip install -e .[test]` adds it, as .ci/run does)")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SHAPES = {"a": (5,), "q": (), "B": (2, 3)}
RANGES = {"a": (-5.0, 5.0), "q": (0.0, 3.0), "B": (-3.0, 3.0)}
REPRESENTATIONS = ("float64", "float32", "int64", "int32", "bool", "list", "python", "torch64", "torch32",
                   "torch_int")
FAULTS = ("none", "none", "none", "nan", "inf", "negative", "complex", "shape", "batch_mismatch", "empty",
          "missing", "unknown", "non_numeric")
SOLVER_EPS = {"eps_abs": 1e-7, "eps_rel": 1e-7}
#: AMORTCVX_HYPOTHESIS_EXAMPLES=1000 for a longer hunt.
PROPERTY = settings(max_examples=int(os.environ.get("AMORTCVX_HYPOTHESIS_EXAMPLES", 30)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make_problem() -> cp.Problem:
    """A 5-variable QP: a vector parameter, a scalar nonneg one, and a matrix one entering the constraints.

    ``x = 0`` is always feasible and the objective is strongly convex, so every valid instance has one optimum.
    """
    x = cp.Variable(5, name="x")
    a = cp.Parameter(5, name="a")
    q = cp.Parameter(nonneg=True, name="q")
    B = cp.Parameter((2, 3), name="B")
    return cp.Problem(cp.Minimize(cp.sum_squares(x - a) + q * cp.norm1(x)), [B @ x[:3] <= 1, x >= -2, x <= 2])


@pytest.fixture(scope="module")
def setup():
    problem = make_problem()
    pps = {"cone": ParametricProblem(problem, form="cone"), "qp": ParametricProblem(problem, form="qp")}
    solvers = {alg: AmortizedSolver(pps[form], algorithm=alg, k=0, solver_settings=SOLVER_EPS)
               for alg, form in (("scs", "cone"), ("osqp", "qp"))}
    reference = make_problem()  # separate parameter objects for the Clarabel solves
    return pps, solvers, reference


# ---------------------------------------------------------------------- generated cases
def _represent(values: np.ndarray, how: str):
    """``values`` (float64) as the user might pass them; returns (value, the float64 array it stands for)."""
    if how in ("int64", "int32", "torch_int"):
        values = np.round(values)
    if how == "bool":
        values = (values > 0).astype(np.float64)
    if how in ("float64", "float32", "int64", "int32", "bool"):
        out = values.astype(how)
        return out, out.astype(np.float64)
    if how == "list" or (how == "python" and values.ndim > 0):
        return values.tolist(), values
    if how == "python":
        return float(values), values
    dtype = {"torch64": torch.float64, "torch32": torch.float32, "torch_int": torch.int64}[how]
    out = torch.tensor(values, dtype=dtype)
    return out, out.double().numpy()


class Case:
    """Parameter values handed to the library, the float64 values they mean, and the expected outcome."""

    def __init__(self, values: dict, meaning: dict, batch: int | None, fault: str, names: set[str]):
        self.values, self.meaning, self.batch, self.fault, self.names = values, meaning, batch, fault, names

    def __repr__(self) -> str:
        def show(v):
            if isinstance(v, (np.ndarray, torch.Tensor)):
                return f"{type(v).__name__}{tuple(v.shape)} {v.dtype}"
            return f"{type(v).__name__} {str(v)[:40]}"
        return f"Case(fault={self.fault}, batch={self.batch}, " + ", ".join(
            f"{k}: {show(v)}" for k, v in self.values.items()) + ")"


@st.composite
def cases(draw, large: tuple[int, int] = (256, 512)) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fault = draw(st.sampled_from(FAULTS))
    batch = draw(st.sampled_from([None, 1, 2, 3, "large"]))
    if batch == "large":
        batch = draw(st.integers(*large))
    if fault == "empty":
        batch = 0
    batched = {name: batch is not None and draw(st.booleans()) for name in SHAPES}
    if batch is not None and not any(batched.values()):
        batched[draw(st.sampled_from(sorted(SHAPES)))] = True
    if fault == "empty":
        batched["a"] = True
    target = draw(st.sampled_from(sorted(SHAPES)))
    values, meaning, names = {}, {}, {target}
    for name, shape in SHAPES.items():
        lo, hi = RANGES[name]
        full = (batch, *shape) if batched[name] else shape
        raw = rng.uniform(lo, hi, size=full)
        how = draw(st.sampled_from(REPRESENTATIONS))
        values[name], meaning[name] = _represent(raw, how)
    v = np.array(meaning[target], dtype=np.float64)
    if fault in ("nan", "inf"):
        if v.size == 0:
            fault = "none"
        else:
            v.flat[rng.integers(v.size)] = np.nan if fault == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
            values[target] = draw(st.sampled_from([v, torch.tensor(v), v.tolist() if v.ndim else float(v)]))
    elif fault == "negative":
        names = {"q"}
        q = np.array(meaning["q"], dtype=np.float64)
        q.flat[rng.integers(q.size)] = -draw(st.floats(1e-6, 10.0))
        values["q"] = draw(st.sampled_from([q, torch.tensor(q, dtype=torch.float32)]))
    elif fault == "complex":
        imag = draw(st.sampled_from([0.0, 1.0]))
        c = v + 1j * imag
        values[target] = draw(st.sampled_from([c, torch.tensor(c, dtype=torch.complex64), c.tolist()]))
    elif fault == "shape":
        kind = "extra_axes" if target == "q" else draw(st.sampled_from(["extra_axes", "shrink"]))
        bad = v[..., None, None] if kind == "extra_axes" else v[..., :-1]
        values[target] = draw(st.sampled_from([bad, torch.tensor(bad)]))
    elif fault == "batch_mismatch":
        other = draw(st.sampled_from(sorted(set(SHAPES) - {target})))
        b1 = batch or 1
        b2 = b1 + draw(st.integers(1, 3))
        for name, size in ((target, b1), (other, b2)):
            lo, hi = RANGES[name]
            values[name] = rng.uniform(lo, hi, size=(size, *SHAPES[name]))
        names = {target, other} | {name for name, b in batched.items() if b}  # any of them differs
    elif fault == "empty":  # a clear error that says so, or one that names a batched parameter
        names = {name for name, b in batched.items() if b}
    elif fault == "missing":
        del values[target]
    elif fault == "unknown":
        names = {"nope"}
        values["nope"] = np.ones(2)
    elif fault == "non_numeric":
        values[target] = draw(st.sampled_from(["abc", None, [[1.0, 2.0], [3.0]], np.array(["x"] * 5, dtype=object),
                                               {"value": 1.0}]))
    if fault != "none":
        meaning = {}
    return Case(values, meaning, batch, fault, names)


def _expect_clear_error(case: Case, exc: BaseException) -> None:
    assert isinstance(exc, (ValueError, TypeError)), f"{case}: {type(exc).__name__}: {exc}"
    msg = str(exc)
    if case.fault == "empty" and "empty batch" in msg:
        return
    assert any(repr(name) in msg for name in case.names), f"{case}: the message names none of " \
                                                          f"{sorted(case.names)}: {msg}"


def _rows(case: Case) -> int:
    return 1 if case.batch is None else case.batch


def _row(case: Case, i: int) -> dict[str, np.ndarray]:
    """Instance ``i`` of a valid case, as float64 arrays of the parameters' own shapes."""
    out = {}
    for name, v in case.meaning.items():
        v = np.asarray(v, dtype=np.float64)
        out[name] = v if v.shape == SHAPES[name] else v[i]
    return out


# ---------------------------------------------------------------------- properties
@PROPERTY
@given(case=cases(large=(1000, 5000)), form=st.sampled_from(["cone", "qp"]))
def test_canonicalize_gives_a_clear_error_or_consistent_data(setup, case, form):
    pp = setup[0][form]
    event(f"fault {case.fault}")
    try:
        theta = pp.parameter_vector(case.values)
        data = pp.canonicalize(case.values)
    except Exception as exc:  # noqa: BLE001 - the property: which exceptions come out
        if case.fault == "none":  # (bool values are read as 0 / 1; every valid case here must be accepted)
            raise
        _expect_clear_error(case, exc)
        return
    assert case.fault == "none", f"{case} was accepted"
    rows = _rows(case)
    assert theta.shape == (rows, pp.num_params) and data.batch_size == rows
    assert theta.is_floating_point() and bool(torch.isfinite(theta).all())
    for i in sorted({0, rows - 1}):  # batched / broadcast input == one float64 instance at a time
        one = pp.parameter_vector(_row(case, i))
        tol = 1e-6 if theta.dtype == torch.float32 else 0.0
        torch.testing.assert_close(theta[i:i + 1].double(), one, rtol=tol, atol=tol)
        if theta.dtype == torch.float64:
            single = pp.canonicalize(_row(case, i))
            vec = data.c if form == "cone" else data.q
            torch.testing.assert_close(vec[i:i + 1], single.c if form == "cone" else single.q)
            torch.testing.assert_close(data.A.values[i:i + 1], single.A.values)


@PROPERTY
@given(case=cases(large=(100, 300)), algorithm=st.sampled_from(["scs", "osqp"]))
def test_solve_gives_a_clear_error_or_the_optimum(setup, case, algorithm):
    _, solvers, reference = setup
    event(f"fault {case.fault}")
    try:
        out = solvers[algorithm].solve(case.values)
    except Exception as exc:  # noqa: BLE001 - the property: which exceptions come out
        if case.fault == "none":
            raise
        _expect_clear_error(case, exc)
        return
    assert case.fault == "none", f"{case} was accepted"
    rows = _rows(case)
    assert len(out.results) == rows
    statuses = [str(r.status) for r in out.results]
    assert statuses == ["optimal"] * rows, (case, statuses)
    params = {p.name(): p for p in reference.parameters()}
    for i in sorted({0, rows // 2, rows - 1}):
        for name, value in _row(case, i).items():
            params[name].value = value
        want = reference.solve(solver=cp.CLARABEL)
        got = out.results[i].objective
        assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (case, i, got, want)


# ---------------------------------------------------------------------- found by the properties
def test_empty_batch_of_a_sign_constrained_parameter_is_a_clear_error(setup):
    pp = setup[0]["cone"]
    with pytest.raises(ValueError, match="empty batch"):
        pp.parameter_vector({"a": np.ones((0, 5)), "q": np.ones(0), "B": np.ones((2, 3))})


def test_huge_batch_canonicalizes():
    pp = ParametricProblem(make_problem(), form="qp")
    rng = np.random.default_rng(0)
    n = 100_000
    data = pp.canonicalize({"a": rng.normal(size=(n, 5)), "q": rng.uniform(0, 1, n), "B": np.ones((2, 3))})
    assert data.batch_size == n and bool(torch.isfinite(data.q).all())
