"""Predictors, training through the solver layers, and safeguarded deployment."""

import dataclasses

import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import Status, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.deploy import AmortizedSolver
from amortcvx.deploy.solver import refinement_label
from amortcvx.iterations import AndersonSettings, make_algorithm, run
from amortcvx.predictors import SETTINGS, PredictorMeta, WarmStartPredictor
from amortcvx.training import LossWeights, SolvedSet, TrainConfig, train

HIGH = {"eps_abs": 1e-9, "eps_rel": 1e-9}


def solved(pp: ParametricProblem, params: dict, backend: str) -> SolvedSet:
    data = pp.canonicalize(params)
    res = solve_batch(data.instances(), backend, settings=HIGH, exact_iterations=False, workers=1)
    assert all(r.status == Status.OPTIMAL for r in res)
    stack = lambda f: torch.tensor(np.stack([getattr(r, f) for r in res]))  # noqa: E731
    return SolvedSet(pp.parameter_vector(params), stack("x"), stack("y"), stack("s") if backend == "scs" else None)


@pytest.fixture(scope="module")
def lasso():
    fam = problems.make("lasso")
    pp = ParametricProblem(fam.problem, "cone")
    return fam, pp, solved(pp, fam.sample(120, seed=0), "scs"), solved(pp, fam.sample(30, seed=1), "scs")


def test_predictor_save_load_checks_problem_and_settings(tmp_path, lasso):
    fam, pp, _, _ = lasso
    meta = PredictorMeta(pp.fingerprint, "scs", {"alpha": 1.5}, pp.num_params, pp.n + pp.m)
    model = WarmStartPredictor(meta, hidden=(8,))
    path = tmp_path / "m.pt"
    model.save(path)
    back = WarmStartPredictor.load(path, fingerprint=pp.fingerprint, algorithm="scs", settings={"alpha": 1.5})
    theta = torch.randn(3, pp.num_params, dtype=torch.float32)
    torch.testing.assert_close(back(theta), model(theta))
    other = ParametricProblem(problems.make("portfolio").problem, "cone")
    with pytest.raises(ValueError, match="not for this problem"):
        WarmStartPredictor.load(path, fingerprint=other.fingerprint)
    with pytest.raises(ValueError, match="other scs settings.*alpha"):
        WarmStartPredictor.load(path, settings={"alpha": 1.0})
    with pytest.raises(ValueError, match="algorithm 'scs', not 'osqp'"):
        WarmStartPredictor.load(path, algorithm="osqp")


def test_same_seed_same_numbers(lasso):
    _, pp, tr, va = lasso
    cfg = TrainConfig(k=2, weights=LossWeights(1.0, 0.1, 0.1), epochs=3, batch_size=32, hidden=(16,),
                      progress=False, seed=7)
    a, b = train(pp, "scs", tr, va, cfg), train(pp, "scs", tr, va, cfg)
    assert a.history == b.history
    for (ka, va_), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va_, vb)
    c = train(pp, "scs", tr, va, TrainConfig(**{**cfg.__dict__, "seed": 8}))
    assert c.history != a.history


def test_unrolled_residual_loss_decreases(lasso):
    _, pp, tr, va = lasso
    cfg = TrainConfig(k=3, weights=LossWeights(regression=0.0, residual=1.0), epochs=15, batch_size=32,
                      hidden=(32,), progress=False, patience=15)
    out = train(pp, "scs", tr, va, cfg)
    best = out.history[out.best_epoch]["val_residual"]
    assert best < out.history[0]["val_residual"]
    # ||T(z_k) - z_k|| after k steps from the prediction vs from the cold start, on held-out instances
    alg = make_algorithm("scs", pp.canonicalize_vector(va.theta))
    cold = run(alg, alg.init(), cfg.k).state
    cold_res = alg.residual(cold, alg.step(cold)).mean()
    assert best < 0.5 * float(cold_res)


def test_checkpoint_is_written_and_loadable(tmp_path, lasso):
    _, pp, tr, va = lasso
    path = tmp_path / "ckpt" / "best.pt"
    out = train(pp, "scs", tr, va, TrainConfig(epochs=2, hidden=(8,), progress=False, checkpoint=str(path)))
    back = WarmStartPredictor.load(path, fingerprint=pp.fingerprint, algorithm="scs",
                                   settings=out.model.meta.settings)
    theta = tr.theta[:4]
    torch.testing.assert_close(back(theta), out.model(theta))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


