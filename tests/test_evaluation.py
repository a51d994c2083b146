"""Tests of amortcvx.evaluation: baselines, compare(), reports and a tiny end-to-end experiment."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import WarmStart, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.evaluation import (
    Comparison,
    ExperimentConfig,
    NearestNeighbor,
    StrategyResult,
    cold_warm_starts,
    compare,
    episode_ids,
    family_episodes,
    format_table,
    optimum_warm_starts,
    plot_iterations_cdf,
    plot_medians,
    previous_solution_warm_starts,
    run_experiment,
    summarize,
    write_instances_csv,
    write_summary_csv,
)
from amortcvx.iterations import AndersonSettings

TIGHT = {"scs": {"eps_abs": 1e-9, "eps_rel": 1e-9}, "osqp": {"eps_abs": 1e-9, "eps_rel": 1e-9, "polishing": True}}
LOOSE = {"eps_abs": 1e-4, "eps_rel": 1e-4}


# ---------------------------------------------------------------------------------------------- baselines
def _solutions(num: int, n: int = 3, m: int = 2, with_s: bool = True):
    """Solutions whose every entry encodes the row: x[i] = i, y[i] = 10 i, s[i] = 100 i."""
    rows = np.arange(num, dtype=np.float64)[:, None]
    x = np.repeat(rows, n, axis=1)
    y = np.repeat(10 * rows, m, axis=1)
    s = np.repeat(100 * rows, m, axis=1) if with_s else None
    return x, y, s


def test_nearest_neighbor_uses_standardized_distance():
    rng = np.random.default_rng(0)
    scales = np.array([1000.0, 1.0, 1e-3])
    train = rng.standard_normal((60, 3)) * scales
    queries = rng.standard_normal((40, 3)) * scales
    x, y, s = _solutions(60)
    nn = NearestNeighbor(train, x, y, s, chunk_size=7)  # several cdist chunks
    rows, dist = nn.query(queries)

    mu, sd = train.mean(0), train.std(0)
    d = np.linalg.norm(((queries - mu) / sd)[:, None, :] - ((train - mu) / sd)[None, :, :], axis=2)
    np.testing.assert_array_equal(rows, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-10)
    raw = np.linalg.norm(queries[:, None, :] - train[None, :, :], axis=2).argmin(1)
    assert (raw != rows).any(), "the data should make standardized and raw nearest neighbours differ"

    ws = nn.warm_starts(queries)
    assert len(ws) == 40
    for j, w in zip(rows, ws, strict=True):
        assert isinstance(w, WarmStart)
        np.testing.assert_array_equal(w.x, x[j])
        np.testing.assert_array_equal(w.y, y[j])
        np.testing.assert_array_equal(w.s, s[j])


def test_nearest_neighbor_picks_the_perturbed_row_and_skips_unsolved_rows():
    rng = np.random.default_rng(1)
    train = rng.standard_normal((20, 4))
    x, y, _ = _solutions(20, with_s=False)
    x[7] = np.nan  # not solved: must never be chosen
    nn = NearestNeighbor(torch.as_tensor(train), x, y, None)
    assert len(nn) == 19
    rows, _ = nn.query(train[[3, 12, 7]] + 1e-6)
    assert rows[0] == 3 and rows[1] == 12 and rows[2] != 7
    w = nn.warm_starts(train[[12]])[0]
    assert w.s is None and w.x[0] == 12.0
    with pytest.raises(ValueError, match="columns"):
        nn.query(np.zeros((1, 5)))


def test_previous_solution_respects_episode_boundaries():
    x, y, s = _solutions(7)
    episodes = episode_ids(7, 3)
    np.testing.assert_array_equal(episodes, [0, 0, 0, 1, 1, 1, 2])
    ws = previous_solution_warm_starts(x, y, s, episodes=episodes)
    assert [w is None for w in ws] == [True, False, False, True, False, False, True]
    for i in (1, 2, 4, 5):
        np.testing.assert_array_equal(ws[i].x, x[i - 1])
        np.testing.assert_array_equal(ws[i].y, y[i - 1])
        np.testing.assert_array_equal(ws[i].s, s[i - 1])
    x[4] = np.nan  # an unsolved row gives its successor a cold start
    ws = previous_solution_warm_starts(x, y, s, episodes=episodes)
    assert ws[5] is None and ws[4] is not None
    with pytest.raises(ValueError, match="episodes"):
        previous_solution_warm_starts(x, y, s, episodes=episodes[:-1])


def test_family_episodes_follow_the_mpc_sampler():
    fam = problems.make("mpc", size="small")
    length = fam.extras["system"].episode_length
    ep = family_episodes(fam, 2 * length + 3)
    starts = np.flatnonzero(np.diff(ep)) + 1
    np.testing.assert_array_equal(starts, [length, 2 * length])
    assert family_episodes(problems.make("portfolio"), 10) is None


def test_optimum_and_cold_warm_starts():
    x, y, s = _solutions(3)
    y[1, 0] = np.nan
    ws = optimum_warm_starts(x, y, s)
    assert ws[1] is None and ws[0] is not None
    np.testing.assert_array_equal(ws[2].s, s[2])
    assert cold_warm_starts(4) == [None] * 4


# ---------------------------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def portfolio_instances():
    fam = problems.make("portfolio", size="small")
    out = {}
    for backend, form in (("scs", "cone"), ("osqp", "qp")):
        pp = ParametricProblem(fam.problem, form=form)
        inst = pp.canonicalize(fam.sample(4, seed=3)).instances()
        sol = solve_batch(inst, backend, settings=TIGHT[backend], workers=1)
        assert all(r.status == "optimal" for r in sol)
        out[backend] = (inst, sol)
    return out


@pytest.mark.parametrize("backend", ["scs", "osqp"])
def test_compare_cold_vs_optimum(portfolio_instances, backend):
    inst, sol = portfolio_instances[backend]
    x = np.stack([r.x for r in sol])
    y = np.stack([r.y for r in sol])
    s = np.stack([r.s for r in sol]) if backend == "scs" else None
    cmp = compare(inst, backend, {"cold": cold_warm_starts(4), "optimum": optimum_warm_starts(x, y, s)},
                  settings=LOOSE, workers=1)
    assert cmp.names == ["cold", "optimum"] and cmp.baseline == "cold"
    assert cmp.non_optimal == {"cold": 0, "optimum": 0}
    cold, opt = cmp.strategies["cold"], cmp.strategies["optimum"]
    assert opt.iterations.max() <= 2  # started at the answer: (about) one iteration
    assert cold.iterations.min() > opt.iterations.max()
    assert opt.warm.all() and not cold.warm.any()
    assert np.isfinite(cold.solve_time).all() and np.isfinite(opt.setup_time).all()  # timed pass
    summ = cmp.summary("optimum")
    assert summ.ratio < 0.5 and summ.objective_gap < 1e-3


def test_compare_rejects_bad_strategies(portfolio_instances):
    inst, _ = portfolio_instances["scs"]
    with pytest.raises(ValueError, match="'short' has 3 warm starts for 4"):
        compare(inst, "scs", {"cold": [None] * 4, "short": [None] * 3})
    with pytest.raises(ValueError, match="baseline 'nn'"):
        compare(inst, "scs", {"cold": [None] * 4}, baseline="nn")
    with pytest.raises(ValueError, match="non-empty"):
        compare(inst, "scs", {})
    no_cold = compare(inst[:1], "scs", {"mine": [None]}, timing=False, workers=1)
    assert no_cold.baseline is None and np.isnan(no_cold.summary("mine").ratio)
    assert np.isnan(no_cold.strategies["mine"].solve_time).all()


def _result(name, iterations, status=None, objective=None, warm=True, seconds=1e-3):
    it = np.asarray(iterations, dtype=np.int64)
    num = it.size
    return StrategyResult(
        name=name, iterations=it,
        status=np.array(status if status is not None else ["optimal"] * num),
        objective=np.asarray(objective if objective is not None else np.ones(num), dtype=np.float64),
        setup_time=np.full(num, seconds), solve_time=np.full(num, seconds), warm=np.full(num, warm))


def test_summary_arithmetic():
    cold = _result("cold", np.arange(1, 11) * 10, warm=False)  # 10, 20, ..., 100
    fast = _result("fast", [1, 2, 3, 4, 5, 6, 7, 8, 9, 100],
                   status=["optimal"] * 8 + ["optimal_inaccurate", "max_iterations"],
                   objective=[1, 1, 1, 1, 1, 1, 1, 1.5, 1, 1])
    s = summarize(fast, cold)
    assert s.count == 10
    assert s.median == pytest.approx(5.5)
    assert s.p90 == pytest.approx(9 + 0.1 * (100 - 9))  # linear interpolation between the 9th and 10th
    assert s.mean == pytest.approx(14.5)
    assert s.ratio == pytest.approx(5.5 / 55.0)
    assert s.non_optimal == 2 and s.warm == 10
    assert s.objective_gap == pytest.approx(0.5)  # row 7 (both optimal): |1.5 - 1| / max(1, 1)
    assert s.median_time_ms == pytest.approx(2.0)
    base = summarize(cold)
    assert np.isnan(base.ratio) and base.warm == 0 and base.median == 55.0

    cmp = Comparison(backend="scs", settings=LOOSE, strategies={"cold": cold, "fast": fast}, baseline="cold")
    assert [x.name for x in cmp.summaries] == ["cold", "fast"]
    assert cmp.summaries[0].ratio == 1.0 and cmp.non_optimal == {"cold": 0, "fast": 2}
    with pytest.raises(ValueError, match="instances"):
        summarize(_result("x", [1, 2]), cold)


# ---------------------------------------------------------------------------------------------- reports
@pytest.fixture
def synthetic_comparison():
    rng = np.random.default_rng(0)
    strategies = {"cold": _result("cold", rng.integers(80, 200, 50), warm=False),
                  "nearest neighbour": _result("nearest neighbour", rng.integers(40, 150, 50)),
                  "learned k=5": _result("learned k=5", rng.integers(5, 60, 50)),
                  "optimum": _result("optimum", np.ones(50, dtype=int))}
    return Comparison(backend="scs", settings=LOOSE, strategies=strategies, baseline="cold")


def test_table_and_csv(synthetic_comparison, tmp_path):
    cmp = synthetic_comparison
    table = format_table(cmp, title="demo")
    lines = table.splitlines()
    assert lines[0] == "demo"
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns: every line has the same width
    assert all(name in table for name in cmp.names)

    path = write_summary_csv(cmp, tmp_path / "out" / "summary.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == cmp.names
    for row, summ in zip(rows, cmp.summaries, strict=True):
        assert float(row["median"]) == summ.median and int(row["non_optimal"]) == summ.non_optimal
        assert row["backend"] == "scs"

    path = write_instances_csv(cmp, tmp_path / "instances.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 50
    learned = [r for r in rows if r["strategy"] == "learned k=5"]
    np.testing.assert_array_equal([int(r["iterations"]) for r in learned], cmp.strategies["learned k=5"].iterations)


def test_plots_are_png(synthetic_comparison, tmp_path):
    for fn, name in ((plot_iterations_cdf, "cdf.png"), (plot_medians, "medians.png")):
        path = fn(synthetic_comparison, tmp_path / name, title="demo")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_end_to_end_benchmark_redraws_its_plot_from_a_saved_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    labels = ("loop (b)", "package cold (a)", "nearest neighbour (c)", "learned k=0", "floor (optimum)")
    rows = [{"family": fam, "algorithm": alg, "size": "small", "batch": batch,
             "ratio_to_loop": {s: 0.2 + 0.3 * j + 0.1 * i for j, s in enumerate(labels)}}
            for i, (fam, alg) in enumerate((("mpc", "scs"), ("lasso", "osqp"))) for batch in (1, 256)]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(rows))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_endtoend.py"
    out = subprocess.run([sys.executable, str(script), "--from-json", str(saved), "--plot", str(tmp_path / "e.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = (tmp_path / "e.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---------------------------------------------------------------------------------------------- pipeline
def test_config_validation():
    with pytest.raises(ValueError, match="unknown solver 'ecos'; known solvers: scs, osqp"):
        ExperimentConfig(solver="ecos")
    with pytest.raises(ValueError, match="n_train"):
        ExperimentConfig(n_train=1)
    with pytest.raises(ValueError, match="eval_k"):
        ExperimentConfig(eval_k=(-1,))
    assert ExperimentConfig(k=3).refine_steps == (0, 3) and ExperimentConfig(k=0).refine_steps == (0,)
    assert ExperimentConfig(eval_k=[0, 4]).refine_steps == (0, 4)
    with pytest.raises(ValueError, match="anderson_memory"):
        ExperimentConfig(anderson_memory=-1)
    assert ExperimentConfig().anderson is None
    with pytest.raises(ValueError, match="safeguard_reference"):
        ExperimentConfig(safeguard_reference="none")
    assert ExperimentConfig(anderson_memory=5).anderson == AndersonSettings(memory=5)
    with pytest.raises(ValueError, match="polish must be a bool"):
        ExperimentConfig(polish=1)


def test_osqp_on_socp_family_is_refused_early(tmp_path):
    cfg = ExperimentConfig(family="kalman", solver="osqp", data_root=str(tmp_path), out_dir=str(tmp_path / "o"),
                           progress=False)
    with pytest.raises(ValueError, match="kind 'socp'"):
        run_experiment(cfg)
    assert not any(tmp_path.glob("*-osqp*"))  # nothing was generated


@pytest.mark.parametrize("family, algorithm, n_test", [("portfolio", "scs", 12), ("mpc", "osqp", 24)])
def test_tiny_experiment_end_to_end(tmp_path, family, algorithm, n_test):
    cfg = ExperimentConfig(family=family, solver=algorithm, n_train=40, n_test=n_test, epochs=2, batch_size=16,
                           eval_k=(0, 2), hidden=(32,), data_root=str(tmp_path / "data"),
                           out_dir=str(tmp_path / "run"), workers=1, timing_single=2, timing_batch=6, progress=False)
    lines: list[str] = []
    res = run_experiment(cfg, log=lines.append)
    expected = ["cold", "nearest neighbour", "learned k=0", "learned k=2", "cold + 2 torch steps", "optimum"]
    if family == "mpc":
        expected.insert(2, "previous solution")
    assert res.comparison.names == expected
    for name, r in res.comparison.strategies.items():
        assert r.iterations.shape == (n_test,)
        assert (r.status == "optimal").all(), (name, r.status)
    assert res.comparison.strategies["optimum"].iterations.max() <= 2
    if family == "mpc":  # previous solution: cold at the first row of each episode (length 20)
        warm = res.comparison.strategies["previous solution"].warm
        assert not warm[0] and not warm[20] and warm[1:20].all() and warm[21:].all()
    assert res.counts["train"] + res.counts["val"] == 40 and res.counts["test"] == n_test
    assert {t.batch_size for t in res.timings} == {1, 6}
    assert {t.strategy for t in res.timings} == {"cold", "learned k=0", "learned k=2"}
    for key in ("table", "summary_csv", "instances_csv", "timing_csv", "model", "config", "history", "cdf_png",
                "medians_png"):
        assert res.files[key].is_file(), key
    assert "optimum" in res.files["table"].read_text()
    assert any("training" in line for line in lines) and any("comparing" in line for line in lines)
    # the datasets are cached: a second run reuses them (same folders, no new ones)
    folders = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert len(folders) == 2


def test_a_switched_off_predictor_is_announced_first_with_the_numbers(synthetic_comparison):
    from amortcvx.deploy import Calibration
    from amortcvx.evaluation import calibration_notice, format_report

    kept, off = Calibration(10.0, 12.0, True), Calibration(30.0, 25.5, False)
    text = format_report(title="TITLE", comparison=synthetic_comparison, fallback={},
                         calibration={"learned k=0": kept, "learned k=5": off}, timings=[], device="cpu",
                         dtype="float64", num_val=7)
    head, _, rest = text.partition("TITLE")
    assert "PREDICTOR SWITCHED OFF by calibration for 1 of 2 learned strategies" in " ".join(head.split())
    assert "the 7 validation instances" in " ".join(head.split())
    assert "learned k=5: PREDICTOR OFF (median exact C iterations learned 30 vs cold 25.5)" in " ".join(head.split())
    assert "learned k=0" not in head
    assert "learned k=5: 30 vs 25.5 (SWITCHED OFF)" in rest and "learned k=0: 10 vs 12 (kept)" in rest
    assert calibration_notice({"learned k=0": kept}) == ""
    # calibration that chose the start by wall time: off although the iterations were fewer, with the times
    slower = Calibration(20.0, 25.0, False, strategy="cold", seconds={"learned": (3.0, 1.5), "cold": (0.5, 0.4)})
    notice = " ".join(calibration_notice({"learned k=10": slower, "learned k=0": kept._replace(strategy="learned")},
                                         7).split())
    assert "for 1 of 2 learned strategies" in notice and "learned k=10: PREDICTOR OFF" in notice
    assert "learned 20 vs cold 25" in notice and "learned: 3 ms at batch 1, 1.5 ms" in notice
    assert "learned k=0" not in notice
    assert format_report(title="TITLE", comparison=synthetic_comparison, fallback={}, calibration={"x": kept},
                         timings=[], device="cpu", dtype="float64").startswith("TITLE")
