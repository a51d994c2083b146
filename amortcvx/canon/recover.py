"""Batched, differentiable maps from canonical solutions to CVXPY variables and constraint duals.

``ParametricProblem.recover`` runs CVXPY's inverse reductions on one numpy solution. For a compiled DPP
problem those reductions are affine in the canonical point (a variable is a slice of ``x``, or a fixed linear
function of it when CVXPY replaced it; a constraint's dual is a slice of ``y``, reshaped, possibly unpacked or
scaled), so each output is ``value = M z + o`` with ``M`` found once by probing ``recover`` with ``0`` and the
unit vectors. Variables that survive compilation unchanged take a fast path (a column-major slice of ``x``);
probing costs one ``recover`` call per canonical coordinate and is done only for what is asked for.
Applied to a batch the map is a torch matrix product: any device, dtype and batch, differentiable.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import torch

from amortcvx.canon.parametric import ParametricProblem


class AffineOutput(NamedTuple):
    """``value = unflatten(z @ M' + o)`` for one output of shape ``shape``.

    Attributes:
        shape: the CVXPY shape of the output.
        start, stop: when not None, the output is ``z[:, start:stop]`` (column-major), and ``M``/``o`` are None.
        M: dense ``(size, len(z))`` float64 matrix, or None.
        o: dense ``(size,)`` float64 offset, or None.
    """

    shape: tuple[int, ...]
    start: int | None
    stop: int | None
    M: np.ndarray | None
    o: np.ndarray | None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The output for a batch ``z`` (B, len) as ``(B, *shape)``."""
        if self.start is not None:
            flat = z[:, self.start:self.stop]
        else:
            M = torch.as_tensor(self.M, dtype=z.dtype, device=z.device)
            flat = z @ M.mT + torch.as_tensor(self.o, dtype=z.dtype, device=z.device)
        return unflatten(flat, self.shape)


def unflatten(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of CVXPY's column-major vec, batched: (B, size) -> (B, *shape)."""
    batch = flat.shape[0]
    if len(shape) <= 1:
        return flat.reshape(batch, *shape)
    return flat.reshape(batch, *reversed(shape)).permute(0, *range(len(shape), 0, -1))


def _probe(pp: ParametricProblem, which: str, size: int, pick) -> list[np.ndarray]:
    """``pick(recover(z))`` for ``z = 0`` and each unit vector ``e_i`` of the ``which`` (x or y) coordinates."""
    zeros_x, zeros_y = np.zeros(pp.n), np.zeros(pp.m)
    out = []
    for i in range(-1, size):
        z = np.zeros(size)
        if i >= 0:
            z[i] = 1.0
        sol = pp.recover(z, zeros_y) if which == "x" else pp.recover(zeros_x, z)
        out.append(pick(sol))
    return out


def _from_probes(values: list, shape: tuple[int, ...], what: str) -> AffineOutput:
    if any(v is None for v in values):
        raise ValueError(f"{what} has no value in CVXPY's recovered solution")
    flat = [np.asarray(v, dtype=np.float64).reshape(-1, order="F") for v in values]
    o = flat[0]
    M = np.stack([f - o for f in flat[1:]], axis=1)
    return AffineOutput(tuple(shape), None, None, M, o)


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""ParametricProblem -> {key: maps}: the maps are computed (probed) once per problem."""


def _memoized(pp: ParametricProblem, key, build):
    per_problem = _MEMO.setdefault(pp, {})
    if key not in per_problem:
        per_problem[key] = build()
    return per_problem[key]


def variable_maps(pp: ParametricProblem, variables: Sequence[cp.Variable]) -> list[AffineOutput]:
    """One :class:`AffineOutput` of canonical ``x`` per variable (in the order given); computed once per problem
    and list of variables."""
    variables = list(variables)
    return _memoized(pp, ("variables", tuple(v.id for v in variables)), lambda: _variable_maps(pp, variables))


def _variable_maps(pp: ParametricProblem, variables: list[cp.Variable]) -> list[AffineOutput]:
    cols = pp._prog.var_id_to_col  # noqa: SLF001 - the compiled program's variable layout
    out: list[AffineOutput | None] = []
    probe_needed = []
    for i, var in enumerate(variables):
        col = cols.get(var.id)
        if col is not None and not var._has_dim_reducing_attr:  # noqa: SLF001 - stored reduced (e.g. a triangle)
            out.append(AffineOutput(tuple(var.shape), int(col), int(col) + var.size, None, None))
        else:
            out.append(None)
            probe_needed.append(i)
    if probe_needed:
        names = [variables[i].name() for i in probe_needed]
        probes = _probe(pp, "x", pp.n, lambda sol: [sol.variables.get(nm) for nm in names])
        for j, i in enumerate(probe_needed):
            out[i] = _from_probes([p[j] for p in probes], variables[i].shape, f"variable {names[j]!r}")
    return out  # type: ignore[return-value]


BOUND_ATTRIBUTES = ("nonneg", "nonpos", "pos", "neg", "bounds")
"""The variable attributes whose sets CVXPY projects a recovered value onto (:func:`project_recovered`)."""
REBUILT_ATTRIBUTES = ("symmetric", "PSD", "NSD", "diag", "sparsity")
"""The variable attributes CVXPY rebuilds a recovered value from a reduced form for, with no projection."""


def project_recovered(var: cp.Variable, values: np.ndarray) -> np.ndarray:
    """``values`` ``(B, *shape)`` of ``var`` projected as CVXPY projects a recovered value: a variable with an
    elementwise attribute (nonneg, nonpos, pos, neg, bounds), which CVXPY replaced by a free one plus constraints,
    gets its value projected onto the attribute's set (``cvxpy.reductions.cvx_attr2constr.recover_value_for_leaf``);
    symmetric, PSD, NSD, diag and sparse variables are rebuilt from their reduced form instead, and left as they are
    here too. The projection is not affine, so :func:`variable_maps` leaves it out; this applies it per instance."""
    attrs = var.attributes
    if any(attrs.get(k) for k in REBUILT_ATTRIBUTES):
        return values
    if all(attrs.get(k) is None or attrs.get(k) is False for k in BOUND_ATTRIBUTES):  # bounds: None or a list
        return values
    return np.stack([np.asarray(var.project(v), dtype=np.float64).reshape(var.shape) for v in values])


def dual_maps(pp: ParametricProblem) -> list[AffineOutput]:
    """One :class:`AffineOutput` of canonical ``y`` per constraint of ``pp.problem.constraints`` (computed once
    per problem)."""
    return _memoized(pp, "duals", lambda: _dual_maps(pp))


def _dual_maps(pp: ParametricProblem) -> list[AffineOutput]:
    cons = pp.problem.constraints
    probes = _probe(pp, "y", pp.m, lambda sol: list(sol.duals))
    return [_from_probes([p[j] for p in probes], tuple(np.shape(probes[0][j])), f"the dual of constraint {j}")
            for j in range(len(cons))]