class _Garbage(torch.nn.Module):
    def __init__(self, out_dim, value):
        super().__init__()
        self.out_dim, self.value = out_dim, value

    def forward(self, theta):
        return torch.full((theta.shape[0], self.out_dim), self.value, dtype=theta.dtype)


def _garbage_model(pp, value, algorithm="scs"):
    settings = dataclasses.asdict(SETTINGS[algorithm]())
    meta = PredictorMeta(pp.fingerprint, algorithm, settings, pp.num_params, pp.n + pp.m)
    return WarmStartPredictor(meta, core=_Garbage(pp.n + pp.m, value))


def test_safeguard_falls_back_to_cold_for_bad_predictions(lasso):
    fam, pp, _, _ = lasso
    params = fam.sample(6, seed=5)
    cold = solve_batch(pp.canonicalize(params).instances(), "scs", workers=1)
    for value in (1e6, float("nan")):
        solver = AmortizedSolver(pp, _garbage_model(pp, value), workers=1)
        out = solver.solve(params, exact_iterations=True)
        assert out.fallback.all()
        assert [r.iterations for r in out.results] == [r.iterations for r in cold]
        assert all(r.status == Status.OPTIMAL for r in out.results)


def test_failed_warm_solve_is_redone_cold(lasso):
    # SCS rescales warm starts and shrugs off garbage; OSQP does not, which makes the failure easy to provoke.
    fam, _, _, _ = lasso
    pp = ParametricProblem(fam.problem, "qp")
    params = fam.sample(4, seed=6)
    cold = solve_batch(pp.canonicalize(params).instances(), "osqp", workers=1)
    limit = {"max_iter": max(r.iterations for r in cold) + 20}  # enough for the cold start only
    garbage = _garbage_model(pp, 1e7, "osqp")
    out = AmortizedSolver(pp, garbage, safeguard_ratio=float("inf"), solver_settings=limit,
                          workers=1).solve(params, exact_iterations=True)
    assert not out.fallback.any() and out.retried.all()  # the garbage start hit the iteration limit ...
    assert all(r.status == Status.OPTIMAL for r in out.results)  # ... and the cold retry solved every instance
    assert all(r.iterations > c.iterations for r, c in zip(out.results, cold))  # both attempts are counted
    unsafe = AmortizedSolver(pp, garbage, safeguard=False, solver_settings=limit,
                             workers=1).solve(params, exact_iterations=True)
    assert all(r.status != Status.OPTIMAL for r in unsafe.results)
    guarded = AmortizedSolver(pp, garbage, solver_settings=limit, workers=1).solve(params,
                                                                                   exact_iterations=True)
    assert guarded.fallback.all() and not guarded.retried.any()  # the residual check alone catches it


def test_calibration_switches_off_a_predictor_that_loses(lasso):
    fam, _, _, _ = lasso
    pp = ParametricProblem(fam.problem, "qp")
    solver = AmortizedSolver(pp, _garbage_model(pp, 1e3, "osqp"), safeguard_ratio=float("inf"), workers=1)
    cal = solver.calibrate(fam.sample(6, seed=8))
    assert not cal.enabled and cal.learned_median > cal.cold_median and not solver.enabled
    params = fam.sample(3, seed=9)
    out = solver.solve(params, exact_iterations=True)
    assert solver.osqp_rho is not None and solver.c_settings()["rho"] == solver.osqp_rho  # fitted by calibrate
    cold = solve_batch(pp.canonicalize(params).instances(), "osqp", settings=solver.c_settings(), workers=1)
    assert out.fallback.all() and [r.iterations for r in out.results] == [r.iterations for r in cold]


def test_model_for_other_problem_is_refused(lasso):
    _, pp, _, _ = lasso
    other = ParametricProblem(problems.make("portfolio").problem, "cone")
    with pytest.raises(ValueError, match="trained for problem"):
        AmortizedSolver(other, _garbage_model(pp, 0.0))
    with pytest.raises(ValueError, match="form 'qp'"):
        AmortizedSolver(pp, algorithm="osqp")


