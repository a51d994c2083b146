"""Active sets of LPs and QPs (``iterations.polish.ActiveSets``) and the predictor that stores them
(``predictors.NeighborActiveSet``)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.iterations.linalg import spmv
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors import NeighborActiveSet, NeighborCorrection, PredictorMeta, WarmStartPredictor, output_space
from amortcvx.predictors.fixed_point import predict
from amortcvx.predictors.model import mlp
from amortcvx.training.recipe import (
    ACTIVE_SET_KINDS,
    KINDS,
    Candidate,
    RecipeSettings,
    applies,
    c_iterations,
    fit_predictor,
    solved_source,
    training_splits,
    uncorrected_model,
)

TIGHT = {"eps_abs": 1e-10, "eps_rel": 1e-10}
EPS = {"eps_abs": 1e-4, "eps_rel": 1e-4}
FORMS = [("scs", "cone"), ("osqp", "qp")]


def _box_problem():
    """minimize 1/2 ||x||^2 + q'x  s.t.  x <= h, sum(x) == 0.5: a piecewise affine solution map."""
    q, h, x = cp.Parameter(4, name="q"), cp.Parameter(4, name="h"), cp.Variable(4, name="x")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [x <= h, cp.sum(x) == 0.5])


def _box_params(num: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.normal(size=(num, 4)), "h": rng.uniform(0.0, 0.5, size=(num, 4))}


def _solved(problem, algorithm: str, form: str, params, settings=TIGHT):
    pp = ParametricProblem(problem, form)
    return pp, solved_source(pp, algorithm, params, solver_settings=settings)(len(next(iter(params.values()))))


def _fields(solved) -> dict[str, torch.Tensor]:
    return {"x": solved.x, "y": solved.y} | ({} if solved.s is None else {"s": solved.s})


@pytest.mark.parametrize("algorithm, form", FORMS)
@pytest.mark.parametrize("family", ["box", "transport"])
def test_the_active_set_of_an_optimum_gives_the_optimum_back(algorithm, form, family):
    """``solve(of(optimum))`` is the optimum (a QP with an equality row, and an LP); the split marks the equality
    rows and the active inequality rows, and moving one active row out of the split moves the answer."""
    if family == "box":
        problem, params = _box_problem(), _box_params(12, 0)
    else:
        fam = problems.make("transport", "small", seed=0)
        problem, params = fam.problem, fam.sample(6, seed=0)
    pp, solved = _solved(problem, algorithm, form, params)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    split = alg.active_set.of(**_fields(solved))
    assert split.dtype == torch.int8 and split.shape == (len(solved), pp.m)
    assert set(torch.unique(split).tolist()) <= {-1, 0, 1} and bool((split[:, :pp.cones.zero] == 1).all())
    assert bool((split[:, pp.cones.zero:] != 0).any()) and bool((split[:, pp.cones.zero:] == 0).any())
    out = alg.active_set.solve(split)
    torch.testing.assert_close(out["x"], solved.x, atol=1e-7, rtol=0)
    torch.testing.assert_close(out["y"], solved.y, atol=1e-7, rtol=0)
    if form == "cone":
        torch.testing.assert_close(out["s"], solved.s, atol=1e-7, rtol=0)
    wrong = split.clone()
    i, j = [int(t[0]) for t in torch.nonzero(wrong[:, pp.cones.zero:] == 1, as_tuple=True)]
    wrong[i, pp.cones.zero + j] = 0
    assert float((alg.active_set.solve(wrong)["x"][i] - solved.x[i]).abs().max()) > 1e-6
    with pytest.raises(ValueError, match="a split must have shape"):
        alg.active_set.solve(split[:, 1:])


def test_cone_programs_with_other_cones_have_no_active_sets_and_the_recipe_skips_the_kind(monkeypatch):
    x, b = cp.Variable(3), cp.Parameter(3, name="b")
    pp = ParametricProblem(cp.Problem(cp.Minimize(cp.norm(x - b, 2))), "cone")
    alg = make_algorithm("scs", pp.canonicalize_vector(pp.parameter_vector({"b": np.ones((2, 3))})))
    assert alg.active_set is None and not any(applies(kind, pp) for kind in ACTIVE_SET_KINDS)
    assert all(applies(kind, pp) for kind in KINDS if kind not in ACTIVE_SET_KINDS)
    lp = ParametricProblem(_box_problem(), "cone")
    assert applies("neighbor_active_set", lp)
    import amortcvx.training.recipe as recipe_mod

    monkeypatch.setattr(recipe_mod, "ACTIVE_SET_ENTRIES", lp.n * (lp.n + lp.m) - 1)  # KKT solves too large
    assert not applies("neighbor_active_set", lp) and applies("neighbor_tangent", lp)
    with pytest.raises(ValueError, match="has nothing to train"):
        Candidate(kind="neighbor_active_set")
    assert Candidate(kind="neighbor_active_set", correction=False, choices=64).label() == (
        "neighbor_active_set uncorrected, 64 candidates")


def _model(pp, algorithm: str, train, choices: int) -> WarmStartPredictor:
    return uncorrected_model(Candidate(kind="neighbor_active_set", correction=False, choices=choices), pp,
                             algorithm, None, train)


