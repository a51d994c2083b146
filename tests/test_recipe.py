"""Tests of the automatic training recipe (amortcvx.training.recipe) and the neighbour-correction predictor."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.canon import ParametricProblem
from amortcvx.predictors import (
    Ensemble,
    NeighborCorrection,
    PredictorMeta,
    WarmStartPredictor,
    ensemble_predictor,
    output_space,
)
from amortcvx.training.recipe import (
    Candidate,
    RecipeResult,
    RecipeSettings,
    c_iterations,
    fit_predictor,
    solved_source,
)

EPS = {"eps_abs": 1e-4, "eps_rel": 1e-4}
# the default search without its uncorrected steps, the tangent expansion and the active sets (which train
# nothing: when chosen there is no ensemble; they have tests of their own, below and in test_active_set.py)
TINY = RecipeSettings(val_size=30, eval_size=30, search_size=60, sizes=(30, 60, 120), max_size=120, epochs=25,
                      patience=5, alternatives=tuple(a for a in RecipeSettings().alternatives
                                                     if a.get("correction", True)))


@pytest.fixture(scope="module")
def portfolio():
    torch.manual_seed(0)
    fam = problems.make("portfolio", "small", seed=0)
    pp = ParametricProblem(fam.problem, "cone")
    source = solved_source(pp, "scs", fam.sample(300, seed=0))
    return fam, pp, source


@pytest.fixture(scope="module")
def fitted(portfolio):
    _, pp, source = portfolio
    return fit_predictor(pp, "scs", source, budget_seconds=300, k=3, solver_settings=EPS, recipe=TINY,
                         progress=False)


def test_recipe_searches_chooses_on_validation_and_reports_a_curve(fitted, portfolio):
    _, pp, _ = portfolio
    res = fitted
    assert isinstance(res.model, WarmStartPredictor)
    assert res.model.meta.fingerprint == pp.fingerprint and res.model.meta.algorithm == "scs"
    search = [t for t in res.trials  # the ensemble's members and average may be at the search size too
              if t.num_train == TINY.search_size and t.candidate.member == 0 and t.candidate.ensemble == 1]
    labels = {t.candidate.label() for t in search}
    assert len(search) == 1 + len(TINY.alternatives)  # the default and every one-change alternative
    assert {"neighbor_correction", "neighbor_tangent"} <= {t.candidate.kind for t in search}
    assert len(labels) == len(search)
    # the choice is the best trial by (median, mean) validation iterations among the search and larger sizes
    eligible = [t for t in res.trials if t.num_train >= TINY.search_size]
    best = min((t.val_median_iterations, t.val_mean_iterations) for t in eligible)
    chosen = [t for t in eligible if t.candidate == res.candidate and t.num_train == res.num_train]
    assert (chosen[0].val_median_iterations, chosen[0].val_mean_iterations) == best
    # the ensemble: the configuration chosen before it, again with other seeds, and the members' average
    joined = [t for t in res.trials if t.candidate.ensemble == TINY.ensemble]
    assert len(joined) == 1
    members = [t for t in res.trials if t.candidate.member > 0]
    assert sorted(t.candidate.member for t in members) == list(range(1, TINY.ensemble))
    assert all(t.num_train == joined[0].num_train for t in members)
    if res.candidate.ensemble > 1:
        assert isinstance(res.model.core, Ensemble) and len(res.model.core.members) == TINY.ensemble
    # the learning curve: the chosen configuration at increasing training-set sizes, one of them the search size
    sizes = [p.num_train for p in res.curve]
    assert sizes == sorted(sizes) and TINY.search_size in sizes and len(sizes) >= 2
    text = res.format()
    assert "learning curve" in text and res.candidate.label() in text
    beat = res.val_median_iterations < res.cold_median_iterations
    assert ("NO CONFIGURATION BEAT THE COLD START" in text) != beat
    worse = dataclasses.replace(res, val_median_iterations=res.cold_median_iterations + 5)  # (robust_ls, stop 33)
    assert f"({res.cold_median_iterations + 5:g} against {res.cold_median_iterations:g} median" in worse.format()


def test_validation_rows_are_drawn_across_the_search_data_and_never_trained_on(fitted):
    """The validation set is a seeded draw from the first ``val_size + search_size`` rows (not the first rows: a
    source of closed-loop trajectories would validate on a few episodes), the training set the other rows in
    order."""
    res = fitted
    val = np.asarray(res.val_rows)
    span = TINY.val_size + TINY.search_size
    assert len(set(val.tolist())) == TINY.val_size and val.max() < span and val.max() >= TINY.val_size
    np.testing.assert_array_equal(val, TINY.validation_rows(10 ** 6, seed=0))
    assert TINY.validation_rows(40, seed=0).max() < 40  # a source with fewer rows: drawn from what it has
    for num_train in (res.num_train, 5, span):  # a set smaller than the span of the validation rows too
        train = dataclasses.replace(res, num_train=num_train).training_rows()
        assert len(train) == num_train and not set(train.tolist()) & set(val.tolist())
        assert np.all(np.diff(train) > 0) and train[-1] == num_train + np.sum(val < train[-1]) - 1


def test_every_training_gets_the_drawn_validation_rows_and_a_prefix_of_the_others(portfolio, monkeypatch):
    """Scripted trainings record their sets: each gets the validation rows of ``RecipeSettings.validation_rows``
    and the first ``n`` other rows, at sizes below the search size too."""
    seen: list = []
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(30, 60, 120), max_size=240,
                              alternatives=({"hidden": (64, 64)},), ensemble=1)
    scripted_recipe(monkeypatch, portfolio, lambda kind, width, n: (1.0 / n, 10.0), settings, seen)
    _, _, source = portfolio
    theta = source(300).theta
    val = settings.validation_rows(len(theta), seed=0)
    others = np.setdiff1d(np.arange(len(theta)), val)
    assert sorted({len(part) for part, _ in seen}) == [30, 60, 120, 240]  # the loss pays at every size
    for part, v in seen:
        torch.testing.assert_close(v.theta, theta[val], rtol=0, atol=0)
        torch.testing.assert_close(part.theta, theta[others[:len(part)]], rtol=0, atol=0)


def test_a_source_that_fails_some_instances_still_gives_every_training_the_same_validation_rows(portfolio,
                                                                                               monkeypatch):
    """Rows count solved instances: where the source fails some of those asked for (every seventh here), a size
    below the search size asks past the failures until the validation rows drawn in the search are there (before:
    an IndexError on sparse_pca, whose source failed one of 694), and every training gets those rows and a prefix of
    the others."""
    pp_, pp, source = portfolio

    def failing(n: int):
        got = source(n)
        keep = [i for i in range(len(got)) if i % 7 != 3]
        return got.subset(torch.as_tensor(keep))

    seen: list = []
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(30, 60, 120), max_size=120,
                              alternatives=({"hidden": (64, 64)},), ensemble=1)
    scripted_recipe(monkeypatch, (pp_, pp, failing), lambda kind, width, n: (1.0 / n, 10.0), settings, seen)
    theta = failing(300).theta
    val = settings.validation_rows(len(failing(90)), seed=0)
    assert val.max() >= len(failing(60))  # the size-30 training asked for 60 instances: too few solved rows
    others = np.setdiff1d(np.arange(len(theta)), val)
    assert 30 in {len(part) for part, _ in seen}
    for part, v in seen:
        torch.testing.assert_close(v.theta, theta[val], rtol=0, atol=0)
        torch.testing.assert_close(part.theta, theta[others[:len(part)]], rtol=0, atol=0)


def test_learning_curve_plot_shows_the_curve_every_training_and_the_cold_start(fitted, tmp_path):
    from amortcvx.evaluation import plot_learning_curve
    from amortcvx.evaluation.reports import learning_curve_figure

    path = plot_learning_curve(fitted, tmp_path / "sub" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = learning_curve_figure(fitted)
    loss_ax, iter_ax = fig.axes[:2]
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [p.num_train for p in fitted.curve])
    np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), [p.val_regression for p in fitted.curve])
    np.testing.assert_array_equal(iter_ax.lines[0].get_ydata(), [p.val_median_iterations for p in fitted.curve])
    # every training is drawn once: on the curve, as another training, or as the chosen model (where it is not on the
    # curve, e.g. an ensemble)
    drawn = sum(len(line.get_xdata()) for line in iter_ax.lines[:3])
    chosen = [t for t in fitted.trials if t.candidate == fitted.candidate and t.num_train == fitted.num_train][-1]
    on_curve_and_chosen = (chosen.num_train, chosen.val_regression, chosen.val_median_iterations) in {
        (p.num_train, p.val_regression, p.val_median_iterations) for p in fitted.curve}
    assert drawn == len(fitted.trials) + (1 if on_curve_and_chosen else 0)
    np.testing.assert_array_equal(iter_ax.lines[2].get_xdata(), [fitted.num_train])
    np.testing.assert_array_equal(iter_ax.lines[2].get_ydata(), [fitted.val_median_iterations])
    horizontal = [line.get_ydata()[0] for line in iter_ax.lines[3:]]
    assert horizontal == [fitted.cold_median_iterations, fitted.cold_median_iterations / 2]
    with pytest.raises(ValueError, match="empty learning curve"):
        learning_curve_figure(dataclasses.replace(fitted, curve=()))


def test_recipe_model_is_no_worse_than_cold_on_held_out(fitted, portfolio):
    fam, pp, _ = portfolio
    held_out = solved_source(pp, "scs", fam.sample(40, seed=99))(40)
    learned = c_iterations(pp, "scs", fitted.model, held_out, solver_settings=EPS)
    cold = c_iterations(pp, "scs", None, held_out, solver_settings=EPS)
    assert np.median(learned) <= np.median(cold)


def test_recipe_respects_a_small_budget(portfolio):
    _, pp, source = portfolio
    res = fit_predictor(pp, "scs", source, budget_seconds=1e-3, solver_settings=EPS, recipe=TINY, progress=False)
    assert len(res.trials) == 1  # the default is always trained; nothing else fits
    assert res.candidate == Candidate()


def test_optimal_prediction_needs_fewer_iterations_than_cold(portfolio):
    """c_iterations hands the prediction to the C solver: a model that returns the optimum beats cold."""
    _, pp, source = portfolio
    solved = source(20)
    space = output_space("scs")
    from amortcvx.iterations.registry import make_algorithm

    alg = make_algorithm("scs", pp.canonicalize_vector(solved.theta))
    target = space.target(alg, solved.x, solved.y, solved.s)

    class Oracle(torch.nn.Module):
        def forward(self, theta):
            idx = torch.cdist(theta, solved.theta).argmin(1)
            return target[idx]

    oracle = c_iterations(pp, "scs", Oracle(), solved, solver_settings=EPS)
    cold = c_iterations(pp, "scs", None, solved, solver_settings=EPS)
    assert np.median(oracle) < 0.5 * np.median(cold)


# ---------------------------------------------------------------------------------------------- neighbour core


def _meta(p: int, d: int) -> PredictorMeta:
    return PredictorMeta(fingerprint="f", algorithm="scs", settings={}, num_params=p, out_dim=d)


def test_neighbor_correction_starts_at_the_neighbour_and_leaves_one_out():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 4, generator=g, dtype=torch.float64)
    values = torch.randn(50, 6, generator=g, dtype=torch.float64)
    core = NeighborCorrection(keys, values, hidden=(16,)).double().eval()
    q = keys[7:9] + 1e-3
    torch.testing.assert_close(core(q), values[7:9])  # zero-initialized correction: exactly the neighbour
    core.train()
    j = core.neighbor(keys[:10])
    assert not torch.any(j == torch.arange(10))  # an instance is not its own neighbour while training
    ref = torch.cdist(keys[:10], keys).fill_diagonal_(float("inf")).argmin(1)
    assert torch.equal(j, ref)


def test_neighbor_correction_chunks_agree_with_one_pass():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(37, 3, generator=g), torch.randn(37, 2, generator=g)
    q = torch.randn(11, 3, generator=g)
    a = NeighborCorrection(keys, values, chunk=5).eval().neighbor(q)
    b = NeighborCorrection(keys, values, chunk=1000).eval().neighbor(q)
    assert torch.equal(a, b)


def test_k_nearest_neighbours_are_sorted_chunk_independent_and_leave_one_out():
    g = torch.Generator().manual_seed(4)
    keys, values = torch.randn(37, 3, generator=g, dtype=torch.float64), torch.randn(37, 2, generator=g)
    q = torch.randn(11, 3, generator=g, dtype=torch.float64)
    ref = torch.cdist(q, keys).argsort(dim=1)[:, :6]
    for chunk in (4, 1000):
        core = NeighborCorrection(keys, values.double(), chunk=chunk).eval()
        assert torch.equal(core.neighbors(q, 6), ref)
        assert torch.equal(core.neighbor(q), ref[:, 0])
    core.train()
    j = core.neighbors(keys[:5], 3)
    assert not torch.any(j == torch.arange(5)[:, None])  # an instance is not its own neighbour while training
    torch.testing.assert_close(j, torch.cdist(keys[:5], keys).fill_diagonal_(float("inf")).argsort(dim=1)[:, :3],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="choices must be an int from 1 to the stored instances"):
        NeighborCorrection(keys, values, choices=38)


def test_the_searches_follow_keys_changed_in_place_or_loaded():
    """The keys' norms are kept between searches, so a search after the keys changed (in place, by loading a state,
    or by a change of dtype) must see the new keys."""
    g = torch.Generator().manual_seed(6)
    keys, values = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g)
    q = torch.randn(9, 4, generator=g, dtype=torch.float64)
    core = NeighborCorrection(keys, values.double()).eval()
    assert torch.equal(core.neighbor(q), torch.cdist(q, keys).argmin(1))
    moved = 3.0 * torch.randn(30, 4, generator=g, dtype=torch.float64)
    core.keys.copy_(moved)
    assert torch.equal(core.neighbor(q), torch.cdist(q, moved).argmin(1))
    other = NeighborCorrection(torch.zeros(30, 4, dtype=torch.float64), values.double()).eval()
    other.neighbor(q)  # norms of the zero keys
    other.load_state_dict(NeighborCorrection(keys, values.double()).state_dict())
    assert torch.equal(other.neighbor(q), torch.cdist(q, keys).argmin(1))
    assert torch.equal(other.neighbor(q.float()), torch.cdist(q, keys).argmin(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_a_search_with_queries_on_another_device_than_the_keys():
    """The kept key norms follow the queries' device, as the keys do (``keys.to(u)``)."""
    g = torch.Generator().manual_seed(7)
    keys, values = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g)
    q = torch.randn(9, 4, generator=g, dtype=torch.float64)
    core = NeighborCorrection(keys, values.double()).eval()
    expected = torch.cdist(q, keys).argmin(1)
    assert torch.equal(core.neighbor(q), expected)
    assert torch.equal(core.neighbor(q.cuda()).cpu(), expected)