def test_safeguard_with_refinement_keeps_the_refined_cold_start(lasso):
    fam, pp, _, _ = lasso
    params = fam.sample(5, seed=7)
    bad = AmortizedSolver(pp, _garbage_model(pp, float("nan")), k=5, safeguard_reference="refined_cold",
                          workers=1).predict_warm_start(params)
    ref = AmortizedSolver(pp, algorithm="scs", k=5, workers=1).predict_warm_start(params)  # k steps from cold
    assert bad.fallback.all() and not ref.fallback.any()
    np.testing.assert_array_equal(bad.cold_residual, ref.residual)
    for a, b in zip(bad.warm_starts, ref.warm_starts):
        for part in ("x", "y", "s"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))


def test_cold_reference_safeguard_halves_the_torch_steps(lasso, monkeypatch):
    import amortcvx.deploy.solver as deploy

    fam, pp, _, _ = lasso
    params = fam.sample(5, seed=7)
    steps = []
    real_run = deploy.run
    monkeypatch.setattr(deploy, "run", lambda alg, state, k, **kw: steps.append(k) or real_run(alg, state, k, **kw))
    good = _garbage_model(pp, 0.0)  # a finite prediction (the zero vector)
    for reference, expected in (("refined_cold", [5, 5]), ("cold", [0, 5])):
        steps.clear()
        AmortizedSolver(pp, good, k=5, safeguard_reference=reference, workers=1).predict_warm_start(params)
        assert steps == expected, reference
    # a NaN prediction falls back to the plain cold start: no warm start, the C solver's own cold iterations
    out = AmortizedSolver(pp, _garbage_model(pp, float("nan")), k=5, safeguard_reference="cold", workers=1)
    res = out.solve(params, exact_iterations=True)
    cold = solve_batch(pp.canonicalize(params).instances(), "scs", workers=1)
    assert res.fallback.all() and [r.iterations for r in res.results] == [r.iterations for r in cold]
    with pytest.raises(ValueError, match="safeguard_reference"):
        AmortizedSolver(pp, good, safeguard_reference="warm")


@pytest.mark.parametrize("name, k, expected",
                         [("mpc_param_dyn", 30, "anderson(memory=10)"), ("robust_ls", 60, "plain")])
def test_calibration_chooses_the_refinement_that_needs_fewer_c_iterations(name, k, expected):
    # whether Anderson acceleration of the refinement helps depends on the problem: on mpc_param_dyn it takes
    # the C solver from ~56 iterations to 1, on robust_ls it costs iterations (docs/iterations.md)
    fam = problems.make(name)
    pp = ParametricProblem(fam.problem, "cone")
    solver = AmortizedSolver(pp, _garbage_model(pp, 0.0), k=k, solver_settings={"eps_abs": 1e-4, "eps_rel": 1e-4},
                             workers=1)
    cal = solver.calibrate(fam.sample(8, seed=11), refinements=(None, AndersonSettings()))
    medians = dict(cal.candidates)
    assert set(medians) == {"plain", "anderson(memory=10)"}
    assert refinement_label(solver.anderson) == refinement_label(cal.anderson) == expected
    assert medians[expected] < min(medians.values()) + 1e-9 and medians[expected] < max(medians.values())
    assert cal.learned_median == medians[expected]
    with pytest.raises(ValueError, match="at least one"):
        solver.calibrate(fam.sample(2, seed=12), refinements=())


@pytest.mark.parametrize("weights, per_epoch", [(LossWeights(1.0, 0.0, 0.0), False),
                                                (LossWeights(1.0, 0.1, 0.0), True)])
def test_regression_training_builds_the_algorithm_only_for_the_targets(weights, per_epoch, monkeypatch):
    from amortcvx.training import trainer

    fam = problems.make("mpc_param_dyn")  # the dynamics enter A: every algorithm built factors per instance
    pp = ParametricProblem(fam.problem, "cone")
    tr, va = solved(pp, fam.sample(40, seed=2), "scs"), solved(pp, fam.sample(10, seed=3), "scs")
    calls = []
    original = trainer.make_algorithm
    monkeypatch.setattr(trainer, "make_algorithm", lambda *a, **k: calls.append(1) or original(*a, **k))
    epochs, batch = 3, 16
    cfg = TrainConfig(k=2, weights=weights, epochs=epochs, batch_size=batch, hidden=(16,), progress=False,
                      patience=epochs)
    result = train(pp, "scs", tr, va, cfg)
    once = 3 + 1  # the targets of the training set (3 chunks) and of the validation set (1), once
    per = epochs * (3 + 1)  # each epoch's training mini-batches and validation pass
    assert len(calls) == once + (per if per_epoch else 0)
    assert np.isfinite(result.history[-1]["val_total"])