def test_a_stored_active_set_has_no_correction_network_and_loads_files_that_had_one(tmp_path):
    """The active-set kinds train nothing, so their core has no correction network (a zero one was a product of
    ``2 p x (n + m)`` weights per call); a file saved when it had one (the zero weights under ``core.net.``) still
    loads, to the same predictions."""
    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(40, 1))
    model = _model(pp, "scs", train, choices=1)
    assert model.core.net is None and not any(".net." in k for k in model.state_dict())
    path = tmp_path / "active_set.pt"
    model.save(path)
    state = torch.load(path, weights_only=True)
    d, p2 = model.core.values.shape[1], 2 * model.core.keys.shape[1]
    state["state_dict"]["core.net.0.weight"] = torch.zeros(d, p2, dtype=torch.float64)
    state["state_dict"]["core.net.0.bias"] = torch.zeros(d, dtype=torch.float64)
    torch.save(state, path)
    loaded = WarmStartPredictor.load(path).eval()
    torch.testing.assert_close(loaded(train.theta[:5]), model(train.theta[:5]), atol=0, rtol=0)


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_a_stored_active_set_predicts_a_query_on_its_piece_exactly(algorithm, form):
    """Queries moved a little from stored instances keep their active sets: the prediction is their optimum (to the
    solves' accuracy), where the nearest stored solution itself is off by the move; the C solver then stops at its
    first check."""
    pp, train = _solved(_box_problem(), algorithm, form, _box_params(40, 1))
    move = 1e-3 * torch.randn(train.theta.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta = train.theta[:10] + move[:10]
    _, truth = _solved(_box_problem(), algorithm, form, {"q": theta[:, :4].numpy(), "h": theta[:, 4:].numpy()})
    assert len(truth) == 10
    model = _model(pp, algorithm, train, choices=1)
    assert model.splits and model.choices == 1 and isinstance(model.core, NeighborActiveSet)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(theta))
    space = output_space(algorithm)
    with torch.no_grad():
        z = predict(model, space, alg, theta)
        plain = model(theta).double()
    want = space.target(alg, **_fields(truth))
    assert float((z - want).abs().max()) < 1e-7 < 1e-4 < float((plain - want).abs().max())
    its = c_iterations(pp, algorithm, model, truth, solver_settings=EPS)
    assert its.max() <= 1


def _transport_queries(algorithm: str, form: str, num: int):
    """transport small, ``num`` instances drawn and solved at eps ``1e-7`` (OSQP fails a few): the problem, all but the
    last 20 solved as the training set, the last 20 as queries."""
    fam = problems.make("transport", "small", seed=0)
    pp, solved = _solved(fam.problem, algorithm, form, fam.sample(num, seed=4), settings={"eps_abs": 1e-7,
                                                                                           "eps_rel": 1e-7})
    cut = len(solved) - 20
    return pp, solved.subset(torch.arange(cut)), solved.subset(torch.arange(cut, len(solved)))


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_active_set_candidates_are_ranked_in_groups_as_one_at_a_time(algorithm, form):
    """Many candidate active sets: ranked in groups (a padded last group), in one group or one at a time, the
    prediction is the same; more candidates find more queries' pieces (fewer C iterations in all)."""
    pp, train, test = _transport_queries(algorithm, form, 660)
    model = _model(pp, algorithm, train, choices=50)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(test.theta))
    space = output_space(algorithm)
    d = pp.n + pp.m
    with torch.no_grad():
        grouped = predict(model, space, alg, test.theta, rank_entries=20 * 7 * pp.n * d)  # groups growing to 7 or less
        whole = predict(model, space, alg, test.theta, rank_entries=10 ** 9)
        single = predict(model, space, alg, test.theta, rank_entries=1)
    torch.testing.assert_close(grouped, whole, atol=1e-9, rtol=0)
    torch.testing.assert_close(single, whole, atol=1e-9, rtol=0)
    few = c_iterations(pp, algorithm, _model(pp, algorithm, train, choices=1), test, solver_settings=EPS)
    many = c_iterations(pp, algorithm, model, test, solver_settings=EPS)
    assert many.sum() < few.sum()