@pytest.mark.parametrize("kind", ["neighbor_correction", "neighbor_tangent"])
def test_neighbor_candidates_come_from_the_nearest_instances_the_first_is_forward(kind):
    from amortcvx.predictors import NeighborTangent

    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g,
                                                                                   dtype=torch.float64)
    tangents = torch.randn(30, 4, 3, generator=g, dtype=torch.float64)
    core = (NeighborCorrection(keys, values, hidden=(8,), choices=3) if kind == "neighbor_correction"
            else NeighborTangent(keys, values, tangents, hidden=(8,), choices=3)).double().eval()
    q = torch.randn(5, 3, generator=g, dtype=torch.float64)
    cands = core.candidates(q)
    assert cands.shape == (5, 3, 4)
    torch.testing.assert_close(cands[:, 0], core(q))
    j = torch.cdist(q, keys).argsort(dim=1)[:, :3]
    expected = values[j]  # untrained correction: the neighbours' answers, moved along their derivatives
    if kind == "neighbor_tangent":
        expected = expected + torch.einsum("bkdp,bkp->bkd", tangents[j], q[:, None] - keys[j])
    torch.testing.assert_close(cands, expected)
    model = WarmStartPredictor(_meta(3, 4), core=core).double().eval()
    torch.testing.assert_close(model.candidates(q)[:, 0], model(q))
    plain = WarmStartPredictor(_meta(3, 4), hidden=(8,)).double().eval()  # one candidate: the forward's
    torch.testing.assert_close(plain.candidates(q), plain(q)[:, None])


def test_tangent_expansion_by_rows_and_gathered_agree(monkeypatch):
    """The CPU path (a product per row) and the GPU path (batched gathers, here in chunks of 2 rows) give
    ``tangents[j] @ du`` row by row, also for no rows and in float32."""
    from amortcvx.predictors import neighbor

    g = torch.Generator().manual_seed(7)
    tangents = torch.randn(9, 6, 4, generator=g, dtype=torch.float64)
    j = torch.tensor([3, 3, 0, 8, 5])
    du = torch.randn(5, 4, generator=g, dtype=torch.float64)
    want = torch.einsum("bdp,bp->bd", tangents[j], du)
    monkeypatch.setattr(neighbor, "GATHER_BYTES", 2 * 6 * 4 * 8)
    for fn in (neighbor.expansion_by_rows, neighbor.expansion_gathered, neighbor.expansion):
        torch.testing.assert_close(fn(tangents, j, du), want, rtol=1e-12, atol=1e-12)
        assert fn(tangents, j[:0], du[:0]).shape == (0, 6)
    torch.testing.assert_close(neighbor.expansion(tangents, j, du.float()), want.float())


