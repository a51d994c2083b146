"""The classifier of LPs' and QPs' optimal active sets (``predictors.ClassifiedActiveSet``) and its candidates."""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx.canon import ParametricProblem
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors import ClassifiedActiveSet, WarmStartPredictor, output_space
from amortcvx.predictors.classifier import CLASSES, flip_rows, most_probable_flips
from amortcvx.predictors.fixed_point import predict
from amortcvx.training.recipe import (
    Candidate,
    RecipeSettings,
    applies,
    c_iterations,
    fit_predictor,
    solved_source,
    training_splits,
    uncorrected_model,
)
from tests.test_active_set import EPS, FORMS, TIGHT
from tests.test_active_set import _solved as _solved_problem

N = 8


def _separable_problem():
    """minimize 1/2 ||x||^2 + q'x  s.t.  x <= h: row i is active exactly where -q_i > h_i (2^8 active sets)."""
    q, h, x = cp.Parameter(N, name="q"), cp.Parameter(N, name="h"), cp.Variable(N, name="x")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [x <= h])


def _params(num: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.normal(size=(num, N)), "h": rng.uniform(0.0, 0.5, size=(num, N))}


def _solved(algorithm: str, form: str, params, settings=TIGHT):
    return _solved_problem(_separable_problem(), algorithm, form, params, settings)


def _model(pp, algorithm: str, train, kind: str = "active_set_classifier", choices: int = 16) -> WarmStartPredictor:
    return uncorrected_model(Candidate(kind=kind, correction=False, choices=choices), pp, algorithm, None, train)


def test_the_most_probable_flips_are_the_cheapest_subsets_in_order():
    """With every row among the candidates' (5 rows, 32 asked), the subsets come cheapest first, each once, subset 0
    (no flip) first; a row that cannot flip (cost inf) is in none, and the slots past the finite subsets repeat
    subset 0; one asked: no flip."""
    cost = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.01
    cost[1, 2] = float("inf")
    rows, subsets, masks = most_probable_flips(cost, 32)
    assert flip_rows(5, 32) == 5 and rows.shape == (3, 5) and subsets.shape == (3, 32) and masks.shape == (32, 5)
    for b in range(3):
        every = sorted(sum(float(cost[b, j]) for j in sub) for r in range(6)
                       for sub in itertools.combinations(range(5), r))
        finite = [c for c in every if np.isfinite(c)]
        got = [float(cost[b, rows[b][masks[s]]].sum()) for s in subsets[b].tolist()]
        assert subsets[b, 0] == 0 and got[:len(finite)] == pytest.approx(finite, rel=1e-12, abs=0)
        assert len(set(subsets[b, :len(finite)].tolist())) == len(finite)
        assert subsets[b, len(finite):].tolist() == [0] * (32 - len(finite))
    assert len({0}.union(subsets[1].tolist())) == 16 and not bool(masks[subsets[1]][:, rows[1] == 2].any())
    _, one, _ = most_probable_flips(cost, 1)
    assert one.tolist() == [[0], [0], [0]]


def test_candidate_splits_are_the_most_probable_in_order_and_keep_constant_rows():
    """The candidates of a classifier (random weights): the first is each row's most probable side; the others
    differ from it only by second most probable sides, in no row with one side only; each is distinct and their
    log-probabilities do not increase; groups of any size give the same list."""
    torch.manual_seed(0)
    keys = torch.randn(20, 3)
    splits = torch.randint(0, 2, (20, 6), dtype=torch.int8)
    splits[:, 4] = 1  # a row with one side (an equality row)
    splits[:, 5] = torch.tensor(CLASSES, dtype=torch.int8).repeat(7)[:20]  # a row with three sides
    core = ClassifiedActiveSet(keys, torch.zeros(20, 2), splits, hidden=(8,), choices=16).eval()
    with torch.no_grad():
        for p in core.classifier.parameters():
            p.normal_()
    u = torch.randn(4, 3)
    every = torch.cat(list(core.split_groups(u, 16)), dim=1)
    assert every.shape == (4, 16, 6) and every.dtype == torch.int8
    torch.testing.assert_close(torch.cat(list(core.split_groups(u, 5)), dim=1), every)
    assert [g.shape[1] for g in core.split_groups(u, 5)] == [5, 5, 5, 1]
    lp = core.log_probs(u).detach()
    side = torch.tensor(CLASSES)
    first = side[lp.argmax(dim=2)]
    second = side[lp.topk(2, dim=2).indices[..., 1]]
    assert torch.equal(every[:, 0].long(), first)
    moved = every.long() != first[:, None]
    assert bool(torch.where(moved, every.long() == second[:, None], torch.ones_like(moved)).all())
    assert not bool(moved[..., 4].any()) and bool(moved.any())
    for b in range(4):
        assert len({tuple(s) for s in every[b].tolist()}) == 16
        score = lp[b].gather(1, (every[b].long() + 1).T).sum(dim=0)
        assert bool((score[1:] <= score[:-1] + 1e-9).all())