def _counting(alg, rows: list):
    """``alg`` with its active sets' solve appending each call's row count to ``rows``."""
    solve = alg.active_set.solve
    return alg._replace(active_set=alg.active_set._replace(
        solve=lambda split, start=None: rows.append(split.shape[0]) or solve(split, start)))


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_an_instance_stops_ranking_at_its_first_exact_candidate(algorithm, form):
    """With the default ``exact``, an instance whose candidate active set gives its optimum (residual at most
    ``EXACT_RESIDUAL``) has no later candidate solved: fewer KKT solves than ranking every candidate, the same
    answers where no candidate is exact, an exact one where one is (an algorithm without ``take`` ranks every
    instance until the call ends, once every instance is exact)."""
    from amortcvx.predictors.fixed_point import EXACT_RESIDUAL

    pp, train, test = _transport_queries(algorithm, form, 420)
    model = _model(pp, algorithm, train, choices=50)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(test.theta))
    space = output_space(algorithm)
    rows = []

    def counting(a):
        return _counting(a, rows)

    counted = counting(alg)._replace(take=lambda index: counting(alg.take(index)))
    with torch.no_grad():
        every = predict(model, space, counted, test.theta, rank_entries=20 * 5 * pp.n * (pp.n + pp.m), exact=None)
        all_rows, rows[:] = sum(rows), []
        early = predict(model, space, counted, test.theta, rank_entries=20 * 5 * pp.n * (pp.n + pp.m))
        early_rows = sum(rows)
        per_instance = predict(model, space, alg._replace(take=None), test.theta)
    res = alg.optimality(space.to_state(alg, early))
    exact = res <= EXACT_RESIDUAL
    assert bool(exact.any()) and not bool(exact.all())
    assert early_rows < all_rows == 20 * 50
    torch.testing.assert_close(early[~exact], every[~exact], rtol=0, atol=0)
    assert float(alg.optimality(space.to_state(alg, every))[exact].max()) <= EXACT_RESIDUAL
    torch.testing.assert_close(per_instance[~exact], every[~exact], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_an_instance_ranks_its_active_sets_in_growing_groups(algorithm, form):
    """One query ranking every one of 50 candidate active sets solves them in groups of 1, 2, 4, ... (where its
    entries allow), in a few calls instead of 50, each candidate once, with the same prediction as one at a time."""
    pp, train, test = _transport_queries(algorithm, form, 420)
    model = _model(pp, algorithm, train, choices=50)
    query = test.theta[:1]
    alg = make_algorithm(algorithm, pp.canonicalize_vector(query))
    space = output_space(algorithm)
    grown, single = [], []
    with torch.no_grad():
        a = _counting(alg, grown)._replace(take=lambda index: _counting(alg.take(index), grown))
        every = predict(model, space, a, query, rank_entries=10 ** 9, exact=None)
        b = _counting(alg, single)._replace(take=lambda index: _counting(alg.take(index), single))
        one = predict(model, space, b, query, rank_entries=1, exact=None)
    assert single == [1] * 50 and grown == [1, 2, 4, 8, 16, 19]
    torch.testing.assert_close(every, one, atol=1e-9, rtol=0)


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_splits_on_shared_data_are_solved_through_one_factor(algorithm, form, monkeypatch):
    """Where ``A`` and ``P`` are shared (mpc small: its dynamics as equality rows, a few active bounds), a batch's
    splits are solved through the equality rows' factor, built once for the data (parts of the batch too, ``take``)
    and a small correction per instance (``polish.BorderedKKT``): the solutions of each instance's own factored
    system, to rounding, for instances with no, few and many other active rows."""
    from amortcvx.iterations import polish

    fam = problems.make("mpc", "small", seed=0)
    pp, solved = _solved(fam.problem, algorithm, form, fam.sample(8, seed=0))
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    split = alg.active_set.of(**_fields(solved)).clone()
    forced = split[0] == 1
    forced &= (split == 1).all(dim=0)  # rows active everywhere, equality rows among them
    free = torch.nonzero(split[0] == 0).flatten()
    split[1, free[:6]] = 1  # more active rows than the optimum's (any split can be solved)
    split[2] = torch.where(forced, split[2], 0)  # only the rows active everywhere
    used, builds = [], []
    of, cholesky = polish.BorderedKKT.of, torch.linalg.cholesky
    monkeypatch.setattr(polish.BorderedKKT, "of", classmethod(
        lambda cls, *args: used.append(of(*args)) or used[-1]))
    monkeypatch.setattr(torch.linalg, "cholesky", lambda *args, **kw: builds.append(1) or cholesky(*args, **kw))
    shared = alg.active_set.solve(split)
    index = torch.tensor([5, 1, 2])
    part = alg.take(index).active_set.solve(split[index])
    assert len(used) == 2 and all(isinstance(u, polish.BorderedKKT) for u in used) and len(builds) == 1
    monkeypatch.setattr(polish.BorderedKKT, "of", classmethod(lambda cls, *args: None))  # each instance factored
    own = alg.active_set.solve(split)
    for key in own:
        assert bool(torch.isfinite(own[key]).all())
        torch.testing.assert_close(shared[key], own[key], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(part[key], own[key][index], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(shared["x"][0], solved.x[0], atol=1e-7, rtol=0)


def _simplex_problem(coupled: bool = False):
    """minimize 1/2 x'Qx - c'x  s.t.  0 <= x <= 0.5, sum(x) == 1 in 40 dimensions (``Q = I``: the projection of ``c``
    on a capped simplex; ``coupled``: ``Q = I + 0.1 11'``, no zero entry): a few weights nonzero at the optimum, the
    other bounds active."""
    c, x = cp.Parameter(40, name="c"), cp.Variable(40, name="x")
    Q = np.eye(40) + (0.1 if coupled else 0.0) * np.ones((40, 40))
    return cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) - c @ x), [x >= 0, x <= 0.5, cp.sum(x) == 1])


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("algorithm, form", FORMS)
def test_splits_whose_bounds_fix_most_variables_are_solved_on_the_free_ones(algorithm, form, coupled, monkeypatch):
    """Where active bounds fix most variables (a projection on a capped simplex: a few of 40 weights free), a
    split's solve eliminates them (``polish.EliminatedKKT``: each instance factors its free variables' system, or
    with a diagonal ``P`` the other active rows' one): the optimum back from its own split, and the whole system's
    solutions to rounding, for splits with fewer and more active bounds than the optimum's; a split holding both
    bounds of a variable is solved the other way."""
    from amortcvx.iterations import polish

    params = {"c": np.random.default_rng(3).normal(0.0, 0.3, (6, 40))}
    pp, solved = _solved(_simplex_problem(coupled), algorithm, form, params)
    assert (polish.EliminatedKKT.diagonal(make_algorithm(algorithm, pp.canonicalize_vector(solved.theta)).work.P,
                                          torch.float64, "cpu") is None) == coupled
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    split = alg.active_set.of(**_fields(solved)).clone()
    bounds, cols, _ = polish.EliminatedKKT.single_rows(alg.work.A, torch.float64, "cpu")
    assert bounds.numel() == 80
    on = split[:, bounds] != 0
    assert bool((on.sum(dim=1) >= 30).all())  # most variables at a bound
    split[1, bounds[on[1]][0]] = 0  # one bound fewer
    free = ~torch.isin(cols, cols[on[2]])  # the bound rows of instance 2's free variables
    more = bounds[free & on[3]][:2]
    assert more.numel() == 2
    split[2, more] = split[3, more]  # two more, on the sides another optimum has them
    used = []
    of = polish.EliminatedKKT.of
    monkeypatch.setattr(polish.EliminatedKKT, "of", classmethod(lambda cls, *args: used.append(of(*args)) or used[-1]))
    reduced = alg.active_set.solve(split)
    assert isinstance(used[-1], polish.EliminatedKKT)
    monkeypatch.setattr(polish.EliminatedKKT, "of", classmethod(lambda cls, *args: None))
    whole = alg.active_set.solve(split)
    for key in whole:
        assert bool(torch.isfinite(whole[key]).all())
        torch.testing.assert_close(reduced[key], whole[key], atol=1e-9, rtol=1e-9)
    for i in (0, 3, 4, 5):  # the optimum's own split
        torch.testing.assert_close(reduced["x"][i], solved.x[i], atol=1e-7, rtol=0)
    both = split.clone()
    j = int(torch.nonzero(solved.x[0] < 1e-6)[0])  # a variable at its lower bound: hold its upper bound too
    rows = bounds[cols == j]
    assert rows.numel() == 2
    both[0, rows] = torch.tensor([-1, 1] if form == "qp" else [1, 1], dtype=split.dtype)
    assert polish.EliminatedKKT.sizes(alg.work.A, alg.work.P, both != 0) is None


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_a_qps_polish_takes_active_set_rounds_until_its_split_settles(algorithm, form, monkeypatch):
    """A QP's polish from a point whose split is not the optimum's (another instance's optimum) solves the split
    its solution says, round after round (``polish.ROUNDS``), where one solve on the first guess does not reach
    the optimum: every instance exact (an optimum passes SCS's and OSQP's tests at their first check)."""
    from amortcvx.iterations import polish

    params = {"c": np.random.default_rng(4).normal(0.0, 0.3, (8, 40))}
    pp, solved = _solved(_simplex_problem(), algorithm, form, params)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    other = {k: torch.roll(v, 1, dims=0) for k, v in _fields(solved).items()}  # each instance another's optimum
    rounds = alg.polish(**other)
    error = (rounds["x"] - solved.x).abs().amax(dim=1)
    assert float(error.max()) < 1e-7
    monkeypatch.setattr(polish, "ROUNDS", 1)
    once = alg.polish(**other)
    assert float((once["x"] - solved.x).abs().amax(dim=1).max()) > 1e-3


