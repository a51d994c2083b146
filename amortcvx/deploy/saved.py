"""Saving and loading an :class:`~amortcvx.deploy.AmortizedSolver`: a folder with the predictor and one JSON file.

``predictor.pt`` is the predictor's own file (:meth:`WarmStartPredictor.save`: tensors and plain data, loaded
without running code); ``solver.json`` holds every constructor setting and every decision calibration took
(predictor on or off, refinement, C solver modes, SCS's fixed scale, OSQP's termination interval, the reference
instance of the persistent C solvers), so a loaded solver answers as the saved one did. Both files are written
to temporary names and renamed; ``solver.json`` last, so a folder is complete exactly when it has one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations.loop import AndersonSettings
from amortcvx.predictors.model import SETTINGS, WarmStartPredictor
from amortcvx.solvers import get_solver

FORMAT = "amortcvx.AmortizedSolver"
VERSION = 1
PREDICTOR_FILE, SOLVER_FILE = "predictor.pt", "solver.json"


def _anderson(a: AndersonSettings | None) -> dict | None:
    return None if a is None else dataclasses.asdict(a)


def save(solver, path: str | os.PathLike) -> None:
    """Write ``solver`` to the folder ``path`` (created if needed; an earlier save there is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; AmortizedSolver.save writes a folder")
    path.mkdir(parents=True, exist_ok=True)
    if solver.model is not None:
        solver.model.save(path / PREDICTOR_FILE)
    cal = solver.calibration
    state = {
        "format": FORMAT, "version": VERSION, "fingerprint": solver.pp.fingerprint, "algorithm": solver.algorithm,
        "model": solver.model is not None,
        "settings": None if solver.settings is None else dataclasses.asdict(solver.settings),
        "k": solver.k, "anderson": _anderson(solver.anderson), "polish": solver.polish, "newton": solver.newton,
        "solver_settings": solver.solver_settings, "safeguard": solver.safeguard,
        "safeguard_ratio": solver.safeguard_ratio, "safeguard_reference": solver.safeguard_reference,
        "finish": solver.finish, "dtype": str(solver.dtype).removeprefix("torch."), "workers": solver.workers,
        "check_termination_given": solver._check_given, "c_modes_given": solver._modes_given,
        "decisions": {
            "enabled": solver.enabled, "cold_refine": solver.cold_refine, "by_batch": solver.by_batch,
            "check_termination": solver.check_termination, "cold_check_termination": solver.cold_check_termination,
            "c_modes": solver.c_modes,
            "scs_scale": solver.scs_scale, "scs_stops": solver.scs_stops, "osqp_rho": solver.osqp_rho,
            "c_setup": solver.c_setup,
            "reference": None if solver._reference is None else solver._reference.reshape(-1).tolist(),
            "calibration": None if cal is None else cal.to_dict(),
        },
    }
    text = json.dumps(state, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".solver-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path / SOLVER_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> dict[str, Any]:
    file = path / SOLVER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a folder written by AmortizedSolver.save "
                                "(or the save did not finish)")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is damaged: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{file} is not an AmortizedSolver file")
    if state.get("version") != VERSION:
        raise ValueError(f"{file} has version {state.get('version')}; this amortcvx reads version {VERSION}")
    return state


def load(cls, path: str | os.PathLike, problem, *, device: str = "cpu", **overrides):
    """See :meth:`amortcvx.deploy.AmortizedSolver.load`."""
    from amortcvx.deploy.solver import Calibration

    path = Path(path)
    state = _read(path)
    algorithm = state["algorithm"]
    pp = problem if isinstance(problem, ParametricProblem) else ParametricProblem(
        problem, form=get_solver(algorithm).form)
    if pp.fingerprint != state["fingerprint"]:
        raise ValueError(f"{path} holds a solver for problem {state['fingerprint']}, not for this problem "
                         f"({pp.fingerprint}): its structure, shapes or constant data differ")
    model = None
    if state["model"]:
        model = WarmStartPredictor.load(path / PREDICTOR_FILE, fingerprint=pp.fingerprint, algorithm=algorithm)
    anderson = state["anderson"]
    kwargs = dict(
        algorithm=algorithm, settings=None if state["settings"] is None else SETTINGS[algorithm](**state["settings"]),
        k=state["k"], anderson=None if anderson is None else AndersonSettings(**anderson), polish=state["polish"],
        solver_settings=state["solver_settings"], safeguard=state["safeguard"],
        safeguard_ratio=state["safeguard_ratio"], safeguard_reference=state["safeguard_reference"],
        finish=state["finish"], dtype=getattr(torch, state["dtype"]), workers=state["workers"],
        check_termination=state["check_termination_given"], c_modes=state["c_modes_given"], device=device,
        newton=state.get("newton", 0))
    kwargs.update(overrides)
    solver = cls(pp, model, **kwargs)
    decided = state["decisions"]
    solver.enabled = bool(decided["enabled"])
    solver.cold_refine = bool(decided["cold_refine"])
    if "check_termination" not in overrides:
        solver.check_termination = decided["check_termination"]
        solver.cold_check_termination = decided.get("cold_check_termination")  # absent in older files
    if "c_modes" not in overrides:
        solver.c_modes = dict(decided["c_modes"])
    solver.scs_scale = decided["scs_scale"]
    solver.scs_stops = dict(decided.get("scs_stops") or {"warm": None, "cold": None})  # absent in older files
    solver.osqp_rho = decided["osqp_rho"]
    solver.c_setup = dict(decided.get("c_setup") or {})  # absent in older files
    if decided.get("scs_linear_solver") is not None:  # files written before normalize was timed
        solver.c_setup.setdefault("linear_solver", decided["scs_linear_solver"])
    if decided["reference"] is not None and "reference_params" not in overrides:
        solver._reference = torch.tensor(decided["reference"], dtype=torch.float64).reshape(1, -1)
    cal = decided["calibration"]
    if cal is not None:
        solver.calibration = Calibration.from_dict(cal)
        solver.by_batch = bool(decided.get("by_batch", False))
    return solver
