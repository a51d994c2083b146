"""Tests of the command line (``python -m amortcvx``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from amortcvx import problems
from amortcvx.cli import DEFAULTS, build_parser, main


def test_families_lists_every_family(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for name in problems.names():
        assert name in out
    line = next(line for line in out.splitlines() if line.startswith("kalman"))
    assert "socp" in line and "osqp" not in line  # OSQP is not offered for SOCP families


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "amortcvx", "families"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "portfolio" in proc.stdout and "sparse_pca" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["run", "--family", "nope"], "unknown problem family 'nope'"),
    (["run", "--family", "kalman", "--algorithm", "osqp"], "kind 'socp'"),
    (["run", "--algorithm", "ecos"], "unknown algorithm 'ecos'"),
    (["run", "--size", "huge"], "unknown size 'huge'"),
    (["run", "--anderson", "-1"], "anderson_memory must be a nonnegative int"),
    (["run", "--family", "kalman", "--polish"], "polishing needs an LP or QP (zero and nonnegative cones only); "
                                                "this problem also has soc cones"),
])
def test_run_rejects_bad_input_with_a_clear_error(capsys, tmp_path, argv, message):
    code = main([*argv, "--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "d")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any work


def test_default_run_is_the_embedded_configuration():
    args = build_parser().parse_args(["run"])
    assert (args.family, args.algorithm, args.n_train, args.n_test, args.k, args.epochs) == (
        DEFAULTS["family"], DEFAULTS["algorithm"], DEFAULTS["n_train"], DEFAULTS["n_test"], DEFAULTS["k"],
        DEFAULTS["epochs"])


def test_tiny_run_prints_the_table(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--family", "transport", "--algorithm", "osqp", "--n-train", "30", "--n-test", "8",
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
