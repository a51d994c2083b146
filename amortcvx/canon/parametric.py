"""Compile a parametric CVXPY problem once; map parameter batches to canonical solver data in torch.

CVXPY's DPP compilation (``problem.get_problem_data``) yields a ``ParamConeProg`` whose sparse tensors give
every entry of the canonical data as an affine function of the flattened parameter vector ``theta``:

    c = T_q [theta; 1],   vec([A_cvx | b_cvx]) = T_A [theta; 1],   vec(P) = T_P [theta; 1]

with the convention ``A_cvx x + b_cvx in K``. :class:`ParametricProblem` keeps those tensors and evaluates them
for a whole batch of parameters with one sparse product, restricted to the entries that depend on parameters;
entries that do not are stored once and shared by the batch. The result equals, entry for entry, what
``get_problem_data`` returns for each instance:

* cone form (SCS):  ``A = -A_cvx``, ``b = b_cvx``, ``s = b - A x in K``;
* QP form (OSQP):   equality rows ``A_cvx x + b_cvx = 0`` become ``l = u = -b_cvx`` with ``A = A_cvx``, inequality
  rows ``A_cvx x + b_cvx >= 0`` become ``-A_cvx x <= b_cvx`` with ``l = -inf``.

The inverse direction maps canonical solutions back to CVXPY variable values and constraint duals, and
CVXPY-space guesses forward to canonical coordinates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from amortcvx.canon.affine import AffineMap
from amortcvx.canon.data import ConeData, ConeDims, QPData, SparseBatch

FORMS = {"cone": cp.SCS, "qp": cp.OSQP}

ParamValue = np.ndarray | torch.Tensor | float


class CvxpySolution(NamedTuple):
    """One instance's solution in CVXPY space.

    Attributes:
        status: CVXPY status string.
        value: optimal objective value (CVXPY's, offset included), nan if unavailable.
        variables: variable name -> value (shaped like the variable).
        duals: one entry per ``problem.constraints`` (same order): its dual value, or None.
    """

    status: str
    value: float
    variables: dict[str, np.ndarray]
    duals: list[Any]

    def fill(self, problem: cp.Problem) -> None:
        """Write the values into ``problem``'s variables and constraints (as ``problem.solve`` would)."""
        for var in problem.variables():
            var.value = self.variables.get(var.name())
        for con, dual in zip(problem.constraints, self.duals):
            if dual is not None:
                con.dual_value = dual


def _fortran_flat(value: Any, batch: int) -> Any:
    """Flatten each instance of a (B, *shape) tensor or array in column-major order (CVXPY's vec)."""
    if value.ndim <= 2:
        return value.reshape(batch, -1)
    perm = (0, *range(value.ndim - 1, 0, -1))
    moved = value.permute(perm) if isinstance(value, torch.Tensor) else value.transpose(perm)
    return moved.reshape(batch, -1)


def _present(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"parameter {name!r} has no value (None)")
    return value


def _all_finite(value: Any) -> bool:
    """Whether every entry of a tensor or array is finite (on the CPU by numpy on the same memory, cheaper than
    torch at small sizes; elsewhere the sum first: one reduction when all are)."""
    if isinstance(value, torch.Tensor):
        if value.is_cpu and value.dtype in (torch.float32, torch.float64):
            return bool(np.isfinite((value.detach() if value.requires_grad else value).numpy()).all())
        return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())
    return bool(np.isfinite(value).all())


def expected_shapes(shape: tuple[int, ...]) -> str:
    """The shapes a parameter of ``shape`` takes, for error messages: one instance or a batch, e.g.
    ``"(10,) or (batch, 10)"``."""
    return f"{tuple(shape)} or (" + ", ".join(["batch", *map(str, shape)]) + ("," if not shape else "") + ")"