def test_predict_takes_the_candidate_of_smallest_residual(box_qp):
    """Of three candidates per instance, its optimum and two other instances' optima, ``predict`` picks the one with
    the smallest residual (SCS: ``optimality``): the optimum; a model without candidates gives its forward."""
    from amortcvx.iterations.registry import make_algorithm
    from amortcvx.predictors import predict

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, values = _shell_and_targets(pp, solved)
    alg = make_algorithm("scs", pp.canonicalize_vector(solved.theta), settings)

    class Offered(torch.nn.Module):  # the optimum as the second of three candidates
        def __init__(self):
            super().__init__()
            self.register_buffer("z", shell.out_mean + shell.out_std * values)

        def candidates(self, theta):
            return torch.stack([self.z.roll(1, 0), self.z, self.z.roll(2, 0)], dim=1)

        def forward(self, theta):
            return self.candidates(theta)[:, 0]

    class ForwardOnly(torch.nn.Module):  # no candidates: its forward is the prediction, in float32 here
        def forward(self, theta):
            return Offered().float()(theta)

    z = predict(Offered(), output_space("scs"), alg, solved.theta)
    torch.testing.assert_close(z, shell.out_mean + shell.out_std * values, rtol=0, atol=0)
    first = predict(ForwardOnly(), output_space("scs"), alg, solved.theta)
    assert first.dtype == torch.float64
    torch.testing.assert_close(first, Offered()(solved.theta), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("algorithm, form", [("scs", "cone"), ("osqp", "qp")])
def test_candidates_are_ranked_by_the_optimality_residual_without_a_step(algorithm, form):
    """Both iterations have an optimality residual that needs no solve (``alg.optimality``), and ``predict`` ranks
    the candidates by it: of three per instance it picks the optimum, and takes no step. Ranked by the step's
    fixed-point residual instead (an algorithm without ``optimality``), the pick is the same, at one step per
    candidate."""
    from amortcvx.iterations.registry import make_algorithm
    from amortcvx.predictors import predict

    pp = ParametricProblem(_box_problem(), form)
    solved = solved_source(pp, algorithm, _box_params(), solver_settings={"eps_abs": 1e-10, "eps_rel": 1e-10})(40)
    settings, shell, values = _shell_and_targets(pp, solved, algorithm)
    optimum = shell.out_mean + shell.out_std * values

    class Offered(torch.nn.Module):  # the optimum as the third of three candidates
        def __init__(self):
            super().__init__()
            self.register_buffer("z", optimum)

        def candidates(self, theta):
            return torch.stack([self.z.roll(1, 0), self.z.roll(2, 0), self.z], dim=1)

    alg = make_algorithm(algorithm, pp.canonicalize_vector(solved.theta), settings)
    steps = []

    def counted(state):
        steps.append(1)
        return alg.step(state)

    assert alg.optimality is not None
    z = predict(Offered(), output_space(algorithm), alg._replace(step=counted), solved.theta)
    torch.testing.assert_close(z, optimum, rtol=0, atol=0)
    assert not steps
    z = predict(Offered(), output_space(algorithm), alg._replace(step=counted, optimality=None), solved.theta)
    torch.testing.assert_close(z, optimum, rtol=0, atol=0)
    assert len(steps) == 3


@pytest.mark.parametrize("kind", ["neighbor_correction", "neighbor_tangent"])
def test_neighbor_predictor_saves_and_loads_without_code(tmp_path, kind):
    from amortcvx.predictors import NeighborTangent

    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(20, 3, generator=g), torch.randn(20, 5, generator=g)
    core = (NeighborCorrection(keys, values, hidden=(8, 8), choices=3) if kind == "neighbor_correction"
            else NeighborTangent(keys, values, torch.randn(20, 5, 3, generator=g), hidden=(8, 8), choices=3))
    with torch.no_grad():
        core.net[-1].weight.normal_(generator=g)
    model = WarmStartPredictor(_meta(3, 5), core=core).eval()
    model.save(tmp_path / "m.pt")
    loaded = WarmStartPredictor.load(tmp_path / "m.pt", fingerprint="f", algorithm="scs")
    x = torch.randn(4, 3, generator=g)
    assert type(loaded.core) is type(core) and loaded.core.core_kind == kind and loaded.core.choices == 3
    torch.testing.assert_close(loaded.eval()(x), model(x))
    torch.testing.assert_close(loaded.candidates(x), model.candidates(x))


def test_ensemble_averages_its_members_and_saves_without_code(tmp_path):
    g = torch.Generator().manual_seed(3)
    models = []
    for j in range(3):
        core = NeighborCorrection(torch.randn(20, 3, generator=g), torch.randn(20, 5, generator=g), hidden=(8,)) \
            if j == 2 else None
        model = WarmStartPredictor(_meta(3, 5), core=core, hidden=(8, 8))
        with torch.no_grad():
            model.out_mean.fill_(0.5)
            model.out_std.fill_(2.0)
        models.append(model.eval())
    joined = ensemble_predictor(models).eval()
    x = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(joined(x), torch.stack([m(x) for m in models]).mean(0))
    joined.save(tmp_path / "e.pt")
    loaded = WarmStartPredictor.load(tmp_path / "e.pt", fingerprint="f", algorithm="scs")
    assert isinstance(loaded.core, Ensemble) and isinstance(loaded.core.members[2], NeighborCorrection)
    torch.testing.assert_close(loaded.eval()(x), joined(x))
    other = WarmStartPredictor(_meta(3, 5), hidden=(8, 8))  # another normalization: trained on other data
    with pytest.raises(ValueError, match="normalization"):
        ensemble_predictor([models[0], other])


def test_learning_curve_sizes_go_on_doubling_up_to_max_size():
    settings = RecipeSettings(val_size=30, eval_size=30, search_size=60, sizes=(30, 60, 120), max_size=1000)
    assert settings.curve_sizes() == [30, 120, 240, 480, 960]
    assert RecipeSettings().curve_sizes()[-4:] == [16000, 32000, 64000, 128000]
    with pytest.raises(ValueError, match="max_size"):
        RecipeSettings(sizes=(250, 500), max_size=400)
    with pytest.raises(ValueError, match="ensemble"):
        RecipeSettings(ensemble=0)


class TaggedModel(torch.nn.Module):
    """A scripted recipe's trained model: its tag ``(kind, width, n)``."""

    def __init__(self, kind: str, width: int, n: int):
        super().__init__()
        self.kind, self.width, self.n = kind, width, n


class FakeClock:
    """``time`` for the recipe's module: seconds pass only where a scripted test advances them."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t


def scripted_recipe(monkeypatch, portfolio, scripted, settings: RecipeSettings, seen: list | None = None,
                    cost=None, clock: FakeClock | None = None, budget: float = 300, share: float = 1e9,
                    epochs: list | None = None):
    """``fit_predictor`` on the portfolio source with the trainings and the C solves replaced: a trained model is
    a tag ``(kind, width, n)`` whose validation loss and median C iterations are ``scripted(kind, width, n)``;
    every other kind counts as a companion (``share``: ``COMPANION_SHARE``). A training takes no time, or
    ``cost(kind, n, width)`` seconds (slept, or added to ``clock``, which then is the recipe's only time); ``seen``
    collects the (training, validation) sets every training was given, ``epochs`` the ``(kind, n, epochs)`` each
    training was allowed."""
    import amortcvx.training.recipe as recipe_mod
    from amortcvx.training.trainer import TrainResult

    _, pp, source = portfolio

    monkeypatch.setattr(recipe_mod, "COMPANION_SHARE", share)
    monkeypatch.setattr(recipe_mod, "candidate_core", lambda cand, *a, **k: cand.kind)
    monkeypatch.setattr(recipe_mod, "_probe_rate", lambda *a, **k: 1e-6)

    def train(pp_, alg, part, val, config, settings=None, core=None):
        if seen is not None:
            seen.append((part, val))
        if epochs is not None:
            epochs.append((core, len(part), config.epochs))
        if cost is not None and clock is not None:
            clock.t += cost(core, len(part), config.hidden[0])
        elif cost is not None:
            time.sleep(cost(core, len(part), config.hidden[0]))
        return TrainResult(TaggedModel(core, config.hidden[0], len(part)), [{}] * 3, 2)

    monkeypatch.setattr(recipe_mod, "train", train)
    if clock is not None:
        monkeypatch.setattr(recipe_mod, "time", clock)
    monkeypatch.setattr(recipe_mod, "evaluate_losses", lambda pp_, alg, settings, model, *a, **k: {
        "regression": scripted(model.kind, model.width, model.n)[0]})
    monkeypatch.setattr(recipe_mod, "c_iterations", lambda pp_, alg, model, solved, **k: np.full(
        len(solved), 20.0 if model is None else scripted(model.kind, model.width, model.n)[1]))
    return fit_predictor(pp, "scs", source, budget_seconds=budget, k=3, solver_settings=EPS, recipe=settings,
                         progress=False)


def test_capacity_step_widens_the_network_where_more_data_stops_paying(portfolio, monkeypatch):
    """Scripted validation numbers (the trainings and the C solves replaced): the (64, 64) network stops gaining
    at 120 instances, twice as wide it is better there and goes on gaining with more data, and the choice, the
    curve and the trials say so."""

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if width == 256:  # the default network: worse than (64, 64) in the search
            return 0.60, 14.0
        if width == 64:
            return (0.50, 12.0) if n < 120 else (0.49, 12.0)  # stalls: less than 5% lower, no fewer iterations
        return 0.40 * 120 / n, 10.0 - n / 120  # wider: better at 120 and still improving with more data

    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=480,
                              alternatives=({"hidden": (64, 64)},), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    hidden = [(t.candidate.hidden[0], t.num_train) for t in res.trials]
    # search (256 then 64, 64 kept), curve of 64 to 120 (stalls), 128 wide at 120 (pays), then 240 only (the
    # portfolio source has 300 instances: 270 for training, so the next doubling, 480, is cut to 270)
    assert hidden[:4] == [(256, 60), (64, 60), (64, 120), (128, 120)]
    assert hidden[4] == (128, 240)
    assert res.candidate.hidden == (128, 128) and res.num_train == max(n for w, n in hidden if w == 128)
    assert [p.num_train for p in res.curve][:3] == [60, 120, 120]
    assert res.curve[1].configuration.startswith("mlp 64x64") and res.curve[2].configuration.startswith("mlp 128x128")


def test_a_wider_network_is_estimated_from_the_largest_network_measured(portfolio, monkeypatch):
    """Scripted on a simulated clock: the search's small network (64x64) costs more per weight than the chosen
    256x256 (a small network's time is mostly overhead). The capacity step's 512x512 is estimated from the largest
    network measured, so it fits the budget left and is trained; estimated from the small one it would not."""
    import amortcvx.training.recipe as recipe_mod

    _, pp, _ = portfolio
    size = {w: recipe_mod._network_size((w, w), pp) for w in (64, 256, 512)}

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
        return {256: (0.5, 12.0), 64: (0.6, 14.0)}.get(width, (0.4, 10.0))  # 256 stalls at 120; 512 is better

    costs = {(256, 60): 1.0, (64, 60): 10.0, (256, 120): 2.0}
    # the 512's estimate (3 epochs here) from the 256 at 120 and from the 64 at 60, per instance and epoch
    from_256 = 2.0 / 3 / 120 * size[512] / size[256] * 120 * 3
    from_64 = 10.0 / 3 / 60 * size[512] / size[64] * 120 * 3
    assert from_64 > 2 * from_256
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                              alternatives=({"hidden": (64, 64)},), ensemble=1, epochs=3, patience=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings, clock=FakeClock(),
                          cost=lambda kind, n, width: costs.get((width, n), 1.0),
                          budget=13.0 + (from_256 + from_64) / 2)
    assert [(t.candidate.hidden[0], t.num_train) for t in res.trials] == [(256, 60), (64, 60), (256, 120), (512, 120)]
    assert res.candidate.hidden == (512, 512)

def test_budget_rates_of_stored_set_kinds_grow_with_the_set():
    from amortcvx.training.recipe import STORED_KINDS, scaled_rate

    assert set(STORED_KINDS) == {"neighbor_correction", "neighbor_tangent", "neighbor_active_set",
                                 "active_set_classifier"}
    assert scaled_rate("mlp", 2e-5, 8000, 16000) == 2e-5  # an MLP's epoch costs the same per instance
    for kind in STORED_KINDS:  # each instance searches the whole stored set: twice the set, twice per instance
        assert scaled_rate(kind, 2e-5, 8000, 16000) == pytest.approx(4e-5)


def test_a_cheap_kind_rides_along_the_curve_and_takes_over_where_better(portfolio, monkeypatch):
    """Scripted validation numbers: the tangent kind loses the search at 60 instances but gains more from data;
    trained beside the MLP at every size of the curve, it takes over at 120 and the curve goes on with it."""

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind == "mlp":
            return 0.5 * 60 / n, 12.0 - n / 120
        return 0.6 * (60 / n) ** 2, 14.0 if n <= 60 else 6.0 * 120 / n

    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_tangent", "hidden": (128, 128)},), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    order = [(t.candidate.kind, t.num_train) for t in res.trials]
    assert order == [("mlp", 60), ("neighbor_tangent", 60), ("mlp", 120), ("neighbor_tangent", 120),
                     ("neighbor_tangent", 240)]
    assert res.candidate.kind == "neighbor_tangent" and res.num_train == 240
    assert [(p.num_train, p.configuration.split()[0]) for p in res.curve] == [
        (60, "mlp"), (120, "mlp"), (120, "neighbor_tangent"), (240, "neighbor_tangent")]


def test_a_candidate_that_trains_nothing_rides_the_curve_whatever_its_search_time(portfolio, monkeypatch):
    """Scripted, with no search trial cheap enough to ride by its share of the choice's time: the active sets and the
    uncorrected tangent expansion (neither trains anything) still ride the MLP's curve, and win at 120 instances
    (the expansion's derivatives are guarded apart: it stops riding where they would take longer than the curve's
    training)."""
    import amortcvx.training.recipe as recipe_mod

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
        if kind == "mlp":
            return 0.5 * 60 / n, 12.0 - n / 120
        return 0.6, 14.0 if n <= 60 else 6.0

    monkeypatch.setattr(recipe_mod, "uncorrected_model", lambda cand, pp_, alg, settings, part, *_:
                        TaggedModel(cand.kind, 0, len(part)))
    for kind in ("neighbor_active_set", "neighbor_tangent"):
        settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                                  alternatives=({"kind": kind, "correction": False, "choices": 64},), ensemble=1)
        res = scripted_recipe(monkeypatch, portfolio, scripted, settings, share=0.0)
        trials = [(t.candidate.kind, t.num_train) for t in res.trials]
        assert trials[:4] == [("mlp", 60), (kind, 60), ("mlp", 120), (kind, 120)]
        assert (res.candidate.kind, res.num_train) == (kind, 120)


def test_a_kind_that_trains_nothing_goes_on_alone_where_the_curve_stops(portfolio, monkeypatch):
    """Scripted: the MLP stops gaining at 120 instances (and so does a wider one); the active sets, which need only
    more instances, go on to 240 alone, whether or not their counts with 8 candidates improve there, and their
    candidates are doubled on the largest set; they are chosen at 240 where better there, else at 120."""
    import amortcvx.training.recipe as recipe_mod

    monkeypatch.setattr(recipe_mod, "uncorrected_model", lambda cand, pp_, alg, settings, part, *_:
                        TaggedModel(cand.kind, 0, len(part)))
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_active_set", "correction": False},), ensemble=1)
    for gains_at_240 in (True, False):
        def scripted(kind: str, width: int, n: int, late: float = 6.0 if gains_at_240 else 11.0
                     ) -> tuple[float, float]:
            if kind == "mlp":
                return 0.5, 12.0
            return 0.6, {60: 14.0, 120: 10.0}.get(n, late)

        res = scripted_recipe(monkeypatch, portfolio, scripted, settings, share=0.0)
        sizes = [t.num_train for t in res.trials if t.candidate.kind == "mlp"]
        assert max(sizes) == 120  # the curve (and the wider network) stopped at 120
        riders = [t.num_train for t in res.trials if t.candidate.kind == "neighbor_active_set"
                  and t.candidate.choices == 8]
        assert riders == [60, 120, 240]
        doubled = [(t.candidate.choices, t.num_train) for t in res.trials if t.candidate.choices > 8]
        assert doubled and all(n == 240 for _, n in doubled)
        assert (res.candidate.kind, res.num_train) == ("neighbor_active_set", 240 if gains_at_240 else 120)


def test_a_candidate_goes_on_alone_past_a_size_where_the_source_failed_instances(portfolio, monkeypatch):
    """Where the source fails some instances (every seventh here), a set asked at 120 holds fewer; the active sets
    still go on alone from there to the next size, 240 (before, the sizes above the set's count began at 120 again,
    which gave no more instances and ended them)."""
    import amortcvx.training.recipe as recipe_mod

    pp_, pp, source = portfolio

    def failing(n: int):
        got = source(n)
        return got.subset(torch.as_tensor([i for i in range(len(got)) if i % 7 != 3]))

    monkeypatch.setattr(recipe_mod, "uncorrected_model", lambda cand, pp_, alg, settings, part, *_:
                        TaggedModel(cand.kind, 0, len(part)))
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_active_set", "correction": False},), ensemble=1)
    res = scripted_recipe(monkeypatch, (pp_, pp, failing),
                          lambda kind, width, n: (0.5, 12.0 if kind == "mlp" else 11.0), settings, share=0.0)
    riders = [t.num_train for t in res.trials if t.candidate.kind == "neighbor_active_set" and t.candidate.choices == 8]
    assert len(riders) == 3 and riders[1] < 120 < riders[2] <= 240


def test_a_companion_rides_no_further_once_it_trains_longer_than_the_curve(portfolio, monkeypatch):
    """Scripted: the neighbour kind is cheap at 60 instances and costs five times the MLP's training at 120 (a
    stored set's cost grows with its square); it is not trained at 240, and the MLP's curve goes on."""

    def cost(kind: str, n: int, width: int) -> float:
        return 0.02 if kind == "mlp" else (0.001 if n <= 60 else 0.1)

    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_correction", "hidden": (128, 128)},), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, lambda kind, width, n: (0.5 * 60 / n, 12.0 if kind == "mlp"
                                                                           else 14.0), settings, cost=cost)
    order = [(t.candidate.kind, t.num_train) for t in res.trials]
    assert order == [("mlp", 60), ("neighbor_correction", 60), ("mlp", 120), ("neighbor_correction", 120),
                     ("mlp", 240)]


def test_a_companion_trains_at_most_as_long_as_the_curve_at_its_size(portfolio, monkeypatch):
    """Scripted on a simulated clock: the neighbour kind rides the MLP's curve; at 120 instances its epochs are
    capped so that its training takes at most the MLP's trial there (1 s), not the budget left (about 300 s)."""
    from amortcvx.training.recipe import scaled_rate

    def cost(kind: str, n: int, width: int) -> float:
        return 1.0 if kind == "mlp" else 0.03 * n / 60  # 3 epochs each (the scripted history)

    allowed: list = []
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                              alternatives=({"kind": "neighbor_correction", "hidden": (128, 128)},), ensemble=1)
    scripted_recipe(monkeypatch, portfolio, lambda kind, width, n: (0.5 * 60 / n, 12.0 if kind == "mlp" else 14.0),
                    settings, cost=cost, clock=FakeClock(), epochs=allowed)
    epochs = {(kind, n): e for kind, n, e in allowed}
    # the rider's seconds per epoch and instance, measured at 60 (a stored set's: twice the set, twice the rate)
    rate = scaled_rate("neighbor_correction", 0.03 / 3 / 60, 60, 120)
    assert epochs["neighbor_correction", 60] == settings.epochs  # the search: the budget left allows every epoch
    assert epochs["neighbor_correction", 120] == pytest.approx(0.8 * 1.0 / (rate * 120), abs=1)  # 20, not 1000


def test_capacity_step_after_a_companion_judges_against_the_curves_own_training(portfolio, monkeypatch):
    """The (64, 64) MLP stalls at 120 instances while a companion, trained there too, has a much lower loss but not
    fewer iterations; the wider MLP is judged against the (64, 64) training at 120 (it pays), not the companion."""

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind == "neighbor_tangent":
            return 0.20, 13.0  # low loss, never fewer iterations than the MLP
        if width == 256:  # the default network: worse than (64, 64) in the search
            return 0.60, 14.0
        if width == 64:
            return (0.50, 12.0) if n < 120 else (0.49, 12.0)  # stalls at 120
        return 0.40, 12.0  # wider: 5% below the (64, 64) loss at 120, not below the companion's

    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                              alternatives=({"hidden": (64, 64)}, {"kind": "neighbor_tangent", "hidden": (64, 64)}),
                              ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    order = [(t.candidate.kind, t.candidate.hidden[0], t.num_train) for t in res.trials]
    assert order[-3:] == [("mlp", 64, 120), ("neighbor_tangent", 64, 120), ("mlp", 128, 120)]
    assert [(p.num_train, p.configuration.split()[1]) for p in res.curve] == [(60, "64x64"), (120, "64x64"),
                                                                             (120, "128x128")]


@pytest.mark.parametrize("mlp_iterations", [22.0, 18.0])
def test_where_no_choice_beats_the_cold_start_the_next_trained_kind_climbs_its_own_curve(portfolio, monkeypatch,
                                                                                     mlp_iterations):
    """Scripted on a simulated clock (cold start: 20 validation iterations): the neighbour correction loses the search
    at 60 instances to the MLP and is too slow to ride its curve, but gains from data. Where the MLP stays at 22 (no
    better than cold) the correction climbs a curve of its own after the MLP's and becomes the choice; where the MLP
    beats the cold start (18), nothing more is trained."""

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind == "mlp":
            return 0.5, mlp_iterations  # stalls at once: no lower loss, no fewer iterations
        return 0.6 * 60 / n, 24.0 - (n - 60) / 30  # 24 at 60, 22 at 120, 18 at 240

    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_correction", "hidden": (128, 128)},), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings, clock=FakeClock(), share=0.5,
                          cost=lambda kind, n, width: 1.0)
    order = [(t.candidate.kind, t.candidate.hidden[0], t.num_train) for t in res.trials]
    mlp_curve = [("mlp", 256, 60), ("neighbor_correction", 128, 60), ("mlp", 256, 120), ("mlp", 512, 120)]
    if mlp_iterations >= 20:
        assert order == mlp_curve + [("neighbor_correction", 128, 120), ("neighbor_correction", 128, 240)]
        assert res.candidate.kind == "neighbor_correction" and res.num_train == 240
        assert res.val_median_iterations == 18.0
        assert [(p.num_train, p.configuration.split()[0]) for p in res.curve][-2:] == [
            (120, "neighbor_correction"), (240, "neighbor_correction")]
    else:
        assert order == mlp_curve
        assert res.candidate.kind == "mlp"


# ---------------------------------------------------------------------------------------------- tangent core


@pytest.fixture(scope="module")
def box_qp():
    """minimize 1/2 ||x||^2 + q'x  s.t.  x <= h: x* = min(-q, h), a piecewise affine solution map."""
    pp = ParametricProblem(_box_problem(), "cone")
    params = _box_params()
    tight = {"eps_abs": 1e-10, "eps_rel": 1e-10}
    return pp, solved_source(pp, "scs", params, solver_settings=tight), tight


def _box_problem():
    import cvxpy as cp

    q, h, x = cp.Parameter(3, name="q"), cp.Parameter(3, name="h"), cp.Variable(3, name="x")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [x <= h])


