"""Bad input is refused early with errors that name what is at fault (issue 10's reliability items)."""

from __future__ import annotations

import dataclasses

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


# ---------------------------------------------------------------------- predictor files
class TinyCore(torch.nn.Module):
    """A custom (non-MLP) core for the save / load tests."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = torch.nn.Linear(in_dim, out_dim)
        self.gate = torch.nn.Parameter(torch.ones(out_dim))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.gate


def make_tiny_core(num_params: int, out_dim: int) -> torch.nn.Module:
    return TinyCore(num_params, out_dim)


def _predictor(core=None):
    from amortcvx.predictors import PredictorMeta, WarmStartPredictor

    meta = PredictorMeta("f" * 16, "scs", {"alpha": 1.5}, 4, 6)
    model = WarmStartPredictor(meta, core=core, hidden=(8,)).double()
    with torch.no_grad():
        model.in_mean.uniform_()
        model.out_std.uniform_(0.5, 2.0)
    return model


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_predictor_file_holds_no_code_and_loads_with_weights_only(tmp_path):
    from amortcvx.predictors import WarmStartPredictor

    model, path = _predictor(), tmp_path / "m.pt"
    model.save(path)
    raw = torch.load(path, weights_only=True)  # plain tensors and strings
    assert set(raw) == {"format", "version", "meta", "state_dict"} and isinstance(raw["meta"], str)
    back = WarmStartPredictor.load(path, fingerprint="f" * 16)
    theta = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(back(theta), model(theta))
    # a file that would run code when unpickled is refused, and the code does not run
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "amortcvx.WarmStartPredictor", "payload": _RunsCode(str(marker))}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt is not a readable amortcvx predictor file"):
        WarmStartPredictor.load(evil)
    assert not marker.exists()


def test_custom_core_is_rebuilt_from_a_named_factory_or_instance(tmp_path):
    from amortcvx.predictors import WarmStartPredictor

    model, path = _predictor(TinyCore(4, 6).double()), tmp_path / "custom.pt"
    model.save(path)
    with pytest.raises(ValueError, match=r"custom\.pt holds a predictor with a custom core module .*TinyCore.*"
                                         r"core_factory="):
        WarmStartPredictor.load(path)
    theta = torch.randn(3, 4, dtype=torch.float64)
    for kwargs in ({"core_factory": f"{__name__}:make_tiny_core"}, {"core_factory": make_tiny_core},
                   {"core": TinyCore(4, 6)}):
        back = WarmStartPredictor.load(path, **kwargs)
        torch.testing.assert_close(back(theta), model(theta))
    with pytest.raises(ValueError, match="cannot be imported"):
        WarmStartPredictor.load(path, core_factory="no_such_module_xyz:make")
    with pytest.raises(ValueError, match=r"custom\.pt: the saved weights do not fit"):
        WarmStartPredictor.load(path, core=TinyCore(4, 5))


def test_damaged_predictor_files_are_one_clear_value_error(tmp_path):
    from amortcvx.predictors import WarmStartPredictor

    model, path = _predictor(), tmp_path / "m.pt"
    model.save(path)
    blob = path.read_bytes()
    cases = {
        "truncated.pt": (blob[: len(blob) // 2], "is not a readable"),
        "junk.pt": (b"\x00junk" * 100, "is not a readable"),
        "empty.pt": (b"", "is not a readable"),
    }
    for name, (data, what) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} {what}"):
            WarmStartPredictor.load(tmp_path / name)
    raw = torch.load(path, weights_only=True)
    for name, broken, what in (
            ("nometa.pt", {k: v for k, v in raw.items() if k != "meta"}, "lacks its metadata"),
            ("badmeta.pt", {**raw, "meta": "{not json"}, "damaged metadata"),
            ("noweights.pt", {k: v for k, v in raw.items() if k != "state_dict"}, "lacks its weights"),
            ("other.pt", {"state_dict": raw["state_dict"]}, "not an amortcvx predictor file")):
        torch.save(broken, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}.*{what}"):
            WarmStartPredictor.load(tmp_path / name)
    # a file of an amortcvx that pickled the whole module
    torch.save({"meta": {}, "state_dict": model.state_dict(), "core": model.core}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt is not a readable.*older amortcvx"):
        WarmStartPredictor.load(tmp_path / "old.pt")
    with pytest.raises(FileNotFoundError):
        WarmStartPredictor.load(tmp_path / "missing.pt")


# ---------------------------------------------------------------------- resumable training
@pytest.fixture(scope="module")
def lasso_sets():
    from amortcvx import problems
    from amortcvx.backends import solve_batch
    from amortcvx.training import SolvedSet

    fam = problems.make("lasso")
    pp = ParametricProblem(fam.problem, "cone")

    def solved(params):
        res = solve_batch(pp.canonicalize(params).instances(), "scs", settings={"eps_abs": 1e-9, "eps_rel": 1e-9},
                          exact_iterations=False, workers=1)
        stack = lambda f: torch.tensor(np.stack([getattr(r, f) for r in res]))  # noqa: E731
        return SolvedSet(pp.parameter_vector(params), stack("x"), stack("y"), stack("s"))

    return pp, solved(fam.sample(60, seed=0)), solved(fam.sample(20, seed=1))


def test_interrupted_training_resumes_from_its_last_epoch_with_the_same_numbers(tmp_path, lasso_sets, monkeypatch):
    from amortcvx.training import TrainConfig, train, trainer

    pp, tr, va = lasso_sets
    cfg = TrainConfig(k=1, epochs=6, batch_size=16, hidden=(8,), progress=False, patience=6, seed=3,
                      checkpoint=str(tmp_path / "ref" / "best.pt"))
    ref = train(pp, "scs", tr, va, cfg)

    ckpt = tmp_path / "run" / "best.pt"
    cfg = dataclasses.replace(cfg, checkpoint=str(ckpt), resume=True)
    real, calls = trainer.evaluate_losses, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C during epoch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(pp, "scs", tr, va, cfg)
    monkeypatch.setattr(trainer, "evaluate_losses", real)
    assert trainer.train_state_path(ckpt).exists() and ckpt.exists()
    epochs_run = []
    monkeypatch.setattr(trainer, "_batch_losses", _counting(trainer._batch_losses, epochs_run))
    out = train(pp, "scs", tr, va, cfg)
    assert out.history == ref.history and out.best_epoch == ref.best_epoch
    for (ka, a), (kb, b) in zip(out.model.state_dict().items(), ref.model.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    # only epochs 3..5 were trained again (4 training batches + 2 validation batches per epoch)
    assert len(epochs_run) == 3 * (4 + 2)
    # another run's state is refused with a clear message
    with pytest.raises(ValueError, match=r"cannot resume from .*best\.pt\.state.*another training run.*'lr'"):
        train(pp, "scs", tr, va, dataclasses.replace(cfg, lr=0.5))
    trainer.train_state_path(ckpt).write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot resume from .*best\.pt\.state.*damaged"):
        train(pp, "scs", tr, va, cfg)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


# ---------------------------------------------------------------------- command line
def _no_work(monkeypatch):
    import amortcvx.evaluation

    def fail(*args, **kwargs):
        raise AssertionError("the run started working")

    monkeypatch.setattr(amortcvx.evaluation, "run_experiment", fail)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_without_cuda_fails_before_any_work(capsys, tmp_path, monkeypatch):
    from amortcvx.cli import main

    _no_work(monkeypatch)
    code = main(["run", "--device", "cuda", "--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--device cuda: CUDA is not available" in err
    assert main(["run", "--device", "gpu0", "--out", str(tmp_path / "o")]) == 2
    assert "--device 'gpu0' is not a torch device" in capsys.readouterr().err


def test_cli_unwritable_out_fails_before_any_work(capsys, tmp_path, monkeypatch):
    from amortcvx.cli import main

    _no_work(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["run", "--out", str(blocker / "run"), "--data-root", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--out {blocker / 'run'}: cannot write there" in err


@pytest.mark.parametrize("flag", ["--eps", "--lr"])
@pytest.mark.parametrize("value", ["-1e-4", "-0.001", "0", "nan"])
def test_cli_negative_tolerance_is_parsed_and_refused_as_not_positive(capsys, flag, value):
    from amortcvx.cli import build_parser, main

    with pytest.raises(SystemExit) as info:
        main(["run", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be positive" in err and "expected one argument" not in err
    assert build_parser().parse_args(["run", "--eps=1e-6"]).eps == 1e-6
    from amortcvx.cli import _join_negative_values

    assert build_parser().parse_args(_join_negative_values(["run", "--seed", "-1", "--eps", "1e-3"])).seed == -1


def test_parameter_values_whose_canonical_data_overflow_are_refused_naming_the_parameter():
    a = cp.Parameter(3, name="a")
    x = cp.Variable(3, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + (10 * a) @ x), [x >= -1, x <= 1])
    for form in ("cone", "qp"):
        pp = ParametricProblem(prob, form)
        pp.canonicalize({"a": np.ones(3)})  # fine
        with pytest.raises(ValueError, match="instance 1: .*overflow.*parameter 'a'"):
            pp.canonicalize({"a": np.array([[1.0, 2.0, 3.0], [1e308, 0.0, 0.0]])})  # 10 a overflows
    with pytest.raises(ValueError, match="parameter 'a' has no value"):
        pp.canonicalize({"a": None})