class ParametricProblem:
    """A DPP CVXPY problem compiled once to a cone (SCS) or QP (OSQP) canonical form.

    Args:
        problem: a DPP ``cp.Problem`` with at least one ``cp.Parameter``. Every parameter needs a unique name
            (``cp.Parameter(..., name=...)``); values passed later are addressed by those names.
        form: ``"cone"`` (``min 1/2x'Px + c'x  s.t.  Ax + s = b, s in K``) or ``"qp"``
            (``min 1/2x'Px + q'x  s.t.  l <= Ax <= u``); asking for ``"qp"`` on a problem that needs other
            cones than zero / nonnegative is a ValueError.

    Raises:
        TypeError: ``problem`` is not a ``cp.Problem``.
        ValueError: the problem is not DPP, has no parameters, has duplicate parameter names, or cannot be put in
            the requested form.
    """

    def __init__(self, problem: cp.Problem, form: str = "cone"):
        if not isinstance(problem, cp.Problem):
            raise TypeError(f"expected a cvxpy.Problem, got {type(problem).__name__}")
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; expected one of {sorted(FORMS)}")
        params = problem.parameters()
        if not params:
            raise ValueError("the problem has no cp.Parameter; there is nothing to amortize over")
        _check_continuous(problem)
        _check_dcp(problem)
        if not problem.is_dpp():
            raise ValueError(
                "the problem is not DPP (disciplined parametrized programming), so its canonical data is not "
                "affine in the parameters; see https://www.cvxpy.org/tutorial/dpp/ (problem.is_dpp() is False)")
        names = [p.name() for p in params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"parameter names must be unique; duplicated: {dup}")
        self.problem = problem
        self.form = form
        self._sign = -1.0 if isinstance(problem.objective, cp.Maximize) else 1.0
        self._params = {p.name(): p for p in params}
        # parameters whose values are checked against attributes (nonneg, PSD, bounds, ...): the others skip it
        self._attributed = {p.name() for p in params if _attribute_checks(p, torch.float64, torch.device("cpu"))}

        saved = {p.id: p.value for p in params}
        try:
            for p in params:  # compilation needs values; they do not change the compiled tensors
                if p.value is None:
                    p.value = _placeholder(p)
            try:
                data, self._chain, self._inverse = problem.get_problem_data(FORMS[form])
            except cp.error.SolverError as exc:
                if form == "qp":
                    raise ValueError(
                        "this problem is not a QP (its canonical form needs cones beyond zero/nonnegative, e.g. "
                        f"SOC, PSD or exp); use form='cone'. CVXPY said: {exc}") from exc
                raise
        finally:
            for p in params:
                p.value = saved[p.id]

        prog = data["param_prob"]
        self._prog = prog
        by_id = {p.id: p for p in params}
        # parameters with dimension-reducing attributes (symmetric, PSD, NSD, diag, sparsity) enter the compiled
        # problem through a reduced parameter: a gather of the column-major entries of the full value
        reduced = _reduced_parameters(self._chain)
        self._gather: dict[str, np.ndarray] = {}
        for pid in prog.param_id_to_col:
            if pid in by_id or pid < 0:  # a user's parameter, or CVXPY's constant column (id -1)
                continue
            if pid not in reduced:
                raise ValueError(f"CVXPY replaced a parameter during compilation in a way amortcvx does not know "
                                 f"(parameter id {pid}); declare the parameters without attributes")
            orig, index = reduced[pid]
            by_id[pid] = orig
            self._gather[orig.name()] = index
        # (name, shape, size, column) in parameter-vector order
        self._layout = sorted(
            ((by_id[pid].name(), by_id[pid].shape, prog.param_id_to_size[pid], col)
             for pid, col in prog.param_id_to_col.items() if pid in by_id),
            key=lambda t: t[3])
        self.num_params = int(prog.total_param_size)
        dims = prog.cone_dims
        self.cones = ConeDims(zero=int(dims.zero), nonneg=int(dims.nonneg), soc=tuple(int(k) for k in dims.soc),
                              psd=tuple(int(k) for k in dims.psd), exp=int(dims.exp))
        if getattr(dims, "p3d", None) or getattr(dims, "pnd", None):
            raise ValueError("power cones are not supported by amortcvx's backends; reformulate without them")
        n = int(prog.x.size)
        self.n = n
        self.m = self.cones.size
        self._build_maps(prog, n, self.m)

    # ------------------------------------------------------------------ compilation
    def _build_maps(self, prog, n: int, m: int) -> None:
        p1 = self.num_params + 1
        q = sp.csr_array(prog.q) if prog.q is not None else sp.csr_array((n + 1, p1))
        self._c_map = AffineMap(q[:n])
        self._offset_map = AffineMap(q[[n]])

        a = sp.coo_array(prog.A) if prog.A is not None else sp.coo_array((m * (n + 1), p1))
        a = sp.csr_array(a)
        a.sum_duplicates()
        rows_with_data = np.unique(sp.coo_array(a).row)
        flat = np.arange(m * (n + 1))
        entry_rows, entry_cols = flat % m, flat // m  # column-major layout of [A | b]
        in_a = rows_with_data[entry_cols[rows_with_data] < n]
        # Sparsity pattern of A (CSC order: column-major == tensor row order).
        a_rows, a_cols = entry_rows[in_a], entry_cols[in_a]
        b_idx = n * m + np.arange(m)
        eq = np.arange(m) < self.cones.zero
        if self.form == "cone":
            a_sign, b_sign = -np.ones(in_a.size), np.ones(m)
        else:
            a_sign = np.where(eq[a_rows], 1.0, -1.0)
            b_sign = np.where(eq, -1.0, 1.0)
        self._a_map = AffineMap(a[in_a], scale=a_sign)
        self._b_map = AffineMap(a[b_idx], scale=b_sign)  # cone form: b; QP form: u
        self._a_pattern = _csc_pattern(a_rows, a_cols, (m, n))

        self._p_map = None
        if prog.P is not None and sp.csr_array(prog.P).nnz:
            pt = sp.csr_array(prog.P)
            pt.sum_duplicates()
            prow = np.unique(sp.coo_array(pt).row)
            self._p_map = AffineMap(pt[prow])
            self._p_pattern = _csc_pattern(prow % n, prow // n, (n, n))
        # every parameter-dependent piece through one stacked map: one sparse product and one finiteness test per
        # call instead of one per piece (most of canonicalize's cost at batch 1)
        lin, rhs = ("c", "b") if self.form == "cone" else ("q", "u")  # the pieces' names in this form
        maps = {lin: self._c_map, "offset": self._offset_map, "A": self._a_map, rhs: self._b_map}
        if self._p_map is not None:
            maps["P"] = self._p_map
        if self.form == "qp":  # last: l is -inf on the inequality rows, so the finiteness test stops before it
            maps["l"] = AffineMap(a[b_idx], scale=b_sign, mask=eq, fill=-np.inf)
        self._maps = maps
        dependent = [name for name, amap in maps.items() if not amap.shared]
        self._stack = AffineMap.stack([maps[name] for name in dependent]) if dependent else None
        ends = np.cumsum([maps[name].size for name in dependent])
        self._slices = {name: slice(int(end - maps[name].size), int(end)) for name, end in zip(dependent, ends)}
        self._finite_end = self._slices["l"].start if "l" in self._slices else None  # the columns tested finite

    # ------------------------------------------------------------------ public API
    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, in the order of the flattened parameter vector."""
        return {name: tuple(shape) for name, shape, _, _ in self._layout}

    @property
    def parameters(self) -> dict[str, cp.Parameter]:
        return dict(self._params)

    @property
    def a_pattern(self) -> tuple[np.ndarray, np.ndarray]:
        """The canonical ``A``'s sparsity pattern, ``(indices, indptr)`` in CSC form (``(m, n)``), the same for every
        instance."""
        return self._a_pattern

    @property
    def quadratic(self) -> bool:
        """Whether the canonical objective has a quadratic part ``P``."""
        return self._p_map is not None

    @property
    def objective_sign(self) -> float:
        """+1.0 for ``cp.Minimize``, -1.0 for ``cp.Maximize``.

        The canonical problem is always a minimization: for ``Maximize(f)`` CVXPY minimizes ``-f``, so the
        canonical optimal value ``1/2 x'Px + c'x + offset`` (what the backends report) is ``-f*``, and CVXPY's
        value is ``objective_sign * canonical value``.
        """
        return self._sign

    @property
    def dependent(self) -> dict[str, bool]:
        """Which canonical pieces depend on parameters (the others are shared by every instance)."""
        out = {"c": not self._c_map.shared, "A": not self._a_map.shared, "b": not self._b_map.shared,
               "P": self._p_map is not None and not self._p_map.shared}
        return out

    @property
    def fingerprint(self) -> str:
        """A stable hash of the compiled problem: form, sizes, cones, parameter layout and the affine maps.

        Two compilations of the same problem (same constants) agree, in any process; any change in structure,
        shapes or constant data changes it. Use it to key saved models and caches.
        """
        h = hashlib.sha256()
        h.update(repr((self.form, self.n, self.m, self.cones, self._layout_key())).encode())
        maps = [self._c_map, self._offset_map, self._a_map, self._b_map] + (
            [self._p_map] if self._p_map is not None else [])
        for amap in maps:
            for arr in (amap.const, amap.dependent, amap._dep.indptr, amap._dep.indices, amap._dep.data):
                h.update(np.ascontiguousarray(arr).tobytes())
        for pat in [self._a_pattern] + ([self._p_pattern] if self._p_map is not None else []):
            h.update(pat[0].tobytes())
            h.update(pat[1].tobytes())
        return h.hexdigest()[:16]

    def _layout_key(self):
        return tuple((name, tuple(shape)) for name, shape, _, _ in self._layout)

    def parameter_vector(self, params: Mapping[str | cp.Parameter, ParamValue], *,
                         dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Validate a parameter batch and flatten it to ``theta`` of shape (B, num_params).

        Args:
            params: name (or ``cp.Parameter``) -> value with shape ``param.shape`` (one instance) or
                ``(B, *param.shape)``. Every parameter is required. Torch tensors keep their device and
                dtype (and autograd graph); numpy values become float64 tensors unless ``dtype`` is given. Numpy
                values, and CPU float64 tensors without a graph (read as arrays, without a copy), are validated and
                flattened in numpy (:meth:`_flatten_host`); others in torch (differentiable).

        Raises:
            ValueError: naming the missing / unknown parameter, a wrong shape or batch size, or non-finite values.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> value, got {type(params).__name__}")
        given: dict[str, Any] = {}
        for key, value in params.items():
            name = key.name() if isinstance(key, cp.Parameter) else key
            if name not in self._params:
                raise ValueError(f"unknown parameter {name!r}; the problem's parameters are {sorted(self._params)}")
            given[name] = value
        missing = sorted(set(self._params) - set(given))
        if missing:
            raise ValueError(f"missing values for parameter(s) {missing}")
        ref = next((v for v in given.values() if isinstance(v, torch.Tensor)), None)
        if dtype is None:
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float64
        if device is None:
            device = ref.device if ref is not None else torch.device("cpu")
        on_host = torch.device(device).type == "cpu" and dtype == torch.float64 and all(
            v.is_cpu and v.dtype == torch.float64 and not v.requires_grad
            for v in given.values() if isinstance(v, torch.Tensor))
        if ref is None or on_host:  # numpy values (the low-latency path), or CPU float64 tensors without a graph
            # (read as numpy arrays, without a copy): validated and flattened in numpy, one tensor made
            host = {name: real_array(_present(given[name], name), name) for name, _, _, _ in self._layout}
            theta = torch.from_numpy(self._flatten(host, np))
            return theta.to(device=device, dtype=dtype)
        values = {}
        for name, _, _, _ in self._layout:
            val = _present(given[name], name)
            if isinstance(val, torch.Tensor):
                if val.is_complex():
                    raise ValueError(f"parameter {name!r} has complex values (dtype {val.dtype}); amortcvx "
                                     "supports real parameters only")
                values[name] = val.to(device=device, dtype=dtype)
            else:
                values[name] = torch.tensor(real_array(val, name), dtype=dtype, device=device)  # a copy
        return self._flatten(values, torch)

    def _flatten(self, values: dict[str, Any], xp: Any) -> Any:
        """Check every parameter's shape, batch size, finiteness and attributes, and flatten the batch to
        ``theta`` (B, num_params) in CVXPY's (column-major) order; ``xp`` is ``np`` for numpy values (the result is
        a new array, never a view of the caller's) or ``torch`` for tensors (differentiable)."""
        batch = None
        batched = {}
        for name, shape, _, _ in self._layout:
            t, shape = values[name], tuple(shape)
            if tuple(t.shape) == shape:
                t = t[None]
            elif t.ndim == len(shape) + 1 and tuple(t.shape[1:]) == shape:
                if batch is not None and t.shape[0] != batch:
                    raise ValueError(f"parameter {name!r} has batch size {t.shape[0]}, but another parameter has "
                                     f"batch size {batch}")
                batch = int(t.shape[0])
            else:
                raise ValueError(f"parameter {name!r} expects shape {expected_shapes(shape)}; got {tuple(t.shape)}")
            if not _all_finite(t):
                raise ValueError(f"parameter {name!r} contains NaN or inf values")
            if name in self._attributed:
                _check_attributes(self._params[name], t if xp is torch else torch.tensor(t))
            batched[name] = t
        batch = 1 if batch is None else batch
        if batch == 0:
            raise ValueError("empty batch (batch size 0)")
        if xp is np:
            return self._flatten_host(batched, batch)
        cols = []
        for name, _, _, _ in self._layout:
            t = batched[name]
            if t.shape[0] != batch:
                t = t.expand(batch, *t.shape[1:])
            flat = _fortran_flat(t, batch)
            if name in self._gather:  # the entries CVXPY's reduced parameter keeps (e.g. the upper triangle)
                flat = flat[:, torch.as_tensor(self._gather[name], device=flat.device)]
            cols.append(flat)
        return torch.cat(cols, dim=1)

    def _flatten_host(self, batched: dict[str, np.ndarray], batch: int) -> np.ndarray:
        """:meth:`_flatten`'s numpy result: each parameter copied once, straight into its columns of a new (B,
        num_params) array viewed as ``(B, *reversed(shape))`` (CVXPY's column-major order), instead of a flattened
        copy per parameter and their concatenation (robust_ls large, batch 1024: 45 against 85 ms, interleaved
        medians; scalars and vectors as fast as before at batch 1)."""
        theta = np.empty((batch, self.num_params))
        col = 0
        for name, shape, size, _ in self._layout:  # size: the parameter's columns (the reduced entries, if any)
            t = batched[name]
            dest = theta[:, col:col + size]
            col += size
            if name in self._gather:  # the entries CVXPY's reduced parameter keeps (e.g. the upper triangle)
                dest[...] = _fortran_flat(np.broadcast_to(t, (batch, *t.shape[1:])), batch)[:, self._gather[name]]
            elif t.ndim <= 2:  # a batch of scalars or vectors: its columns as they are (a batch of one broadcasts)
                dest[...] = t.reshape(t.shape[0], size)
            else:
                np.reshape(dest, (batch, *reversed(shape)), copy=False)[...] = t.transpose(0, *range(t.ndim - 1, 0, -1))
        return theta

    def canonicalize(self, params: Mapping[str | cp.Parameter, ParamValue], *,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ConeData | QPData:
        """Map a parameter batch to canonical data (differentiable with respect to the parameter tensors).

        See :meth:`parameter_vector` for the accepted input. Unbatched input gives a batch of one.
        """
        return self.canonicalize_vector(self.parameter_vector(params, dtype=dtype, device=device))

    def canonicalize_vector(self, theta: torch.Tensor) -> ConeData | QPData:
        """Canonical data for flattened parameter vectors ``theta`` of shape (B, num_params)."""
        if theta.ndim != 2 or theta.shape[1] != self.num_params:
            raise ValueError(f"theta must have shape (B, {self.num_params}); got {tuple(theta.shape)}")
        out = None if self._stack is None else self._stack(theta)
        if out is not None:
            self._check_finite(theta, out if self._finite_end is None else out[:, :self._finite_end])
        v = {name: out[:, self._slices[name]] if name in self._slices else amap(theta)
             for name, amap in self._maps.items()}
        offset = v["offset"][:, 0]
        a = SparseBatch(indices=self._a_pattern[0], indptr=self._a_pattern[1], shape=(self.m, self.n),
                        values=v["A"], shared=self._a_map.shared)
        p = None
        if self._p_map is not None:
            p = SparseBatch(indices=self._p_pattern[0], indptr=self._p_pattern[1], shape=(self.n, self.n),
                            values=v["P"], shared=self._p_map.shared)
        if self.form == "cone":
            return ConeData(P=p, A=a, b=v["b"], c=v["c"], cones=self.cones, offset=offset)
        return QPData(P=p, q=v["q"], A=a, l=v["l"], u=v["u"], offset=offset, eq=self.cones.zero)

    def _check_finite(self, theta: torch.Tensor, out: torch.Tensor) -> None:
        """Refuse finite parameter values whose canonical data ``out`` (the stacked parameter-dependent pieces)
        overflow (e.g. ``p = 1e155`` in ``p**2``).

        Names the instance, the canonical piece and the parameter of largest magnitude in that instance.
        """
        if _all_finite(out):
            return
        with torch.no_grad():
            finite = torch.isfinite(out.detach())
            i = int(torch.nonzero(~finite.all(dim=1))[0, 0])
            j = int(torch.nonzero(~finite[i])[0, 0])
            row = theta[i].detach().abs()
            col = int(torch.argmax(row))
        piece = next(nm for nm, sl in self._slices.items() if sl.start <= j < sl.stop)
        name = next(nm for nm, _, size, start in self._layout if start <= col < start + size)
        raise ValueError(f"instance {i}: the canonical data ({piece}) are not finite although the parameter "
                         f"values are: they overflow; the largest value is in parameter {name!r} "
                         f"(|value| = {float(row[col]):.3g})")

    # ------------------------------------------------------------------ inverse maps
    def recover(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
                status: str = cp.OPTIMAL, value: float = float("nan")) -> CvxpySolution:
        """Map one canonical primal-dual pair back to CVXPY variables and constraint duals.

        Args:
            x: canonical primal solution (length n).
            y: canonical dual solution (length m), rows ordered as the cones.
            status: the CVXPY status to attach (see ``amortcvx.backends`` for the mapping from solver statuses).
            value: the optimal value to attach, in CVXPY's sign: ``problem.value`` as ``problem.solve`` would
                set it. The backends report the canonical (minimization) value; for a ``cp.Maximize`` problem
                pass ``pp.objective_sign * canonical_value`` (see :attr:`objective_sign`). It is attached as
                given.
        """
        from cvxpy.reductions.solution import Solution
        from cvxpy.reductions.solvers import utilities
        from cvxpy.reductions.solvers.conic_solvers.conic_solver import ConicSolver

        x = _as_numpy(x, self.n, "x")
        y = _as_numpy(y, self.m, "y")
        solver_inv = self._inverse[-1]
        zero = self.cones.zero
        eq_key, neq_key = ConicSolver.EQ_CONSTR, ConicSolver.NEQ_CONSTR  # QpSolver uses the same keys
        duals = utilities.get_dual_values(y[:zero], utilities.extract_dual_value, solver_inv[eq_key])
        duals |= utilities.get_dual_values(y[zero:], utilities.extract_dual_value, solver_inv[neq_key])
        sol = Solution(status, value, {self._prog.x.id: x}, duals, {})
        for reduction, inv in reversed(list(zip(self._chain.reductions[:-1], self._inverse[:-1]))):
            sol = reduction.invert(sol, inv)
        variables = {}
        for var in self.problem.variables():
            val = sol.primal_vars.get(var.id)
            variables[var.name()] = None if val is None else np.asarray(val).reshape(var.shape)
        dual_list = [sol.dual_vars.get(con.id) for con in self.problem.constraints]
        return CvxpySolution(status=sol.status, value=float(value), variables=variables, duals=dual_list)

    def canonical_primal(self, values: Mapping[str | cp.Variable, np.ndarray]) -> np.ndarray:
        """Canonical ``x`` from a guess of (some of) the CVXPY variables.

        Variables that survive compilation unchanged are copied to their canonical columns (column-major);
        auxiliary variables introduced by CVXPY's reductions, and variables not given, are set to zero.
        Combine with the conversions of ``amortcvx.iterations`` to build a full warm start.
        """
        x = np.zeros(self.n)
        by_name = {v.name(): v for v in self.problem.variables()}
        for key, val in values.items():
            name = key.name() if isinstance(key, cp.Variable) else key
            if name not in by_name:
                raise ValueError(f"unknown variable {name!r}; the problem's variables are {sorted(by_name)}")
            var = by_name[name]
            arr = np.asarray(val, dtype=np.float64)
            if arr.shape != tuple(var.shape):
                raise ValueError(f"variable {name!r} has shape {var.shape}; got {arr.shape}")
            col = self._prog.var_id_to_col.get(var.id)
            if col is None:
                continue  # replaced during compilation (e.g. symmetric variables): left at zero
            x[col:col + var.size] = arr.flatten(order="F")
        return x


def _check_continuous(problem: cp.Problem) -> None:
    """Refuse integer / boolean variables (a mixed-integer problem is not convex)."""
    bad = [f"{v.name()} ({'boolean' if v.attributes.get('boolean') else 'integer'}=True)"
           for v in problem.variables() if v.attributes.get("integer") or v.attributes.get("boolean")]
    if bad:
        raise ValueError(
            "amortcvx needs continuous convex problems, but the problem has integer / boolean variable(s) "
            f"{bad}; declare them without integer=/boolean= (a continuous relaxation) to use amortcvx")


def _check_dcp(problem: cp.Problem) -> None:
    """Refuse a problem that does not follow the DCP rules, showing the offending objective / constraints."""
    if problem.is_dcp():
        return
    parts = []
    if not problem.objective.is_dcp():
        parts.append(f"the objective {problem.objective} is not DCP")
    bad = [str(c) for c in problem.constraints if not c.is_dcp()]
    if bad:
        parts.append(f"constraint(s) not DCP: {bad}")
    try:
        from cvxpy.utilities.debug_tools import build_non_disciplined_error_msg

        detail = build_non_disciplined_error_msg(problem, "DCP").strip()
    except Exception:  # noqa: BLE001 - the detail is optional (a private CVXPY helper)
        detail = ""
    raise ValueError(
        "the problem is not convex: it does not follow the DCP rules (problem.is_dcp() is False), so amortcvx "
        "cannot compile it; " + "; ".join(parts) + (f". CVXPY says: {detail}" if detail else "")
        + " (see https://www.cvxpy.org/tutorial/dcp/)")


def real_array(val: Any, name: str) -> np.ndarray:
    """``val`` as a float64 array; complex or non-numeric values are a ValueError naming the parameter."""
    try:
        arr = np.asarray(val)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(f"parameter {name!r}: cannot read its value as an array ({exc})") from None
    if np.iscomplexobj(arr):
        raise ValueError(f"parameter {name!r} has complex values (dtype {arr.dtype}); amortcvx supports real "
                         "parameters only")
    try:
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parameter {name!r} must hold real numbers; got dtype {arr.dtype} ({exc})") from None


def _bounds(p: cp.Parameter) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Numeric ``bounds=`` of a parameter (lower, upper), each None when absent or not a constant."""
    bounds = p.attributes.get("bounds")
    if bounds is None:
        return None, None
    out = []
    for b in bounds:
        if b is None or isinstance(b, cp.Expression):
            out.append(None)
            continue
        try:
            arr = np.array(np.broadcast_to(np.asarray(b, dtype=np.float64), p.shape))
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(arr if np.isfinite(arr).any() else None)
    return out[0], out[1]


def _check_attributes(p: cp.Parameter, t: torch.Tensor) -> None:
    """Refuse instances of a batch ``t`` (B, *shape) that break ``p``'s sign / integrality / bounds attributes.

    One vectorized test per attribute over the whole batch; a violation is a ValueError naming the parameter,
    the attribute and the batch positions at fault.
    """
    checks = _attribute_checks(p, t.dtype, t.device)
    if not checks or t.shape[0] == 0:  # an empty batch is refused by the caller with its own message
        return
    with torch.no_grad():
        v = t.detach()
        masks = torch.stack([fn(v).reshape(v.shape[0], -1).any(dim=1) for _, fn in checks])  # (checks, B)
        if not bool(masks.any()):
            return
        masks = masks.cpu()
    for (what, _), mask in zip(checks, masks):
        bad = torch.nonzero(mask).flatten().tolist()
        if bad:
            shown = bad[:10] + (["..."] if len(bad) > 10 else [])
            raise ValueError(f"parameter {p.name()!r} is declared {what}, but its value breaks this in "
                             f"{len(bad)} instance(s), at batch position(s) {shown}")


def _attribute_checks(p: cp.Parameter, dtype: torch.dtype, device: torch.device) -> list:
    """``(description, violation mask of a batch)`` of every attribute of ``p`` that a value can break."""
    attrs = p.attributes
    checks = []  # (description, mask of violating entries)
    if attrs.get("nonneg"):
        checks.append(("nonneg=True (values >= 0)", lambda v: v < 0))
    if attrs.get("pos"):
        checks.append(("pos=True (values > 0)", lambda v: v <= 0))
    if attrs.get("nonpos"):
        checks.append(("nonpos=True (values <= 0)", lambda v: v > 0))
    if attrs.get("neg"):
        checks.append(("neg=True (values < 0)", lambda v: v >= 0))
    if attrs.get("boolean"):
        checks.append(("boolean=True (values 0 or 1)", lambda v: (v != 0) & (v != 1)))
    if attrs.get("integer"):
        checks.append(("integer=True (integral values)", lambda v: v != torch.round(v)))
    if attrs.get("symmetric") or attrs.get("PSD") or attrs.get("NSD"):
        checks.append(("symmetric (|X - X'| <= 1e-10)", lambda v: (v - v.mT).abs() > SYMMETRY_TOL))
    if attrs.get("PSD"):
        checks.append(("PSD=True (eigenvalues >= -1e-8)",
                       lambda v: torch.linalg.eigvalsh((v + v.mT) / 2)[..., :1] < -EIGEN_TOL))
    if attrs.get("NSD"):
        checks.append(("NSD=True (eigenvalues <= 1e-8)",
                       lambda v: torch.linalg.eigvalsh((v + v.mT) / 2)[..., -1:] > EIGEN_TOL))
    if attrs.get("diag"):
        checks.append(("diag=True (zero off the diagonal)",
                       lambda v: (v * (1 - torch.eye(v.shape[-1], dtype=v.dtype, device=v.device))).abs()
                       > SYMMETRY_TOL))
    if p.sparse_idx is not None:
        outside = torch.ones(p.shape, dtype=torch.bool)
        outside[tuple(torch.as_tensor(np.asarray(i)) for i in p.sparse_idx)] = False
        checks.append(("sparsity= (zero outside the pattern)",
                       lambda v: (v.abs() > SYMMETRY_TOL) & outside.to(v.device)))
    lower, upper = _bounds(p)
    if lower is not None:
        lo = torch.as_tensor(lower, dtype=dtype, device=device)
        checks.append(("bounds= (values >= the lower bound)", lambda v: v < lo))
    if upper is not None:
        hi = torch.as_tensor(upper, dtype=dtype, device=device)
        checks.append(("bounds= (values <= the upper bound)", lambda v: v > hi))
    return checks


SYMMETRY_TOL = 1e-10
"""Largest entry allowed where an attribute needs zero (asymmetry, off-diagonal, outside a sparsity pattern):
CVXPY's ``GENERAL_PROJECTION_TOL``."""

EIGEN_TOL = 1e-8
"""Largest eigenvalue of the wrong sign a PSD / NSD parameter value may have (CVXPY's ``PSD_NSD_PROJECTION_TOL``)."""


def _reduced_parameters(chain) -> dict[int, tuple[cp.Parameter, np.ndarray]]:
    """Reduced parameter id -> (the user's parameter, column-major indices of its entries that the reduced
    parameter holds), for the parameters CVXPY's ``CvxAttr2Constr`` replaced (it keeps the upper triangle of a
    symmetric / PSD / NSD value, the diagonal of a diagonal one, the pattern of a sparse one)."""
    out = {}
    for reduction in chain.reductions:
        for orig, new in getattr(reduction, "_parameters", {}).items():
            shape = orig.shape
            if orig.attributes.get("symmetric") or orig.attributes.get("PSD") or orig.attributes.get("NSD"):
                rows, cols = np.triu_indices(shape[0])
            elif orig.attributes.get("diag"):
                rows = cols = np.arange(shape[0])
            elif orig.sparse_idx is not None:
                index = np.ravel_multi_index(tuple(np.asarray(i) for i in orig.sparse_idx), shape, order="F")
                out[new.id] = (orig, index.astype(np.int64))
                continue
            else:
                raise ValueError(f"parameter {orig.name()!r}: CVXPY reduced it for an attribute amortcvx does not "
                                 f"know ({ {k: v for k, v in orig.attributes.items() if v} })")
            out[new.id] = (orig, (rows + cols * shape[0]).astype(np.int64))
    return out


def _placeholder(p: cp.Parameter) -> np.ndarray:
    if p.attributes.get("symmetric") or p.attributes.get("PSD") or p.attributes.get("diag"):
        return np.eye(p.shape[0])
    if p.attributes.get("NSD"):
        return -np.eye(p.shape[0])
    if p.sparse_idx is not None:
        val = np.zeros(p.shape)
        val[tuple(np.asarray(i) for i in p.sparse_idx)] = 1.0
        return val
    val = np.ones(p.shape)
    lower, upper = _bounds(p)
    if lower is not None or upper is not None:  # a value inside the bounds (CVXPY checks them)
        lo = np.full(p.shape, -np.inf) if lower is None else lower
        hi = np.full(p.shape, np.inf) if upper is None else upper
        return np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2,
                        np.where(np.isfinite(lo), lo + 1, np.where(np.isfinite(hi), hi - 1, val)))
    if p.is_nonneg() or p.is_pos():
        return val
    if p.is_nonpos() or p.is_neg():
        return -val
    return val


def _csc_pattern(rows: np.ndarray, cols: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(indices, indptr) of a CSC pattern whose entries are listed in column-major order."""
    order = np.lexsort((rows, cols))
    if not np.array_equal(order, np.arange(rows.size)):
        raise AssertionError("entries must be in column-major order")
    indptr = np.zeros(shape[1] + 1, dtype=np.int64)
    np.add.at(indptr, cols + 1, 1)
    return rows.astype(np.int64), np.cumsum(indptr)


def _as_numpy(v, size: int, what: str) -> np.ndarray:
    arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    arr = arr.astype(np.float64).ravel()
    if arr.size != size:
        raise ValueError(f"{what} must have length {size}; got {arr.size}")
    return arr