def _box_params():
    rng = np.random.default_rng(5)
    return {"q": rng.normal(size=(40, 3)), "h": rng.uniform(-0.5, 0.5, size=(40, 3))}


def _shell_and_targets(pp, solved, algorithm="scs"):
    from amortcvx.iterations.registry import ITERATIONS
    from amortcvx.training.recipe import _normalization

    settings = ITERATIONS[algorithm].settings()
    shell, target = _normalization(pp, algorithm, settings, solved)
    return settings, shell, (target - shell.out_mean) / shell.out_std


def _moved(pp, solved, shell, du, tight):
    """The instances at normalized parameters u + du, solved tightly, and their normalized targets."""
    from amortcvx.training.trainer import SolvedSet, targets

    theta = solved.theta + du * shell.in_std
    moved = solved_source(pp, "scs", {"q": theta[:, :3].numpy(), "h": theta[:, 3:].numpy()},
                          solver_settings=tight)(len(theta))
    assert len(moved) == len(theta)
    settings, _, _ = _shell_and_targets(pp, solved)
    z = targets(pp, "scs", settings, SolvedSet(moved.theta, moved.x, moved.y, moved.s), len(moved))
    return (z - shell.out_mean) / shell.out_std


def test_solution_tangents_match_differences_of_tight_solves(box_qp):
    from amortcvx.training.tangents import solution_tangents

    pp, source, tight = box_qp
    solved = source(40)
    settings, shell, _ = _shell_and_targets(pp, solved)
    jac = solution_tangents(pp, "scs", settings, solved, shell.in_std, shell.out_std)
    assert jac.shape == (40, pp.n + pp.m, pp.num_params)  # SCS's fixed-point variable: (x, y - s)
    h = 1e-4
    for k in (0, 4):  # a q and an h entry
        e = torch.zeros(pp.num_params, dtype=torch.float64)
        e[k] = h
        fd = (_moved(pp, solved, shell, e, tight) - _moved(pp, solved, shell, -e, tight)) / (2 * h)
        torch.testing.assert_close(jac[:, :, k], fd, atol=1e-4, rtol=1e-4)
    assert float(jac.abs().max()) > 0.1  # the map does move
    # past the deadline: the first chunk only (at least two instances)
    early = solution_tangents(pp, "scs", settings, solved, shell.in_std, shell.out_std, deadline=0.0)
    assert 2 <= len(early) < 40
    torch.testing.assert_close(early, jac[:len(early)])


