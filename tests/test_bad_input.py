"""Bad input is refused early with errors that name what is at fault (issue 10's reliability items)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx.canon import ParametricProblem


def norm_problem(**attrs) -> tuple[cp.Problem, cp.Parameter]:
    y = cp.Variable(3, name="y")
    q = cp.Parameter(name="q", **attrs)
    return cp.Problem(cp.Minimize(q * cp.norm(y - 1, 2) + cp.sum_squares(y))), q


# ---------------------------------------------------------------------- parameter attributes
def test_nonneg_parameter_refuses_a_negative_instance_naming_parameter_and_position():
    prob, _ = norm_problem(nonneg=True)
    pp = ParametricProblem(prob)
    pp.parameter_vector({"q": np.array([0.0, 2.0])})  # fine: both >= 0
    with pytest.raises(ValueError, match=r"'q'.*nonneg.*position\(s\) \[0\]"):
        pp.parameter_vector({"q": -1.0})
    with pytest.raises(ValueError, match=r"'q'.*nonneg.*position\(s\) \[1, 3\]"):
        pp.canonicalize({"q": torch.tensor([1.0, -1.0, 0.0, -2.0])})


@pytest.mark.parametrize("attr, good, bad", [
    ("pos", 1.0, 0.0), ("nonpos", 0.0, 0.5), ("neg", -1.0, 0.0)])
def test_sign_attributes_are_checked_per_instance(attr, good, bad):
    y = cp.Variable(2, name="y")
    q = cp.Parameter(name="q", **{attr: True})
    pp = ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(y) + q * cp.sum(y))))
    pp.parameter_vector({"q": np.array([good, good])})
    with pytest.raises(ValueError, match=rf"'q'.*{attr}=True.*position\(s\) \[1\]"):
        pp.parameter_vector({"q": np.array([good, bad])})


def test_parameter_bounds_are_checked_per_instance():
    y = cp.Variable(2, name="y")
    b = cp.Parameter(2, name="b", bounds=[np.zeros(2), np.array([1.0, 2.0])])
    pp = ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - b))))
    pp.parameter_vector({"b": np.array([[0.5, 2.0], [1.0, 0.0]])})
    with pytest.raises(ValueError, match=r"'b'.*bounds.*upper.*position\(s\) \[1\]"):
        pp.parameter_vector({"b": np.array([[0.5, 2.0], [1.5, 0.0]])})
    with pytest.raises(ValueError, match=r"'b'.*bounds.*lower.*position\(s\) \[0\]"):
        pp.parameter_vector({"b": np.array([[-0.5, 2.0], [1.0, 0.0]])})


# ---------------------------------------------------------------------- complex values
def test_complex_numpy_and_torch_values_are_refused_naming_the_parameter():
    prob, _ = norm_problem(nonneg=True)
    pp = ParametricProblem(prob)
    with pytest.raises(ValueError, match=r"parameter 'q' has complex values"):
        pp.parameter_vector({"q": np.array([1.0 + 2.0j])[0]})
    with pytest.raises(ValueError, match=r"parameter 'q' has complex values"):
        pp.parameter_vector({"q": np.array([1.0 + 0.0j, 2.0])})
    with pytest.raises(ValueError, match=r"parameter 'q' has complex values"):
        pp.parameter_vector({"q": torch.tensor([1.0 + 1.0j])})


# ---------------------------------------------------------------------- integer / boolean variables
@pytest.mark.parametrize("form", ["cone", "qp"])
@pytest.mark.parametrize("kind", ["integer", "boolean"])
def test_integer_and_boolean_variables_are_refused(form, kind):
    x = cp.Variable(3, name="xi", **{kind: True})
    z = cp.Variable(name="z")
    c = cp.Parameter(3, name="c")
    prob = cp.Problem(cp.Minimize(c @ x + cp.square(z)), [x >= 0, x <= 1, z >= 1])
    with pytest.raises(ValueError, match=rf"continuous convex.*'xi \({kind}=True\)'") as info:
        ParametricProblem(prob, form=form)
    assert "SOC" not in str(info.value) and "'z" not in str(info.value)


# ---------------------------------------------------------------------- non-DCP problems
def test_non_dcp_problem_is_reported_as_not_convex_with_the_offending_parts():
    y = cp.Variable(2, name="y")
    q = cp.Parameter(nonneg=True, name="q")
    prob = cp.Problem(cp.Minimize(q * cp.sqrt(y[0])), [cp.square(y[1]) == q, y >= 0])
    with pytest.raises(ValueError, match=r"not convex.*DCP") as info:
        ParametricProblem(prob)
    msg = str(info.value)
    assert "not DPP" not in msg
    assert str(prob.objective) in msg and str(prob.constraints[0]) in msg
    assert str(prob.constraints[1]) not in msg


def test_dcp_but_not_dpp_is_still_reported_as_not_dpp():
    y = cp.Variable(2, name="y")
    a, b = cp.Parameter(name="a"), cp.Parameter(name="b")
    prob = cp.Problem(cp.Minimize(a * b * cp.sum(y) + cp.sum_squares(y)))
    with pytest.raises(ValueError, match="not DPP"):
        ParametricProblem(prob)


# ---------------------------------------------------------------------- maximization
def portfolio_max(n: int = 30, k: int = 5, seed: int = 0) -> cp.Problem:
    rng = np.random.default_rng(seed)
    w = cp.Variable(n, name="w")
    mu = cp.Parameter(n, name="mu")
    F = rng.normal(size=(k, n)) / np.sqrt(n)
    return cp.Problem(cp.Maximize(mu @ w - cp.sum_squares(F @ w)), [cp.sum(w) == 1, w >= 0])


def test_objective_sign_and_dataset_objective_carry_cvxpy_sign(tmp_path):
    from amortcvx.datasets import Dataset, generate_dataset

    prob = portfolio_max()
    pp = ParametricProblem(prob)
    assert pp.objective_sign == -1.0
    assert ParametricProblem(norm_problem(nonneg=True)[0]).objective_sign == 1.0
    mu = np.random.default_rng(1).normal(0.1, 0.2, size=(4, 30))
    ds = generate_dataset(pp, {"mu": mu}, "scs", tmp_path, workers=1, progress=False)
    assert ds.manifest["objective_sign"] == -1.0
    ref = []
    for row in mu:
        prob.param_dict["mu"].value = row
        ref.append(prob.solve(solver=cp.CLARABEL))
    assert ds.ok.all()
    np.testing.assert_allclose(ds.objective, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(ref) > 0)  # the sign matters here: a maximized positive value
    np.testing.assert_allclose(Dataset.open(ds.path, pp).objective, ref, rtol=1e-5, atol=1e-6)
    # recover() attaches the value as given (CVXPY's sign, which the caller computes with objective_sign)
    sol = pp.recover(ds.x[0], ds.y[0], value=ds.objective[0])
    assert sol.value == pytest.approx(ref[0], rel=1e-5)


def test_datasets_without_objective_sign_are_converted_with_the_problem(tmp_path):
    import json

    from amortcvx.datasets import Dataset, generate_dataset

    prob = portfolio_max()
    pp = ParametricProblem(prob)
    mu = np.random.default_rng(1).normal(0.1, 0.2, size=(2, 30))
    ds = generate_dataset(pp, {"mu": mu}, "scs", tmp_path, workers=1, progress=False)
    # a folder of an older amortcvx: no objective_sign in the manifest, so the stored values are taken as
    # canonical (minimization) values
    man = json.loads((ds.path / "manifest.json").read_text())
    del man["objective_sign"]
    (ds.path / "manifest.json").write_text(json.dumps(man))
    np.testing.assert_array_equal(Dataset.open(ds.path, verify=False).objective, ds.objective)  # as stored
    np.testing.assert_array_equal(Dataset.open(ds.path, pp, verify=False).objective, -ds.objective)


# ---------------------------------------------------------------------- datasets
def tiny_qp() -> ParametricProblem:
    x = cp.Variable(3, name="x")
    c = cp.Parameter(3, name="c")
    return ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(x) + c @ x), [x >= -1]), form="cone")


def test_truncated_chunk_without_verification_names_the_chunk_file(tmp_path):
    from amortcvx.datasets import Dataset, DatasetError, generate_dataset

    pp = tiny_qp()
    ds = generate_dataset(pp, {"c": np.random.default_rng(0).normal(size=(6, 3))}, "scs", tmp_path,
                          chunk_size=3, workers=1, progress=False)
    chunk = ds.path / "chunk-00001.npz"
    chunk.write_bytes(chunk.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"chunk-00001\.npz.*(damaged|truncated)"):
        Dataset.open(ds.path, allow_partial=True, verify=False)


def test_setting_typo_leaves_nothing_behind_so_the_corrected_rerun_works(tmp_path):
    from amortcvx.datasets import generate_dataset

    pp = tiny_qp()
    params = {"c": np.random.default_rng(0).normal(size=(4, 3))}
    with pytest.raises(ValueError, match="eps_abz"):
        generate_dataset(pp, params, "scs", tmp_path, settings={"eps_abz": 1e-6}, workers=1, progress=False)
    assert not any(tmp_path.rglob("manifest.json"))
    ds = generate_dataset(pp, params, "scs", tmp_path, settings={"eps_abs": 1e-6}, workers=1, progress=False)
    assert ds.ok.all() and ds.settings["eps_abs"] == 1e-6


def test_dataset_parameters_are_checked_against_their_attributes_before_writing(tmp_path):
    from amortcvx.datasets import generate_dataset

    prob, _ = norm_problem(nonneg=True)
    pp = ParametricProblem(prob)
    with pytest.raises(ValueError, match=r"'q'.*nonneg.*position\(s\) \[2\]"):
        generate_dataset(pp, {"q": np.array([1.0, 0.0, -1.0])}, "scs", tmp_path, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"'q' has complex values"):
        generate_dataset(pp, {"q": np.array([1.0, 2.0j])}, "scs", tmp_path, workers=1, progress=False)
    assert not any(tmp_path.rglob("manifest.json"))


SCRIPT_WITHOUT_GUARD = """
import numpy as np, cvxpy as cp
from amortcvx.canon import ParametricProblem
from amortcvx.datasets import generate_dataset
x = cp.Variable(3, name="x")
c = cp.Parameter(3, name="c")
pp = ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(x) + c @ x), [x >= -1]))
generate_dataset(pp, {"c": np.ones((8, 3))}, "scs", ROOT, workers=2, progress=False)
"""


def test_script_without_main_guard_gets_the_hint_not_a_lock_error(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "noguard.py"
    script.write_text(SCRIPT_WITHOUT_GUARD.replace("ROOT", repr(str(tmp_path / "data"))))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "__main__" in proc.stderr
    assert "another process is generating" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------- optional Ray
def test_ray_test_skips_with_a_reason_when_ray_is_missing(monkeypatch):
    import sys

    from test_datasets import test_ray_gives_the_same_dataset_as_processes

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without Ray installed
    with pytest.raises(pytest.skip.Exception, match="Ray is not installed"):
        test_ray_gives_the_same_dataset_as_processes(None, None)
