"""The command line on a problem file of the user's own (``--problem path/to/file.py:make``), stage by stage."""

from __future__ import annotations

import json
import textwrap

import pytest

from amortcvx.cli import main
from amortcvx.evaluation import load_problem_file

PROBLEM = '''
import cvxpy as cp
import numpy as np


def make():
    b = cp.Parameter(4, name="b")
    x = cp.Variable(3, name="x")
    A = np.random.default_rng(0).normal(size=(4, 3))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), [x >= -1, x <= 1])

    def sampler(n, rng):
        return {"b": rng.normal(size=(n, 4))}

    return prob, sampler


class Family:
    def __init__(self):
        self.problem, sampler = make()
        self.sample = lambda num, seed: sampler(num, np.random.default_rng(seed))
        self.name = "box"


def family():
    return Family()


def socp():
    a = cp.Parameter(2, name="a")
    x = cp.Variable(2)
    return cp.Problem(cp.Minimize(cp.norm(x - a, 2))), lambda n, rng: {"a": rng.normal(size=(n, 2))}


def wrong_names():
    return make()[0], lambda n, rng: {"c": rng.normal(size=(n, 4))}


def wrong_shape():
    return make()[0], lambda n, rng: {"b": rng.normal(size=(4,))}


def sampler_fails():
    def sampler(n, rng):
        raise RuntimeError("no data today")
    return make()[0], sampler


def not_a_problem():
    return 3


def raises():
    raise KeyError("oops")


def no_parameters():
    x = cp.Variable(2)
    return cp.Problem(cp.Minimize(cp.sum_squares(x))), lambda n, rng: {}
'''

TINY = ["--n-train", "24", "--n-test", "5", "--epochs", "2", "--k", "2", "--hidden", "16", "--batch-size", "8",
        "--workers", "1", "--timing-single", "2", "--timing-batch", "4", "--quiet"]


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "box_ls.py"
    path.write_text(textwrap.dedent(PROBLEM))
    return path


def test_run_on_a_problem_file_end_to_end(problem_file, tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    assert main(["run", "--problem", f"{problem_file}:make", "--solver", "osqp", *TINY, "--out", str(out),
                 "--data-root", str(data)]) == 0
    text = capsys.readouterr().out
    assert "box_ls (custom) | osqp eps 0.0001 | 5 held-out instances" in text
    for name in ("cold", "nearest neighbour", "learned k=0", "learned k=2", "cold + 2 torch steps", "optimum"):
        assert name in text
    record = json.loads((out / "config.json").read_text())
    assert record["problem"] == f"{problem_file}:make" and record["kind"] == "custom"
    assert record["config"]["problem"] == f"{problem_file}:make" and record["counts"]["test"] == 5
    assert sorted(p.name.split("-osqp-")[1].split("-n")[0] for p in data.iterdir()) == ["box_ls-test", "box_ls-train"]
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (out / "table.txt").read_text().strip()


def test_fit_then_evaluate_then_report_on_a_run_directory_that_resumes(problem_file, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths on the command line, recorded as absolute ones
    out = tmp_path / "run"
    base = ["--problem", problem_file.name, "--solver", "scs", *TINY, "--data-root", "data"]
    assert main(["evaluate", str(out)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    # a first fit of 2 epochs, then the same run directory asked for 4: it continues at epoch 2
    assert main(["fit", *base, "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 2
    assert "has not been evaluated yet" in capsys.readouterr().err
    assert not (out / "table.txt").exists() and (out / "model.pt").is_file()
    assert main(["fit", *base, "--epochs", "4", "--out", str(out), "--progress"]) == 0
    assert "training resumed at epoch 2" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["fit", *base, "--epochs", "4", "--out", str(fresh)]) == 0
    assert (out / "history.csv").read_text() == (fresh / "history.csv").read_text()
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 4
    # evaluate reads the configuration and model from the run directory (from any folder); given flags replace
    # the recorded ones
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["evaluate", str(out), "--eval-k", "0,3", "--timing-batch", "0"]) == 0
    text = capsys.readouterr().out
    assert "learned k=3" in text and "cold + 3 torch steps" in text and "learned k=2" not in text
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["eval_k"] == [0, 3] and record["config"]["epochs"] == 4
    assert not any((tmp_path / "elsewhere").iterdir()) and len(list((tmp_path / "data").iterdir())) == 2
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (out / "table.txt").read_text().strip()


def test_a_family_object_from_the_file(problem_file):
    source = load_problem_file(f"{problem_file}:family")
    assert source.name == "box_ls-family" and source.kind == "custom" and source.episodes is None
    params = source.sample(3, 7)
    assert params["b"].shape == (3, 4)
    assert (source.sample(3, 7)["b"] == params["b"]).all()


@pytest.mark.parametrize("function, message", [
    ("nope", "has no function 'nope' (its functions: "),
    ("socp", "solver 'osqp' takes QPs and LPs only"),
    ("wrong_names", "the sampler's names do not match the problem's parameters ['b']: missing ['b']; "
                    "unknown ['c']"),
    ("wrong_shape", "parameter 'b': the sampler returned shape (4,) for n = 2; expected (2, 4)"),
    ("sampler_fails", "the sampler raised RuntimeError: no data today"),
    ("not_a_problem", "must return (problem, sampler) or a family object"),
    ("raises", "() raised KeyError"),
    ("no_parameters", "the problem has no cp.Parameter"),
])
def test_a_faulty_problem_file_is_named_in_one_error_before_any_work(problem_file, tmp_path, capsys, function,
                                                                     message):
    data = tmp_path / "data"
    code = main(["run", "--problem", f"{problem_file}:{function}", "--solver", "osqp", "--out",
                 str(tmp_path / "o"), "--data-root", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and str(problem_file) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not data.exists() and not (tmp_path / "o").exists()


def test_a_missing_or_broken_problem_file(tmp_path, capsys):
    assert main(["run", "--problem", str(tmp_path / "nowhere.py"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'nowhere.py'} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("import cvxpy as cp\n1 / 0\n")
    assert main(["run", "--problem", f"{broken}:make", "--out", str(tmp_path / "o")]) == 2
    assert f"importing {broken} failed: ZeroDivisionError" in capsys.readouterr().err