def test_neighbor_tangent_is_exact_on_the_neighbours_affine_piece(box_qp):
    from amortcvx.predictors import NeighborTangent
    from amortcvx.training.tangents import solution_tangents

    pp, source, tight = box_qp
    solved = source(40)
    settings, shell, values = _shell_and_targets(pp, solved)
    keys = (solved.theta - shell.in_mean) / shell.in_std
    jac = solution_tangents(pp, "scs", settings, solved, shell.in_std, shell.out_std)
    du = 1e-3 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    truth = _moved(pp, solved, shell, du, tight)  # x* = min(-q, h) keeps its pieces under so small a move
    tangent = NeighborTangent(keys, values, jac, hidden=(8,)).double().eval()
    plain = NeighborCorrection(keys, values, hidden=(8,)).double().eval()
    with torch.no_grad():
        err_tangent = float((tangent(keys + du) - truth).abs().max())
        err_plain = float((plain(keys + du) - truth).abs().max())
    assert err_tangent < 1e-8 and err_plain > 1e-3  # measured: 1.7e-12 against 5.0e-3
    with pytest.raises(ValueError, match="tangents must have shape"):
        NeighborTangent(keys, values, jac[:, :, :2])



def test_neighbor_tangent_keeps_its_derivatives_in_float32_through_conversions_and_saving(box_qp, tmp_path):
    """The derivatives are stored in ``TANGENT_DTYPE`` (half of float64's memory) whatever the module's dtype, are
    saved and loaded so, and the float64 model's predictions are those of float64 derivatives to float32's rounding."""
    from amortcvx.predictors import NeighborTangent
    from amortcvx.predictors.neighbor import TANGENT_DTYPE
    from amortcvx.training.tangents import solution_tangents

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, values = _shell_and_targets(pp, solved)
    keys = (solved.theta - shell.in_mean) / shell.in_std
    jac = solution_tangents(pp, "scs", settings, solved, shell.in_std, shell.out_std)
    assert jac.dtype == torch.float64 and TANGENT_DTYPE == torch.float32
    core = NeighborTangent(keys, values, jac, hidden=(8,), choices=2).double().eval()
    assert core.tangents.dtype == torch.float32 and core.keys.dtype == core.values.dtype == torch.float64
    assert core.float().double().tangents.dtype == torch.float32
    model = WarmStartPredictor(shell.meta, core=core).double().eval()
    path = tmp_path / "tangent.pt"
    model.save(path)
    loaded = WarmStartPredictor.load(path).double().eval()
    assert loaded.core.tangents.dtype == torch.float32
    torch.testing.assert_close(loaded.core.tangents, core.tangents, rtol=0, atol=0)
    du = 0.05 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        exact = values + torch.einsum("bdp,bp->bd", jac, du)  # the nearest of keys + du is the instance itself
        z = loaded.core(keys + du)
    scale = float(exact.abs().max())
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-6 * scale)
    assert float((z - exact).abs().max()) > 0  # rounded to float32 (else this test would not see the storage)


def test_anchor_derivatives_extend_from_where_they_end_in_each_sets_units(box_qp, monkeypatch):
    """The recipe's derivatives: a larger training set computes only its new anchors, a smaller or equal one
    none; each set gets them in its own normalization's units, equal to computing them all at once there."""
    import amortcvx.training.recipe as recipe_mod
    from amortcvx.training.tangents import solution_tangents

    pp, source, _ = box_qp
    solved = source(40)
    calls: list[int] = []

    def counted(pp_, alg, settings, part, *args, **kwargs):
        calls.append(len(part))
        return solution_tangents(pp_, alg, settings, part, *args, **kwargs)

    monkeypatch.setattr(recipe_mod, "solution_tangents", counted)
    settings, small_shell, _ = _shell_and_targets(pp, solved.subset(torch.arange(15)))
    _, shell, _ = _shell_and_targets(pp, solved)
    assert not torch.allclose(small_shell.out_std, shell.out_std)  # the two sets have their own units
    store = recipe_mod.AnchorDerivatives(pp, "scs", settings, deadline=float("inf"))
    assert store.seconds_for(15) == 0.0 and not store.full()  # no rate measured yet, no derivatives
    first = store(solved.subset(torch.arange(15)), small_shell)
    assert store.seconds_for(15) == 0.0 and store.seconds_for(45) == pytest.approx(3 * store.seconds_for(25))
    again = store(solved.subset(torch.arange(10)), small_shell)
    full = store(solved, shell)
    assert calls == [15, 25]
    assert first.shape[0] == 15 and again.shape[0] == 10 and full.shape[0] == 40
    assert full.dtype == torch.float32
    want = solution_tangents(pp, "scs", settings, solved, shell.in_std, shell.out_std)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, first[:10])
    monkeypatch.setattr(recipe_mod, "TANGENT_BYTES", 12 * pp.num_params * (pp.n + pp.m) * 4)  # 12 anchors' worth
    capped = recipe_mod.AnchorDerivatives(pp, "scs", settings, deadline=float("inf"))
    assert capped(solved, shell).shape[0] == 12 and calls[-1] == 12
    assert capped.full() and not store.full()  # at its memory cap; the first store below it (40 of its cap)


