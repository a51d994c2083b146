"""``CvxpyLayer``: a parametric convex problem as a warm-started, differentiable torch module.

Forward, for a batch of parameters ``theta``::

    theta --canonicalize--> data --warm start (cold | previous call | learned predictor)-->
        [torch iterations to tolerance, batched on the device --> Newton refinement --> certified?]
        --> the rest: C solver (SCS / OSQP) on a persistent object, warm-started --> Newton refinement
        --> canonical (x, y, s) --> CVXPY variables (batched affine map, differentiable)

Backward: implicit differentiation of the normal-map optimality conditions at the refined point (see
:mod:`amortcvx.iterations.kkt`), or, optionally, through ``k`` unrolled torch iterations started at the solution.
Every returned answer passed the solver's own termination test at the requested tolerance: either the C solver
stopped on it, or its float64 re-implementation (``certify``) accepted the point. Newton refinement only
replaces a point by one that also passes that test.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import cvxpy as cp
import numpy as np
import torch
from torch import nn

from amortcvx.backends import PersistentSolver, Status
from amortcvx.backends import osqp as osqp_backend
from amortcvx.backends import scs as scs_backend
from amortcvx.backends.persistent import ThreadedSolver, resolve_threads, stateless_rho, stateless_scale
from amortcvx.backends.race import Race
from amortcvx.canon.data import ConeData
from amortcvx.canon.parametric import ParametricProblem, expected_shapes
from amortcvx.canon.recover import AffineOutput, dual_maps, variable_maps
from amortcvx.iterations.kkt import (
    BATCHES,
    Data,
    Factor,
    ImplicitSolution,
    Point,
    blank_factor,
    converged,
    dual_of,
    newton_refine,
    point_from_solution,
    problem_linear_algebra,
    put_factor_,
    slack_of,
    sparse,
    take,
    take_factor,
    warm_start_fields,
)
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import run_to_tolerance, unroll
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors.fixed_point import output_space, predict
from amortcvx.solvers import get_solver

METHODS = ("auto", "c", "torch")
WARM_STARTS = ("cold", "previous", "learned")
GRADIENTS = ("implicit", "unrolled")
FAILURES = ("nan", "raise")
LINEAR_ALGEBRA = BATCHES
"""How refinement and backward solve with the optimality conditions' Jacobian
(:data:`amortcvx.iterations.kkt.BATCHES`)."""
PRESOLVE_SETTINGS: dict[str, Mapping[str, Any]] = {"scs": scs_backend.STATELESS_SETTINGS,
                                                   "osqp": osqp_backend.STATELESS_SETTINGS}
"""C settings of the loose solve (``presolve_eps``) by solver, under the caller's: SCS without adaptive scale or
Anderson memory keeps one object for every instance instead of a new setup per solve (the answers are refined and
certified, so only speed changes; SOCP batch 1024: 0.53 against 0.84 s per forward, SDP batch 64: 0.20 against
0.29 s). Unless the caller sets ``scale``, that object's fixed scale is the one of fewest iterations on the first
batch it solves (:func:`~amortcvx.backends.persistent.stateless_scale`, up to 64 instances; the benchmark's SDP at
``1e-3``: 69 -> 26 mean iterations). OSQP without rho adaptation, likewise at the fixed ``rho`` of fewest
iterations (:func:`~amortcvx.backends.persistent.stateless_rho`, :data:`STATELESS_VALUES`; the benchmark's QP,
batch 64: 97 -> 44 mean exact iterations at ``3e-4``, 9.0 -> 6.2 ms per loose solve of the batch).