def _matrix_problem():
    """minimize 1/2 ||x||^2 + q'x  s.t.  G x <= h, sum(x) == 0.5, with ``G`` a parameter: the constraint matrix, and so
    the torch iterations' factorization, differs between instances."""
    G, q, h = cp.Parameter((4, 4), name="G"), cp.Parameter(4, name="q"), cp.Parameter(4, name="h")
    x = cp.Variable(4, name="x")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [G @ x <= h, cp.sum(x) == 0.5])


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_a_factorization_per_instance_still_ranks_only_the_instances_left(algorithm, form):
    """Where ``A`` is a parameter (one factorization per instance), the algorithm still takes parts of its batch
    (``alg.take``): candidates are ranked in groups and an instance stops at its first exact one, so fewer active
    sets are solved than by one call per candidate on the whole batch (``take=None``), with the same prediction (to
    rounding where a later candidate is exact too); a taken algorithm's step is the batch's own on its rows."""
    from amortcvx.predictors.fixed_point import EXACT_RESIDUAL

    rng = np.random.default_rng(5)
    params = {"G": np.eye(4)[None] + 0.2 * rng.normal(size=(260, 4, 4)), "q": rng.normal(size=(260, 4)),
              "h": rng.uniform(0.0, 0.5, size=(260, 4))}
    pp, solved = _solved(_matrix_problem(), algorithm, form, params, settings={"eps_abs": 1e-8, "eps_rel": 1e-8})
    cut = len(solved) - 20
    train, test = solved.subset(torch.arange(cut)), solved.subset(torch.arange(cut, len(solved)))
    model = _model(pp, algorithm, train, choices=40)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(test.theta))
    assert alg.work.solver.batch_size == 20 and alg.take is not None
    space = output_space(algorithm)
    rows = []

    def counting(a):
        return _counting(a, rows)

    with torch.no_grad():
        early = predict(model, space, counting(alg)._replace(take=lambda index: counting(alg.take(index))),
                        test.theta, rank_entries=20 * 5 * pp.n * (pp.n + pp.m))
        early_rows, rows[:] = sum(rows), []
        whole = predict(model, space, counting(alg._replace(take=None)), test.theta)
        whole_rows = sum(rows)
    exact = alg.optimality(space.to_state(alg, early)) <= EXACT_RESIDUAL
    assert int(exact.sum()) >= 10 and early_rows < whole_rows
    torch.testing.assert_close(early[~exact], whole[~exact], rtol=0, atol=0)
    assert float(alg.optimality(space.to_state(alg, whole))[exact].max()) <= EXACT_RESIDUAL
    index = torch.tensor([3, 0, 3, 17])
    part = alg.take(index)
    torch.testing.assert_close(part.fixed_point(part.step(part.init())), alg.fixed_point(alg.step(alg.init()))[index],
                               rtol=0, atol=1e-12)