def test_uncorrected_candidates_train_nothing_and_normalize_the_training_fields():
    plain = Candidate(kind="neighbor_tangent", correction=False)
    assert Candidate(kind="neighbor_tangent", correction=False, hidden=(64, 64), weight_decay=1e-4, residual=True,
                     member=2) == plain
    assert (plain.hidden, plain.weight_decay, plain.residual, plain.member, plain.ensemble) == ((), 0.0, False, 0, 1)
    assert plain.label() == "neighbor_tangent uncorrected" != Candidate(kind="neighbor_tangent").label()
    with pytest.raises(ValueError, match="only the kinds .* predict without a trained correction; got 'mlp'"):
        Candidate(kind="mlp", correction=False)


def test_uncorrected_model_is_the_tangent_expansion_with_the_training_normalization(box_qp):
    """The recipe's uncorrected tangent: the neighbour's solution moved along its derivative, in float64, with the
    normalization training would fit; on the neighbours' affine pieces it starts SCS at the answer."""
    from amortcvx.predictors import NeighborTangent
    from amortcvx.training.recipe import uncorrected_model

    pp, source, tight = box_qp
    solved = source(40)
    settings, shell, values = _shell_and_targets(pp, solved)
    model = uncorrected_model(Candidate(kind="neighbor_tangent", correction=False), pp, "scs", settings, solved)
    assert isinstance(model.core, NeighborTangent) and not model.training
    assert all(p.dtype == torch.float64 and not p.any() for p in model.core.net.parameters())  # no correction
    for name in ("in_mean", "in_std", "out_mean", "out_std"):
        torch.testing.assert_close(getattr(model, name), getattr(shell, name).double(), rtol=0, atol=0)
    keys = (solved.theta - shell.in_mean) / shell.in_std
    du = 1e-3 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    truth = _moved(pp, solved, shell, du, tight)
    with torch.no_grad():
        z = model(solved.theta + du * shell.in_std)
    torch.testing.assert_close((z - shell.out_mean) / shell.out_std, truth, atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="trains a correction"):
        uncorrected_model(Candidate(kind="neighbor_tangent"), pp, "scs", settings, solved)


def test_the_uncorrected_expansion_is_chosen_as_a_companion_without_capacity_or_ensemble(portfolio, monkeypatch):
    """Scripted: the trained tangent's correction costs iterations its expansion alone does not (as on mpc); the
    search tries the uncorrected expansion last, it rides the curve as a companion and becomes the choice where it
    is the best, the curve's own network goes on, and nothing is trained for it (no capacity step, no ensemble)."""
    import amortcvx.training.recipe as recipe_mod

    built: list = []

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind == "neighbor_tangent uncorrected":
            return 0.5 * 60 / n, 360.0 / n  # a higher loss than the trained kinds, fewer iterations
        return 0.2 * 60 / n, 12.0

    def uncorrected(cand, pp_, alg, settings, part, tangents=None, splits=None, fit_classifier=None, reference=None):
        built.append(len(part))
        return TaggedModel(cand.label(), 0, len(part))

    monkeypatch.setattr(recipe_mod, "uncorrected_model", uncorrected)
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_tangent", "hidden": (128, 128)}, {"hidden": (64, 64)},
                                            {"kind": "neighbor_tangent", "correction": False}), ensemble=3)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    order = [(t.candidate.label().split()[0], t.candidate.correction, t.num_train) for t in res.trials]
    assert order[:4] == [("mlp", True, 60), ("neighbor_tangent", True, 60), ("mlp", True, 60),
                         ("neighbor_tangent", False, 60)]
    assert res.candidate == Candidate(kind="neighbor_tangent", correction=False) and res.num_train == 240
    # it rode the curve; no capacity step, no ensemble; 16-128 candidates; the choice rebuilt at the end (an
    # uncorrected model is not kept: its derivatives are most of the memory)
    assert built == [60, 120, 240] + [240] * 4 + [240]
    assert (res.model.kind, res.model.n) == (res.candidate.label(), 240)
    assert [t.candidate.choices for t in res.trials[-4:]] == [16, 32, 64, 128]
    assert res.candidate.choices == 8  # more candidates: no better here (scripted)
    assert ("mlp", True, 240) in order  # the curve's own network went on beside it
    assert all(p.configuration.startswith("mlp") for p in res.curve)
    assert all(t.candidate.member == 0 and t.candidate.ensemble == 1 for t in res.trials)


def test_the_uncorrected_expansion_rides_along_as_its_own_companion(portfolio, monkeypatch):
    """Scripted: in the search the trained tangent beats its uncorrected expansion (as on mpc's validation set at
    500 instances), and the MLP beats both; the expansion, which trains nothing, still rides along the curve as a
    companion of its own (not only the best of its kind) and takes over where more data makes it better."""
    import amortcvx.training.recipe as recipe_mod

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind == "neighbor_tangent uncorrected":
            return 0.5, 14.0 if n <= 60 else 4.0
        return (0.4, 13.0) if kind == "neighbor_tangent" else (0.3 * 60 / n, 12.0)

    monkeypatch.setattr(recipe_mod, "uncorrected_model",
                        lambda cand, pp_, alg, settings, part, *_: TaggedModel(cand.label(), 0, len(part)))
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                              alternatives=({"kind": "neighbor_tangent", "hidden": (128, 128)},
                                            {"kind": "neighbor_tangent", "correction": False}), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    at_120 = [t.candidate.label() for t in res.trials if t.num_train == 120]
    assert "neighbor_tangent uncorrected" in at_120 and at_120[0].startswith("mlp")
    assert res.candidate == Candidate(kind="neighbor_tangent", correction=False) and res.num_train == 120


def test_an_uncorrected_expansion_doubles_its_candidates_while_that_pays(portfolio, monkeypatch):
    """Scripted: the uncorrected expansion rides along the MLP's curve; its number of candidates is doubled from 8
    up to the cap, every count tried (16 and 32 pay, 64 does not), and with 32 it beats the MLP and becomes the
    choice; where every doubling pays, the count stops below the training set's size or at ``MAX_CHOICES``; where
    more candidates pay but stay worse than the MLP, the MLP stays the choice."""
    import amortcvx.training.recipe as recipe_mod

    def run(by_count, mlp=9.5):
        def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
            if kind.startswith("neighbor_tangent uncorrected"):
                count = int(kind.split(", ")[1].split()[0]) if ", " in kind else recipe_mod.NEIGHBOR_CHOICES
                return 0.5, by_count[count]
            return 0.3, mlp

        monkeypatch.setattr(recipe_mod, "uncorrected_model", lambda cand, pp_, alg, settings, part, *_:
                            TaggedModel(cand.label(), 0, len(part)))
        settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=120,
                                  alternatives=({"kind": "neighbor_tangent", "correction": False},), ensemble=1)
        return scripted_recipe(monkeypatch, portfolio, scripted, settings)

    res = run({8: 10.0, 16: 9.0, 32: 7.0, 64: 8.0})
    assert res.candidate == Candidate(kind="neighbor_tangent", correction=False, choices=32)
    assert [t.candidate.choices for t in res.trials if not t.candidate.correction] == [8, 8, 16, 32, 64]
    assert res.val_median_iterations == 7.0 and res.num_train == 120
    every = {8: 10.0, 16: 9.0, 32: 8.0, 64: 7.0, 128: 6.0}
    res = run(every)  # every doubling pays: the count stops below the 120 training instances (128 would exceed)
    assert [t.candidate.choices for t in res.trials if not t.candidate.correction] == [8, 8, 16, 32, 64]
    monkeypatch.setattr(recipe_mod, "MAX_CHOICES", 32)
    res = run(every)  # and at MAX_CHOICES
    assert res.candidate.choices == 32
    assert [t.candidate.choices for t in res.trials if not t.candidate.correction] == [8, 8, 16, 32]
    monkeypatch.undo()
    res = run({8: 12.0, 16: 11.0, 32: 10.5, 64: 11.0})
    assert res.candidate == Candidate() and res.val_median_iterations == 9.5
    assert Candidate(kind="neighbor_tangent", correction=False, choices=32).label() == (
        "neighbor_tangent uncorrected, 32 candidates")
    with pytest.raises(ValueError, match="choices must be an int of at least 1"):
        Candidate(kind="neighbor_tangent", correction=False, choices=0)


def clocked_rider_recipe(monkeypatch, portfolio, scripted, budget: float) -> RecipeResult:
    """A scripted recipe on a simulated clock where the uncorrected expansion (the only alternative) rides an MLP
    curve of 60, 120 and 240 instances: an MLP training costs 10 s per 60 instances (the budget's estimates are
    exact: 3 epochs, patience 1), an expansion trial 1 s."""
    import amortcvx.training.recipe as recipe_mod

    clock = FakeClock()

    def uncorrected(cand, pp_, alg, settings, part, tangents=None, splits=None, fit_classifier=None, reference=None):
        clock.t += 1.0
        return TaggedModel(cand.label(), 0, len(part))

    monkeypatch.setattr(recipe_mod, "uncorrected_model", uncorrected)
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_tangent", "correction": False},), ensemble=1,
                              epochs=3, patience=1)
    return scripted_recipe(monkeypatch, portfolio, scripted, settings, cost=lambda kind, n, width: 10.0 * n / 60,
                           clock=clock, budget=budget)


