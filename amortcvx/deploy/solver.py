"""Deployment: predict warm starts, refine them in torch, finish with the real C solver, safely.

:class:`AmortizedSolver` runs, for a batch of parameters::

    theta --predictor--> z0 --k torch steps (batched)--> z_k --> (x, y[, s]) [--> polished, if better] --> C solver
    (fresh state, user tolerance) --> answer

With ``polish=True`` (LPs and QPs) each refined point is also solved exactly on its guessed active set
(:mod:`amortcvx.iterations.polish`), and each instance keeps whichever of the two points gives the smaller
fixed-point residual at the C solver's first step (:func:`start_residual`).

Safeguards (a learned warm start changes speed, never answers, and never makes a solve fail):

1. Before the C solve, each instance's fixed-point residual ``||T(z) - z||`` after ``k`` steps from the
   prediction is compared with a reference from the cold start; when ``residual(pred_k) > safeguard_ratio *
   reference`` (or it is not finite) the instance falls back to a cold start. With
   ``safeguard_reference="refined_cold"`` (default) the reference is the residual after the same ``k`` steps
   from the cold start and the fallback is that refined cold start (``2k`` torch steps per batch in all). With
   ``"cold"`` the reference is the residual of the cold start's first step and the fallback is the plain cold
   start (``k + 1`` steps: half the torch work, a weaker check). For ``k = 0`` the two are the same.
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

import copy
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from amortcvx.backends import SolveResult, Status, WarmStart, solve_batch
from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations.loop import AndersonSettings, run
from amortcvx.iterations.polish import check_polishable
from amortcvx.iterations.registry import DATA_FORMS, make_algorithm
from amortcvx.predictors.fixed_point import output_space
from amortcvx.predictors.model import WarmStartPredictor

BACKEND_OF = {"scs": "scs", "osqp": "osqp"}
"""Algorithm -> the C backend that finishes its solves."""

SAFEGUARD_REFERENCES = ("refined_cold", "cold")
"""What a refined prediction's residual is compared with (see the module docstring, safeguard 1)."""


class WarmStartBatch(NamedTuple):
    """Predicted warm starts for a batch.

    Attributes:
        warm_starts: one :class:`WarmStart` per instance; None means the plain cold start.
        fallback: bool (B,), True where the safeguard chose the (refined or plain) cold start over the
            prediction.
        residual: (B,) fixed-point residual after ``k`` steps from the prediction (from the cold start when
            there is no predictor); with polishing, the residual of the C solver's first step from the warm start.
        cold_residual: (B,) fixed-point residual of the cold-start reference: after ``k`` steps from the cold
            start, or of its first step (``safeguard_reference="cold"``, or the safeguard off).
        seconds: wall time of prediction + refinement + conversion for the whole batch.
    """

    warm_starts: list[WarmStart | None]
    fallback: np.ndarray
    residual: np.ndarray
    cold_residual: np.ndarray
    seconds: float


class AmortizedResult(NamedTuple):
    """Answers for a batch.

    Attributes:
        results: one :class:`SolveResult` per instance (from the C solver, at the requested tolerance).
        fallback: bool (B,), the safeguard used the (refined) cold start before solving.
        retried: bool (B,), the warm-started solve did not reach ``optimal`` and was redone cold.
        predict_seconds: time of prediction and refinement for the batch.
        solve_seconds: wall time of the C solves for the batch.
    """

    results: list[SolveResult]
    fallback: np.ndarray
    retried: np.ndarray
    predict_seconds: float
    solve_seconds: float


class Calibration(NamedTuple):
    """Outcome of :meth:`AmortizedSolver.calibrate`: medians of exact C iterations and the decisions.

    Attributes:
        learned_median, cold_median: medians with the learned warm starts (chosen refinement) and with the
            (refined) cold start.
        enabled: whether the predictor is used.
        anderson: the refinement kept (None: plain steps).
        candidates: ``(refinement label, learned median)`` of every refinement tried, in order.
    """

    learned_median: float
    cold_median: float
    enabled: bool
    anderson: AndersonSettings | None = None
    candidates: tuple[tuple[str, float], ...] = ()


