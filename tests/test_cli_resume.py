"""``python -m amortcvx run`` interrupted by Ctrl-C during training continues from its last finished epoch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from amortcvx.cli import main
from amortcvx.training import train_state_path


def _args(data_root, out, epochs: int, *extra: str) -> list[str]:
    return ["run", "--family", "transport", "--solver", "osqp", "--n-train", "30", "--n-test", "6",
            "--k", "0", "--eval-k", "0", "--workers", "1", "--timing-single", "0", "--timing-batch", "0",
            "--no-calibrate", "--patience", "100000", "--epochs", str(epochs), "--data-root", str(data_root),
            "--out", str(out), *extra]


SIGINT_IGNORED = pytest.mark.skipif(
    sys.platform != "win32" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process (a background job of a shell without job control), and so in its "
           "children: Ctrl-C cannot be tested here")


@SIGINT_IGNORED
@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to a child process")
def test_run_interrupted_by_sigint_resumes_training_with_the_same_numbers(tmp_path, capsys):
    data = tmp_path / "data"
    out = tmp_path / "interrupted"
    state = train_state_path(out / "checkpoint.pt")
    # a run that would train for a very long time, interrupted (Ctrl-C) once it has finished an epoch
    proc = subprocess.Popen([sys.executable, "-m", "amortcvx", *_args(data, out, 100_000, "--quiet")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no training state appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "continues training from its last finished epoch" in err
    assert "Traceback" not in err
    saved = torch.load(state, weights_only=True)
    last = json.loads(saved["info"])["epoch"]  # the last finished epoch before the interrupt
    epochs = last + 4

    # the rerun (same folder, more epochs allowed) continues at the epoch after the saved one ...
    assert main(_args(data, out, epochs)) == 0
    log = capsys.readouterr().err
    assert f"resuming training from {state}" in log
    assert f"training resumed at epoch {last + 1}" in log
    # ... and ends with the numbers of an uninterrupted run
    fresh = tmp_path / "fresh"
    assert main(_args(data, fresh, epochs, "--quiet")) == 0
    capsys.readouterr()
    history = (out / "history.csv").read_text()
    assert history == (fresh / "history.csv").read_text()
    assert len(history.splitlines()) == 1 + epochs
    best = [json.loads((d / "config.json").read_text())["best_epoch"] for d in (out, fresh)]
    assert best[0] == best[1]

    # another run's settings in the same folder: one clear error pointing at --no-resume, exit 2
    assert main(_args(data, out, epochs, "--quiet", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "another training run" in err and "--no-resume" in err and "Traceback" not in err
    # --no-resume trains from scratch (and replaces the state)
    assert main(_args(data, out, 2, "--quiet", "--lr", "0.01", "--no-resume")) == 0
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 2


def test_resume_is_on_by_default_and_checked():
    from amortcvx.cli import build_parser
    from amortcvx.evaluation import ExperimentConfig

    assert ExperimentConfig().resume is True
    with pytest.raises(ValueError, match="resume must be a bool"):
        ExperimentConfig(resume="no")
    assert build_parser().parse_args(["run"]).resume is True
    assert build_parser().parse_args(["run", "--no-resume"]).resume is False


@SIGINT_IGNORED
def test_ctrl_c_during_a_checkpoint_write_completes_the_file_then_interrupts(tmp_path, monkeypatch):
    from amortcvx.predictors.model import atomic_torch_save

    real_save = torch.save

    def save_interrupted(obj, fh):  # a Ctrl-C arrives in the middle of the write
        real_save(obj, fh)
        signal.raise_signal(signal.SIGINT)
        fh.write(b"")

    monkeypatch.setattr(torch, "save", save_interrupted)
    target = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.ones(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]  # complete and in place
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left