def test_the_curve_leaves_time_for_the_candidate_step(portfolio, monkeypatch):
    """Scripted on a clock of simulated seconds: the MLP's loss keeps falling with more data (so its curve goes
    on) while the uncorrected expansion rides along and pays with more candidates. The curve stops where its next
    training would leave less than ``CANDIDATE_RESERVE`` times the expansion's trial time, the expansion goes on
    alone, and its candidates are doubled; without the reserve, the curve's last training takes the budget and no
    doubling is tried."""
    import amortcvx.training.recipe as recipe_mod

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
        if kind.startswith("neighbor_tangent uncorrected"):
            return 0.5, 10.0 if ", " not in kind else 6.0  # 16 candidates and more: 6
        return 0.3 * 60 / n, 12.0

    def run(reserve: int):
        monkeypatch.setattr(recipe_mod, "CANDIDATE_RESERVE", reserve)
        # the search ends at 11 s, the curve's 120 at 32 s; its 240 would end at 73 s of the 74
        res = clocked_rider_recipe(monkeypatch, portfolio, scripted, budget=74)
        mlp = [t.num_train for t in res.trials if t.candidate.kind == "mlp"]
        counts = [t.candidate.choices for t in res.trials if not t.candidate.correction]
        return res, mlp, counts

    res, mlp, counts = run(recipe_mod.CANDIDATE_RESERVE)  # the default: 16 s kept for the step
    # the curve stops at 120; the expansion goes on alone to 240 (1 s, within the budget and the reserve) and its
    # candidates are doubled there (256 would exceed the 240 training instances)
    assert mlp == [60, 120] and counts == [8, 8, 8, 16, 32, 64, 128]
    assert res.candidate == Candidate(kind="neighbor_tangent", correction=False, choices=16) and res.num_train == 240
    res, mlp, counts = run(0)
    assert mlp == [60, 120, 240] and counts == [8, 8, 8]
    assert res.candidate.choices == 8 and res.val_median_iterations == 10.0


def test_a_classifiers_fit_is_not_counted_in_the_candidate_steps_reserve(portfolio, monkeypatch):
    """Scripted on a simulated clock: the active-set classifier rides an MLP curve; each new training-set size costs
    its fit (3 s, once per size) and every trial 1 s. The candidate step reuses the fit, so the reserve the curve and
    the sizes alone leave for it counts the 1 s trials only: the classifier goes on alone to 240 and its candidates are
    doubled there. Counted with the fit (16 x 4 s), the reserve would already end the curve at 60."""
    import amortcvx.training.recipe as recipe_mod

    clock = FakeClock()
    fits = []

    class Core:  # what the recipe's memo sees of a ClassifiedActiveSet
        def __init__(self, n: int):
            self.keys, self.classifier = torch.zeros(n, 1), torch.nn.Linear(1, 1)

        def fit(self):
            fits.append(len(self.keys))
            clock.t += 3.0

    def uncorrected(cand, pp_, alg, settings, part, tangents=None, splits=None, fit_classifier=None, reference=None):
        fit_classifier(Core(len(part)))
        clock.t += 1.0
        return TaggedModel(cand.label(), 0, len(part))

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
        if kind.startswith("active_set_classifier uncorrected"):
            return 0.5, 10.0 if ", " not in kind else 6.0  # 16 candidates and more: 6
        return 0.3 * 60 / n, 12.0  # the MLP's loss keeps falling: its curve goes on

    monkeypatch.setattr(recipe_mod, "uncorrected_model", uncorrected)
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "active_set_classifier", "correction": False},), ensemble=1,
                              epochs=3, patience=1)
    # the search ends at 14 s, the curve's 120 at 38 s, its 240 would end at 82 s of the 90: the curve stops there
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings, cost=lambda kind, n, width: 10.0 * n / 60,
                          clock=clock, budget=90)
    riders = [(t.num_train, t.candidate.choices) for t in res.trials if not t.candidate.correction]
    assert [t.num_train for t in res.trials if t.candidate.kind == "mlp"] == [60, 120]
    assert riders == [(60, 8), (120, 8), (240, 8), (240, 16), (240, 32), (240, 64), (240, 128)]
    assert fits == [60, 120, 240]  # once per size
    assert res.candidate == Candidate(kind="active_set_classifier", correction=False, choices=16)


def test_an_expansion_whose_derivatives_would_outlast_the_curve_rides_no_further(portfolio, monkeypatch):
    """Scripted on a simulated clock: the uncorrected expansion rides the MLP's curve unless it is not the best so
    far and its new derivatives alone (predicted from the rate measured so far) would take longer than the curve's
    training at that size; as the best so far it rides on whatever they cost."""
    import amortcvx.training.recipe as recipe_mod

    def run(seconds_per_instance, rider_iterations: float):
        class Derivatives:  # the recipe's derivatives, with a scripted cost
            def __init__(self, *args, **kwargs):
                self.seconds, self.cap = 0.0, 0

            def full(self) -> bool:
                return False

            def seconds_for(self, n: int) -> float:
                return seconds_per_instance(n) * n

        def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
            if kind.startswith("neighbor_tangent uncorrected"):
                return 0.5, rider_iterations
            return 0.3 * 60 / n, 12.0  # the MLP's loss keeps falling: its curve goes on

        monkeypatch.setattr(recipe_mod, "AnchorDerivatives", Derivatives)
        # the curve ends at 240 after about 75 s: no time left for the expansion to go on alone to 240 where it stopped
        # riding (test_an_expansion_goes_on_alone_only_where_its_derivatives_fit_the_budget)
        res = clocked_rider_recipe(monkeypatch, portfolio, scripted, budget=100)
        return [(t.candidate.kind, t.num_train) for t in res.trials if t.candidate.choices == 8]

    # the MLP trains 120 instances in 20 s: derivatives of 0.2 s per instance (24 s) would take longer
    assert run(lambda n: 0.2, 14.0) == [("mlp", 60), ("neighbor_tangent", 60), ("mlp", 120), ("mlp", 240)]
    both = [("mlp", 60), ("neighbor_tangent", 60), ("mlp", 120), ("neighbor_tangent", 120), ("mlp", 240),
            ("neighbor_tangent", 240)]
    assert run(lambda n: 0.1, 14.0) == both
    # cheap at 120, where it becomes the best so far (10 against 12), then 240 s at 240 (the MLP's 40 s): it rides on
    assert run(lambda n: 0.1 if n <= 120 else 1.0, 10.0) == both
    assert run(lambda n: 0.1 if n <= 120 else 1.0, 14.0) == both[:-1]  # not the best: it does not

def test_an_expansion_goes_on_alone_only_where_its_derivatives_fit_the_budget(portfolio, monkeypatch):
    """Scripted on a simulated clock: the MLP stops gaining at 120 instances; the uncorrected expansion, riding it or
    stopped from riding by the cost of its derivatives, goes on alone to 240 where its new derivatives (predicted
    from the rate measured so far) and its trial fit the budget with the candidate step's reserve, and not where the
    derivatives would not, nor where they are at their memory cap (a larger set would give it no more anchors)."""
    import amortcvx.training.recipe as recipe_mod

    def run(seconds_per_instance, anchors_full: bool = False):
        class Derivatives:  # the recipe's derivatives, with a scripted cost
            def __init__(self, *args, **kwargs):
                self.seconds, self.cap = 0.0, 100

            def full(self) -> bool:
                return anchors_full

            def seconds_for(self, n: int) -> float:
                return seconds_per_instance(n) * n

        def scripted(kind: str, width: int, n: int) -> tuple[float, float]:
            if kind.startswith("neighbor_tangent uncorrected"):
                return 0.5, 14.0
            return 0.5, 12.0  # the MLP gains nothing from more data: its curve stops at 120

        monkeypatch.setattr(recipe_mod, "AnchorDerivatives", Derivatives)
        res = clocked_rider_recipe(monkeypatch, portfolio, scripted, budget=150)
        return [(t.candidate.kind, t.num_train) for t in res.trials if t.candidate.choices == 8]

    curve = [("mlp", 60), ("neighbor_tangent", 60), ("mlp", 120)]
    wider = [("mlp", 120)]  # the capacity step where more data stopped paying
    assert run(lambda n: 0.01) == curve + [("neighbor_tangent", 120)] + wider + [("neighbor_tangent", 240)]
    # 240 s of derivatives at 240: not in the budget
    assert run(lambda n: 0.01 if n <= 120 else 1.0) == curve + [("neighbor_tangent", 120)] + wider
    # 24 s of derivatives at 120, longer than the MLP's 20 s there: it stops riding, then goes on alone
    assert run(lambda n: 0.2) == curve + wider + [("neighbor_tangent", 120), ("neighbor_tangent", 240)]
    # its derivatives at their memory cap (as many anchors as the cap allows): a larger set would add none
    assert run(lambda n: 0.01, anchors_full=True) == curve + [("neighbor_tangent", 120)] + wider