A solve at ``eps`` without refinement (``refine_steps=0``) uses them too where ``A`` and ``P`` do not depend on the
parameters and the caller sets none of them; an instance that does not end optimal that way is solved again, cold,
with the caller's settings (:meth:`CvxpyLayer._direct_solve`). The benchmark's SOCP and SDP at batch 64, ``eps =
1e-6``, forward: 6.8 -> 3.3 ms and 41 -> 10.9 ms (against 5.9 and 18.1 ms with the default refinement; docs/layers.md,
"Forward without refinement"), the same answers to the tolerance."""
STATELESS_VALUES: dict[str, tuple[str, Any]] = {"scs": ("scale", stateless_scale), "osqp": ("rho", stateless_rho)}
"""The setting a stateless object keeps fixed, by solver, and the walk that picks it on the first batch."""
PRESOLVE_EPS = {"c": 3e-4, "torch": 1e-3}
"""The tolerance of the first stage by method, unless ``presolve_eps`` is given: the loose C solve, and the
torch iterations (both then refined by Newton steps and certified at ``eps``). Measured for the C solve
(forward+backward, CPU, 1 thread, interleaved medians of 10, with :data:`REFINE_PASSES` 2 / 4): SOCP batch 64
10.0 / 10.7 ms at ``3e-4`` against 10.3 / 11.4 ms at ``1e-3``, batch 1024 97 / 105 against 116 / 126 ms; QP and
SDP within 2% (``1e-4``: as ``3e-4``). The torch stage keeps ``1e-3``: on a GPU its steps are launch-bound
(about 0.5 ms each), and a tighter tolerance there is unmeasured."""
REFINE_PASSES = 2
"""The default ``refine_passes``: iterative-refinement passes of each Newton step's linear solve
(:func:`~amortcvx.iterations.kkt.newton_refine`'s ``passes``). Two cut the forward at batch 64 (CPU, 1 thread): SOCP
7.2 -> 6.7 ms, QP 8.8 -> 8.0 ms, SDP 21.6 -> 21.2 ms; the refined points stay at about ``1e-12`` of the exact
solution (the QP's were at ``1e-15`` with four: pass 4 where a solution at machine precision matters, e.g. as a
finite-difference reference). One pass cut the SOCP further (6.2 ms) but left the QP's points at ``1e-10`` and made
it no faster."""
CPU_TORCH_STEPS = 15
"""``method="auto"`` on the CPU: the number of torch iterations of the torch candidate (then Newton refinement,
then the C solver for the uncertified rest), where a torch step is a few batched products with matrices
shared by the batch (QP form, ``P`` and ``A`` parameter-free: one factorization for every instance). QP n = 20,
m = 40, batch 1024, forward+backward: 0.39 s against 0.86 s for the loose C solve; 10 to 25 steps cost about
the same, 5 are too few (66% certified)."""
TORCH_STOPPED = 0.95
"""``method="torch"``: the torch iterations end once this fraction of the batch has reached the loose tolerance
(:func:`~amortcvx.iterations.loop.run_to_tolerance`'s ``stopped``); the rest go on from their last iterate
(Newton refinement, then the C solver). The whole batch steps until its slowest instance stops, and the tail is
long: on the benchmark's QP at batch 1024 the median instance stops after 53 steps, the last after 335. CPU, 1
thread, forward at batch 1024 (every fraction certified as many instances, within 3): QP 273 -> 152 ms, SOCP 150
-> 114 ms, SDP 1514 -> 1202 ms (0.99: 196, 128, 1292 ms; 0.9: 144, 116, 1114 ms)."""
AUTO_PROBE = 16
"""``method="auto"`` on the CPU where both the torch steps and the loose C solve apply: each is timed on its
first call (per batch size, by powers of two); then each call takes the one whose last forward was faster per
instance, and every ``AUTO_PROBE``-th call the other (its time changes as the parameters move; each call's time
is recorded, the first with its one-time costs, so the interval does not grow with the measured ratio:
:class:`~amortcvx.backends.race.Race` with ``share=None``; with a share, the benchmark's QP at batch 64 kept the
slower way for the whole run, forward+backward 27.3 against 19.1 ms). Measured: the
torch steps win on the QP benchmark (batch 64 and 1024), the C solve on a 20-asset portfolio at batch 64 (a
training loop: 1.22 s against 1.04 s)."""
LAYER_ARGS = ("eps", "method", "warm_start", "max_torch_steps", "refine_steps")
"""Keys of ``solver_args`` the layer reads itself; every other key is a setting of the C solver."""
PREVIOUS_RETRY = 8
"""``warm_start="previous"``: after a call in which the previous solution, refined, answered fewer than half of
the instances, the next ``PREVIOUS_RETRY - 1`` calls skip that stage (the solver still starts from it): where
consecutive batches are unrelated (e.g. a training loop over shuffled samples) the attempt only costs."""


class SolverFailure(RuntimeError):
    """Raised (``on_failure="raise"``) when an instance has no solution (infeasible, unbounded, solver error)."""


class Solution(NamedTuple):
    """A solved batch in the normal-map variables.

    Attributes:
        x: (B, n) float64 canonical primal (zeros where failed).
        w: (B, m) float64 combined dual-slack variable (see :mod:`amortcvx.iterations.kkt`).
        failed: (B,) bool: no solution (NaN outputs).
        status: per instance, the final :class:`~amortcvx.backends.Status`.
        certified: (B,) bool: answered with a refined point that passed the solver's test at ``eps`` (no C
            solve at ``eps`` was needed: the point came from the torch iterations or from a looser C solve).
        factor: the refinement's last factorization per instance (dense linear algebra; reused by the backward
            where the Jacobian at the solution is the one it was built from), or None; ``last_solution`` does
            not keep it (the autograd graph does, until the backward).
    """

    x: torch.Tensor
    w: torch.Tensor
    failed: torch.Tensor
    status: list[Status]
    certified: torch.Tensor
    factor: Factor | None = None


def _certify(form: str, data: Data, d, pt: Point, eps: float) -> np.ndarray:
    """The solver's own optimality test at ``pt`` (float64, host), per instance."""
    y = dual_of(d, pt.w)
    other = slack_of(d, pt.w, y)
    arr = [np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy()) for t in (pt.x, y, other)]
    if form == "cone":
        return scs_backend.certify(data, arr[0], arr[1], arr[2], eps_abs=eps, eps_rel=eps)
    return osqp_backend.certify(data, arr[0], arr[2], arr[1], eps_abs=eps, eps_rel=eps)