@pytest.mark.parametrize("algorithm, form", FORMS)
def test_the_classifier_solves_active_sets_that_no_stored_instance_had(algorithm, form):
    """Queries whose active sets none of the 300 stored instances had (each row far from its boundary): the
    classifier's candidates give their optimum exactly and the C solver stops at once; the nearest instances'
    active sets cannot (16 candidates each)."""
    pp, train = _solved(algorithm, form, _params(300, 1))
    stored = {tuple(s) for s in training_splits(pp, algorithm, None, train).tolist()}
    pool = _params(4000, 2)
    margin = np.abs(pool["q"] + pool["h"]).min(axis=1) > 0.3
    fresh = [i for i in np.flatnonzero(margin)
             if tuple((training_splits(pp, algorithm, None, _solved(algorithm, form, {k: v[i:i + 1] for k, v in
                                                                                      pool.items()})[1])[0]).tolist())
             not in stored][:8]
    assert len(fresh) == 8
    _, test = _solved(algorithm, form, {k: v[fresh] for k, v in pool.items()})
    classifier = _model(pp, algorithm, train)
    neighbours = _model(pp, algorithm, train, kind="neighbor_active_set")
    assert isinstance(classifier.core, ClassifiedActiveSet) and classifier.splits and classifier.choices == 16
    alg = make_algorithm(algorithm, pp.canonicalize_vector(test.theta))
    space = output_space(algorithm)
    want = space.target(alg, test.x, test.y, *([] if test.s is None else [test.s]))
    with torch.no_grad():
        ours = predict(classifier, space, alg, test.theta)
        theirs = predict(neighbours, space, alg, test.theta)
    assert float((ours - want).abs().max()) < 1e-7
    assert float((theirs - want).abs().amax(dim=1).min()) > 1e-4
    assert c_iterations(pp, algorithm, classifier, test, solver_settings=EPS).max() <= 1


def test_the_fit_is_deterministic_and_learns_the_stored_rows():
    pp, train = _solved("scs", "cone", _params(300, 3))
    a, b = _model(pp, "scs", train), _model(pp, "scs", train)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    core = a.core
    with torch.no_grad():
        guess = torch.tensor(CLASSES)[core.log_probs(core.keys).argmax(dim=2)]
    assert float((guess == core.splits.long()).double().mean()) > 0.95
    epochs = ClassifiedActiveSet(core.keys, core.values, core.splits, hidden=(8,)).fit(epochs=3, patience=1)
    assert 1 <= epochs <= 3


def test_the_classifier_saves_and_loads_without_code(tmp_path):
    pp, train = _solved("scs", "cone", _params(100, 4))
    model = _model(pp, "scs", train, choices=8)
    model.float().double()  # conversions leave the splits and the sides seen alone
    assert model.core.splits.dtype == torch.int8 and model.core.seen.dtype == torch.bool
    model.save(tmp_path / "m.pt")
    loaded = WarmStartPredictor.load(tmp_path / "m.pt", fingerprint=pp.fingerprint, algorithm="scs")
    assert isinstance(loaded.core, ClassifiedActiveSet) and loaded.choices == 8 and loaded.splits
    assert torch.equal(loaded.core.seen, model.core.seen) and loaded.core.classifier_hidden == (256, 256)
    theta = train.theta[:4] + 0.01
    torch.testing.assert_close(torch.cat(list(loaded.split_groups(theta, 3)), dim=1),
                               torch.cat(list(model.split_groups(theta, 8)), dim=1))


def test_the_recipe_treats_the_classifier_as_an_active_set_kind(monkeypatch):
    """Tried where the neighbours' active sets are (LPs and QPs), built without a trained correction, and in the
    recipe's trials on a QP, where it wins (its candidates are exact on every piece); its classifier is fitted once
    per training-set size (the candidate step's trials of more candidates reuse it)."""
    fits = []
    real_fit = ClassifiedActiveSet.fit
    monkeypatch.setattr(ClassifiedActiveSet, "fit", lambda core, **kw: fits.append(len(core.keys)) or
                        real_fit(core, **kw))
    x, b = cp.Variable(3), cp.Parameter(3, name="b")
    socp = ParametricProblem(cp.Problem(cp.Minimize(cp.norm(x - b, 2))), "cone")
    qp = ParametricProblem(_separable_problem(), "cone")
    assert applies("active_set_classifier", qp) and not applies("active_set_classifier", socp)
    with pytest.raises(ValueError, match="has nothing to train"):
        Candidate(kind="active_set_classifier")
    assert Candidate(kind="active_set_classifier", correction=False, choices=64).label() == (
        "active_set_classifier uncorrected, 64 candidates")
    source = solved_source(qp, "scs", _params(200, 5))
    settings = RecipeSettings(val_size=30, eval_size=30, search_size=60, sizes=(60, 120), max_size=120, epochs=20,
                              patience=5, ensemble=1,
                              alternatives=({"kind": "active_set_classifier", "correction": False},))
    res = fit_predictor(qp, "scs", source, budget_seconds=120, k=2, solver_settings=EPS, recipe=settings,
                        progress=False)
    sizes = [t.num_train for t in res.trials if t.candidate.kind == "active_set_classifier"]
    assert len(sizes) > len(set(sizes)) and sorted(fits) == sorted(set(sizes))
    assert res.candidate.kind == "active_set_classifier" and isinstance(res.model.core, ClassifiedActiveSet)
    assert res.val_median_iterations < res.cold_median_iterations
    # each classifier trial starts its active sets' solves from the best trained network on the same instances
    for t in (t for t in res.trials if t.candidate.kind == "active_set_classifier"):
        trained = [u for u in res.trials if u.candidate.correction and u.num_train == t.num_train]
        best = min(trained, key=lambda u: (u.val_median_iterations, u.val_mean_iterations))
        assert t.reference == best.label() and t.label().endswith(f" from {best.label()}")
    assert res.reference and res.label() in res.format() and res.model.core.reference is not None