def test_predict_keeps_the_best_of_many_candidates_taken_one_at_a_time(box_qp):
    """The uncorrected tangent with 32 candidates: ``predict`` takes them one at a time and returns, per instance,
    the candidate of smallest optimality residual, the same as ranking all of them at once; the model's core
    predicts from the count its candidate asks for."""
    from amortcvx.iterations.registry import make_algorithm
    from amortcvx.predictors import predict
    from amortcvx.training.recipe import uncorrected_model

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, _ = _shell_and_targets(pp, solved)
    model = uncorrected_model(Candidate(kind="neighbor_tangent", correction=False, choices=32), pp, "scs", settings,
                              solved)
    assert model.core.choices == 32
    theta = solved.theta + 0.3 * torch.randn(solved.theta.shape, generator=torch.Generator().manual_seed(9),
                                             dtype=torch.float64) * shell.in_std
    alg = make_algorithm("scs", pp.canonicalize_vector(theta), settings)
    space = output_space("scs")
    with torch.no_grad():
        every = model.candidates(theta)
        res = torch.stack([alg.optimality(space.to_state(alg, every[:, i])) for i in range(every.shape[1])], 1)
        z = predict(model, space, alg, theta)
    picked = res.argmin(dim=1)
    assert len(set(picked.tolist())) > 3  # the choice differs between instances
    torch.testing.assert_close(z, every[torch.arange(len(theta)), picked], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm, form", [("scs", "cone"), ("osqp", "qp")])
def test_an_algorithm_takes_instances_of_its_batch_without_a_new_factorization(algorithm, form):
    """``alg.take(index)`` is the algorithm on the batch's instances ``index`` (here the batch repeated 3 times, copy
    after copy, and a few instances out of order with a repeat): its optimality residual and its step equal the batch's
    own on those instances, and the shared factorization is reused (no new build in the cache). Where the
    factorization is per instance (a parameter in ``A``), the taken algorithm's steps are the batch's own too, its
    instances' factors gathered, none built again."""
    import cvxpy as cp

    from amortcvx.iterations.linalg import FactorCache
    from amortcvx.iterations.registry import make_algorithm

    pp = ParametricProblem(_box_problem(), form)
    params = {k: v[:5] for k, v in _box_params().items()}
    cache = FactorCache()
    alg = make_algorithm(algorithm, pp.canonicalize(params), cache=cache)
    space = output_space(algorithm)
    z = torch.randn(3, 5, space.dim(alg.work.n, alg.work.m), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    three = alg.take(torch.arange(5).repeat(3))
    assert cache.builds == 1 and three.work.batch_size == 15
    state = space.to_state(three, z.reshape(15, -1))
    own = torch.stack([alg.optimality(space.to_state(alg, z[c])) for c in range(3)])
    torch.testing.assert_close(three.optimality(state).view(3, 5), own, rtol=1e-12, atol=1e-12)
    stepped = three.fixed_point(three.step(state)).view(3, 5, -1)
    for c in range(3):
        torch.testing.assert_close(stepped[c], alg.fixed_point(alg.step(space.to_state(alg, z[c]))), rtol=1e-10,
                                   atol=1e-12)
    index = torch.tensor([4, 1, 1])
    some = alg.take(index)
    torch.testing.assert_close(some.optimality(space.to_state(some, z[0, index])), own[0, index], rtol=1e-12,
                               atol=1e-12)

    a, x = cp.Parameter(3, name="a"), cp.Variable(3, name="x")
    in_a = ParametricProblem(cp.Problem(cp.Minimize(cp.sum_squares(x)), [a @ x >= 1]), form)
    per_instance = make_algorithm(algorithm, in_a.canonicalize({"a": np.ones((2, 3)) + np.eye(3)[:2]}))
    assert per_instance.work.solver.batch_size == 2
    pick = torch.tensor([1, 0, 1])
    taken = per_instance.take(pick)
    start = per_instance.init()
    torch.testing.assert_close(taken.fixed_point(taken.step(taken.init())),
                               per_instance.fixed_point(per_instance.step(start))[pick], rtol=0, atol=1e-12)


def test_predict_ranks_groups_of_candidates_as_it_ranks_them_one_at_a_time(box_qp):
    """``predict`` ranks the candidates a group at a time on the batch taken ``g`` times (``rank_group``: here groups of
    21, the last one padded): with every candidate ranked (``exact=None``) the pick equals ranking them one call per
    candidate (``rank_entries=1``) and ranking all of them at once, instance by instance; where the algorithm cannot
    take instances it ranks them one at a time. By default a small batch of this small problem is one group."""
    from amortcvx.iterations.registry import make_algorithm
    from amortcvx.predictors import predict
    from amortcvx.predictors.fixed_point import rank_group
    from amortcvx.training.recipe import uncorrected_model

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, _ = _shell_and_targets(pp, solved)
    model = uncorrected_model(Candidate(kind="neighbor_tangent", correction=False, choices=37), pp, "scs", settings,
                              solved)
    theta = solved.theta[:3] + 0.3 * torch.randn((3, solved.theta.shape[1]), dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(4)) * shell.in_std
    alg = make_algorithm("scs", pp.canonicalize_vector(theta), settings)
    space = output_space("scs")
    width = space.dim(alg.work.n, alg.work.m)
    sizes = []

    def counted(index):
        sizes.append(len(index) // 3)
        return alg.take(index)

    with torch.no_grad():
        every = model.candidates(theta)
        res = torch.stack([alg.optimality(space.to_state(alg, every[:, i])) for i in range(every.shape[1])], 1)
        grouped = predict(model, space, alg._replace(take=counted), theta, rank_entries=21 * 3 * width, exact=None)
        whole = predict(model, space, alg._replace(take=counted), theta, exact=None)
        single = predict(model, space, alg, theta, rank_entries=1, exact=None)
        untaken = predict(model, space, alg._replace(take=None), theta, exact=None)
    assert sizes == [21, 37] and rank_group(37, 3, width) == 37  # groups of 21 (the second padded), then one
    assert float(res.min(dim=1).values.min()) > 1e-9  # no candidate is exact here: the default ranks them all too
    best = every[torch.arange(3), res.argmin(dim=1)]
    for z in (grouped, whole, single, untaken, predict(model, space, alg, theta)):
        torch.testing.assert_close(z, best, rtol=0, atol=0)


def test_the_ranking_benchmark_runs_and_reports_both_rankings():
    """``benchmarks/bench_ranking.py`` on a tiny configuration: the machine line, then one line per candidate count
    and batch size with both times, their ratio and how far the two picks differ."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ranking.py"
    out = subprocess.run([sys.executable, str(script), "--pairs", "portfolio:small:scs", "--train", "60",
                          "--choices", "8", "--batch", "1", "4", "--repeats", "1", "--workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "ms/instance" in line]
    assert out.stdout.startswith("machine:") and len(rows) == 2
    assert all("one call each" in r and "ratio" in r and "picks differ by" in r for r in rows)


def test_derivatives_carry_over_to_another_normalization(box_qp):
    """The recipe computes a tangent kind's derivatives once per anchor count; a larger training set beyond the cap
    has its own normalization, into which ``renormalized`` converts them: the same as computing them there."""
    from amortcvx.training.recipe import renormalized
    from amortcvx.training.tangents import solution_tangents

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, _ = _shell_and_targets(pp, solved.subset(torch.arange(20)))
    _, other, _ = _shell_and_targets(pp, solved)
    assert not torch.allclose(shell.in_std, other.in_std) and not torch.allclose(shell.out_std, other.out_std)
    first = solved.subset(torch.arange(20))
    jac = solution_tangents(pp, "scs", settings, first, shell.in_std, shell.out_std)
    direct = solution_tangents(pp, "scs", settings, first, other.in_std, other.out_std)
    torch.testing.assert_close(renormalized(jac, shell.in_std, shell.out_std, other.in_std, other.out_std), direct)


def test_an_uncorrected_expansion_that_wins_the_search_does_not_stop_a_network_that_gains_from_data(
        portfolio, monkeypatch):
    """Scripted (mpc_param_dyn, stop 30): at the search size the uncorrected expansion is best (here by its median;
    there by its mean at a tie), but it gains nothing from more data while the MLP does. The search's choice is the
    MLP, whose curve goes on; the expansion rides along and does not take over."""
    import amortcvx.training.recipe as recipe_mod

    def scripted(kind: str, width: int, n: int) -> tuple[float, float]:  # (validation loss, median iterations)
        if kind.startswith("neighbor_tangent uncorrected"):  # however many candidates
            return 0.6, 13.0
        return 0.5 * 60 / n, {60: 14.0, 120: 10.0}.get(n, 8.0)

    monkeypatch.setattr(recipe_mod, "uncorrected_model",
                        lambda cand, pp_, alg, settings, part, *_: TaggedModel(cand.label(), 0, len(part)))
    settings = RecipeSettings(val_size=30, eval_size=10, search_size=60, sizes=(60, 120), max_size=240,
                              alternatives=({"kind": "neighbor_tangent", "correction": False},), ensemble=1)
    res = scripted_recipe(monkeypatch, portfolio, scripted, settings)
    assert res.candidate == Candidate() and res.num_train == 240
    order = [(t.candidate.label().split()[-1], t.num_train) for t in res.trials]
    assert order == [("regression", 60), ("uncorrected", 60), ("regression", 120), ("uncorrected", 120),
                     ("regression", 240), ("uncorrected", 240)] + [("candidates", 240)] * 4  # 16-128: no better


def test_amortized_solver_starts_from_the_chosen_candidate_and_answers_at_the_tolerance(box_qp):
    """End to end through ``AmortizedSolver``: the uncorrected tangent from 8 neighbours, on instances moved slightly
    from the stored ones (on their pieces), starts SCS at the answer (median 0 exact C iterations, against the cold
    start's), and every answer is optimal and agrees with the cold solve's objective to the tolerance."""
    from amortcvx import AmortizedSolver
    from amortcvx.training.recipe import uncorrected_model

    pp, source, _ = box_qp
    solved = source(40)
    settings, shell, _ = _shell_and_targets(pp, solved)
    model = uncorrected_model(Candidate(kind="neighbor_tangent", correction=False), pp, "scs", settings, solved)
    assert model.core.choices == 8
    du = 1e-3 * torch.randn(solved.theta.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    theta = (solved.theta + du * shell.in_std).numpy()
    params = {"q": theta[:, :3], "h": theta[:, 3:]}
    learned = AmortizedSolver(pp, model, k=0, solver_settings=EPS, workers=1).solve(params, exact_iterations=True)
    cold = AmortizedSolver(pp, None, algorithm="scs", k=0, solver_settings=EPS, workers=1).solve(
        params, exact_iterations=True)
    its = [r.iterations for r in learned.results]
    assert np.median(its) == 0 < np.median([r.iterations for r in cold.results])
    assert all(r.status.name == "OPTIMAL" for r in learned.results)
    np.testing.assert_allclose([r.objective for r in learned.results], [r.objective for r in cold.results],
                               atol=1e-3, rtol=1e-3)