class CvxpyLayer(nn.Module):
    """A DPP CVXPY problem as a torch layer (the calling convention of ``cvxpylayers.torch.CvxpyLayer``).

    ``layer(*values)`` takes one tensor per parameter, in the order of ``parameters``, each of the
    parameter's shape (broadcast to the batch) or with a leading batch dimension, and returns a tuple with one
    tensor per variable in ``variables`` (batch dimension first; none if every input was unbatched), followed,
    with ``return_duals=True``, by one tensor per constraint of ``problem.constraints`` (its dual value).

    Args:
        problem: a DPP ``cp.Problem``; every parameter must have a unique name.
        parameters: the problem's parameters, in the order the values will be passed (all of them).
        variables: the variables to return (each a variable of the problem).
        solver: ``"osqp"`` (LPs / QPs) or ``"scs"`` (any cone program); default: OSQP when the problem is a
            QP, else SCS.
        method: ``"c"`` (persistent C solver objects, on the host), ``"torch"`` (batched torch iterations on
            the parameters' device until certified; the rest by the C solver), or ``"auto"`` (torch on CUDA;
            on the CPU, C, or for QPs whose ``P`` and ``A`` do not depend on the parameters whichever of C and
            :data:`CPU_TORCH_STEPS` torch iterations was faster, timed as it runs: :data:`AUTO_PROBE`).
        predictor: a :class:`~amortcvx.predictors.WarmStartPredictor` trained for this problem and solver.
        warm_start: ``"cold"``, ``"previous"`` (the last call's solution, when the batch size matches; for
            training loops whose parameters move slowly) or ``"learned"`` (needs ``predictor``).
        eps: absolute and relative tolerance of the solver's termination test (``eps_abs = eps_rel``).
        gradients: ``"implicit"`` (default; implicit differentiation at the refined solution) or
            ``"unrolled"`` (through ``unroll_steps`` torch iterations started at the solution).
        unroll_steps: steps for ``gradients="unrolled"``.
        return_duals: also return the constraints' dual values (differentiable).
        on_failure: ``"nan"`` (NaN outputs and gradients for an instance without a solution, with a warning
            naming it) or ``"raise"`` (:class:`SolverFailure`).
        refine_steps: Newton steps on the optimality conditions after the solve (0: none); they make the
            gradients accurate beyond ``eps`` and, from a loose first stage (``presolve_eps``), usually the
            forward faster. Without them the C solver answers at ``eps`` (for SCS on one object without adaptive
            scale or Anderson memory where it can: :data:`PRESOLVE_SETTINGS`), often the fastest forward for cone
            programs when no gradient is needed (per call: ``solver_args={"refine_steps": 0}``).
        refine_passes: iterative-refinement passes of each Newton step's linear solve (:data:`REFINE_PASSES`).
        presolve_eps: with refinement, the first stage's tolerance (the C solver's with ``method="c"``, the torch
            iterations' with ``method="torch"``; None: :data:`PRESOLVE_EPS` by method); the instances whose
            Newton-refined point then passes the solver's test at ``eps`` are answered with it, the others are
            solved by the C solver at ``eps`` (warm-started from the loose point). Set it to ``eps`` (or below)
            to always solve at ``eps``.
        max_torch_steps: limit of the torch iterations (``method="torch"``).
        linear_algebra: ``"dense"`` (batched factorizations), ``"krylov"`` (matrix-free GMRES on the sparse
            canonical data) or ``"auto"`` (:func:`~amortcvx.iterations.kkt.linear_algebra`: Krylov when ``n + m``
            exceeds ``KRYLOV_SIZE``, unless shared equality rows keep the reduced dense path small).
        solver_args: default per-call arguments (see :meth:`forward`).
        threads: threads for the C solves (None: every core this process may use, at most 8; a batch of at least
            16 is cut into parts solved concurrently, :class:`~amortcvx.backends.persistent.ThreadedSolver`).

    Raises:
        TypeError / ValueError: naming the problem, parameter or variable at fault.
    """

    def __init__(self, problem: cp.Problem, parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable],
                 *, solver: str | None = None, method: str = "auto", predictor: nn.Module | None = None,
                 warm_start: str = "cold", eps: float = 1e-6, gradients: str = "implicit",
                 unroll_steps: int = 50, return_duals: bool = False, on_failure: str = "nan",
                 refine_steps: int = 4, refine_passes: int = REFINE_PASSES, presolve_eps: float | None = None,
                 max_torch_steps: int = 5000,
                 linear_algebra: str = "auto", solver_args: Mapping[str, Any] | None = None,
                 threads: int | None = None):
        super().__init__()
        if not isinstance(problem, cp.Problem):
            raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}")
        _check_choice("method", method, METHODS)
        _check_choice("gradients", gradients, GRADIENTS)
        _check_choice("on_failure", on_failure, FAILURES)
        _check_choice("warm_start", warm_start, WARM_STARTS)
        _check_choice("linear_algebra", linear_algebra, ("auto", *LINEAR_ALGEBRA))
        if not eps > 0:
            raise ValueError(f"eps must be positive; got {eps!r}")
        self.parameters_order = _check_parameters(problem, parameters)
        self.variables = _check_variables(problem, variables)
        if solver is None:  # OSQP where CVXPY can hand the problem to a QP solver, else SCS
            solver = "osqp" if get_solver("osqp").accepts(problem) else "scs"
        description = get_solver(solver)
        description.check_problem(problem)
        self.pp = pp = ParametricProblem(problem, description.form)
        self.solver = solver
        self.form = description.form
        if predictor is not None:
            meta = getattr(predictor, "meta", None)
            if meta is None or meta.fingerprint != pp.fingerprint or meta.algorithm != solver:
                raise ValueError(
                    f"the predictor was trained for problem {getattr(meta, 'fingerprint', None)} with "
                    f"{getattr(meta, 'algorithm', None)!r}; this layer is problem {pp.fingerprint} with {solver!r}")
        if warm_start == "learned" and predictor is None:
            raise ValueError("warm_start='learned' needs a predictor")
        self.predictor = predictor
        self.method, self.warm_start, self.eps = method, warm_start, float(eps)
        self.gradients, self.unroll_steps, self.return_duals = gradients, int(unroll_steps), bool(return_duals)
        self.on_failure, self.max_torch_steps = on_failure, int(max_torch_steps)
        self.refine_steps = _refine_steps(refine_steps)
        if isinstance(refine_passes, bool) or not isinstance(refine_passes, int) or refine_passes < 1:
            raise ValueError(f"refine_passes must be a positive int; got {refine_passes!r}")
        self.refine_passes = refine_passes
        self.solver_args = dict(solver_args or {})
        self.presolve_eps = None if presolve_eps is None else float(presolve_eps)
        self.threads = resolve_threads(threads)
        if linear_algebra == "auto":
            linear_algebra = problem_linear_algebra(pp)
        self.linear_algebra = linear_algebra
        self._batch = LINEAR_ALGEBRA[linear_algebra]
        self._var_maps: list[AffineOutput] = variable_maps(pp, self.variables)
        self._dual_maps: list[AffineOutput] | None = dual_maps(pp) if return_duals else None
        self._solvers: dict[tuple, ThreadedSolver] = {}
        self._cache = FactorCache()
        self._previous: dict[str, torch.Tensor] | None = None  # the last solution as warm-start fields
        self._last: tuple[Data, Solution] | None = None  # ... before they are computed (on the first call that asks)
        self._previous_skip = 0
        self._races: dict[int, Race] = {}
        self.last_solution: Solution | None = None

    # ------------------------------------------------------------------ forward
    def forward(self, *values: Any, solver_args: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """Solve the batch; see the class docstring.

        Args:
            values: one value per parameter, in the layer's order.
            solver_args: per-call settings laid over the layer's: ``eps``, ``method``, ``warm_start``,
                ``max_torch_steps``, ``refine_steps``, and any setting of the C solver (e.g. ``max_iters`` /
                ``max_iter``).
        """
        args = {**self.solver_args, **dict(solver_args or {})}
        eps = float(args.pop("eps", self.eps))
        method = args.pop("method", self.method)
        warm_mode = args.pop("warm_start", self.warm_start)
        max_steps = int(args.pop("max_torch_steps", self.max_torch_steps))
        _check_choice("method", method, METHODS)
        _check_choice("warm_start", warm_mode, WARM_STARTS)
        steps = _refine_steps(args.pop("refine_steps", self.refine_steps))
        theta, batched, out_dtype = self._theta(values)
        data = self.pp.canonicalize_vector(theta.detach())
        race = None
        if method == "auto":
            method, max_steps, race = self._auto_method(data, theta.device, max_steps, steps)
        start = time.perf_counter()
        sol = self._solve(data, theta.detach(), eps, method, warm_mode, max_steps, args, steps)
        if race is not None:
            race.record(method, (time.perf_counter() - start) / data.batch_size)
        self.last_solution = sol._replace(factor=None)  # the factorizations live only as long as the graph
        self._report(sol)
        if self.gradients == "implicit":
            x, y, _ = ImplicitSolution.apply(theta, sol.x, sol.w, self.pp.canonicalize_vector, sol.failed, self._batch,
                                             sol.factor, data)
        else:
            x, y = self._unrolled(theta, sol)
        self._last = (data, self.last_solution)
        outs = [m.apply(x) for m in self._var_maps]
        if self._dual_maps is not None:
            outs += [m.apply(y) for m in self._dual_maps]
        outs = [o.to(out_dtype) for o in outs]
        if not batched:
            outs = [o.squeeze(0) for o in outs]
        return tuple(outs)

    def _auto_method(self, data: Data, device: torch.device, max_steps: int, steps: int,
                     ) -> tuple[str, int, Race | None]:
        """``method="auto"``: torch on CUDA; on the CPU, C, or where a torch step is a few products with matrices
        shared by the batch (QP form, ``P`` and ``A`` parameter-free) and refinement (``steps``) follows, the faster
        of C and :data:`CPU_TORCH_STEPS` torch steps (a :class:`~amortcvx.backends.race.Race` per batch-size bucket,
        returned to be told the time)."""
        if device.type == "cuda":
            return "torch", max_steps, None
        if not (self.form == "qp" and data.matrices_shared and steps):
            return "c", max_steps, None
        race = self._races.setdefault(int(data.batch_size).bit_length(),
                                     Race(("torch", "c"), AUTO_PROBE, share=None))
        method = race.pick()
        return method, (min(max_steps, CPU_TORCH_STEPS) if method == "torch" else max_steps), race

    def loose_eps(self, method: str) -> float:
        """The first stage's tolerance for ``method`` (``"c"`` or ``"torch"``): ``presolve_eps``, or
        :data:`PRESOLVE_EPS` by method when it is None."""
        return PRESOLVE_EPS[method] if self.presolve_eps is None else self.presolve_eps

    def _theta(self, values: Sequence[Any]) -> tuple[torch.Tensor, bool, torch.dtype]:
        order = self.parameters_order
        if len(values) != len(order):
            raise ValueError(f"the layer takes {len(order)} parameter value(s), in the order "
                             f"{[p.name() for p in order]}; got {len(values)}")
        ref = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        out_dtype = ref.dtype if ref is not None else torch.float64
        device = ref.device if ref is not None else torch.device("cpu")
        batched = False
        given = {}
        for i, (p, v) in enumerate(zip(order, values)):
            ndim = np.ndim(v) if not isinstance(v, torch.Tensor) else v.ndim
            if ndim == len(p.shape) + 1:
                batched = True
            elif ndim != len(p.shape):
                got = tuple(np.shape(v)) if not isinstance(v, torch.Tensor) else tuple(v.shape)
                raise ValueError(f"parameter {p.name()!r} (value {i + 1} of {len(order)}) expects shape "
                                 f"{expected_shapes(p.shape)}; got {got}")
            given[p.name()] = v
        theta = self.pp.parameter_vector(given, dtype=torch.float64, device=device)
        return theta, batched, out_dtype

    # ------------------------------------------------------------------ solving
    def _solve(self, data: Data, theta: torch.Tensor, eps: float, method: str, warm_mode: str, max_steps: int,
               c_args: Mapping[str, Any], steps: int) -> Solution:
        """Candidates in stages, each on the instances not answered yet, then the C solver at ``eps`` for the rest.

        Stages (with refinement): the previous call's solution itself (when the parameters moved little it lies
        where Newton's method converges: no solver run at all; see :data:`PREVIOUS_RETRY` for when it is skipped;
        a learned point is not tried this way: on the benchmark problems fewer than half of them converged and
        the attempt cost more than it saved), then the torch iterations (``method="torch"``) or a loose C solve
        (``presolve_eps``). A stage's candidate is Newton-refined and kept where it passes the solver's test at
        ``eps``; the others carry the stage's point as the warm start of the next stage. ``steps``: the Newton steps
        of each refinement (0: no stages, the C solver at ``eps`` alone, :meth:`_direct_solve`).
        """
        B = data.batch_size
        device = theta.device
        d = self._batch(data)
        warm = self._warm(data, theta, warm_mode)
        x = torch.zeros(B, data.n, dtype=torch.float64, device=device)
        w = torch.zeros(B, data.m, dtype=torch.float64, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        status = [Status.SOLVER_ERROR] * B
        factor: Factor | None = None
        stages = []
        if steps and warm is not None and warm_mode == "previous":
            if self._previous_skip:
                self._previous_skip -= 1
            else:
                stages.append((lambda sub, start: start, "previous"))
        if method == "torch":
            stages.append((lambda sub, start: self._torch_candidate(sub, start, eps, max_steps, steps), "torch"))
        elif steps and self.loose_eps("c") > eps:
            stages.append((lambda sub, start: self._loose_candidate(sub, start, c_args), "loose"))
        for stage, kind in stages:
            todo = torch.nonzero(~done).flatten()
            if todo.numel() == 0:
                break
            d_sub = take(d, todo)
            sub = d_sub.data
            start = None if warm is None else {k: v[todo] for k, v in warm.items()}
            cand = stage(sub, start)
            pt = point_from_solution(d_sub, cand["x"], cand["y"], cand.get("s"))
            ok, pt, part = self._refined(sub, d_sub, pt, eps, steps)
            if kind == "previous" and 2 * int(ok.sum()) < ok.numel():
                self._previous_skip = PREVIOUS_RETRY - 1
            x[todo], w[todo] = torch.where(ok[:, None], pt.x, x[todo]), torch.where(ok[:, None], pt.w, w[todo])
            factor = _with_part(factor, todo, part, ok, B)
            done[todo] = ok
            for i in todo[ok].tolist():
                status[i] = Status.OPTIMAL
            warm = ({k: v.new_zeros(B, v.shape[1]) for k, v in cand.items()} if warm is None
                    else {k: v.clone() for k, v in warm.items()})
            for k, v in cand.items():
                warm[k][todo] = v
        certified = done.clone()
        todo = torch.nonzero(~done).flatten()
        if todo.numel():
            d_sub = take(d, todo)
            sub = d_sub.data
            starts = None if warm is None else {k: v[todo] for k, v in warm.items()}
            solve = self._c_solve if steps else self._direct_solve
            xs, ys, ss, st = solve(sub, starts, eps, c_args)
            has = torch.tensor([s.has_solution for s in st], dtype=torch.bool, device=device)
            pt = point_from_solution(d_sub, xs, ys, ss)
            pt = Point(torch.nan_to_num(pt.x), torch.nan_to_num(pt.w))
            final = pt
            if steps:
                ref, _, part = newton_refine(d_sub, pt, steps=steps, passes=self.refine_passes)
                ok = torch.as_tensor(_certify(self.form, sub, d_sub, ref, eps), device=device)
                final = Point(torch.where(ok[:, None], ref.x, pt.x), torch.where(ok[:, None], ref.w, pt.w))
                factor = _with_part(factor, todo, part, ok, B)
                good = has & (ok | torch.tensor([s == Status.OPTIMAL for s in st], device=device))
            else:
                good = torch.tensor([s == Status.OPTIMAL for s in st], dtype=torch.bool, device=device) | (
                    has & torch.as_tensor(_certify(self.form, sub, d_sub, pt, eps), device=device))
            x[todo], w[todo], done[todo] = final.x, final.w, good
            for j, i in enumerate(todo.tolist()):
                status[i] = st[j] if not (bool(good[j]) and st[j] == Status.OPTIMAL_INACCURATE) else Status.OPTIMAL
        failed = ~done
        x = torch.where(failed[:, None], torch.zeros_like(x), x)
        w = torch.where(failed[:, None], torch.zeros_like(w), w)
        return Solution(x, w, failed, status, certified, factor)

    def _refined(self, data: Data, d, pt: Point, eps: float, steps: int) -> tuple[torch.Tensor, Point, Factor | None]:
        """Newton-refine a candidate (``steps``); True where the refined point converged and passes the solver's
        test; the refinement's factorizations."""
        factor = None
        if steps:
            pt, norm, factor = newton_refine(d, pt, steps=steps, passes=self.refine_passes)
        ok = torch.as_tensor(_certify(self.form, data, d, pt, eps), device=pt.x.device)
        if steps:  # keep only converged refinements: the others are solved at eps and refined again
            ok = ok & converged(d, norm)
        return ok, pt, factor

    def _torch_candidate(self, data: Data, warm: Mapping[str, torch.Tensor] | None, eps: float,
                         max_steps: int, steps: int) -> dict[str, torch.Tensor]:
        """The batched torch iterations to ``max(eps, loose_eps("torch"))`` (refinement, ``steps``, does the rest;
        without it to ``eps``)."""
        alg = make_algorithm(self.solver, data, cache=self._cache)
        state = alg.init(**warm) if warm is not None else alg.init()
        loose = max(eps, self.loose_eps("torch")) if steps else eps
        res = run_to_tolerance(alg, state, tol=loose, max_steps=max_steps, stopped=TORCH_STOPPED)
        return output_space(self.solver).warm_start(alg, res.state)

    def _loose_candidate(self, data: Data, warm: Mapping[str, torch.Tensor] | None,
                         c_args: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The C solver at ``loose_eps("c")`` with :data:`PRESOLVE_SETTINGS` (non-finite answers replaced by
        zeros)."""
        args = {**PRESOLVE_SETTINGS.get(self.solver, {}), **c_args}
        xs, ys, ss, _ = self._c_solve(data, warm, self.loose_eps("c"), args, retry=False)
        fields = {"x": xs, "y": ys} if ss is None else {"x": xs, "y": ys, "s": ss}
        finite = torch.stack([torch.isfinite(v).all(dim=1) for v in fields.values()]).all(dim=0)
        return {k: torch.where(finite[:, None], v, torch.zeros_like(v)) for k, v in fields.items()}

    def _c_solve(self, data: Data, warm: Mapping[str, torch.Tensor] | None, eps: float,
                 c_args: Mapping[str, Any], *, retry: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[Status]]:
        """Solve on a persistent C object at ``eps`` (warm where given; with ``retry``, instances whose warm-started
        solve did not end optimal are solved again from a cold start)."""
        settings = {"eps_abs": eps, "eps_rel": eps, **c_args}
        key = tuple(sorted((k, repr(v)) for k, v in settings.items()))
        solver = self._solvers.get(key)
        if solver is None:
            stateless = PRESOLVE_SETTINGS[self.solver].items() <= settings.items()
            key_name, walk = STATELESS_VALUES[self.solver]
            if stateless and key_name not in settings:  # a fixed value is kept for every call: pick it on this batch
                settings[key_name] = walk(data.instance(0), data, settings).value
            ref = data.instance(0)
            solver = self._solvers[key] = ThreadedSolver(lambda: PersistentSolver(self.solver, ref, settings),
                                                         self.threads)
        starts = None if warm is None else {k: v.detach().to("cpu", torch.float64).numpy() for k, v in warm.items()}
        results = solver.solve(data, starts, checked=True)  # canonicalize_vector's data
        if starts is not None and retry:
            again_idx = [i for i, r in enumerate(results) if r.status != Status.OPTIMAL]
            if again_idx:
                again = solver.solve(data.take(np.asarray(again_idx)), checked=True)
                for i, r in zip(again_idx, again):
                    results[i] = r
        device = data.b.device if isinstance(data, ConeData) else data.q.device

        def stack(field: str) -> torch.Tensor:
            return torch.as_tensor(np.stack([getattr(r, field) for r in results]), dtype=torch.float64, device=device)

        s = stack("s") if self.form == "cone" else None
        return stack("x"), stack("y"), s, [r.status for r in results]

    def _direct_solve(self, data: Data, warm: Mapping[str, torch.Tensor] | None, eps: float,
                      c_args: Mapping[str, Any],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[Status]]:
        """The C solver at ``eps`` with no refinement after it: with :data:`PRESOLVE_SETTINGS` where ``A`` and
        ``P`` do not depend on the parameters and ``c_args`` sets none of them (one object for the stream, no new
        setup per solve); the instances that do not end optimal that way are solved again, cold, with ``c_args``
        alone."""
        fast = PRESOLVE_SETTINGS.get(self.solver, {})
        if not fast or not data.matrices_shared or set(fast) & set(c_args):
            return self._c_solve(data, warm, eps, c_args)
        xs, ys, ss, st = self._c_solve(data, warm, eps, {**fast, **c_args})
        again = [i for i, status in enumerate(st) if status != Status.OPTIMAL]
        if again:
            idx = torch.as_tensor(again, device=xs.device)
            xa, ya, sa, sta = self._c_solve(data.take(np.asarray(again)), None, eps, c_args)
            xs[idx], ys[idx] = xa, ya
            if ss is not None:
                ss[idx] = sa
            for i, status in zip(again, sta):
                st[i] = status
        return xs, ys, ss, st

    def _warm(self, data: Data, theta: torch.Tensor, mode: str) -> dict[str, torch.Tensor] | None:
        """Warm-start fields (``x``, ``y``[, ``s``]) for the batch, or None for cold starts."""
        B = data.batch_size
        if mode == "previous":
            prev = self._previous_fields()
            if prev is None or prev["x"].shape[0] not in (1, B) or prev["x"].device != theta.device:
                return None
            return {k: v.expand(B, -1) for k, v in prev.items()}
        if mode == "learned":
            if self.predictor is None:
                raise ValueError("warm_start='learned' needs a predictor")
            with torch.no_grad():  # the predictor's fixed-point variable is scaled by its algorithm settings
                alg = make_algorithm(self.solver, data, settings=self.predictor.meta.algorithm_settings(),
                                     cache=self._cache)
                space = output_space(self.solver)  # the predictor may live on another device
                ws = space.prediction_warm_start(alg, predict(self.predictor, space, alg, theta))
            ok = torch.stack([torch.isfinite(v).all(dim=1) for v in ws.values()]).all(dim=0)
            return {k: torch.where(ok[:, None], v, torch.zeros_like(v)) for k, v in ws.items()}
        return None

    def _previous_fields(self) -> dict[str, torch.Tensor] | None:
        """The last call's solution as warm-start fields, or None before the first call (computed once, when a call
        with ``warm_start="previous"`` asks: the other modes do not pay for it)."""
        if self._last is not None:
            self._previous, self._last = self._warm_dict(*self._last), None
        return self._previous

    def _warm_dict(self, data: Data, sol: Solution) -> dict[str, torch.Tensor]:
        """The solution as warm-start fields for the next call (failed instances start cold)."""
        out = warm_start_fields(sparse(data), Point(sol.x, sol.w))  # sparse: only vectors and cones are read
        return {k: torch.where(sol.failed[:, None], torch.zeros_like(v), v).detach() for k, v in out.items()}

    def _unrolled(self, theta: torch.Tensor, sol: Solution) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs equal to the solution, with the gradients of ``unroll_steps`` torch iterations from it."""
        data = self.pp.canonicalize_vector(theta)
        alg = make_algorithm(self.solver, data)
        prev = self._warm_dict(self.pp.canonicalize_vector(theta.detach()), sol)
        res = unroll(alg, alg.init(**prev), self.unroll_steps)
        out = alg.solution(res.state)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=theta.device)
        x = torch.where(sol.failed[:, None], nan, prev["x"] + (out.x - out.x.detach()))
        y = torch.where(sol.failed[:, None], nan, prev["y"] + (out.y - out.y.detach()))
        return x, y

    def _report(self, sol: Solution) -> None:
        bad = torch.nonzero(sol.failed).flatten().tolist()
        if not bad:
            return
        detail = ", ".join(f"{i} ({sol.status[i]})" for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        msg = f"{len(bad)} instance(s) of the batch have no solution: {detail}"
        if self.on_failure == "raise":
            raise SolverFailure(msg)
        warnings.warn(msg + "; their outputs and gradients are NaN", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ convenience
    @classmethod
    def from_solver(cls, solver: Any, parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable],
                    **options: Any) -> CvxpyLayer:
        """A layer for an :class:`~amortcvx.deploy.AmortizedSolver`'s problem and solver, warm-started by its
        predictor (``warm_start="learned"``; cold without one, and cold with a ``UserWarning`` that gives
        calibration's numbers when calibration switched it off, unless ``options`` choose the start), at its
        tolerance (``eps_abs``), with its C solver settings (``c_settings()``, calibration's included) and its
        ``threads``; ``options`` override any of these."""
        c_settings = dict(solver.c_settings())
        eps = c_settings.pop("eps_abs", None)
        c_settings.pop("eps_rel", None)
        model = solver.model if solver.model is not None and solver.enabled else None
        if solver.model is not None and model is None and not {"predictor", "warm_start"} & options.keys():
            why = ("the solver's predictor is switched off (no calibration recorded)" if solver.calibration is None
                   else f"the solver's calibration switched its predictor off ({solver.calibration.describe()})")
            warnings.warn(f"this layer starts cold: {why}; pass predictor=solver.model, warm_start='learned' to use "
                          "it anyway", UserWarning, stacklevel=2)
        opts: dict[str, Any] = {"solver": solver.algorithm, "predictor": model, "threads": solver.threads,
                                "warm_start": "learned" if model is not None else "cold", "solver_args": c_settings}
        if eps is not None:
            opts["eps"] = float(eps)
        opts.update(options)
        return cls(solver.pp.problem, parameters, variables, **opts)


def _with_part(factor: Factor | None, todo: torch.Tensor, part: Factor | None, keep: torch.Tensor,
               batch: int) -> Factor | None:
    """``factor`` (for the whole batch) with the instances ``todo[keep]`` taken from ``part`` (the refinement of
    the sub-batch ``todo``); in place where ``factor`` exists."""
    if part is None:
        return factor
    if factor is None and todo.numel() == batch:  # a stage on the whole batch: its factor is the base (no copy)
        return part._replace(ok=part.ok & keep)
    sub = torch.nonzero(keep).flatten()
    return put_factor_(factor if factor is not None else blank_factor(part, batch), todo[sub], take_factor(part, sub))


def _refine_steps(value: Any) -> int:
    """``refine_steps`` checked: a nonnegative int."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"refine_steps must be a nonnegative int; got {value!r}")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def _check_parameters(problem: cp.Problem, parameters: Sequence[cp.Parameter]) -> list[cp.Parameter]:
    params = list(parameters)
    for p in params:
        if not isinstance(p, cp.Parameter):
            raise TypeError(f"parameters must be cp.Parameter objects; got {type(p).__name__}")
    ids = [p.id for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a parameter is listed twice: {[p.name() for p in params]}")
    have = {p.id: p for p in problem.parameters()}
    extra = [p.name() for p in params if p.id not in have]
    if extra:
        raise ValueError(f"parameter(s) {extra} are not parameters of the problem")
    missing = [p.name() for pid, p in have.items() if pid not in set(ids)]
    if missing:
        raise ValueError(f"every parameter of the problem must be listed; missing {missing}")
    return params


def _check_variables(problem: cp.Problem, variables: Sequence[cp.Variable]) -> list[cp.Variable]:
    out = list(variables)
    have = {v.id for v in problem.variables()}
    for v in out:
        if not isinstance(v, cp.Variable):
            raise TypeError(f"variables must be cp.Variable objects; got {type(v).__name__}")
        if v.id not in have:
            raise ValueError(f"variable {v.name()!r} is not a variable of the problem")
    return out


__all__ = ["CvxpyLayer", "Solution", "SolverFailure"]
