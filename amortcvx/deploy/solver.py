"""Deployment: predict warm starts, refine them in torch, finish with the real C solver, safely.

:class:`AmortizedSolver` runs, for a batch of parameters::

    theta --predictor--> z0 --k torch steps (batched)--> z_k --> (x, y[, s]) [--> polished, if better]
        --> certified finish: the C solver's own termination test, in float64 -> passed: answered at once
        --> the rest: the C solver, warm-started, on a persistent solver object (user tolerance) --> answer

Where the time goes is kept small: the factorization of the torch iteration does not depend on the
parameters when they enter neither ``A`` nor ``P``, and is then computed once and reused by every call
(:class:`~amortcvx.iterations.linalg.FactorCache`); the C solves run on one persistent solver object per
backend and settings (:class:`~amortcvx.backends.PersistentSolver`), set up on a fixed reference instance
(so a result does not depend on the order of the instances); ``solve`` runs in timed mode unless exact
iteration counts are asked for (``exact_iterations=True`` solves each instance on a fresh object instead).

Certified finish (``finish="certify"``, the default): each refined (or polished) warm start is checked in
float64, on the unscaled data, by the termination test the C solver itself applies at the requested
tolerance (:func:`amortcvx.backends.scs.certify`, :func:`amortcvx.backends.osqp.certify`: primal residual,
dual residual, duality gap, and cone membership, which the point is projected onto (SCS) or which an OSQP
step gives exactly). Instances that pass are answered with that point, status ``optimal`` and
``certified=True``; no C solve runs for them. ``finish="c"`` always runs the C solver.

With ``newton=N`` (any cone) each warm start is then refined by up to ``N`` semismooth Newton steps on the
optimality conditions (:func:`amortcvx.iterations.kkt.newton_refine`, the layer's refinement): where they converge
(an LP / QP with the right active set in one step; cone programs quadratically near the solution, to a hundredth
of the requested tolerance: :data:`NEWTON_FINISH_MARGIN`) the refined point replaces the warm start, and the
certificate answers the instance with no C iteration at all; where they do not, the warm start is left as it was.
Newton's method is local: where the steps from a learned point do not converge, they are tried from the cold start
too (refined by the strategy's ``k`` steps, or by the one step the safeguard's reference takes anyway). A point
the Newton steps solve is kept even where the safeguard (below) would have replaced the learned start. A warm
start, refined or not, changes only the speed: answers still pass the certificate or come from the C solver. Cost:
one batched Cholesky per step and instance, of the size the equality rows leave free (float64, in chunks of
bounded memory; matrix-free GMRES where :func:`amortcvx.iterations.kkt.linear_algebra` says so).
:meth:`AmortizedSolver.fit` lets calibration choose between 0 and :data:`NEWTON_STEPS` steps where the dense path
applies (:func:`newton_choices`).

With ``polish=True`` (LPs and QPs) each refined point is also solved exactly on its guessed active set
(:mod:`amortcvx.iterations.polish`), and each instance keeps whichever of the two points gives the smaller
fixed-point residual at the C solver's first step (:func:`start_residual`); a bare prediction (``k = 0``), by
the smaller residual of the optimality conditions (:func:`point_optimality`, no linear solve), against which the
safeguard then measures the cold start's too.

Safeguards (a learned warm start changes speed, never answers, and never makes a solve fail):

1. Before the C solve, each instance's fixed-point residual ``||T(z) - z||`` after ``k`` steps from the
   prediction is compared with a reference from the cold start; when ``residual(pred_k) > safeguard_ratio *
   reference`` (or it is not finite) the instance falls back to a cold start. With
   ``safeguard_reference="cold"`` (default) the reference is the residual of the cold start's first step and
   the fallback is the plain cold start (``k + 1`` torch steps per batch in all). With ``"refined_cold"`` the
   reference is the residual after the same ``k`` steps from the cold start and the fallback is that refined
   cold start (``2k`` steps: twice the torch work, a stronger check). For ``k = 0`` the two are the same.
2. After the C solve, any warm-started instance whose status is not ``optimal`` is solved again from a cold
   start; its reported iterations and times are the sum of both attempts (``retried`` marks it).
3. :meth:`AmortizedSolver.calibrate` (optional, on held-out instances that are not the test set): solve a
   validation batch with the learned warm starts and with the (refined) cold start on the C solver; if the
   learned median exact iteration count is higher, the predictor is switched off (every instance takes the
   refined cold start) until calibrated again. It can also choose the refinement (plain or Anderson-accelerated
   steps) by the same medians. A lower torch fixed-point residual does not always mean fewer C
   iterations (the C solvers rescale the data and adapt their step), so (1) alone cannot rule out a predictor
   that is worse on average.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from amortcvx.backends import PersistentSolver, SolveResult, Status, WarmStart, get_backend, solve_batch
from amortcvx.backends.batched import objectives
from amortcvx.backends.osqp import RELAXATION_CHOICES, check_interval, checked_work
from amortcvx.backends.persistent import (
    RACE_CALLS,
    WALK_INSTANCES,
    WALK_SECONDS,
    StopPointSolver,
    ThreadedSolver,
    resolve_threads,
    stateless_rho,
    stateless_scale,
)
from amortcvx.backends.scs import stop_point
from amortcvx.canon.data import ConeData, QPData
from amortcvx.canon.parametric import ParametricProblem
from amortcvx.deploy.result import AmortizedResult
from amortcvx.iterations import kkt
from amortcvx.iterations.cones import project_cone, project_dual_cone
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import AndersonSettings, run
from amortcvx.iterations.polish import check_polish_choice, eliminable, polish_allowed
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors.fixed_point import output_space, predict
from amortcvx.predictors.model import WarmStartPredictor
from amortcvx.solvers import get_solver

SAFEGUARD_REFERENCES = ("cold", "refined_cold")
"""What a refined prediction's residual is compared with (see the module docstring, safeguard 1); the first is
the default."""

NEWTON_STEPS = 4
"""The Newton steps of the certified finish that :meth:`AmortizedSolver.fit` offers calibration (next to none)."""
NEWTON_PASSES = 1
"""Refinement passes of each Newton step's linear solve in the certified finish: the certificate asks for the
user's tolerance, not the machine accuracy the layer refines to (its default, 4 passes), so one pass is enough
and makes each step cheaper."""
NEWTON_FINISH_MARGIN = 0.01
"""The certified finish's Newton steps stop, and their point replaces the warm start, where ``||F||_inf`` is at most
this times the requested tolerance (the smaller positive one of ``eps_abs`` and ``eps_rel``, relative as in
:func:`amortcvx.iterations.kkt.converged`), not at the level of a refined solution (``kkt.REFINED``, ``1e-9``): the
certificate asks for the user's tolerance, and the steps past it cost a factorization each without changing what
the certificate sees (kalman small, SCS, eps ``1e-4``, the cold start with 4 Newton steps: 61% of 200 instances
certified at ``1e-9``, 85% here). At a tenth of eps a few certified points were no fixed points of SCS's iteration
(started there, SCS took 2-3 iterations instead of stopping at its first check: 3 of 89 on kalman); at a hundredth
none were. The certificate judges every point; one that fails it goes to the C solver, warm-started."""
NEWTON_CHUNK_BYTES = 2 ** 28
"""The Newton finish refines a batch in chunks of about this many bytes of float64 work: ``n x n`` per instance
(the dense factorizations), ``n x (n + m)`` where ``A`` depends on the parameters (a copy per instance)."""


def newton_choices(pp: ParametricProblem) -> tuple[int, ...]:
    """The Newton steps calibration chooses among by default: ``(0, NEWTON_STEPS)`` where the dense refinement
    applies (:func:`amortcvx.iterations.kkt.linear_algebra`: ``n + m <= KRYLOV_SIZE``, or a shared ``A`` whose
    equality rows keep the reduced system small; beyond, a batch of matrix-free solves costs more than it is
    likely to save), else ``(0,)``."""
    return (0, NEWTON_STEPS) if kkt.problem_linear_algebra(pp) == "dense" else (0,)


def polish_choices(pp: ParametricProblem) -> tuple[bool, ...]:
    """Whether to polish, as calibration chooses by default: ``(False, True)`` for LPs and QPs whose dense
    refinement applies (the same size rule as :func:`newton_choices`: polishing solves a dense ``n x n`` system
    per instance, and per candidate on LPs) and for QPs whose bounds make the polish's systems small at any size
    (:func:`~amortcvx.iterations.polish.eliminable`), else ``(False,)``."""
    allowed = polish_allowed(pp.form, pp.cones) and (kkt.problem_linear_algebra(pp) == "dense" or eliminable(pp))
    return (False, True) if allowed else (False,)


def _step_count(n: Any) -> bool:
    """Whether ``n`` is a number of Newton steps: a nonnegative int (not a bool)."""
    return not isinstance(n, bool) and isinstance(n, int) and n >= 0


FINISHES = ("certify", "c")
"""How a warm start becomes an answer: certified where it passes the solver's own test, else the C solver
(``"certify"``); or always the C solver (``"c"``)."""

STRATEGIES = ("learned", "refined_cold", "cold")
"""The start :meth:`AmortizedSolver.calibrate` chooses by wall time: the prediction (refined by ``k`` steps), the
cold start refined the same way (predictor off: ``k`` steps, or with ``k = 0`` its first step, then the Newton
steps when ``newton`` is set), or the plain cold start (no torch work at all)."""

OPTION_TIE = 1.05
""":meth:`AmortizedSolver.choose_option` keeps the first option (the fewest steps) among those whose worse-of-the-two
ratio to the fastest is within this factor of the best one's: timings of the shared machine differ by 5-10% from
run to run, and options closer than that are not told apart by them (huber_fit small, four calibrations of one
classifier: `k = 0` plain and `k = 0` + Newton 4, tied at 0 C iterations, were kept two times each;
docs/training.md). Fewer steps then win: the same configuration from one calibration to the next."""

STRATEGY_DROP = 4.0
""":meth:`AmortizedSolver.choose_strategy` times again, after its first round, only the strategies whose worse-of-the-
two ratio to the fastest is within this factor of the best one's: later rounds guard close calls against the
machine's noise, and a start that costs several times the others' cannot become the choice by them. (A predictor
with 2048 candidate active sets on mpc_param_dyn, whose ``A`` holds parameters, took 1.2 s per instance at batch 1
against 0.5 ms for a cold solve; its three rounds were half of a 232 s calibration.)"""

REPORTED_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
"""The batch sizes :meth:`Calibration.describe` reports the per-call strategy of."""

C_MODES = ("adaptive", "stateless", "stop")
"""How the persistent C solver objects run (see :meth:`AmortizedSolver.object_settings`); ``"stop"`` (SCS only) is
the stateless object behind a calibrated stop point (:class:`~amortcvx.backends.persistent.StopPointSolver`)."""

BACKEND_C_MODES = {"scs": C_MODES, "osqp": ("adaptive", "stateless")}
"""The modes each backend offers."""

DEFAULT_C_MODES = {"scs": {"warm": "stateless", "cold": "adaptive"}, "osqp": {"warm": "adaptive", "cold": "adaptive"}}
"""By backend, the mode of warm-started and of cold C solves until :meth:`AmortizedSolver.calibrate` times both.
Measured (SCS, small families, 100 instances, against a hand-written persistent loop, SCS's default scale): from
a start within 1e-3 of the optimum, stateless objects took 0.10-0.82x of the loop's time and adaptive ones
(rebuilt per solve) 0.15-2.7x; cold, stateless took 0.63-3.0x (no acceleration: sparse_pca 789 iterations
against 264) and adaptive 0.46-3.5x. OSQP keeps its adaptive ``rho`` until calibration has fitted the fixed one."""

RELAXATION_GAIN = 0.05
""":meth:`AmortizedSolver.choose_osqp_alpha` keeps another relaxation than OSQP's default only where its cold solves
cost at least this fraction less work. SCS's ``alpha`` is not chosen: its cold solves run to its checks every 25
iterations or to a stop point (docs/backends.md), and in two A/B runs of the package's cold path on the small
families (stop 53) with SCS's ``alpha`` chosen among 1.5 and 1.2 by exact counts (each with its scale walked on exact
counts) mpc got slower (0.45-0.52 of the hand-written loop at batch 256 -> 0.58-0.63) where sparse_pca got faster
(0.39-0.40 -> 0.36-0.37); stop 33 had found the same on mpc small (docs/backends.md)."""

WALK_TRIES = 12
"""About how many passes over its instances :meth:`AmortizedSolver.choose_osqp_alpha` makes per value (a walk of at
most 9 tries and 2 midpoints, then the exact counts): what sizes its sample where solves are slow."""

COLD_COUNT_SAMPLE = 64
"""At most this many validation instances are solved cold in exact mode for the cold solves' OSQP check interval
and SCS stop point (exact mode costs 2x (OSQP) to 4x (SCS, its log) a timed solve)."""


class WarmStartBatch(NamedTuple):
    """Predicted warm starts for a batch.

    Attributes:
        warm_starts: one :class:`WarmStart` per instance; None means the plain cold start.
        fallback: bool (B,), True where the safeguard chose the (refined or plain) cold start over the
            prediction.
        residual: (B,) fixed-point residual after ``k`` steps from the prediction (from the cold start when
            there is no predictor); with polishing, the residual of the C solver's first step from the warm start;
            for a bare prediction (``k = 0``, polished or not) where the algorithm has an optimality residual
            (:attr:`~amortcvx.iterations.loop.FixedPointAlgorithm.optimality`; SCS and OSQP), that residual
            (no step; polished, at the warm start: :func:`point_optimality`).
        cold_residual: (B,) fixed-point residual of the cold-start reference: after ``k`` steps from the cold
            start, or of its first step (``safeguard_reference="cold"``, or the safeguard off); the optimality
            residual of the cold start where ``residual`` is one.
        seconds: wall time of prediction + refinement + conversion for the whole batch.
        arrays: the warm starts as batched float64 host arrays by field (``x``, ``y``[, ``s``]), None when every
            instance starts cold; ``warm_starts[i]`` is None where ``arrays`` is not used.
    """

    warm_starts: list[WarmStart | None]
    fallback: np.ndarray
    residual: np.ndarray
    cold_residual: np.ndarray
    seconds: float
    arrays: dict[str, np.ndarray] | None = None


class Relaxation(NamedTuple):
    """What :meth:`AmortizedSolver.choose_osqp_alpha` measured.

    Attributes:
        alpha: OSQP's relaxation kept.
        rho: the stateless object's fixed ``rho`` walked with it (the settings' where they fix it).
        work: ``(alpha, expected iterations of a timed cold solve, checks included)`` of every value tried, in
            order (:func:`~amortcvx.backends.osqp.checked_work`).
    """

    alpha: float
    rho: float | None
    work: tuple[tuple[float, float], ...]


class Calibration(NamedTuple):
    """Outcome of :meth:`AmortizedSolver.calibrate`: medians of exact C iterations and the decisions.

    Attributes:
        learned_median, cold_median: medians with the learned warm starts (chosen refinement) and with the
            (refined) cold start.
        enabled: whether the predictor is used.
        anderson: the refinement kept (None: plain steps).
        candidates: ``(refinement label, learned median)`` of every refinement tried, in order.
        c_modes: the modes of the persistent C solver objects kept for warm and cold solves (SCS; measured).
        strategy: the start every instance gets, chosen by measured wall time (:data:`STRATEGIES`).
        seconds: per strategy tried, ``(ms per instance at batch 1, ms per instance at the validation batch)``.
        scs_scale: the fixed scale of stateless SCS objects (None: SCS's default).
        osqp_rho: OSQP's initial rho (None: OSQP's default or the user's).
        check_termination: OSQP's termination-check interval of warm-started timed solves (None: 25).
        timing_batch: the batch size of the second timing (the validation batch); with ``seconds`` it gives each
            call the strategy that is fastest at its batch size (:meth:`strategy_for`).
        newton: the Newton steps of the certified finish kept (0: none).
        cold_check_termination: OSQP's termination-check interval of cold timed solves (None: 25).
        scs_stops: SCS's stop points of the ``"stop"`` mode for warm-started and cold solves (``{"warm": c or None,
            "cold": c or None}``, :func:`~amortcvx.backends.scs.stop_point`).
        polish: whether the refined warm starts are polished (None: the solver's own setting; files written before
            calibration chose it).
        c_setup: the C solver's settings calibration chose: the setup settings timed by
            :meth:`AmortizedSolver.choose_setup` (SCS's ``normalize``, and where every instance has its own setup
            SCS's ``linear_solver`` or OSQP's ``scaling``) and OSQP's relaxation ``alpha``, by the work of exact
            cold counts (:meth:`AmortizedSolver.choose_osqp_alpha`); None or empty: the settings' or the solver's.
        k: the torch refinement steps after the prediction kept (None: the solver's own; files written before
            calibration chose them).
    """

    learned_median: float
    cold_median: float
    enabled: bool
    anderson: AndersonSettings | None = None
    candidates: tuple[tuple[str, float], ...] = ()
    c_modes: dict[str, str] | None = None
    strategy: str | None = None
    seconds: dict[str, tuple[float, float]] | None = None
    scs_scale: float | None = None
    osqp_rho: float | None = None
    check_termination: int | None = None
    timing_batch: int | None = None
    newton: int = 0
    cold_check_termination: int | None = None
    scs_stops: dict[str, int | None] | None = None
    polish: bool | None = None
    c_setup: dict[str, Any] | None = None
    k: int | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (:meth:`from_dict` reads it back)."""
        out = self._asdict()
        out["anderson"] = None if self.anderson is None else dataclasses.asdict(self.anderson)
        out["candidates"] = [list(c) for c in self.candidates]
        out["seconds"] = None if self.seconds is None else {k: list(v) for k, v in self.seconds.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        """The calibration :meth:`to_dict` wrote (fields a file lacks take their defaults; other keys are
        ignored)."""
        known = {k: v for k, v in d.items() if k in cls._fields}
        if "c_setup" not in known and d.get("scs_linear_solver") is not None:  # written before normalize was timed
            known["c_setup"] = {"linear_solver": d["scs_linear_solver"]}
        a, seconds = known.get("anderson"), known.get("seconds")
        known["anderson"] = None if a is None else AndersonSettings(**a)
        known["candidates"] = tuple((str(label), float(med)) for label, med in known.get("candidates", ()))
        known["seconds"] = None if seconds is None else {k: (float(v[0]), float(v[1])) for k, v in seconds.items()}
        return cls(**known)

    def cost_model(self) -> dict[str, tuple[float, float]]:
        """Per strategy timed, ``(c, f)`` with ms per instance at batch ``B`` modelled as ``c + f / B`` (a per-call
        cost ``f`` shared by the batch, a per-instance cost ``c``), fitted to the two measurements (batch 1 and
        ``timing_batch``); empty without them."""
        if not self.seconds or not self.timing_batch or self.timing_batch < 2:
            return {}
        n = float(self.timing_batch)
        out = {}
        for name, (t1, tn) in self.seconds.items():
            f = max(0.0, (t1 - tn) / (1.0 - 1.0 / n))
            out[name] = (max(0.0, t1 - f), f)
        return out

    def strategy_for(self, batch: int) -> str | None:
        """The fastest strategy at ``batch`` instances per call by :meth:`cost_model` (None without one)."""
        model = self.cost_model()
        if not model:
            return None
        return min(model, key=lambda k: model[k][0] + model[k][1] / max(1, batch))

    def describe(self) -> str:
        """One paragraph for reports: what was chosen and the numbers it was chosen on."""
        times = "; ".join(f"{k}: {a:.3g} ms at batch 1, {b:.3g} ms at the validation batch"
                          for k, (a, b) in (self.seconds or {}).items())
        used = {self.strategy_for(b) for b in REPORTED_BATCHES} if self.cost_model() else {self.strategy}
        if used == {"learned"}:
            head = "predictor ON"
        elif "learned" in used:
            head = "predictor ON for some batch sizes (below)"
        elif used == {"refined_cold"}:
            head = "PREDICTOR OFF: every instance starts from the refined cold start"
        elif used == {"cold"}:
            head = "PREDICTOR OFF: every instance starts from the cold start"
        else:
            head = "PREDICTOR OFF: every instance starts from the cold start, refined at the batch sizes below"
        learned = ("no predictor" if math.isnan(self.learned_median)
                   else f"learned {self.learned_median:g}")
        why = (f"median exact C iterations {learned} vs cold {self.cold_median:g}"
               + (f"; wall time per instance {times}" if times else ""))
        by_batch = ""
        if self.cost_model():
            chosen = ", ".join(f"{b}: {self.strategy_for(b)}" for b in REPORTED_BATCHES)
            by_batch = f"; per call by batch size: {chosen}"
        setup = ", ".join(f"{k}={v}" for k, v in (self.c_setup or {}).items() if k != "alpha")
        solver = f"; C setup {setup} (timed)" if setup else ""
        if (self.c_setup or {}).get("alpha") is not None:
            solver += f"; C relaxation alpha={self.c_setup['alpha']:g} (least cold work, exact counts)"
        return f"{head} ({why}){by_batch}{solver}"


def start_residual(alg, warm_start: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) fixed-point residual of the first step from a warm start (the step the C solver takes first)."""
    state = alg.init(**warm_start)
    return alg.residual(state, alg.step(state))


def point_optimality(alg, warm_start: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) residual of the optimality conditions at a warm start (``alg.optimality`` at the state it starts):
    nil at a solution, no linear solve."""
    return alg.optimality(alg.init(**warm_start))


def refinement_label(anderson: AndersonSettings | None) -> str:
    """``"plain"`` or ``"anderson(memory=M)"``, for reports."""
    return "plain" if anderson is None else f"anderson(memory={anderson.memory})"


def option_label(anderson: AndersonSettings | None, newton: int, polish: bool = False, k: int | None = None) -> str:
    """:func:`refinement_label`, with ``" + polish"`` where the refined points are polished and ``" + newton N"``
    where the certified finish takes ``N`` Newton steps; with ``k``, led by ``"k=K "`` (the refinement steps, where
    calibration chose among several)."""
    steps = "" if k is None else f"k={k} "
    return steps + refinement_label(anderson) + (" + polish" if polish else "") + (f" + newton {newton}" if newton
                                                                                    else "")


class AmortizedSolver:
    """Warm-started solves of a parametric problem with a trained predictor.

    Args:
        pp: the compiled problem (form "cone" for SCS, "qp" for OSQP).
        model: a trained :class:`WarmStartPredictor` for ``pp`` (its meta is checked), or None for cold starts
            only (then ``k`` steps from the cold start are still possible).
        algorithm: "scs" or "osqp"; taken from ``model`` when given.
        settings: the torch iteration settings (``ScsSettings`` / ``OsqpSettings``); default: the model's.
        k: torch refinement steps after the prediction.
        anderson: None for plain refinement steps; :class:`~amortcvx.iterations.AndersonSettings` to accelerate
            them (safeguarded Anderson acceleration, same number of steps; the cold-start refinement of the
            safeguard is accelerated the same way).
        polish: after the refinement, polish each warm start on its guessed active set
            (:mod:`amortcvx.iterations.polish`, LPs and QPs only) and keep, per instance, whichever of the two
            has the smaller residual at the C solver's first step (the refined cold start likewise). Residuals
            (of the safeguard and in :class:`WarmStartBatch`) are then those first-step residuals.
        solver_settings: settings of the C solver (tolerances, ...), passed to the backend; the certified
            finish uses the same tolerances.
        safeguard: enable the residual check and the cold retry (see the module docstring).
        safeguard_ratio: allowed ratio of predicted to cold residual (positive).
        safeguard_reference: ``"cold"`` (default) or ``"refined_cold"`` (see the module docstring).
        device: where prediction and refinement run.
        dtype: the precision of prediction and refinement (certificates and C solves are float64).
        workers: processes for the C solves of ``exact_iterations=True`` (``backends.solve_batch``); timed solves
            run in this process on the persistent solver objects.
        threads: threads for the timed C solves (None: :func:`~amortcvx.backends.persistent.default_threads`,
            every core this process may use, at most 8): a batch of at least 16 instances is cut into up to
            ``threads`` parts, each solved on its own copy of the persistent object
            (:class:`~amortcvx.backends.persistent.ThreadedSolver`; the same answers as one object).
        finish: ``"certify"`` (default) or ``"c"`` (see the module docstring).
        reference_params: the parameter values (one instance) on which the persistent C solver objects are set
            up; default: the predictor's training mean (its input normalization), without a predictor the mean
            parameter of the first batch solved.
        check_termination: OSQP's termination-check interval for warm-started timed solves; None: 25 until
            :meth:`calibrate` sets it from the validation C iterations (:func:`amortcvx.backends.osqp.check_interval`),
            and then also the interval of cold solves (:attr:`cold_check_termination`). Given, cold solves keep the
            backend's 25.
        c_modes: ``{"warm": mode, "cold": mode}``, the mode (:data:`C_MODES`) of the persistent C solver objects
            for warm-started and for cold solves (default :data:`DEFAULT_C_MODES` of the backend); :meth:`calibrate`
            chooses them by measured wall time unless given.
        newton: Newton steps on each warm start before the certified finish (0: none; see the module
            docstring); :meth:`calibrate` chooses among ``newton_steps`` when given.
    """

    def __init__(self, pp: ParametricProblem, model: WarmStartPredictor | None = None, *,
                 algorithm: str | None = None, settings: Any = None, k: int = 0,
                 anderson: AndersonSettings | None = None, polish: bool = False, solver_settings: Mapping | None = None,
                 safeguard: bool = True, safeguard_ratio: float = 1.0, safeguard_reference: str = "cold",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64, workers: int | None = 1,
                 finish: str = "certify", reference_params: Mapping | None = None,
                 check_termination: int | None = None, c_modes: Mapping[str, str] | None = None,
                 newton: int = 0, threads: int | None = None):
        if model is not None:
            if model.meta.fingerprint != pp.fingerprint:
                raise ValueError(f"the predictor was trained for problem {model.meta.fingerprint}, not for this "
                                 f"problem ({pp.fingerprint})")
            if algorithm is not None and algorithm != model.meta.algorithm:
                raise ValueError(f"the predictor is for {model.meta.algorithm!r}, not {algorithm!r}")
            algorithm = model.meta.algorithm
            if settings is None:
                settings = model.meta.algorithm_settings()
        description = get_solver(algorithm, "algorithm")
        if description.form != pp.form:
            raise ValueError(f"algorithm {algorithm!r} needs a problem of form {description.form!r}; "
                             f"got {pp.form!r}")
        if k < 0:
            raise ValueError(f"k must be nonnegative; got {k}")
        if not _step_count(newton):
            raise ValueError(f"newton must be a nonnegative int (Newton steps of the certified finish); got {newton!r}")
        if anderson is not None and not isinstance(anderson, AndersonSettings):
            raise TypeError(f"anderson must be None or an AndersonSettings; got {type(anderson).__name__}")
        check_polish_choice(pp.form, pp.cones, polish)
        self.pp, self.algorithm, self.settings, self.k, self.anderson = pp, algorithm, settings, k, anderson
        self.polish = bool(polish)
        self.newton = newton
        self.backend = description.backend.name
        self.description = description
        self.solver_settings = dict(solver_settings or {})
        if safeguard_reference not in SAFEGUARD_REFERENCES:
            raise ValueError(f"safeguard_reference must be one of {SAFEGUARD_REFERENCES}; got {safeguard_reference!r}")
        if not (isinstance(safeguard_ratio, (int, float)) and safeguard_ratio > 0):
            raise ValueError(f"safeguard_ratio must be a positive number; got {safeguard_ratio!r}")
        if finish not in FINISHES:
            raise ValueError(f"finish must be one of {FINISHES}; got {finish!r}")
        if check_termination is not None and not (isinstance(check_termination, int) and check_termination >= 1):
            raise ValueError(f"check_termination must be None or a positive int; got {check_termination!r}")
        self.safeguard, self.safeguard_ratio = safeguard, float(safeguard_ratio)
        self.safeguard_reference = safeguard_reference
        self.device, self.dtype, self.workers = torch.device(device), dtype, workers
        self.threads = resolve_threads(threads)
        # a copy: the caller's module keeps its device, dtype and train/eval mode
        self.model = None if model is None else copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        self.space = output_space(algorithm)
        if self.model is not None:  # one probe now, rather than a tensor-size error deep inside a solve
            expected = self.space.dim(pp.n, pp.m)
            try:
                with torch.no_grad():
                    probe = self.model(torch.zeros(1, pp.num_params, dtype=dtype, device=self.device))
            except RuntimeError as e:  # e.g. a core whose width does not match the output normalization
                raise ValueError(f"the predictor fails on a parameter vector of length {pp.num_params}; {algorithm} "
                                 f"on this problem needs vectors of length {expected} (n + m = {pp.n} + {pp.m}): "
                                 f"{e}") from None
            if tuple(probe.shape) != (1, expected):
                raise ValueError(f"the predictor maps a parameter vector to shape {tuple(probe.shape[1:])}; "
                                 f"{algorithm} on this problem needs vectors of length {expected} "
                                 f"(n + m = {pp.n} + {pp.m})")
        self.enabled = True  # see calibrate()
        self.cold_refine = True  # without the predictor, refine the cold start by k steps (see calibrate())
        self.finish = finish
        self.check_termination = check_termination
        self._check_given = check_termination
        self.cold_check_termination: int | None = None  # OSQP's interval of cold timed solves (None: 25)
        self.factors = FactorCache()  # parameter-independent torch factorizations, reused by every call
        self._eps = self._tolerances()
        self._reference = None if reference_params is None else self.pp.parameter_vector(
            reference_params, dtype=torch.float64, device="cpu")
        if self._reference is not None and self._reference.shape[0] != 1:
            raise ValueError("reference_params must be one instance (no batch dimension, or a batch of one)")
        if self._reference is None and self.model is not None and hasattr(self.model, "in_mean"):
            self._reference = self.model.in_mean.detach().to("cpu", torch.float64).reshape(1, -1)
        self._persistent: dict[str, ThreadedSolver] = {}
        self._predictions: dict | None = None  # bare predictions kept by batch, only within _predictions_kept
        defaults = DEFAULT_C_MODES[self.backend]
        modes = {**defaults, **dict(c_modes or {})}
        offered = BACKEND_C_MODES[self.backend]
        bad = {k: v for k, v in modes.items() if k not in defaults or v not in offered}
        if bad:
            raise ValueError(f"c_modes maps 'warm' and 'cold' to one of {offered} ({self.backend}); got {bad}")
        self.c_modes = modes
        self._modes_given = c_modes
        self.scs_scale: float | None = None  # the fixed scale of stateless SCS objects (see choose_scs_scale)
        # the stop points of the "stop" mode, by kind (scs.stop_point; set by calibrate)
        self.scs_stops: dict[str, int | None] = {"warm": None, "cold": None}
        self.osqp_rho: float | None = None  # OSQP's initial rho, fitted by calibrate() (see choose_osqp_rho)
        self.c_setup: dict[str, Any] = {}  # C settings chosen by calibrate() (choose_setup, choose_osqp_alpha)
        self.calibration = None  # the last calibrate()'s outcome (a Calibration)
        self.recipe = None  # fit(budget=...)'s RecipeResult: what the automatic recipe chose and its learning curve
        self.by_batch = False  # per call, the strategy calibration found fastest at its batch size

    # ------------------------------------------------------------------ building, saving, loading
    @classmethod
    def fit(cls, problem: Any, data: Any, *, solver: str = "scs", num: int | None = None, k: int = 10,
            eps: float = 1e-4, solver_settings: Mapping | None = None, train_config: Any = None,
            epochs: int | None = None, budget: float | None = None, root: Any = None,
            seed: int = 0, device: str = "cpu", workers: int | None = 1, calibrate: bool = True,
            progress: bool = True, **options: Any) -> AmortizedSolver:
        """Compile ``problem``, solve sampled instances, train a predictor, calibrate: a ready solver.

        Args:
            problem: a DPP ``cp.Problem`` with named ``cp.Parameter`` s (or a compiled ``ParametricProblem``).
            data: a sampler ``(n, rng: numpy.random.Generator) -> {parameter name: array (n, *shape)}`` or such a
                dict of arrays (training and validation instances).
            solver: ``"scs"`` (any cone) or ``"osqp"`` (LPs and QPs); form, C backend and torch iteration follow.
            num: instances to draw from a sampler (default :data:`~amortcvx.deploy.fit.DEFAULT_INSTANCES`).
            k: torch refinement steps after the prediction (also the unroll of training); calibration chooses
                between ``k`` and none (:func:`~amortcvx.deploy.fit.refine_choices`).
            eps: the tolerance of every answer (``eps_abs = eps_rel``), by the solver's own test.
            solver_settings: further C solver settings (override ``eps``).
            train_config: a :class:`~amortcvx.training.TrainConfig` (default: ``TrainConfig(k=k)``); ``epochs``
                overrides its epochs.
            budget: seconds for the automatic recipe (:func:`amortcvx.training.recipe.fit_predictor`): it draws
                and solves instances as it needs them (chunks of the sampler; ``num`` is then ignored), and
                chooses the training-set size, the model (MLP or a correction of the nearest neighbour's
                solution), the loss mix, regularization and early stopping on validation; its report and
                learning curve are ``solver.recipe`` (``solver.recipe.format()``). None (default): one training
                with ``train_config`` on ``num`` instances.
            root: folder of the cached dataset and checkpoint (default :func:`~amortcvx.deploy.fit.cache_root`).
                A rerun with the same problem and samples reuses them; an interrupted one resumes.
            seed: seeds the sampler, the split and training.
            device: where training, prediction and refinement run.
            workers: processes for solving the dataset (None: all cores).
            calibrate: choose the refinement and C solver modes on the validation instances, and switch the
                predictor off if it does not pay (:meth:`calibrate`; the outcome is in :attr:`calibration`).
            progress: progress bars.
            options: further :class:`AmortizedSolver` arguments (``polish``, ``anderson``, ``safeguard``, ...).
        """
        from amortcvx.deploy.fit import fit

        return fit(cls, problem, data, solver=solver, num=num, k=k, eps=eps, solver_settings=solver_settings,
                   train_config=train_config, epochs=epochs, budget=budget, root=root, seed=seed, device=device,
                   workers=workers, calibrate=calibrate, progress=progress, **options)

    def save(self, path) -> None:
        """Save the predictor and every setting and calibration decision to the folder ``path``.

        ``path/predictor.pt`` (see :meth:`WarmStartPredictor.save`; absent without a predictor) and
        ``path/solver.json``. :meth:`load` restores a solver that answers exactly as this one.
        """
        from amortcvx.deploy.saved import save

        save(self, path)

    @classmethod
    def load(cls, path, problem, *, device: str = "cpu", **overrides) -> AmortizedSolver:
        """The solver saved by :meth:`save` in ``path``, for ``problem`` (the same ``cp.Problem``, rebuilt with the
        same constants; a different problem is a ValueError naming both fingerprints). ``overrides``: constructor
        arguments to change (``k``, ``solver_settings``, ...)."""
        from amortcvx.deploy.saved import load

        return load(cls, path, problem, device=device, **overrides)

    def layer(self, parameters, variables, **options):
        """A differentiable torch layer of this problem (:class:`amortcvx.layers.CvxpyLayer`) warm-started by this
        solver's predictor (cold when calibration switched it off), at its tolerance and C settings:
        ``layer(*values)`` -> one tensor per variable in ``variables``. ``options``: further
        :class:`~amortcvx.layers.CvxpyLayer` arguments (``eps``, ``warm_start``, ``gradients``, ...).
        """
        from amortcvx.layers import CvxpyLayer  # deploy sits below layers

        return CvxpyLayer.from_solver(self, parameters, variables, **options)

    def solve_cvxpy(self, problem=None, **solve_kwargs) -> float:
        """``problem.solve`` warm-started with this solver's prediction for the parameters' current values.

        ``problem`` defaults to the one this solver was built for; variables, duals, status and value are
        filled as ``problem.solve`` does, with this solver's C settings (``solve_kwargs`` override them).
        See :mod:`amortcvx.deploy.cvxpy_native`.
        """
        from amortcvx.deploy.cvxpy_native import solve

        return solve(self.pp.problem if problem is None else problem, self, **solve_kwargs)

    def _tolerances(self) -> tuple[float, float]:
        """``(eps_abs, eps_rel)`` of the C solver: the backend's defaults overridden by ``solver_settings``."""
        defaults = get_backend(self.backend).default_settings
        merged = {**defaults, **self.solver_settings}
        eps = (merged["eps_abs"], merged["eps_rel"])
        for name, value in zip(("eps_abs", "eps_rel"), eps):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"solver setting {name} must be a nonnegative number; got {value!r}")
        return float(eps[0]), float(eps[1])

    def c_settings(self) -> dict:
        """The C solver's settings: ``solver_settings`` and what :meth:`calibrate` fitted where ``solver_settings``
        does not set it: the setup settings (:attr:`c_setup`), OSQP's initial ``rho``."""
        settings = self._setup_settings()
        if self.algorithm == "osqp" and self.osqp_rho is not None:
            settings.setdefault("rho", self.osqp_rho)
        return settings

    def _setup_settings(self) -> dict:
        """``solver_settings`` and, where they do not set them, the setup settings calibration chose
        (:attr:`c_setup`, :meth:`choose_setup`)."""
        return {**self.c_setup, **self.solver_settings}

    def choose_setup(self, params: Mapping, *, instances: int = 16, repeats: int = 2) -> dict[str, Any]:
        """The C solver's setup settings whose cost recurs with every setup, timed on the first ``instances`` of
        ``params`` (validation instances).

        The settings are the backend's :attr:`~amortcvx.backends.BackendInfo.setup_choices`: SCS's ``normalize`` (its
        adaptive object is set up again before every solve) and, where ``A`` or ``P`` depend on the parameters (every
        instance then has its own setup), its linear solver when ``n`` is at most
        :data:`~amortcvx.backends.scs.DENSE_MAX_N`; OSQP's ``scaling`` where ``A`` or ``P`` depend on the parameters
        (its ``update(Px=, Ax=)`` equilibrates again). Each in turn, only where ``solver_settings`` does not set it: for
        each value, the stateless object's fixed scale (SCS, :meth:`choose_scs_scale`) or ``rho`` (OSQP,
        :meth:`choose_osqp_rho`) walked for it unless ``solver_settings`` sets them, then cold solves timed on the
        adaptive and the stateless objects, the values in turn in ``repeats`` interleaved rounds (the machine's load
        drifts; one value timed after the other once chose 10 passes where 0 was faster in each of three interleaved
        rounds, 1.75-1.94 against 2.06-2.42 ms per instance on mpc_param_dyn large); the value of the fastest is kept (a
        value this build of the solver lacks is skipped). Equilibration costs at every setup and saves iterations or
        not, by problem; the linear solvers solve exactly (the same iterates). The solvers test termination on the
        unscaled data whatever these settings: the same tolerance, only the time differs.

        Returns the chosen settings (e.g. ``{"linear_solver": "cpu_dense", "normalize": False}``); sets nothing.
        """
        theta = self.pp.parameter_vector(params, dtype=torch.float64, device="cpu")
        self._reference_theta(theta)  # the persistent objects' reference: from all of params, as every later step
        some = {name: value[:instances] for name, value in _as_batch(self.pp, params).items()}
        theta = theta[:instances]
        data = self.pp.canonicalize_vector(theta)
        choices = [(name, values) for name, values in
                   get_backend(self.backend).setup_choices(self.pp.n, data.matrices_shared)
                   if name not in self.solver_settings]
        if not choices:
            return {}
        fitted = "scale" if self.algorithm == "scs" else "rho"
        modes = [mode for mode in BACKEND_C_MODES[self.backend] if mode != "stop"]
        saved = (dict(self.c_setup), self.scs_scale, self.osqp_rho, dict(self._persistent))
        chosen: dict[str, Any] = {}
        def cold_solve(state: tuple, mode: str) -> Callable[[], Any]:
            def run() -> None:
                self.c_setup, self.scs_scale, self.osqp_rho, self._persistent = state
                self.persistent_solver(theta, mode, "cold").solve(data)
            return run

        try:
            for name, values in choices:
                runs = {}  # (value, mode) -> a cold solve of data with that value (its own walked scale or rho)
                for value in values:
                    self.c_setup, self._persistent = {**saved[0], **chosen, name: value}, {}
                    try:
                        if fitted not in self.solver_settings:
                            if self.algorithm == "scs":
                                self.scs_scale = self.choose_scs_scale(some)
                            else:
                                self.osqp_rho = self.choose_osqp_rho(some)
                        state = (self.c_setup, self.scs_scale, self.osqp_rho, self._persistent)
                        self.persistent_solver(theta, modes[0], "cold")  # a value this build lacks fails here
                    except ValueError:  # not in this build of the solver
                        continue
                    runs.update({(value, mode): cold_solve(state, mode) for mode in modes})
                by_value: dict[Any, float] = {}  # the value's better mode
                for (value, _), seconds in _interleaved_best(runs, RACE_CALLS, repeats).items():
                    by_value[value] = min(by_value.get(value, math.inf), seconds)
                if by_value:
                    chosen[name] = min(by_value, key=by_value.get)
        finally:
            self.c_setup, self.scs_scale, self.osqp_rho, self._persistent = saved
        return chosen

    def choose_osqp_rho(self, params: Mapping) -> float | None:
        """OSQP's initial ``rho`` for this problem, measured on ``params`` (validation instances): starting from the
        geometric median of the rho OSQP's adaptation reaches in cold solves of them, the fixed rho of fewest
        iterations on a stateless object (:func:`~amortcvx.backends.persistent.stateless_rho`); None when no
        adapted rho is finite and positive.

        OSQP adapts rho during a solve, starting from ``rho`` (0.1) on every solve of a persistent object (the
        protocol that makes results independent of order resets it). Starting where the adaptation ends saves
        iterations and the refactorization of the reset; measured on the small families (200 instances, eps
        1e-4): lasso 150 -> 50 median iterations (0.29 -> 0.12 ms per solve), portfolio 75 -> 50, mpc 50 -> 25.
        The adapted values are a noisy guide, so the walk checks them: on MPC large the geometric median of one
        validation sample was 0.08 (183 mean exact iterations at that fixed rho), where the walk ends at 0.8 (31).
        """
        ref, data = self._measured(params)
        adapted = _geometric_median_stat(PersistentSolver(self.backend, ref, self._setup_settings()).solve(data),
                                         "rho_estimate")
        if adapted is None:
            return None
        return stateless_rho(ref, data, self.c_settings(), start=adapted).value

    def choose_osqp_alpha(self, params: Mapping) -> Relaxation | None:
        """OSQP's relaxation ``alpha`` for this problem, measured on ``params`` (validation instances): among
        :data:`~amortcvx.backends.osqp.RELAXATION_CHOICES` (OSQP's default first), the one whose cold solves cost the
        least work; None for SCS (:data:`RELAXATION_GAIN`'s note) and where ``solver_settings`` sets ``alpha``.

        Each value is measured as the package's cold path runs with it: on the stateless object's settings
        (:meth:`object_settings`) with that ``alpha`` and its own fixed ``rho`` (:func:`stateless_rho`, walked from
        the current one unless ``solver_settings`` sets it; at the default, the current :attr:`osqp_rho` where one was
        fitted at the default, :meth:`choose_osqp_rho`), exact iterations of cold solves of the first
        :data:`COLD_COUNT_SAMPLE` instances on one such object (``check_termination=1``; the object the cold path
        solves on, set up once; where the value's walk counted them at the rho it chose, its counts, not solved again;
        where solves are slow, fewer instances, so that each value's walk and counts take
        about :data:`~amortcvx.backends.persistent.WALK_SECONDS`: transport large 278 s for the three values on 64,
        53 s on 8 with the default's rho reused), as timed solves at the check interval chosen for them would take them
        (:func:`~amortcvx.backends.osqp.checked_work`: fewer exact iterations with a longer tail can cost more
        checked ones; lasso small: 32.9 against 34.5 mean exact iterations, 46.2 against 42.6 timed). Another value
        than the default is kept only where it costs :data:`RELAXATION_GAIN` less. An iteration costs the same at
        any ``alpha``; the termination test is the same (on the unscaled data), so the answers meet the same
        tolerance. Sets nothing."""
        if self.algorithm != "osqp" or "alpha" in self.solver_settings:
            return None
        reference, data = self._measured(params)

        def counts(settings: dict, sample) -> list[int]:  # exact, on the object the cold path solves on
            exact = PersistentSolver(self.backend, reference, {**settings, "check_termination": 1})
            return [max(1, r.iterations) for r in exact.solve(sample, checked=True)]

        # slow solves: every value on fewer instances (each value's walk and counts about WALK_SECONDS)
        first = data.take(np.arange(min(WALK_INSTANCES, data.batch_size)))
        start = time.perf_counter()
        counts({**self.object_settings("stateless"), "alpha": RELAXATION_CHOICES[0]}, first)
        per_solve = (time.perf_counter() - start) / first.batch_size
        keep = int(min(COLD_COUNT_SAMPLE, max(WALK_INSTANCES, WALK_SECONDS / max(per_solve * WALK_TRIES, 1e-12))))
        sample = data if data.batch_size <= keep else data.take(np.arange(keep))
        default = RELAXATION_CHOICES[0]
        # the rho already fitted at the default (choose_osqp_rho, as calibrate calls it first) is not walked again
        current = self.osqp_rho if self.c_settings().get("alpha", default) == default else None
        fitted: dict[float, float | None] = {}
        work: dict[float, float] = {}
        for alpha in RELAXATION_CHOICES:
            settings = {**self.object_settings("stateless"), "alpha": alpha}
            seen = None  # the walk's own exact counts on the sample at the rho it chose, where it has them
            if "rho" not in self.solver_settings:
                if alpha == default and current is not None:
                    settings["rho"] = current
                else:
                    walk = stateless_rho(reference, sample, settings, instances=keep)
                    settings["rho"] = walk.value
                    if walk.counts is not None and len(walk.counts) == sample.batch_size:
                        seen = [max(1, c) for c in walk.counts]
            fitted[alpha] = settings.get("rho")
            work[alpha] = checked_work(counts(settings, sample) if seen is None else seen)
        best = min(RELAXATION_CHOICES, key=lambda a: work[a])
        if work[best] > (1.0 - RELAXATION_GAIN) * work[default]:
            best = default
        return Relaxation(best, fitted[best], tuple(work.items()))

    def _reference_theta(self, theta: torch.Tensor | None) -> torch.Tensor:
        """The reference instance of the persistent objects (set from ``theta``'s mean on first use)."""
        if self._reference is None:
            if theta is None:
                raise ValueError("no reference instance yet: pass reference_params or solve a batch first")
            self._reference = theta.detach().to("cpu", torch.float64).mean(dim=0, keepdim=True)
        return self._reference.to(torch.float64)

    def _reference_instance(self, theta: torch.Tensor | None):
        """The canonical data of the persistent objects' reference instance (:meth:`_reference_theta`)."""
        return self.pp.canonicalize_vector(self._reference_theta(theta)).instance(0)

    def _measured(self, params: Mapping) -> tuple[Any, Any]:
        """``params`` (validation instances) as calibration's choices measure them: the reference instance of the
        persistent objects (set from ``params`` where there is none yet) and their canonical data, in float64 on the
        CPU, where the C solvers run."""
        theta = self.pp.parameter_vector(params, dtype=torch.float64, device="cpu")
        return self._reference_instance(theta), self.pp.canonicalize_vector(theta)

    def object_settings(self, mode: str) -> dict:
        """The C settings of the persistent object for ``mode`` (see :data:`C_MODES`): ``"adaptive"``, the C
        solver's settings (:meth:`c_settings`) as given; ``"stateless"``, those plus the backend's
        :attr:`~amortcvx.backends.BackendInfo.stateless_settings`, under which one object serves every instance with
        no setup or reset between solves: SCS with a fixed scale (:attr:`scs_scale` when calibrated) and no Anderson
        acceleration, OSQP with ``rho`` fixed (at the fitted :attr:`osqp_rho` when calibrated); ``"stop"`` (SCS),
        the stateless settings (the short run adds ``max_iters``, :meth:`persistent_solver`)."""
        if mode not in BACKEND_C_MODES[self.backend]:
            raise ValueError(f"mode must be one of {BACKEND_C_MODES[self.backend]}; got {mode!r}")
        settings = self.c_settings()
        if mode in ("stateless", "stop"):
            settings.update(get_backend(self.backend).stateless_settings)
            if self.algorithm == "scs" and self.scs_scale is not None:
                settings.setdefault("scale", self.scs_scale)
        return settings

    def persistent_solver(self, theta: torch.Tensor | None = None, mode: str = "adaptive",
                          kind: str = "cold") -> ThreadedSolver:
        """The persistent C solver objects of this problem for ``mode`` (set up on first use, with
        :meth:`object_settings`), one per thread (:attr:`threads`, :class:`~amortcvx.backends.persistent.
        ThreadedSolver`): :class:`~amortcvx.backends.PersistentSolver` s, or for ``"stop"``
        :class:`~amortcvx.backends.persistent.StopPointSolver` s at the stop point of ``kind`` (``"warm"`` or
        ``"cold"``, :attr:`scs_stops`).

        The object is set up on the reference instance (see ``reference_params``); without one, on the mean of the
        flattened parameters ``theta`` (B, p) of the first batch solved, which is then kept for later calls.

        Raises:
            ValueError: ``"stop"`` without a stop point for ``kind`` (calibrate first, or set :attr:`scs_stops`).
        """
        stop = self.scs_stops.get(kind) if mode == "stop" else None
        if mode == "stop" and stop is None:
            raise ValueError(f"c_modes[{kind!r}] = 'stop' needs a stop point: calibrate, or set "
                             f"scs_stops[{kind!r}] (SCS iterations of the short run)")
        key = mode if stop is None else f"stop:{stop}"
        if key not in self._persistent:
            settings = self.object_settings(mode)
            ref = self._reference_instance(theta)

            def make() -> PersistentSolver | StopPointSolver:
                return (PersistentSolver(self.backend, ref, settings) if stop is None
                        else StopPointSolver(ref, settings, stop))
            self._persistent[key] = ThreadedSolver(make, self.threads)
        return self._persistent[key]

    def predict_warm_start(self, params: Mapping) -> WarmStartBatch:
        """Warm starts for the C solver: prediction, ``k`` refinement steps, safeguard, conversion.

        Args:
            params: parameter values (see :meth:`ParametricProblem.parameter_vector`).
        """
        return self._predict(params).batch

    def _predict(self, params: Mapping) -> _Prediction:
        """:meth:`predict_warm_start`, the data it was computed from, and the points to certify."""
        t0 = time.perf_counter()
        return self._predict_data(*self._canonical(params), t0)

    def _canonical(self, params: Mapping) -> tuple[torch.Tensor, ConeData | QPData, str]:
        """The flattened parameters of a batch, their canonical data, and the strategy of its batch size."""
        theta = self.pp.parameter_vector(params, dtype=self.dtype, device=self.device)
        if theta.requires_grad:  # tensors in a graph: the solver does not differentiate
            theta = theta.detach()
        return theta, self.pp.canonicalize_vector(theta), self.strategy_for(theta.shape[0])

    def _predict_data(self, theta: torch.Tensor, data: ConeData | QPData, strategy: str, t0: float) -> _Prediction:
        """:meth:`_predict` from the flattened parameters, their canonical data and the batch's strategy."""
        if strategy == "cold":  # plain cold starts: no torch work at all
            size = data.batch_size
            nan = np.full(size, np.nan)
            batch = WarmStartBatch([None] * size, np.full(size, self.model is not None), nan, nan,
                                   time.perf_counter() - t0)
            return _Prediction(batch, theta, data, None, np.zeros(size, dtype=bool), strategy)
        return self._predict_torch(theta, data, strategy, t0)

    @torch.no_grad()
    def _predict_torch(self, theta: torch.Tensor, data: ConeData | QPData, strategy: str, t0: float) -> _Prediction:
        """The torch path of :meth:`_predict`: the predictor's or the (refined) cold start's warm starts."""
        use_model = strategy == "learned"
        alg = make_algorithm(self.algorithm, data, self.settings, cache=self.factors)
        host = self._host_data(theta, data) if self.newton and self.finish == "certify" else None
        # the cold start refined by k steps: what every instance gets without a predictor, and the reference of
        # the "refined_cold" safeguard; the "cold" reference (and no safeguard) needs only the cold start's
        # first step
        refined_reference = self.safeguard and self.safeguard_reference == "refined_cold"
        cold_steps = self.k if (not use_model or refined_reference) else 0
        # a bare prediction (k = 0), polished or not, and the cold start are compared by the residual of the
        # optimality conditions where the algorithm has one: no step for either (the cold start's first step only
        # where the Newton finish needs it)
        by_optimality = use_model and self.k == 0 and alg.optimality is not None
        cold = run(alg, alg.init(), cold_steps, anderson=self.anderson).state
        cold_solved = cold_passed = cold_next = None
        if cold_steps > 0:
            cold_ws, cold_res = self._finish(alg, cold, self.space.warm_start(alg, cold))
            cold_ws, cold_solved, cold_passed = self._newton(data, cold_ws, alg, host)
        elif by_optimality:
            cold_ws, cold_res = None, alg.optimality(cold)
        else:  # the plain cold start and its first step's residual
            cold_next = alg.step(cold)
            cold_ws, cold_res = None, alg.residual(cold, cold_next)
            if not use_model and self.newton:  # k = 0: the refined cold start is the first step, Newton-refined
                cold_ws, cold_solved, cold_passed = self._newton(data, self.space.warm_start(alg, cold_next), alg,
                                                                           host)
        if not use_model:  # nothing to choose between
            fallback = torch.full_like(cold_res, self.model is not None, dtype=torch.bool)
            return self._package(alg, theta, data, strategy, cold_ws, fallback, cold_res, cold_res, t0,
                                 passed=cold_passed)
        z0 = self._bare_prediction(alg, theta)
        state = run(alg, self.space.to_state(alg, z0), self.k, anderson=self.anderson).state
        # the step from the refined state gives the residual (without polishing) and, for a bare SCS
        # prediction, also its warm start (the estimates one step on): taken once, only where used
        bare_after_step = self.k == 0 and self.space.prediction_after_step
        nxt = alg.step(state) if ((not self.polish and not by_optimality) or bare_after_step) else None
        if self.k > 0:
            ws = self.space.warm_start(alg, state)
        elif bare_after_step:
            ws = self.space.warm_start(alg, nxt)
        else:
            ws = self.space.prediction_warm_start(alg, z0)
        if by_optimality and not self.polish:
            res = alg.optimality(state)
        else:
            ws, res = self._finish(alg, state, ws, nxt, by_optimality)
        ws, solved, passed = self._newton(data, ws, alg, host)
        if self.newton and not bool(solved.all()):  # Newton is local: from the cold start where it failed here
            if cold_ws is None:  # from the cold start's first step (computed above for the reference residual)
                idx = torch.nonzero(~solved).flatten()
                cold_next = alg.step(cold) if cold_next is None else cold_next
                start = {k: v[idx] for k, v in self.space.warm_start(alg, cold_next).items()}
                part, part_solved, _ = self._newton(data.take(idx.cpu().numpy()), start)
                cold_solved = torch.zeros_like(solved).index_copy(0, idx, part_solved)
                alt = {k: v.index_copy(0, idx, part[k]) for k, v in ws.items()}
            else:
                alt = cold_ws
            use = cold_solved & ~solved
            ws = {k: torch.where(use[:, None], alt[k], v) for k, v in ws.items()}
            solved = solved | use
        bad = ~torch.isfinite(res)
        if self.safeguard:  # a point the Newton steps solved is kept whatever its residual before them
            bad |= (res > self.safeguard_ratio * cold_res) & ~solved
        if passed is not None:  # a start that passed is solved, so kept; only a non-finite residual replaces it
            passed = passed & ~bad.cpu().numpy()
        if cold_ws is not None:
            ws = {key: torch.where(bad.unsqueeze(1), cold_ws[key], v) for key, v in ws.items()}
            return self._package(alg, theta, data, strategy, ws, bad, res, cold_res, t0, passed=passed)
        return self._package(alg, theta, data, strategy, ws, bad, res, cold_res, t0, plain_cold=bad, passed=passed)

    @contextlib.contextmanager
    def _predictions_kept(self):
        """Within: each batch's bare prediction is computed once and kept (:meth:`_bare_prediction`). For the
        measurements that compare what follows the prediction: calibration's options (untimed), and the C modes
        (timed, where the prediction costs the same for every mode); never for timing strategies against each other.
        A predictor with many candidates spends most of a solve on its prediction (transport small, 4096 active
        sets: about 12 s for 200 instances)."""
        if self._predictions is not None:  # within another: its kept predictions serve this one too
            yield
            return
        self._predictions = {}
        try:
            yield
        finally:
            self._predictions = None

    def _bare_prediction(self, alg, theta: torch.Tensor) -> torch.Tensor:
        """``predict`` for the batch ``theta``; within :meth:`_predictions_kept`, once per batch."""
        if self._predictions is None:
            return predict(self.model, self.space, alg, theta, self.dtype)
        key = (tuple(theta.shape), hashlib.sha1(theta.detach().cpu().numpy().tobytes()).hexdigest())
        if key not in self._predictions:
            self._predictions[key] = predict(self.model, self.space, alg, theta, self.dtype)
        return self._predictions[key]

    def _finish(self, alg, state, ws: dict[str, torch.Tensor], nxt=None,
                by_optimality: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The warm starts ``ws`` read from ``state`` (refined), optionally polished, and their residuals.

        Without ``polish``: ``ws`` and the fixed-point residual of the next step from ``state``. With it: per
        instance the better of ``ws`` and its active-set polish, judged by the residual of the first step the C
        solver takes from each (:func:`start_residual`), or with ``by_optimality`` by their optimality residuals
        (:func:`point_optimality`: no linear solve), and that residual. ``nxt``: ``alg.step(state)`` when the
        caller has it already.
        """
        if not self.polish:
            return ws, alg.residual(state, alg.step(state) if nxt is None else nxt)
        polished = alg.polish(**ws)
        judge = point_optimality if by_optimality else start_residual
        r_ws, r_pol = judge(alg, ws), judge(alg, polished)
        take = r_pol < r_ws  # False where the polished point is not finite
        ws = {key: torch.where(take.unsqueeze(1), polished[key], v) for key, v in ws.items()}
        return ws, torch.where(take, r_pol, r_ws)

    def _candidates(self, alg, ws: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The point each warm start offers to the certificate, as float64 host arrays.

        SCS: ``(x, Pi_K*(y), Pi_K(s))``, the warm start with its duals and slacks projected onto their cones (SCS's
        iterates are there by construction; the test itself does not look). OSQP: ``(x, z, y)`` after one OSQP
        step from the warm start, exactly what C OSQP computes first from it, with ``l <= z <= u`` and ``y`` in the
        normal cone at ``z``.
        """
        if self.algorithm == "scs":
            point = {"x": ws["x"], "y": project_dual_cone(ws["y"], self.pp.cones),
                     "s": project_cone(ws["s"], self.pp.cones)}
        else:
            sol = alg.solution(alg.step(alg.init(x=ws["x"], y=ws["y"])))
            point = {"x": sol.x, "z": sol.z, "y": sol.y}
        return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in point.items()}

    def _newton(self, data: ConeData | QPData, ws: dict[str, torch.Tensor], alg=None,
                host: ConeData | QPData | None = None) -> _Refined:
        """The warm starts with the instances where ``newton`` Newton steps from them converge replaced by the
        refined point (:func:`amortcvx.iterations.kkt.newton_refine`; float64), and where that happened or the start
        needed none; the others are left as they are. Without ``newton``: ``ws`` unchanged, nothing solved.

        Given ``alg`` (bound to ``data``) and ``host`` (:meth:`_host_data`, passed only with the certified finish),
        a start that already passes the certificate takes no Newton step (it counts as solved, and ``passed`` says
        so): an exact prediction costs only the test, the Newton steps only the others (mpc large, 2000 stored
        instances, the uncorrected tangent: 54% of the starts pass as they are)."""
        size = ws["x"].shape[0]
        device = ws["x"].device
        if not self.newton:
            return _Refined(ws, torch.zeros(size, dtype=torch.bool, device=device), None)
        if host is None:
            return _Refined(*self._newton_chunks(data, ws), None)
        passed = self._certify(host, self._candidates(alg, ws))
        todo = np.flatnonzero(~passed)
        done = torch.from_numpy(passed).to(device)
        if todo.size == 0:
            return _Refined(ws, done, passed)
        if todo.size == size:
            return _Refined(*self._newton_chunks(data, ws), passed)
        idx = torch.from_numpy(todo).to(device)
        part, part_done = self._newton_chunks(data.take(todo), {k: v[idx] for k, v in ws.items()})
        return _Refined({k: v.index_copy(0, idx, part[k]) for k, v in ws.items()}, done.index_copy(0, idx, part_done),
                        passed)

    def _newton_chunks(self, data: ConeData | QPData, ws: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_newton_part` on chunks of at most :data:`NEWTON_CHUNK_BYTES` of work."""
        size = ws["x"].shape[0]
        n, m = self.pp.n, self.pp.m
        per_instance = n * n if not self.pp.dependent["A"] else n * (n + m)  # (B, n, n) factors; per-instance A
        chunk = max(1, NEWTON_CHUNK_BYTES // (8 * per_instance))
        parts = [self._newton_part(data.take(np.arange(i, min(size, i + chunk))) if size > chunk else data,
                                   {k: v[i:i + chunk] for k, v in ws.items()}) for i in range(0, size, chunk)]
        done = torch.cat([p[1] for p in parts])
        return {k: torch.cat([p[0][k] for p in parts]) for k in ws}, done

    def _certify(self, host: ConeData | QPData, point: dict[str, np.ndarray]) -> np.ndarray:
        """(B,) bool: whether each instance's point (:meth:`_candidates`) passes the C solver's test at the requested
        tolerance (``host``: the batch's data on the host, :meth:`_host_data`)."""
        return get_backend(self.backend).certify(host, **point, eps_abs=self._eps[0], eps_rel=self._eps[1])

    def _newton_tol(self) -> float:
        """Where the finish's Newton steps stop (:data:`NEWTON_FINISH_MARGIN`; ``kkt.REFINED`` where both
        tolerances are 0)."""
        positive = [e for e in self._eps if e > 0]
        return NEWTON_FINISH_MARGIN * min(positive) if positive else kkt.REFINED

    def _newton_part(self, data: ConeData | QPData, ws: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        d = kkt.auto(data)
        x, y = ws["x"].to(torch.float64), ws["y"].to(torch.float64)
        s = ws["s"].to(torch.float64) if "s" in ws else None
        tol = self._newton_tol()
        ref = kkt.newton_refine(d, kkt.point_from_solution(d, x, y, s), steps=self.newton, tol=tol,
                                passes=NEWTON_PASSES, near=None)
        done = kkt.converged(d, ref.norm, tol)
        refined = kkt.warm_start_fields(d, ref.point)
        return {k: torch.where(done[:, None], refined[k], v.to(torch.float64)).to(v.dtype) for k, v in ws.items()}, done

    def _package(self, alg, theta, data, strategy, ws, fallback, res, cold_res, t0, plain_cold=None,
                 passed=None) -> _Prediction:
        """Host-side warm starts; ``plain_cold`` marks instances that get no warm start at all, ``passed`` those
        whose warm start passed the certificate already (:meth:`_newton`)."""
        fallback = fallback.cpu().numpy()
        plain = np.zeros_like(fallback) if plain_cold is None else plain_cold.cpu().numpy()
        host = None if ws is None else {k: v.detach().to("cpu", torch.float64).numpy() for k, v in ws.items()}
        candidates = None
        if ws is not None and self.finish == "certify":
            candidates = self._candidates(alg, ws)
        warm: list[WarmStart | None] = [None] * fallback.shape[0]
        if host is not None:
            for i in np.flatnonzero(~plain):
                warm[i] = WarmStart(x=host["x"][i], y=host["y"][i], s=host["s"][i] if "s" in host else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        batch = WarmStartBatch(warm, fallback, res.cpu().numpy(), cold_res.cpu().numpy(), time.perf_counter() - t0,
                               host)
        warm_mask = ~plain if host is not None else np.zeros_like(plain)
        return _Prediction(batch, theta, data, candidates, warm_mask, strategy, passed)

    def calibrate(self, params: Mapping, *, margin: float = 1.0,
                  refinements: Sequence[AndersonSettings | None] | None = None, timed: bool = True,
                  newton_steps: Sequence[int] | None = None, polish: Sequence[bool] | None = None,
                  refine_steps: Sequence[int] | None = None, progress: bool = False) -> Calibration:
        """``self.configure(self.calibrated(params, ...))``: compute the configuration and apply it; returns it."""
        return self.configure(self.calibrated(params, margin=margin, refinements=refinements, timed=timed,
                                              newton_steps=newton_steps, polish=polish, refine_steps=refine_steps,
                                              progress=progress))

    def calibrated(self, params: Mapping, *, margin: float = 1.0,
                   refinements: Sequence[AndersonSettings | None] | None = None,
                   timed: bool = True, newton_steps: Sequence[int] | None = None,
                   polish: Sequence[bool] | None = None, refine_steps: Sequence[int] | None = None,
                   progress: bool = False) -> Calibration:
        """The configuration of this solver for its problem, measured on ``params``; the solver is left unchanged.

        ``params`` are held-out validation instances (not the test set). In order:

        1. The C solver's setup settings whose cost recurs with every setup (SCS's ``normalize``; where ``A`` or
           ``P`` depend on the parameters, SCS's linear solver or OSQP's ``scaling``; :meth:`choose_setup`). Then
           OSQP's initial ``rho`` (:meth:`choose_osqp_rho`), unless ``solver_settings`` sets it; then OSQP's
           relaxation ``alpha`` (:meth:`choose_osqp_alpha`, kept in ``c_setup``; ``rho`` walked again with it),
           unless ``solver_settings`` sets it. Every measurement below uses them.
        2. With a predictor: each of ``refine_steps`` (the refinement steps ``k``, e.g. ``(0, 10)``; default: the
           current ``k``), with each of ``refinements`` (e.g. ``(None, AndersonSettings())``; default: the current
           one; at ``k = 0`` plain only), each of ``newton_steps`` (e.g. ``(0, 4)``; default: the current
           ``newton``) and each of ``polish`` (e.g. :func:`polish_choices`; default: the current ``polish``), is
           tried with the learned warm starts, exact C iteration counts (certified instances count 0). The lowest
           median is kept: whether acceleration helps depends on the problem (it can cost iterations, see
           docs/iterations.md). Ties: with ``timed``, the fastest of the tied options by wall time, the fewest
           steps among those within the machine's noise of it (:meth:`choose_option`: a prediction that is exact
           alone needs no steps after it, whose cost then buys only the tail's C iterations), else the lowest mean,
           then the first. The predictor passes when
           ``median(learned) <= margin * median(cold)``, the cold start refined the same way (and finished with the
           same Newton steps).
        3. OSQP without an explicit ``check_termination``: the termination-check intervals of timed solves
           (:func:`~amortcvx.backends.osqp.check_interval`: the least expected iterations plus checks), for
           warm-started solves from the C iterations the kept start needed where it was not certified, for cold
           solves from exact counts of plain cold solves of ``params``.
           SCS without a ``scale`` in ``solver_settings``: the stateless object's scale (:meth:`choose_scs_scale`);
           SCS: the stop points of the ``"stop"`` mode (:func:`~amortcvx.backends.scs.stop_point`; warm from the
           kept start's counts, cold from exact counts of plain cold solves on the stateless object).
           Without explicit ``c_modes``: the modes of the persistent objects (:meth:`choose_c_modes`).
        4. ``timed=True``: fewer C iterations do not always mean less time (the prediction and the ``k`` torch
           steps cost time too): the strategies still allowed (the learned start if it passed 2, the cold start
           refined by ``k`` steps, the plain cold start) are timed and the fastest is kept
           (:meth:`choose_strategy`). Without it: the learned start if it passed 2, else the refined cold start.

        ``progress``: a progress bar over these steps (each option of 2 is one; with a costly predictor, the
        options' shared prediction and the strategies' timing take most of the time).

        Returns the :class:`Calibration`: every decision and the numbers behind it (``describe()``);
        :meth:`configure` applies it (and :meth:`save` keeps it).
        """
        refinement = [self.anderson] if refinements is None else list(refinements)
        if not refinement:
            raise ValueError("refinements must name at least one refinement (None: plain steps)")
        ks = [self.k] if refine_steps is None else list(refine_steps)
        if not ks or not all(_step_count(k) for k in ks):
            raise ValueError(f"refine_steps must hold nonnegative ints; got {refine_steps!r}")
        for opt in refinement:
            if opt is not None and not isinstance(opt, AndersonSettings):
                raise TypeError(f"refinements must hold None or AndersonSettings; got {type(opt).__name__}")
        steps = [self.newton] if newton_steps is None else list(newton_steps)
        if not steps or not all(_step_count(n) for n in steps):
            raise ValueError(f"newton_steps must hold nonnegative ints; got {newton_steps!r}")
        polishes = [self.polish] if polish is None else [bool(p) for p in polish]
        if not polishes:
            raise ValueError("polish must name at least one choice (False, True)")
        check_polish_choice(self.pp.form, self.pp.cones, any(polishes))
        # (k, anderson, newton, polish), the fewest steps first; Anderson over no steps is plain steps
        options = list(dict.fromkeys((k, a if k else None, n, p) for k in sorted(set(ks)) for p in polishes
                                     for n in steps for a in refinement))
        saved = (self.k, self.anderson, self.newton, self.polish, self.enabled, self.cold_refine, self.by_batch,
                 dict(self.c_modes), self.scs_scale, self.osqp_rho, self.check_termination, self.cold_check_termination,
                 dict(self.scs_stops), dict(self.c_setup), dict(self._persistent))
        from tqdm.auto import tqdm

        steps_total = (len(options) if self.model is not None else 0) + 3 + int(timed)
        bar = tqdm(total=steps_total, desc="calibrating", unit="step", disable=not progress, leave=False)
        try:
            self.by_batch = False  # every measurement runs the strategy it sets
            return self._measure(params, margin, options, timed, bar)
        finally:
            bar.close()
            (self.k, self.anderson, self.newton, self.polish, self.enabled, self.cold_refine, self.by_batch,
             self.c_modes, self.scs_scale, self.osqp_rho, self.check_termination, self.cold_check_termination,
             self.scs_stops, self.c_setup, self._persistent) = saved

    def _measure(self, params: Mapping, margin: float, options: list, timed: bool, bar) -> Calibration:
        """:meth:`calibrated`'s measurements; changes the solver (the caller restores it); ``bar`` (a tqdm bar)
        advances by one per step."""

        def step(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update()
        self.c_setup = self.choose_setup(params)
        if self.algorithm == "osqp" and "rho" not in self.solver_settings:
            self.osqp_rho = self.choose_osqp_rho(params)
        relaxation = self.choose_osqp_alpha(params)
        if relaxation is not None:
            self.c_setup = {**self.c_setup, "alpha": relaxation.alpha}
            if "rho" not in self.solver_settings:
                self.osqp_rho = relaxation.rho  # walked with it
        self._persistent.clear()  # rebuilt with the chosen settings on first use
        # the batch's bare prediction once, for every option (untimed) and the C modes (timed: it costs the same
        # for each); not for timing the strategies against each other below
        with self._predictions_kept():
            candidates, kept, learned = [], None, math.nan
            if self.model is not None:
                self.enabled = True
                for opt in options:
                    self.k, self.anderson, self.newton, self.polish = opt
                    out = self.solve(params, exact_iterations=True)
                    its = [r.iterations for r in out.results]
                    candidates.append((opt, float(np.median(its)), float(np.mean(its)), out))
                    step(f"learned start, {_label(opt, options)}")
                fewest = min(c[1] for c in candidates)
                tied = [c for c in candidates if c[1] == fewest]
                if timed and len(tied) > 1:
                    fastest = self.choose_option(params, [c[0] for c in tied])
                    first = next(c for c in tied if c[0] == fastest)
                else:
                    first = min(tied, key=lambda c: c[2])  # the lowest mean; the first of ties
                (self.k, self.anderson, self.newton, self.polish), learned, _, kept = first
            elif len(options) == 1:  # no predictor: the one refinement given is the cold start's
                self.k, self.anderson, self.newton, self.polish = options[0]
            self.enabled, self.cold_refine = False, True
            cold_out = self.solve(params, exact_iterations=True)
            cold = float(np.median([r.iterations for r in cold_out.results]))
            step("cold start")
            passed = self.model is not None and bool(learned <= margin * cold)
            self.enabled = passed
            used = kept if passed else cold_out  # the C iterations of the kept start where it was not certified
            warm_its = [max(1, r.iterations) for r, cert in zip(used.results, used.certified) if not cert]
            if self.algorithm == "osqp" and self._check_given is None:
                self.check_termination = None if not warm_its else check_interval(warm_its)
                self.cold_check_termination = check_interval(self._plain_cold_iterations(params))
            if self.algorithm == "scs" and "scale" not in self.solver_settings:
                self.scs_scale = self.choose_scs_scale(params)
                self._persistent = {k: v for k, v in self._persistent.items() if k == "adaptive"}  # the scale changed
            if self.algorithm == "scs":
                cold_its = self._plain_cold_iterations(params, self.object_settings("stateless"))
                self.scs_stops = {"warm": stop_point(warm_its) if warm_its else None, "cold": stop_point(cold_its)}
            step("C settings")
            if self._modes_given is None:
                self.c_modes = self.choose_c_modes(params)
            step("C modes")
        seconds = None
        strategy = "learned" if passed else ("refined_cold" if self.cold_refinable else "cold")
        if timed:
            allowed = (["learned"] if passed else []) + (["refined_cold"] if self.cold_refinable else []) + ["cold"]
            strategy, seconds = self.choose_strategy(params, allowed)
            step("strategy")
        timing_batch = int(self.pp.parameter_vector(params).shape[0]) if timed else None
        return Calibration(learned, cold, strategy == "learned", self.anderson,
                           tuple((_label(opt, options), med) for opt, med, _, _ in candidates),
                           dict(self.c_modes), strategy, seconds, self.scs_scale, self.osqp_rho, self.check_termination,
                           timing_batch, self.newton, self.cold_check_termination, dict(self.scs_stops), self.polish,
                           dict(self.c_setup), self.k)

    def _plain_cold_iterations(self, params: Mapping, settings: Mapping | None = None) -> list[int]:
        """Exact C iterations (at least 1) of plain cold solves of the first :data:`COLD_COUNT_SAMPLE` instances of
        ``params``: fresh objects with ``settings`` (default :meth:`c_settings`)."""
        data = self.pp.canonicalize(params, dtype=torch.float64, device="cpu")
        data = data if data.batch_size <= COLD_COUNT_SAMPLE else data.take(np.arange(COLD_COUNT_SAMPLE))
        out = solve_batch(data.instances(), self.backend, settings=self.c_settings() if settings is None else settings,
                          exact_iterations=True, workers=self.workers)
        return [max(1, r.iterations) for r in out]

    def configure(self, calibration: Calibration) -> Calibration:
        """Apply a :class:`Calibration` (from :meth:`calibrated`, possibly of a saved solver): refinement, strategy,
        C solver modes and settings; the persistent C objects are rebuilt on next use. Returns it."""
        if not isinstance(calibration, Calibration):
            raise TypeError(f"configure takes a Calibration; got {type(calibration).__name__}")
        self.anderson = calibration.anderson
        self.newton = calibration.newton
        if calibration.k is not None:
            self.k = calibration.k
        if calibration.polish is not None:
            check_polish_choice(self.pp.form, self.pp.cones, calibration.polish)
            self.polish = calibration.polish
        self.use_strategy(calibration.strategy or ("learned" if calibration.enabled else "refined_cold"))
        if calibration.c_modes is not None:
            self.c_modes = dict(calibration.c_modes)
        self.scs_scale, self.osqp_rho = calibration.scs_scale, calibration.osqp_rho
        self.c_setup = dict(calibration.c_setup or {})
        if calibration.scs_stops is not None:
            self.scs_stops = dict(calibration.scs_stops)
        if self._check_given is None:
            self.check_termination = calibration.check_termination
            self.cold_check_termination = calibration.cold_check_termination
        self._persistent.clear()
        self.calibration = calibration
        self.by_batch = calibration.cost_model() != {}
        return calibration

    @property
    def calibration(self) -> Calibration | None:
        """The last :meth:`calibrate`'s (or :meth:`configure`'s) outcome; None before."""
        return self._calibration

    @calibration.setter
    def calibration(self, calibration: Calibration | None) -> None:
        self._calibration = calibration
        self._fastest: dict[int, str | None] = {}  # batch size -> calibration.strategy_for(batch size)

    def strategy_for(self, batch: int) -> str:
        """The start a call of ``batch`` instances gets: after :meth:`configure` with a timed calibration, the
        strategy fastest at that batch size (:meth:`Calibration.strategy_for`, computed once per batch size); else
        :attr:`strategy`."""
        if self.by_batch and self._calibration is not None:
            chosen = self._fastest.get(batch)
            if chosen is None and batch not in self._fastest:
                if len(self._fastest) >= 64:  # many batch sizes: keep the memo small
                    self._fastest.clear()
                chosen = self._fastest[batch] = self._calibration.strategy_for(batch)
            if chosen is not None and (chosen != "learned" or self.model is not None):
                return chosen
        return self.strategy

    @property
    def strategy(self) -> str:
        """The start instances get now (:data:`STRATEGIES`), from ``enabled``, ``cold_refine`` and ``k``."""
        if self.model is not None and self.enabled:
            return "learned"
        return "refined_cold" if self.cold_refinable and self.cold_refine else "cold"

    @property
    def cold_refinable(self) -> bool:
        """Whether the refined cold start differs from the plain one: ``k`` torch steps, or the Newton finish."""
        return self.k > 0 or self.newton > 0

    def use_strategy(self, strategy: str) -> None:
        """Set ``enabled`` and ``cold_refine`` so that instances get ``strategy`` (:data:`STRATEGIES`)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
        if strategy == "learned" and self.model is None:
            raise ValueError("strategy 'learned' needs a predictor")
        self.enabled = strategy == "learned"
        self.cold_refine = strategy != "cold"
        self.by_batch = False  # an explicit choice holds for every batch size

    def choose_strategy(self, params: Mapping, allowed: Sequence[str] = STRATEGIES, *, repeats: int = 2,
                        single: int = 16) -> tuple[str, dict[str, tuple[float, float]]]:
        """The fastest of ``allowed`` strategies in wall time, measured on ``params`` (validation instances).

        Each is timed (best of ``repeats`` interleaved rounds) per instance at batch 1 (the first ``single`` instances,
        one call each) and at the whole batch in one call; the kept one has the smallest worse-of-the-two ratio to the
        fastest at each batch size, so it is good for low-latency single calls and for batches alike. Every strategy
        answers at the same tolerance; only the time differs. Returns ``(strategy, {strategy: (ms at batch 1, ms at the
        batch)})``; sets nothing (see :meth:`use_strategy`).
        """
        saved = (self.enabled, self.cold_refine, self.by_batch)
        size, rows = self._single_rows(params, single)
        best = {strategy: [math.inf, math.inf] for strategy in allowed}
        live = list(allowed)
        try:
            for strategy in allowed:  # first use: persistent objects, caches
                self.use_strategy(strategy)
                self.solve(rows[0])
            for _ in range(repeats):  # interleaved rounds: the machine's load drifts
                for strategy in live:
                    self.use_strategy(strategy)
                    for j, (calls, count) in enumerate(((rows, len(rows)), ([params], size))):
                        t0 = time.perf_counter()
                        for call in calls:
                            self.solve(call)
                        best[strategy][j] = min(best[strategy][j], 1e3 * (time.perf_counter() - t0) / count)
                scores = _strategy_scores(best)
                live = [s for s in live if scores[s] <= STRATEGY_DROP * min(scores.values())]
        finally:
            self.enabled, self.cold_refine, self.by_batch = saved
        scores = _strategy_scores(best)
        return min(scores, key=scores.get), {strategy: (t[0], t[1]) for strategy, t in best.items()}

    def _single_rows(self, params: Mapping, single: int) -> tuple[int, list[dict]]:
        """The batch size of ``params`` and its first ``single`` instances, one per call (batch-1 timings)."""
        batched = _as_batch(self.pp, params)
        size = int(self.pp.parameter_vector(params).shape[0])
        rows = [{name: value[i:i + 1] if value.shape[0] > 1 else value for name, value in batched.items()}
                for i in range(min(single, size))]
        return size, rows

    def choose_option(self, params: Mapping, options: Sequence[tuple], *, repeats: int = 2, single: int = 16) -> tuple:
        """The fastest in wall time of calibration ``options`` ``(k, anderson, newton, polish)`` for the learned
        start, whose C iteration medians tied (:meth:`calibrated`). Timed like :meth:`choose_strategy`: per instance
        at batch 1 (the first ``single`` instances, one call each) and at the whole batch, best of ``repeats``
        interleaved rounds after one untimed call each; the first option (they come the fewest steps first) whose
        worse-of-the-two ratio to the fastest is within :data:`OPTION_TIE` of the smallest wins. Within
        :meth:`_predictions_kept` only what follows the prediction is timed (the prediction costs the same for every
        option). Sets nothing (the caller sets the kept one)."""
        size, rows = self._single_rows(params, single)

        def run(option: tuple, calls: list) -> Callable[[], None]:
            def call() -> None:
                self.k, self.anderson, self.newton, self.polish = option
                for one in calls:
                    self.solve(one)
            return call

        saved = (self.k, self.anderson, self.newton, self.polish, self.enabled, self.cold_refine, self.by_batch)
        try:
            self.use_strategy("learned")
            best = _interleaved_best({(i, j): run(option, calls) for i, option in enumerate(options)
                                      for j, calls in enumerate((rows, [params]))}, 1, repeats)
        finally:
            (self.k, self.anderson, self.newton, self.polish, self.enabled, self.cold_refine, self.by_batch) = saved
        times = {i: (best[i, 0] / len(rows), best[i, 1] / size) for i in range(len(options))}
        scores = _strategy_scores(times)
        fastest = min(scores.values())
        return options[next(i for i in range(len(options)) if scores[i] <= OPTION_TIE * fastest)]

    def choose_scs_scale(self, params: Mapping) -> float:
        """The fixed scale of the stateless SCS object: the one of fewest cold iterations on ``params`` (validation
        instances; :func:`~amortcvx.backends.persistent.stateless_scale`, starting from the settings' scale). A
        stateless object keeps its scale for every solve, so it should start at a good one. Sets nothing."""
        if self.algorithm != "scs":
            raise ValueError(f"the stateless scale is SCS's; this solver runs {self.algorithm!r}")
        return stateless_scale(*self._measured(params), self.c_settings()).value

    def choose_c_modes(self, params: Mapping, *, repeats: int = 2) -> dict[str, str]:
        """The faster mode (:data:`C_MODES`) for warm-started and for cold timed C solves, measured on ``params``
        with the current settings (SCS's stateless scale: :meth:`choose_scs_scale`; OSQP's fixed ``rho``:
        :meth:`choose_osqp_rho`).

        Warm: ``solve(params)`` (timed mode) with each mode for the warm-started instances; cold: cold solves of the
        same instances on each mode's object. Best of ``repeats`` wall times each, in interleaved rounds
        (:func:`_interleaved_best`), after :data:`~amortcvx.backends.persistent.RACE_CALLS` untimed calls (the
        objects set up, the threads' race settled: each mode is timed at its own best of one object and parts on
        threads). The batch's bare prediction is computed once for all of
        them (:meth:`_predictions_kept`: it costs the same whatever the mode). Both modes answer at the same
        tolerance; only speed differs. Returns the modes; sets nothing.

        OSQP's cold solves are not timed where no solve of ``params`` on the adaptive object changed ``rho``: that
        object and the stateless one (``rho`` fixed at the same value) then take the same iterates at the same
        cost (transport large, 12 instances, 4 interleaved rounds: 155 against 161 ms per instance; mpc large
        3.49 against 3.46 ms), so timing them measures only the machine's noise; the stateless one is kept, and
        the timed calls are saved (on transport large, by count, about 30 of calibration's 130 s).
        """
        saved = dict(self.c_modes)
        theta = self.pp.parameter_vector(params, dtype=torch.float64, device="cpu")
        data = self.pp.canonicalize_vector(theta)
        best = {}

        def in_mode(kind: str, mode: str) -> Callable[[], Any]:
            def run() -> None:
                self.c_modes = {**saved, kind: mode}
                if kind == "warm":
                    self.solve(params)
                else:
                    self.persistent_solver(theta, mode, "cold").solve(data)
            return run

        try:
            with self._predictions_kept():  # the prediction costs the same for every mode: computed once
                for kind in ("warm", "cold"):
                    if kind == "cold" and self.backend == "osqp" and not self._rho_adapts(theta, data):
                        best[kind] = "stateless"
                        continue
                    runs = {mode: in_mode(kind, mode) for mode in BACKEND_C_MODES[self.backend]
                            if mode != "stop" or self.scs_stops.get(kind) is not None}
                    times = _interleaved_best(runs, RACE_CALLS, repeats)
                    best[kind] = min(times, key=times.get)
        finally:
            self.c_modes = saved
        return best

    def _rho_adapts(self, theta: torch.Tensor, data: QPData) -> bool:
        """Whether OSQP's adaptive cold object changed ``rho`` in any cold solve of ``data``."""
        out = self.persistent_solver(theta, "adaptive", "cold").solve(data)
        return any((r.stats or {}).get("rho_updates", 0) > 0 for r in out)

    def solve(self, params: Mapping, *, exact_iterations: bool = False) -> AmortizedResult:
        """Predict, refine, certify, and solve the rest with the C solver at ``solver_settings``.

        Every answer meets the requested tolerance by the solver's own termination test: run in float64 by the
        certificate (``certified``) or by the C solver, warm-started. Warm-started instances that do not end
        ``optimal`` are solved again cold when the safeguard is on.

        Args:
            params: parameter values (one instance or a batch).
            exact_iterations: count C iterations exactly, each instance on a fresh solver object (slower: for
                tables and benchmarks). By default (timed mode) the C solves run on the persistent solver object
                and report the iterations the solver itself reports.
        """
        t_start = time.perf_counter()
        theta, data, strategy = self._canonical(params)
        if strategy == "cold" and not exact_iterations:
            return self._solve_cold(theta, data, t_start)
        pred = self._predict_data(theta, data, strategy, t_start)
        t0 = time.perf_counter()
        data = self._host_data(theta, data)
        size = data.batch_size
        certified = np.zeros(size, dtype=bool)
        results: list[SolveResult | None] = [None] * size
        rest = np.arange(size)
        if pred.candidates is not None:
            certified = pred.warm & self._certified(data, pred)
            for i, r in zip(np.flatnonzero(certified), self._certified_results(data, pred.candidates, certified)):
                results[i] = r
            rest = np.flatnonzero(~certified)
        retried = np.zeros(size, dtype=bool)
        if rest.size:
            warm = pred.warm if rest.size == size else pred.warm[rest]
            solved = self._c_solve(pred, data, rest, warm, exact_iterations)
            if self.safeguard and warm.any():
                redo = [j for j, r in enumerate(solved) if warm[j] and r.status != Status.OPTIMAL]
                if redo:
                    again = self._c_solve(pred, data, rest[redo], np.zeros(len(redo), dtype=bool), exact_iterations)
                    for j, r in zip(redo, again):
                        first = solved[j]
                        solved[j] = r._replace(iterations=first.iterations + r.iterations,
                                               setup_time=first.setup_time + r.setup_time,
                                               solve_time=first.solve_time + r.solve_time)
                        retried[rest[j]] = True
            if rest.size == size:  # every instance went to the C solver, in order
                results = solved
            else:
                for i, r in zip(rest.tolist(), solved):
                    results[i] = r
        return AmortizedResult(self._cvxpy_sign(results), pred.batch.fallback, retried, pred.batch.seconds,
                               time.perf_counter() - t0, certified, pred.warm.copy(), pred.strategy == "learned",
                               self.pp)

    def _solve_cold(self, theta: torch.Tensor, data: ConeData | QPData, t_start: float) -> AmortizedResult:
        """:meth:`solve` where every instance gets the plain cold start (the strategy of this batch size, timed
        mode): one call of the persistent cold object, nothing else. The general path gives the same answers with
        the torch path's bookkeeping around them, which cost about 12 us per call (portfolio small, batch 1, SCS
        and OSQP: 66 -> 59 and 61 -> 55 us against the hand-written loop's 53 and 58 us)."""
        t0 = time.perf_counter()
        results = self._cvxpy_sign(self._cold_c_solve(theta, self._host_data(theta, data)))
        # fallback (every instance, where there is a model), retried, certified, warm_started: rows of one array
        flags = np.zeros((4, len(results)), dtype=bool)
        flags[0] = self.model is not None
        return AmortizedResult(results, flags[0], flags[1], t0 - t_start, time.perf_counter() - t0, flags[2], flags[3],
                               False, self.pp)

    def _host_data(self, theta: torch.Tensor, data: ConeData | QPData) -> ConeData | QPData:
        """The canonical data as the certificate and the C solvers take it: exact float64 on the host (``data``
        itself where the solver computes in float64 on the CPU)."""
        if self.dtype != torch.float64 or self.device.type != "cpu":
            return self.pp.canonicalize_vector(theta.to("cpu", torch.float64))
        return data

    def _cvxpy_sign(self, results: list[SolveResult]) -> list[SolveResult]:
        """The results with CVXPY's objective sign (a maximization's canonical problem minimizes ``-f``)."""
        sign = self.pp.objective_sign
        return results if sign == 1.0 else [r._replace(objective=sign * r.objective) for r in results]

    def _cold_c_solve(self, theta: torch.Tensor, data: ConeData | QPData) -> list[SolveResult]:
        """Every instance of ``data`` from the plain cold start, in one call of the persistent cold object (OSQP: at
        the cold solves' termination-check interval)."""
        check = self.cold_check_termination if self.algorithm == "osqp" else None
        return self.persistent_solver(theta, self.c_modes["cold"], "cold").solve(data, check_termination=check,
                                                                                  checked=True)

    def _c_solve(self, pred: _Prediction, data: ConeData | QPData, index: np.ndarray, warm: np.ndarray,
                 exact_iterations: bool) -> list[SolveResult]:
        """C solves of the instances ``index`` (warm-started where ``warm``)."""
        if exact_iterations:
            starts = [pred.batch.warm_starts[i] if w else None for i, w in zip(index, warm)]
            return solve_batch([data.instance(int(i)) for i in index], self.backend, warm_starts=starts,
                               settings=self.c_settings(), exact_iterations=True, workers=self.workers)
        sub = data if index.size == data.batch_size else data.take(index)
        if not warm.any():  # every instance cold: one call on the cold object
            return self._cold_c_solve(pred.theta, sub)
        # each kind on its own object, with its own termination-check interval
        pos, cold = np.flatnonzero(warm), np.flatnonzero(~warm)
        arrays = None if pred.batch.arrays is None else {k: v[index[pos]] for k, v in pred.batch.arrays.items()}
        check = self.check_termination if self.algorithm == "osqp" else None
        parts = [(pos, self.persistent_solver(pred.theta, self.c_modes["warm"], "warm").solve(
            sub if pos.size == index.size else sub.take(pos), arrays, check_termination=check, checked=True))]
        if cold.size:
            parts.append((cold, self._cold_c_solve(pred.theta, sub.take(cold))))
        out: list[SolveResult | None] = [None] * index.size
        for where, part in parts:
            for j, r in zip(where, part):
                out[j] = r
        return out

    def _certified(self, data: ConeData | QPData, pred: _Prediction) -> np.ndarray:
        """(B,) bool: whether each instance's candidate passes the certificate; those that passed it in the prediction
        (``pred.passed``) are not tested again."""
        done = np.zeros(data.batch_size, dtype=bool) if pred.passed is None else pred.passed
        rest = np.flatnonzero(~done)
        if rest.size == 0:
            return done.copy()
        sub = data if rest.size == data.batch_size else data.take(rest)
        point = {k: v if rest.size == data.batch_size else v[rest] for k, v in pred.candidates.items()}
        out = done.copy()
        out[rest] = self._certify(sub, point)
        return out

    def _certified_results(self, data: ConeData | QPData, point: dict[str, np.ndarray],
                           mask: np.ndarray) -> list[SolveResult]:
        """SolveResults of the certified instances (status optimal, 0 C iterations, message ``"certified"``)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return []
        sub = data if idx.size == data.batch_size else data.take(idx)
        x = point["x"][idx]
        objective = objectives(sub, x)
        s = point.get("s")
        return [SolveResult(x=x[j], y=point["y"][i], s=None if s is None else s[i], status=Status.OPTIMAL,
                            iterations=0, setup_time=0.0, solve_time=0.0, objective=float(objective[j]),
                            message="certified")
                for j, i in enumerate(idx)]


def _label(option: tuple, options: Sequence[tuple]) -> str:
    """:func:`option_label` of a calibration option ``(k, anderson, newton, polish)``, naming ``k`` where
    ``options`` offer several."""
    k, anderson, newton, polish = option
    return option_label(anderson, newton, polish, k if len({o[0] for o in options}) > 1 else None)


def _interleaved_best(runs: Mapping[Any, Callable[[], Any]], untimed: int, repeats: int) -> dict[Any, float]:
    """Per key, the shortest wall time of its run in ``repeats`` interleaved rounds (every run once per round, in
    turn: the machine's load drifts, and timing one run after the other lets a load change decide), after
    ``untimed`` calls of each (set-ups, caches, the threads' race)."""
    for call in runs.values():
        for _ in range(untimed):
            call()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for key, call in runs.items():
            t0 = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def _strategy_scores(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each strategy's worse-of-the-two ratio to the fastest (ms per instance at batch 1 and at the batch): the
    smallest is :meth:`AmortizedSolver.choose_strategy`'s choice (the first of ties)."""
    fastest = [min(t[j] for t in times.values()) for j in range(2)]
    return {k: max(t[j] / fastest[j] for j in range(2)) for k, t in times.items()}


def _geometric_median_stat(results: Sequence[SolveResult], key: str) -> float | None:
    """The geometric median of ``r.stats[key]`` over the results that report it finite and positive (the value an
    adaptive solver setting ends at: OSQP's rho), or None when none does."""
    values = [r.stats[key] for r in results
              if r.stats and np.isfinite(r.stats.get(key, np.nan)) and r.stats[key] > 0]
    return float(np.exp(np.median(np.log(values)))) if values else None


def _as_batch(pp: ParametricProblem, params: Mapping) -> dict[str, np.ndarray | torch.Tensor]:
    """``params`` by name with a leading batch dimension on every value (single instances get one)."""
    out = {}
    for key, value in params.items():
        name = key.name() if hasattr(key, "name") and callable(key.name) else key
        shape = pp.parameter_shapes[name]
        value = value if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
        out[name] = value[None] if tuple(value.shape) == shape else value
    return out


class _Prediction(NamedTuple):
    """What :meth:`AmortizedSolver._predict` hands to :meth:`AmortizedSolver.solve`."""

    batch: WarmStartBatch
    theta: torch.Tensor
    data: ConeData | QPData
    candidates: dict[str, np.ndarray] | None
    warm: np.ndarray
    strategy: str
    passed: np.ndarray | None = None  # instances whose candidate passed the certificate in the prediction


class _Refined(NamedTuple):
    """What :meth:`AmortizedSolver._newton` returns: the warm starts, where they are solved (passed as they were,
    or converged), and where they passed the certificate before any Newton step (None: not tested)."""

    ws: dict[str, torch.Tensor]
    solved: torch.Tensor
    passed: np.ndarray | None