def test_the_nearest_stored_solution_stands_where_no_active_set_can_be_solved(monkeypatch):
    """Where every candidate's KKT system fails (NaN), the prediction is the forward pass's (the nearest stored
    solution), not NaN (queries off the stored instances, whose own active sets would be exact: one candidate, so that
    the batch's own algorithm solves it)."""
    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(30, 2))
    model = _model(pp, "scs", train, choices=1)
    theta = train.theta[:5] + 1e-3
    alg = make_algorithm("scs", pp.canonicalize_vector(theta))
    solved = []
    failing = alg.active_set._replace(solve=lambda split, start=None: solved.append(split) or {
        k: torch.full_like(v, float("nan")) for k, v in alg.active_set.solve(split, start).items()})
    with torch.no_grad():
        z = predict(model, output_space("scs"), alg._replace(active_set=failing), theta)
        torch.testing.assert_close(z, model(theta).double())
        assert len(solved) == 1 and float((predict(model, output_space("scs"), alg, theta) - z).abs().max()) > 1e-6


def _face_problem():
    """maximize x1 + x2  s.t.  x1 + x2 <= 1, x1 >= l, x >= 0: every point of the segment x1 + x2 = 1, l <= x1 <= 1
    is optimal, so the optimal active set (the first row) leaves the KKT system singular: a degenerate LP."""
    c, lo, x = cp.Parameter(2, name="c"), cp.Parameter(name="l"), cp.Variable(2, name="x")
    return cp.Problem(cp.Maximize(c @ x), [x[0] + x[1] <= 1, x[0] >= lo, x >= 0])


def _face_params(num: int, seed: int) -> dict[str, np.ndarray]:
    return {"c": np.ones((num, 2)), "l": np.random.default_rng(seed).uniform(0.6, 0.9, size=num)}


def _residual(alg, space, fields: dict[str, torch.Tensor]) -> torch.Tensor:
    return alg.optimality(space.to_state(alg, space.target(alg, **fields)))


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_a_degenerate_active_set_is_solved_near_its_start(algorithm, form):
    """On an optimal face wider than a point the optimal active set's solutions are a segment: from zero the solve
    gives the one nearest the origin, (1/2, 1/2), which breaks x1 >= l; from a start near the optimum, an optimum
    near the start. Where the active set's system is nonsingular the start changes nothing; a start of the wrong
    shape is an error."""
    pp, solved = _solved(_face_problem(), algorithm, form, _face_params(8, 0))
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    space = output_space(algorithm)
    split = alg.active_set.of(**_fields(solved))
    gen = torch.Generator().manual_seed(0)
    start = {f: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for f, v in _fields(solved).items()}
    near, zero = alg.active_set.solve(split, start), alg.active_set.solve(split)
    assert float(_residual(alg, space, near).max()) < 1e-9 < 1e-3 < float(_residual(alg, space, zero).min())
    assert float((near["x"] - solved.x).abs().max()) < 1e-2
    torch.testing.assert_close(zero["x"], torch.full_like(zero["x"], 0.5), atol=1e-4, rtol=0)
    pp, solved = _solved(_box_problem(), algorithm, form, _box_params(6, 0))
    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta))
    split = alg.active_set.of(**_fields(solved))
    anywhere = {f: torch.randn(v.shape, generator=gen, dtype=v.dtype) for f, v in _fields(solved).items()}
    for f in ("x", "y"):
        torch.testing.assert_close(alg.active_set.solve(split, anywhere)[f], alg.active_set.solve(split)[f],
                                   atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="a start must have"):
        alg.active_set.solve(split, {"x": solved.x[:, 1:], "y": solved.y})


