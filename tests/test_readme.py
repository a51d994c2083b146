"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMORTCVX_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    out = scope["out"]
    assert out.optimal.all() and out.variables["w"].shape == (100, 20)
    assert scope["prob"].status == "optimal"
