"""Tests of the command line (``python -m amortcvx``) and of the flags it builds from ExperimentConfig."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from amortcvx import problems
from amortcvx.cli import COMMAND_GROUPS, GROUPS, build_parser, main
from amortcvx.evaluation import ExperimentConfig
from amortcvx.evaluation.options import add_dataclass_arguments, config_from_args, field_docs
from amortcvx.solvers import NAMES
from amortcvx.training import TrainConfig


def test_families_lists_every_family(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for name in problems.names():
        assert name in out
    line = next(line for line in out.splitlines() if line.startswith("kalman"))
    assert "socp" in line and "osqp" not in line  # OSQP is not offered for SOCP families
    line = next(line for line in out.splitlines() if line.startswith("portfolio"))
    assert "scs, osqp" in line


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "amortcvx", "families"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "portfolio" in proc.stdout and "sparse_pca" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["run", "--family", "nope"], "unknown problem family 'nope'"),
    (["run", "--family", "kalman", "--solver", "osqp"], "kind 'socp'"),
    (["run", "--size", "huge"], "unknown size 'huge'"),
    (["run", "--anderson", "-1"], "anderson_memory must be a nonnegative int"),
    (["run", "--k", "61"], "k must be an int in 0..60"),
    (["fit", "--family", "kalman", "--polish"], "polishing needs an LP or QP (zero and nonnegative cones only); "
                                                "this problem also has soc cones"),
])
def test_run_rejects_bad_input_with_a_clear_error(capsys, tmp_path, argv, message):
    code = main([*argv, "--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "d")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any work


def test_unknown_solver_is_refused_by_the_parser_listing_the_known_ones(capsys):
    for flag in ("--solver", "--algorithm"):  # the former name still works
        with pytest.raises(SystemExit) as info:
            main(["run", flag, "ecos"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice: 'ecos'" in err and all(name in err for name in NAMES)
    assert build_parser().parse_args(["run", "--algorithm", "osqp"]).solver == "osqp"


def test_every_option_is_one_config_field_with_its_default():
    """The flags are the fields of ExperimentConfig, each in one group, with the config's defaults; the training
    defaults are TrainConfig's."""
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    grouped = [f for group in GROUPS.values() for f in group]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    assert set(COMMAND_GROUPS["run"]) == set(GROUPS)
    default = ExperimentConfig()
    for command in ("run", "fit"):
        args = build_parser().parse_args([command])
        assert config_from_args(ExperimentConfig, {k: v for k, v in vars(args).items() if k != "command"}) == default
    train = TrainConfig()
    for name in ("epochs", "batch_size", "lr", "weight_decay", "patience", "hidden", "weights", "device", "dtype"):
        assert getattr(default, name) == getattr(train, name), name
    docs = field_docs(ExperimentConfig)
    assert set(docs) == set(names) and all(docs.values())
    helptext = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert docs["n_test"] in " ".join(helptext.split())


def test_flags_parse_to_the_config():
    args = build_parser().parse_args(["run", "--solver", "osqp", "--n-train", "50", "--eval-k", "0,5",
                                      "--hidden", "16,8", "--residual", "0.5", "--no-calibrate", "--quiet",
                                      "--out", "x", "--no-resume", "--workers", "3"])
    config = config_from_args(ExperimentConfig, {k: v for k, v in vars(args).items() if k != "command"})
    assert (config.solver, config.n_train, config.eval_k, config.hidden) == ("osqp", 50, (0, 5), (16, 8))
    assert config.weights.residual == 0.5 and config.weights.regression == 1.0
    assert (config.calibrate, config.progress, config.resume, config.out_dir, config.workers) == (
        False, False, False, "x", 3)
    for bad in (["--eval-k", "a"], ["--hidden", "0"], ["--eps", "0"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", *bad])


@dataclasses.dataclass(frozen=True)
class Inner:
    """Inner.

    Attributes:
        a, b: two numbers.
    """

    a: float = 1.0
    b: float = 2.0

@dataclasses.dataclass(frozen=True)
class Options:
    """Options.

    Attributes:
        size: how many
            (continued).
        flag: on or off.
        name: a name.
        inner: nested.
    """

    size: int = 3
    flag: bool = True
    name: str | None = dataclasses.field(default=None, metadata={"flag": "--label"})
    inner: Inner = Inner()


def test_dataclass_flags_helper_on_a_dataclass_of_its_own():
    assert field_docs(Options)["size"] == "how many (continued)."
    assert field_docs(Inner) == {"a": "two numbers.", "b": "two numbers."}
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Options, defaults={"size": 7})
    args = parser.parse_args(["--no-flag", "--label", "z", "--b", "5"])
    assert config_from_args(Options, args) == Options(size=7, flag=False, name="z", inner=Inner(1.0, 5.0))
    assert "how many (continued). (default: 7)" in " ".join(parser.format_help().split())
    only = argparse.ArgumentParser()
    add_dataclass_arguments(only, Options, only=["size"], suppress_defaults=True)
    assert vars(only.parse_args([])) == {} and vars(only.parse_args(["--size", "2"])) == {"size": 2}
    with pytest.raises(ValueError, match="has no fields"):
        add_dataclass_arguments(argparse.ArgumentParser(), Options, only=["nope"])


def test_tiny_run_prints_the_table(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--family", "transport", "--solver", "osqp", "--n-train", "30", "--n-test", "8",
                 "--epochs", "2", "--k", "3", "--eval-k", "0,3", "--anderson", "2", "--polish", "--workers", "1",
                 "--timing-single", "2", "--timing-batch", "4", "--out", str(out), "--data-root",
                 str(tmp_path / "data"), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("cold", "nearest neighbour", "learned k=0", "learned k=3", "optimum", "speedup vs cold"):
        assert name in text
    assert (out / "table.txt").is_file() and (out / "model.pt").is_file() and (out / "summary.csv").is_file()
    config = (out / "config.json").read_text()
    assert '"anderson_memory": 2' in config and '"polish": true' in config
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (out / "table.txt").read_text().strip()