class _Lookup(torch.nn.Module):
    """A reference core that answers each stored normalized query with its stored output."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.values[torch.cdist(u, self.keys).argmin(dim=1)]


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_the_active_sets_are_solved_from_the_reference_networks_prediction(algorithm, form):
    """With a ``reference`` core, the forward pass is its prediction, and each candidate active set is solved from
    that point: on the degenerate LP, a reference point near (0.99, 0.01), off the optimal face, gives the optimum
    next to it (the solves from the nearest stored solution's point or from zero land elsewhere on the face)."""
    pp, train = _solved(_face_problem(), algorithm, form, _face_params(30, 1))
    _, queries = _solved(_face_problem(), algorithm, form, _face_params(6, 2))
    model = _model(pp, algorithm, train, choices=4)
    alg = make_algorithm(algorithm, pp.canonicalize_vector(queries.theta))
    space = output_space(algorithm)
    gen = torch.Generator().manual_seed(1)
    x_ref = torch.tensor([0.99, 0.01], dtype=torch.float64) + 1e-3 * torch.randn(6, 2, generator=gen,
                                                                                  dtype=torch.float64)
    point = dict(_fields(queries), x=x_ref)
    if "s" in point:  # the cone form's slacks of the reference point (off the face: not optimal)
        point["s"] = alg.work.b - spmv(alg.work.A, x_ref)
    z_ref = space.target(alg, **point)
    assert float(_residual(alg, space, point).min()) > 1e-5
    with torch.no_grad():
        plain = predict(model, space, alg, queries.theta)
        model.core.reference = _Lookup(model._normalized(queries.theta), (z_ref - model.out_mean) / model.out_std)
        torch.testing.assert_close(model(queries.theta).double(), z_ref)
        z = predict(model, space, alg, queries.theta)
    x, x_plain = (space.prediction_warm_start(alg, p)["x"] for p in (z, plain))
    assert float(alg.optimality(space.to_state(alg, z)).max()) < 1e-9
    assert float((x - x_ref).abs().max()) < 1e-2 < float((x_plain - x_ref).abs().max())


def test_the_active_set_predictor_saves_and_loads_without_code_and_keeps_its_splits_int8(tmp_path):
    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(30, 3))
    model = _model(pp, "scs", train, choices=3)
    assert model.core.splits.dtype == torch.int8
    torch.testing.assert_close(model.core.splits, training_splits(pp, "scs", None, train))
    model.float().double()  # conversions leave the splits alone
    assert model.core.splits.dtype == torch.int8
    model.save(tmp_path / "m.pt")
    loaded = WarmStartPredictor.load(tmp_path / "m.pt", fingerprint=pp.fingerprint, algorithm="scs")
    assert isinstance(loaded.core, NeighborActiveSet) and loaded.choices == 3 and loaded.splits
    assert torch.equal(loaded.core.splits, model.core.splits)
    theta = train.theta[:4] + 0.01
    torch.testing.assert_close(torch.cat(list(loaded.split_groups(theta, 2)), dim=1),
                               torch.cat(list(model.split_groups(theta, 3)), dim=1))
    alg = make_algorithm("scs", pp.canonicalize_vector(theta))
    with torch.no_grad():
        torch.testing.assert_close(predict(loaded.double(), output_space("scs"), alg, theta),
                                   predict(model, output_space("scs"), alg, theta))
    model.core.reference = mlp(pp.num_params, pp.n + pp.m, (8,))  # a reference network: saved, loaded, the forward
    model.double().save(tmp_path / "r.pt")
    loaded = WarmStartPredictor.load(tmp_path / "r.pt", fingerprint=pp.fingerprint, algorithm="scs").double()
    assert isinstance(loaded.core.reference, torch.nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(loaded(theta), model(theta))
        torch.testing.assert_close(model(theta), model.out_mean + model.out_std * model.core.reference(
            model._normalized(theta)))
    with pytest.raises(ValueError, match="splits must have shape"):
        NeighborActiveSet(torch.zeros(5, 2), torch.zeros(5, 3), torch.zeros(4, 7, dtype=torch.int8))
    meta = PredictorMeta(fingerprint="f", algorithm="scs", settings={}, num_params=2, out_dim=3)
    plain = WarmStartPredictor(meta, core=NeighborCorrection(torch.zeros(5, 2), torch.zeros(5, 3)))
    assert not plain.splits


def test_a_reference_network_is_copied_and_must_share_the_training_normalization():
    """``uncorrected_model(..., reference=)`` copies the reference's core into an active-set core; a reference trained
    on other instances (another normalization) or a kind without active sets is an error."""
    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(30, 3))
    cand = Candidate(kind="neighbor_active_set", correction=False)
    same = uncorrected_model(cand, pp, "scs", None, train)
    model = uncorrected_model(cand, pp, "scs", None, train, reference=same)
    assert isinstance(model.core.reference, NeighborActiveSet) and model.core.reference is not same.core
    with torch.no_grad():
        torch.testing.assert_close(model(train.theta[:3] + 0.01), same(train.theta[:3] + 0.01))
    other = uncorrected_model(cand, pp, "scs", None, train.subset(torch.arange(15)))
    with pytest.raises(ValueError, match="another normalization"):
        uncorrected_model(cand, pp, "scs", None, train, reference=other)
    with pytest.raises(ValueError, match="take a reference network"):
        uncorrected_model(Candidate(kind="neighbor_tangent", correction=False), pp, "scs", None, train, reference=same)