def start_residual(alg, warm_start: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) fixed-point residual of the first step from a warm start (the step the C solver takes first)."""
    state = alg.init(**warm_start)
    return alg.residual(state, alg.step(state))


def refinement_label(anderson: AndersonSettings | None) -> str:
    """``"plain"`` or ``"anderson(memory=M)"``, for reports."""
    return "plain" if anderson is None else f"anderson(memory={anderson.memory})"


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
        solver_settings: settings of the C solver (tolerances, ...), passed to the backend.
        safeguard: enable the residual check and the cold retry (see the module docstring).
        safeguard_ratio: allowed ratio of predicted to cold residual.
        safeguard_reference: ``"refined_cold"`` or ``"cold"`` (see the module docstring).
        device, dtype: where prediction and refinement run.
        workers: processes for the C solves (``backends.solve_batch``).
    """

    def __init__(self, pp: ParametricProblem, model: WarmStartPredictor | None = None, *,
                 algorithm: str | None = None, settings=None, k: int = 0, anderson: AndersonSettings | None = None,
                 polish: bool = False, solver_settings: Mapping | None = None,
                 safeguard: bool = True, safeguard_ratio: float = 1.0, safeguard_reference: str = "refined_cold",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64, workers: int | None = 1):
        if model is not None:
            if model.meta.fingerprint != pp.fingerprint:
                raise ValueError(f"the predictor was trained for problem {model.meta.fingerprint}, not for this "
                                 f"problem ({pp.fingerprint})")
            if algorithm is not None and algorithm != model.meta.algorithm:
                raise ValueError(f"the predictor is for {model.meta.algorithm!r}, not {algorithm!r}")
            algorithm = model.meta.algorithm
            if settings is None:
                settings = model.meta.algorithm_settings()
        if algorithm not in DATA_FORMS:
            raise ValueError(f"algorithm must be one of {sorted(DATA_FORMS)}; got {algorithm!r}")
        if DATA_FORMS[algorithm] != pp.form:
            raise ValueError(f"algorithm {algorithm!r} needs a problem of form {DATA_FORMS[algorithm]!r}; "
                             f"got {pp.form!r}")
        if k < 0:
            raise ValueError(f"k must be nonnegative; got {k}")
        if anderson is not None and not isinstance(anderson, AndersonSettings):
            raise TypeError(f"anderson must be None or an AndersonSettings; got {type(anderson).__name__}")
        if polish and pp.form == "cone":
            check_polishable(pp.cones)
        self.pp, self.algorithm, self.settings, self.k, self.anderson = pp, algorithm, settings, k, anderson
        self.polish = bool(polish)
        self.backend = BACKEND_OF[algorithm]
        self.solver_settings = dict(solver_settings or {})
        if safeguard_reference not in SAFEGUARD_REFERENCES:
            raise ValueError(f"safeguard_reference must be one of {SAFEGUARD_REFERENCES}; got {safeguard_reference!r}")
        self.safeguard, self.safeguard_ratio = safeguard, safeguard_ratio
        self.safeguard_reference = safeguard_reference
        self.device, self.dtype, self.workers = torch.device(device), dtype, workers
        # a copy: the caller's module keeps its device, dtype and train/eval mode
        self.model = None if model is None else copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        self.space = output_space(algorithm)
        self.enabled = True  # see calibrate()

    def predict_warm_start(self, params: Mapping) -> WarmStartBatch:
        """Warm starts for the C solver: prediction, ``k`` refinement steps, safeguard, conversion.

        Args:
            params: parameter values (see :meth:`ParametricProblem.parameter_vector`).
        """
        return self._predict(params)[0]

    @torch.no_grad()
    def _predict(self, params: Mapping):
        """:meth:`predict_warm_start` and the canonical data it was computed from."""
        t0 = time.perf_counter()
        theta = self.pp.parameter_vector(params, dtype=self.dtype, device=self.device)
        data = self.pp.canonicalize_vector(theta)
        alg = make_algorithm(self.algorithm, data, self.settings)  # one factorization for every refinement
        use_model = self.model is not None and self.enabled
        # the cold start refined by k steps: what every instance gets without a predictor, and the reference of
        # the default safeguard; the "cold" reference (and no safeguard) needs only the cold start's first step
        refined_reference = self.safeguard and self.safeguard_reference == "refined_cold"
        cold_steps = self.k if (not use_model or refined_reference) else 0
        cold = run(alg, alg.init(), cold_steps, anderson=self.anderson).state
        if cold_steps > 0:
            cold_ws, cold_res = self._finish(alg, cold, self.space.warm_start(alg, cold))
        else:  # the plain cold start and its first step's residual
            cold_ws, cold_res = None, alg.residual(cold, alg.step(cold))
        if not use_model:  # nothing to choose between
            fallback = torch.full_like(cold_res, self.model is not None, dtype=torch.bool)
            return self._package(cold_ws, fallback, cold_res, cold_res, t0), data
        z0 = self.model(theta)
        state = run(alg, self.space.to_state(alg, z0), self.k, anderson=self.anderson).state
        ws = self.space.warm_start(alg, state) if self.k > 0 else self.space.prediction_warm_start(alg, z0)
        ws, res = self._finish(alg, state, ws)
        bad = ~torch.isfinite(res)
        if self.safeguard:
            bad |= res > self.safeguard_ratio * cold_res
        if cold_ws is not None:
            ws = {key: torch.where(bad.unsqueeze(1), cold_ws[key], v) for key, v in ws.items()}
            return self._package(ws, bad, res, cold_res, t0), data
        return self._package(ws, bad, res, cold_res, t0, plain_cold=bad), data

    def _finish(self, alg, state, ws: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The warm starts ``ws`` read from ``state`` (refined), optionally polished, and their residuals.

        Without ``polish``: ``ws`` and the fixed-point residual of the next step from ``state``. With it: per
        instance the better of ``ws`` and its active-set polish, judged by the residual of the first step the C
        solver takes from each (:func:`start_residual`), and that residual.
        """
        if not self.polish:
            return ws, alg.residual(state, alg.step(state))
        polished = alg.polish(**ws)
        r_ws, r_pol = start_residual(alg, ws), start_residual(alg, polished)
        take = r_pol < r_ws  # False where the polished point is not finite
        ws = {key: torch.where(take.unsqueeze(1), polished[key], v) for key, v in ws.items()}
        return ws, torch.where(take, r_pol, r_ws)

    def _package(self, ws, fallback, res, cold_res, t0, plain_cold=None) -> WarmStartBatch:
        """Host-side warm starts; ``plain_cold`` marks instances that get no warm start at all."""
        fallback = fallback.cpu().numpy()
        plain = np.zeros_like(fallback) if plain_cold is None else plain_cold.cpu().numpy()
        host = None if ws is None else {k: v.detach().to("cpu", torch.float64).numpy() for k, v in ws.items()}
        warm: list[WarmStart | None] = []
        for i in range(fallback.shape[0]):
            if host is None or plain[i]:
                warm.append(None)
            else:
                warm.append(WarmStart(x=host["x"][i], y=host["y"][i], s=host["s"][i] if "s" in host else None))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return WarmStartBatch(warm, fallback, res.cpu().numpy(), cold_res.cpu().numpy(), time.perf_counter() - t0)

    def calibrate(self, params: Mapping, *, margin: float = 1.0,
                  refinements: Sequence[AndersonSettings | None] | None = None) -> Calibration:
        """Keep the predictor only if it does not need more C iterations than the (refined) cold start.

        Solves ``params`` (held-out validation instances, not the test set) with exact counts. With
        ``refinements`` (e.g. ``(None, AndersonSettings())``), first solves them with the learned warm starts
        under each refinement and keeps the one with the lowest median (ties: the lowest mean, then the first) as
        ``self.anderson``:
        whether acceleration helps depends on the problem (it can cost iterations, see docs/iterations.md).
        Then sets ``self.enabled = median(learned) <= margin * median(cold)``, the cold start refined the same way.
        """
        if self.model is None:
            raise ValueError("calibrate needs a predictor")
        options = [self.anderson] if refinements is None else list(refinements)
        if not options:
            raise ValueError("refinements must name at least one refinement (None: plain steps)")
        for opt in options:
            if opt is not None and not isinstance(opt, AndersonSettings):
                raise TypeError(f"refinements must hold None or AndersonSettings; got {type(opt).__name__}")
        self.enabled = True
        candidates = []
        for opt in options:
            self.anderson = opt
            its = [r.iterations for r in self.solve(params).results]
            candidates.append((opt, float(np.median(its)), float(np.mean(its))))
        self.anderson, learned, _ = min(candidates, key=lambda c: (c[1], c[2]))  # min keeps the first of ties
        self.enabled = False
        cold = float(np.median([r.iterations for r in self.solve(params).results]))
        self.enabled = bool(learned <= margin * cold)
        return Calibration(learned, cold, self.enabled, self.anderson,
                           tuple((refinement_label(a), med) for a, med, _ in candidates))

    def solve(self, params: Mapping, *, exact_iterations: bool = True) -> AmortizedResult:
        """Predict, refine and solve a batch with the C solver at ``solver_settings``.

        Every result comes from the C solver; warm-started instances that do not end ``optimal`` are solved
        again cold when the safeguard is on.
        """
        pred, data = self._predict(params)
        if self.dtype != torch.float64 or self.device.type != "cpu":  # the C solvers get exact float64 data
            data = self.pp.canonicalize(params, dtype=torch.float64, device="cpu")
        instances = data.instances()
        t0 = time.perf_counter()
        results = solve_batch(instances, self.backend, warm_starts=pred.warm_starts,
                              settings=self.solver_settings, exact_iterations=exact_iterations,
                              workers=self.workers)
        retried = np.zeros(len(results), dtype=bool)
        if self.safeguard:
            redo = [i for i, (r, w) in enumerate(zip(results, pred.warm_starts))
                    if w is not None and r.status != Status.OPTIMAL]
            if redo:
                again = solve_batch([instances[i] for i in redo], self.backend, settings=self.solver_settings,
                                    exact_iterations=exact_iterations, workers=self.workers)
                for i, r in zip(redo, again):
                    first = results[i]
                    results[i] = r._replace(iterations=first.iterations + r.iterations,
                                            setup_time=first.setup_time + r.setup_time,
                                            solve_time=first.solve_time + r.solve_time)
                    retried[i] = True
        return AmortizedResult(results, pred.fallback, retried, pred.seconds, time.perf_counter() - t0)
