"""The worked examples run (in their quick mode) and report what the docs say they report."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_portfolio_layer_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "portfolio_layer.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("amortcvx (cold)"))
    violation = float(re.search(r"max constraint violation on the test set (\S+)", line).group(1))
    assert violation < 1e-6  # the layer's portfolios are feasible
    assert "machine:" in out.stdout and "training" in line