def test_training_rows_are_the_targets_and_splits_read_apart():
    """``training_rows`` (one algorithm setup for both) gives what ``trainer.targets`` and ``training_splits`` give,
    and a predictor built from them is the one built without them."""
    from amortcvx.training.recipe import training_rows
    from amortcvx.training.trainer import targets

    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(30, 3))
    rows = training_rows(pp, "scs", None, train)
    torch.testing.assert_close(rows.target, targets(pp, "scs", None, train, len(train)), rtol=0, atol=0)
    assert torch.equal(rows.split, training_splits(pp, "scs", None, train))
    cand = Candidate(kind="neighbor_active_set", correction=False, choices=3)
    given = uncorrected_model(cand, pp, "scs", None, train, rows=lambda part: rows)
    plain = uncorrected_model(cand, pp, "scs", None, train)
    for (name, a), (_, b) in zip(given.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_candidates_are_the_nearest_distinct_active_sets():
    """Stored instances on a line at 0, 1, ..., 7 with splits A A B A C B D D: from a query at 0.1, three candidates
    are the instances 0 (A), 2 (B) and 4 (C); asked for five, the fifth is D (6) and the slot past the four distinct
    holds the nearest again; new splits loaded into the module are read afresh."""
    keys = torch.arange(8.0)[:, None]
    code = {"A": [1, 0], "B": [0, 1], "C": [1, 1], "D": [-1, 0]}
    splits = torch.tensor([code[c] for c in "AABACBDD"], dtype=torch.int8)
    model = NeighborActiveSet(keys, torch.zeros(8, 3), splits, choices=3).eval()
    query = torch.tensor([[0.1], [7.0]])
    j, count = model.distinct_neighbors(query, 3)
    assert j.tolist() == [[0, 2, 4], [7, 5, 4]] and count.tolist() == [3, 3]
    j, count = model.distinct_neighbors(query, 5)
    assert j.tolist() == [[0, 2, 4, 6, 0], [7, 5, 4, 3, 7]] and count.tolist() == [4, 4]
    groups = list(model.split_groups(query, 2))
    assert [g.shape[1] for g in groups] == [2, 1]
    torch.testing.assert_close(torch.cat(groups, dim=1), splits[torch.tensor([[0, 2, 4], [7, 5, 4]])])
    model.load_state_dict({**model.state_dict(), "splits": torch.ones(8, 2, dtype=torch.int8)})
    j, count = model.distinct_neighbors(query, 3)
    assert count.tolist() == [1, 1] and j.tolist() == [[0, 0, 0], [7, 7, 7]]
    assert len(list(model.split_groups(query, 2))) == 1  # no group past every row's count


def test_the_recipe_tries_the_active_set_kind_on_a_qp_and_doubles_its_candidates(monkeypatch):
    """A QP with a piecewise affine solution map: the recipe tries the kind in its search, doubles its candidates
    and (no network learns this map as well from about 100 instances) chooses it; every training instance's target
    and active set are read once, however many trials store them."""
    import amortcvx.training.recipe as recipe_mod

    read = []
    real = recipe_mod.training_rows
    monkeypatch.setattr(recipe_mod, "training_rows", lambda pp_, alg, settings, part: read.append(len(part)) or
                        real(pp_, alg, settings, part))
    pp = ParametricProblem(_box_problem(), "cone")
    source = solved_source(pp, "scs", _box_params(200, 5))
    settings = RecipeSettings(val_size=30, eval_size=30, search_size=60, sizes=(60, 120), max_size=120, epochs=20,
                              patience=5, ensemble=1,
                              alternatives=({"kind": "neighbor_active_set", "correction": False},))
    res = fit_predictor(pp, "scs", source, budget_seconds=120, k=2, solver_settings=EPS, recipe=settings,
                        progress=False)
    tried = [(t.candidate.choices, t.num_train) for t in res.trials if t.candidate.kind == "neighbor_active_set"]
    assert tried[0] == (8, res.trials[0].num_train)  # in the search (whether it rides the curve depends on time)
    doubled = [(c, n) for c, n in tried if c > 8]  # on its best trial, while below that trial's training set
    assert doubled and [c for c, _ in doubled] == [2 ** i for i in range(4, 13) if 2 ** i <= doubled[0][1]]
    assert res.candidate.kind == "neighbor_active_set" and isinstance(res.model.core, NeighborActiveSet)
    assert res.val_median_iterations < res.cold_median_iterations
    assert len(tried) > len(read) and sum(read) == max(n for _, n in tried)


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_amortized_solver_answers_from_the_stored_active_sets_at_the_tolerance(algorithm, form):
    """End to end through ``AmortizedSolver``: on instances moved slightly from the stored ones, the solver starts
    at the answer (median 0 exact C iterations, against the cold start's), every answer is optimal and agrees with
    the cold solve's objective to the tolerance."""
    from amortcvx import AmortizedSolver

    pp, train = _solved(_box_problem(), algorithm, form, _box_params(40, 6))
    model = _model(pp, algorithm, train, choices=8)
    move = 1e-3 * torch.randn(train.theta.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    theta = (train.theta + move).numpy()
    params = {"q": theta[:, :4], "h": theta[:, 4:]}
    learned = AmortizedSolver(pp, model, algorithm=algorithm, k=0, solver_settings=EPS, workers=1).solve(
        params, exact_iterations=True)
    cold = AmortizedSolver(pp, None, algorithm=algorithm, k=0, solver_settings=EPS, workers=1).solve(
        params, exact_iterations=True)
    assert np.median([r.iterations for r in learned.results]) == 0 < np.median([r.iterations for r in cold.results])
    assert all(r.status.name == "OPTIMAL" for r in learned.results)
    np.testing.assert_allclose([r.objective for r in learned.results], [r.objective for r in cold.results],
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_a_bare_polished_prediction_is_judged_by_its_optimality_residual(algorithm, form, monkeypatch):
    """``k = 0`` with polishing: the polished and the unpolished point are compared by the optimality residual at
    each (no step of the torch algorithm from either), the kept one is the smaller, and the safeguard's cold
    reference is the cold start's optimality residual."""
    from amortcvx import AmortizedSolver
    from amortcvx.deploy import solver as deploy_solver

    pp, train = _solved(_box_problem(), algorithm, form, _box_params(40, 6))
    model = _model(pp, algorithm, train, choices=1)
    move = 0.3 * torch.randn(train.theta.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta = (train.theta + move).numpy()  # far enough that some nearest active sets are wrong
    params = {"q": theta[:, :4], "h": theta[:, 4:]}

    def no_step(*args, **kwargs):
        raise AssertionError("a step was taken to compare the polished and the unpolished point")
    monkeypatch.setattr(deploy_solver, "start_residual", no_step)
    solver = AmortizedSolver(pp, model, algorithm=algorithm, k=0, polish=True, safeguard_ratio=1e30, workers=1)
    batch = solver.predict_warm_start(params)
    alg = make_algorithm(algorithm, pp.canonicalize(params))
    kept = {f: torch.as_tensor(a) for f, a in batch.arrays.items()}
    np.testing.assert_allclose(batch.residual, deploy_solver.point_optimality(alg, kept).numpy(), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(batch.cold_residual, alg.optimality(alg.init()).numpy(), rtol=1e-12)
    bare = AmortizedSolver(pp, model, algorithm=algorithm, k=0, safeguard_ratio=1e30, workers=1)
    unpolished = {f: torch.as_tensor(a) for f, a in bare.predict_warm_start(params).arrays.items()}
    assert (batch.residual <= deploy_solver.point_optimality(alg, unpolished).numpy() * (1 + 1e-9)).all()
    assert (batch.residual < 1e-9).mean() > (deploy_solver.point_optimality(alg, unpolished).numpy() < 1e-9).mean()


def test_calibration_predicts_each_batch_once_for_all_its_options(monkeypatch):
    """Calibration's untimed option loop (refinements x Newton steps) and the timing of the C modes compute the bare
    prediction of the validation batch once and reuse it; the decisions are those of a prediction computed every
    time; elsewhere every solve predicts anew."""
    import amortcvx.deploy.solver as solver_mod
    from amortcvx import AmortizedSolver
    from amortcvx.iterations.loop import AndersonSettings

    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(40, 7))
    model = _model(pp, "scs", train, choices=4)
    theta = (train.theta[:20] + 0.05).numpy()
    params = {"q": theta[:, :4], "h": theta[:, 4:]}
    calls = []
    real = solver_mod.predict
    monkeypatch.setattr(solver_mod, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))

    def calibrated():
        solver = AmortizedSolver(pp, model, k=2, solver_settings=EPS, workers=1, c_modes={"warm": "adaptive",
                                                                                          "cold": "adaptive"})
        calls.clear()
        cal = solver.calibrated(params, refinements=(None, AndersonSettings()), newton_steps=(0, 4), timed=False)
        return cal, len(calls)

    once, count = calibrated()
    assert count == 1 and len(once.candidates) == 4
    solver = AmortizedSolver(pp, model, k=2, solver_settings=EPS, workers=1)
    calls.clear()
    solver.calibrated(params, newton_steps=(0, 4), timed=False)  # the options and the timed C modes: one prediction
    assert len(calls) == 1
    monkeypatch.setattr(AmortizedSolver, "_bare_prediction", lambda self, alg, th: solver_mod.predict(
        self.model, self.space, alg, th, self.dtype))  # a prediction computed every time
    every, count = calibrated()
    assert count == 4 and every.candidates == once.candidates and every.learned_median == once.learned_median
    monkeypatch.undo()
    monkeypatch.setattr(solver_mod, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    solver = AmortizedSolver(pp, model, k=0, solver_settings=EPS, workers=1)
    calls.clear()
    solver.choose_c_modes(params)  # timed C modes: the prediction once for all of them (the same cost for each)
    assert len(calls) == 1
    solver.solve(params)
    solver.solve(params)
    assert len(calls) == 3  # elsewhere every solve predicts


def test_strategy_timing_drops_a_start_far_slower_than_the_others_after_one_round(monkeypatch):
    """``choose_strategy`` times again only the strategies within ``STRATEGY_DROP`` of the best after its first
    round: a prediction made 30 ms slower per call is timed once (its first use and one round), the cold start in
    every round; the choice is the same as with every round timed."""
    import time

    import amortcvx.deploy.solver as solver_mod
    from amortcvx import AmortizedSolver

    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(40, 9))
    model = _model(pp, "scs", train, choices=4)
    theta = (train.theta[:8] + 0.05).numpy()
    params = {"q": theta[:, :4], "h": theta[:, 4:]}
    solver = AmortizedSolver(pp, model, k=0, solver_settings=EPS, workers=1)
    real = AmortizedSolver._bare_prediction
    monkeypatch.setattr(AmortizedSolver, "_bare_prediction",
                        lambda self, alg, th: time.sleep(0.03) or real(self, alg, th))
    calls = {"learned": 0, "cold": 0}
    solve = AmortizedSolver.solve
    monkeypatch.setattr(AmortizedSolver, "solve", lambda self, p, **kw: (
        calls.__setitem__(self.strategy, calls[self.strategy] + 1), solve(self, p, **kw))[1])
    choice, seconds = solver.choose_strategy(params, ["learned", "cold"], repeats=3, single=4)
    assert choice == "cold" and seconds["learned"][0] > 10 * seconds["cold"][0]
    assert calls == {"learned": 1 + 4 + 1, "cold": 1 + 3 * (4 + 1)}  # first use, then 4 single calls and the batch
    monkeypatch.setattr(solver_mod, "STRATEGY_DROP", float("inf"))
    calls.update(learned=0, cold=0)
    assert solver.choose_strategy(params, ["learned", "cold"], repeats=3, single=4)[0] == "cold"
    assert calls == {"learned": 1 + 3 * 5, "cold": 1 + 3 * 5}


def test_calibration_shows_its_steps_in_a_progress_bar_on_request(capsys):
    from amortcvx import AmortizedSolver

    pp, train = _solved(_box_problem(), "scs", "cone", _box_params(40, 10))
    model = _model(pp, "scs", train, choices=4)
    theta = (train.theta[:8] + 0.05).numpy()
    params = {"q": theta[:, :4], "h": theta[:, 4:]}
    solver = AmortizedSolver(pp, model, k=0, solver_settings=EPS, workers=1)
    quiet = solver.calibrated(params, newton_steps=(0, 4), timed=False)
    assert "calibrating" not in capsys.readouterr().err
    shown = solver.calibrated(params, newton_steps=(0, 4), timed=False, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err
    assert shown.candidates == quiet.candidates and shown.enabled == quiet.enabled
