"""Tests of the check families (``problems.CHECK_FAMILIES``): the problems the training recipe is checked on.

They must build and sample like the bundled families, solve, canonicalize, put their parameters where their
docs say, and have the property that makes each one a check of a different kind.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.problems import Family

CHECK = problems.check_names()

# The kind of each, and which canonical pieces depend on parameters (documented in docs/problems.md).
EXPECTED = {
    "huber_fit": ("qp", {"A", "b"}),
    "max_entropy": ("exp", {"b", "c"}),
    "degenerate_lp": ("lp", {"b", "c"}),
    "active_set_qp": ("qp", {"b", "c"}),
}


@pytest.fixture(scope="module")
def small() -> dict[str, Family]:
    return {name: problems.make(name, "small", seed=0) for name in CHECK}


def test_check_set_is_separate_from_the_bundled_families():
    assert CHECK == sorted(EXPECTED)
    assert not set(CHECK) & set(problems.names())
    assert not set(CHECK) & set(problems.FAMILIES)


@pytest.mark.parametrize("name", CHECK)
def test_contract_kind_and_landing(name, small):
    fam = small[name]
    kind, landing = EXPECTED[name]
    assert fam.name == name and fam.kind == kind and fam.kind in problems.KINDS and fam.description
    assert fam.problem.is_dpp()
    dep = ParametricProblem(fam.problem, "cone").dependent
    assert {k for k, v in dep.items() if v} == landing


@pytest.mark.parametrize("name", CHECK)
def test_sampler_is_seeded(name, small):
    fam = small[name]
    a, b, c = fam.sample(4, seed=7), fam.sample(4, seed=7), fam.sample(4, seed=8)
    for key, p in fam.parameters.items():
        assert a[key].shape == (4, *p.shape)
        np.testing.assert_array_equal(a[key], b[key])
        assert not np.allclose(a[key][0], a[key][1])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    other = problems.make(name, "small", seed=1).extras  # the family seed fixes the constant data
    same = problems.make(name, "small", seed=0).extras
    for key, value in fam.extras.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, same[key])
    assert any(isinstance(v, np.ndarray) and not np.array_equal(v, other[k]) for k, v in fam.extras.items())


@pytest.mark.parametrize("name", CHECK)
def test_instances_solve_and_canonicalize(name, small):
    """SCS solves sampled instances, and the batched canonical data of amortcvx match CVXPY's own per instance."""
    fam = small[name]
    params = fam.sample(3, seed=2)
    pp = ParametricProblem(fam.problem, "cone")
    data = pp.canonicalize_vector(pp.parameter_vector(params, dtype=torch.float64))
    for i in range(3):
        fam.assign(params, i)
        fam.problem.solve(solver=cp.CLARABEL)
        assert fam.problem.status == cp.OPTIMAL
        ref, _, _ = fam.problem.get_problem_data(cp.SCS)
        inst = data.instance(i)
        np.testing.assert_allclose(np.asarray(inst.b), ref["b"], atol=1e-12)
        np.testing.assert_allclose(np.asarray(inst.c), ref["c"], atol=1e-12)


def test_large_sizes_build():
    for name in CHECK:
        fam = problems.make(name, "large", seed=0)
        small_n = sum(v.size for v in problems.make(name, "small").problem.variables())
        assert sum(v.size for v in fam.problem.variables()) > small_n
        assert fam.sample(1, seed=0).keys() == fam.parameters.keys()


def _solve(fam: Family, params, i: int) -> np.ndarray:
    fam.assign(params, i)
    fam.problem.solve(solver=cp.CLARABEL)
    return np.asarray(fam.problem.variables()[0].value)


def test_active_set_changes_between_instances(small):
    """active_set_qp: many bounds active, on a different set of coordinates in (almost) every instance."""
    fam = small["active_set_qp"]
    params = fam.sample(12, seed=0)
    sets = {tuple(np.abs(_solve(fam, params, i)) > 1 - 1e-6) for i in range(12)}
    assert len(sets) == 12
    assert np.mean([sum(s) for s in sets]) >= 0.2 * fam.parameters["q"].shape[0]


def test_degenerate_lp_is_degenerate(small):
    """degenerate_lp: at the optimum more inequalities are tight than there are variables (primal degeneracy)
    in most instances."""
    fam = small["degenerate_lp"]
    A = fam.extras["A"]
    params = fam.sample(8, seed=0)
    degenerate = 0
    for i in range(8):
        x = _solve(fam, params, i)
        tight = ((np.abs(A @ x - params["b"][i]) < 1e-6).sum() + (np.abs(x) < 1e-6).sum()
                 + (np.abs(x - 1) < 1e-6).sum())
        degenerate += tight > x.shape[0]
    assert degenerate >= 4
