"""The installed package: every amortcvx subpackage is listed in pyproject.toml, the families install under it."""

import ast
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    listed = set(_config()["packages"])
    on_disk = {"amortcvx"} | {"amortcvx." + p.parent.name for p in (ROOT / "amortcvx").glob("*/__init__.py")}
    missing = on_disk - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"amortcvx.problems"}


def test_families_install_under_the_package():
    assert _config()["package-dir"] == {"amortcvx.problems": "problems"}
    from amortcvx import problems

    assert pathlib.Path(problems.__file__).resolve().parent == ROOT / "problems"
    assert "portfolio" in problems.names()


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_core_layers_do_not_import_the_families():
    core = ("backends", "canon", "datasets", "deploy", "iterations", "predictors", "training")
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[:2] == ["amortcvx", "problems"]
                                                   or n.split(".")[0] == "problems")
                 for layer in core for p in (ROOT / "amortcvx" / layer).rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core layers import the bundled families: {offenders}"
