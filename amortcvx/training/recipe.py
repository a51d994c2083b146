"""An automatic training recipe: choose the predictor, its size, regularization, loss mix and the number of
training instances on validation data, within a time budget.

:func:`fit_predictor` is what ``AmortizedSolver.fit`` calls. With ``get_solved(n)`` returning the first ``n``
solved instances (the caller's sampler and cache; :meth:`RecipeSettings.validation_rows`, a seeded random draw
from the first ``val_size + search_size``, are the validation set, the other rows in order the training set), it

1. solves a validation subset cold on the C solver (exact iteration counts): the reference;
2. searches at ``search_size`` training instances, one change at a time from the default (an MLP, regression
   to the optimum): the predictor kind (MLP, :class:`~amortcvx.predictors.NeighborCorrection`, a correction
   on top of the nearest training instance's solution, or :class:`~amortcvx.predictors.NeighborTangent`, the
   same on top of that solution moved along the solution map's derivative there, computed by
   :func:`~amortcvx.training.tangents.solution_tangents`), a smaller network, weight decay, the loss mix
   (regression plus the fixed-point residual after ``k`` unrolled torch steps), and that expansion alone with no
   correction trained (``Candidate.correction``: tried, never chosen here, a companion below); a change is kept
   when it lowers
   the validation median of exact C iterations from the bare prediction (k = 0; ties: the mean); every
   training stops early on the validation loss (``TrainConfig.patience``) and its epochs are capped by the
   time left; on LPs and QPs also :class:`~amortcvx.predictors.NeighborActiveSet` (the nearest training
   instances' optimal active sets, each solved exactly on the query's data: nothing trained, a companion too) and
   :class:`~amortcvx.predictors.ClassifiedActiveSet` (the most probable active sets by a classifier of each
   row's side fitted to the training instances' active sets, solved the same way: a companion too); an active-set
   trial's solves start from the prediction of the best network trained on the same instances, its ``reference``
   (where there is one: a degenerate LP's active set gives the optimum nearest its start);
3. trains the chosen configuration on more instances (``sizes``, then doubling up to ``max_size``) while the
   budget allows and more data still pays (fewer validation iterations, or a validation loss 5% lower than at
   the previous size), and keeps the best; where more data stopped paying with budget left, trains the
   configuration twice as wide (up to :data:`MAX_WIDTH`) at that size and, where that pays, goes on growing the
   data with it; a kind whose best search trial took at most a quarter of the choice's time
   (:data:`COMPANION_SHARE`; in practice the neighbour kinds, whose stored instances grow denser with the data), and
   every candidate that trains nothing (``Candidate.correction`` False: the kinds of :data:`UNTRAINED_KINDS`, the
   uncorrected expansion), is trained at every size too (a trained one's epochs capped so that its training takes at
   most the curve's trial at that size), until a training of it takes longer than the curve's at the same size, and
   takes over the curve where it is better; every size trained gives a point
   of the learning curve (validation regression loss and median C iterations against the training-set size),
   which :class:`RecipeResult` prints; where the curve ends (its next training does not fit the budget, or more
   data stopped paying), the candidates that train nothing go on up the sizes alone while the budget allows (also
   those that stopped riding for their cost);
4. for each kind without a trained correction (``Candidate.correction`` False: the choice, or a companion), on its
   largest training set, tries every doubling of the number of candidates it predicts from (nearest training
   instances, or the classifier's most probable active sets: ``Candidate.choices``, up to :data:`MAX_CHOICES`) and
   keeps the best; that becomes the choice where it beats it;
   then, where the choice still does not beat the cold start on validation, the best trained kind of the search that
   no curve trained climbs a learning curve of its own (more data, then a wider network, as in 3) with the budget
   left, and becomes the choice where it is better (the search ranks kinds by what they do with few instances);
5. where the budget allows and the choice trains a network, trains the choice again with ``ensemble - 1`` other
   seeds and keeps the best of the members and their average (:func:`~amortcvx.predictors.ensemble_predictor`)
   by validation iterations (not where the choice trains nothing: its members would be alike).

Nothing in the recipe looks at the problem family: the same candidates and rules run on every problem, and the
choice is made on the validation instances only (never on the test set the caller measures on).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from amortcvx.backends import Status, WarmStart, solve_batch
from amortcvx.canon.parametric import ParametricProblem
from amortcvx.iterations.linalg import FactorCache
from amortcvx.iterations.loop import run
from amortcvx.iterations.polish import polish_allowed
from amortcvx.iterations.registry import make_algorithm
from amortcvx.predictors.classifier import ClassifiedActiveSet
from amortcvx.predictors.ensemble import ensemble_predictor
from amortcvx.predictors.fixed_point import output_space, predict
from amortcvx.predictors.model import SETTINGS, PredictorMeta, WarmStartPredictor
from amortcvx.predictors.neighbor import TANGENT_DTYPE, NeighborActiveSet, NeighborCorrection, NeighborTangent
from amortcvx.training.losses import LossWeights, losses
from amortcvx.training.tangents import solution_tangents
from amortcvx.training.trainer import (
    SolvedSet,
    TrainConfig,
    _batch_losses,
    chunk_algorithms,
    evaluate_losses,
    settings_dict,
    targets,
    train,
)

KINDS = ("mlp", "neighbor_correction", "neighbor_tangent", "neighbor_active_set", "active_set_classifier")
"""Predictor kinds the recipe chooses among (the :data:`ACTIVE_SET_KINDS` on LPs and QPs only: :func:`applies`)."""
ACTIVE_SET_KINDS = ("neighbor_active_set", "active_set_classifier")
"""Kinds whose candidates are active sets solved on the query's data (:func:`applies`)."""
TANGENT_BYTES = 2 ** 29
"""The most bytes (``anchors x d x p`` entries in :data:`~amortcvx.predictors.neighbor.TANGENT_DTYPE`) of a
:class:`~amortcvx.predictors.NeighborTangent`'s derivatives, 512 MiB: beyond, only the first instances of the
training set are its anchors (it still trains on all). Kalman small (``d = 234``, ``p = 24``): 23900 anchors; the
time share (:data:`TANGENT_SHARE`) usually ends them first (6.5 ms per anchor there). Measured there on 200
held-out instances, 1024 candidates: 39 / 35.5 / 33 median C iterations with 3561 / 8000 / 16000 anchors, of
66.5 cold (docs/training.md)."""
STORED_KINDS = ("neighbor_correction", "neighbor_tangent", "neighbor_active_set", "active_set_classifier")
"""Kinds that store their training set and search all of it for every instance they predict: a training's cost
per epoch grows with the square of the set size (the budget's estimates scale it so; portfolio, stop 28: a
neighbour correction took 76 s at 8000 instances and 79 s at 16000 with fewer epochs, where a linear estimate
allowed 45 s)."""
UNTRAINED_KINDS = tuple(core.core_kind for core in (NeighborCorrection, NeighborTangent, NeighborActiveSet,
                                                    ClassifiedActiveSet) if core.untrained)
"""Kinds without a correction network for :func:`~amortcvx.training.trainer.train` (``Candidate.correction`` must be
False; the cores that say so, :attr:`~amortcvx.predictors.neighbor.NeighborCorrection.untrained`): the
neighbours' active sets train nothing; the classifier's network is fitted to the stored active sets when
the core is built (:meth:`~amortcvx.predictors.ClassifiedActiveSet.fit`, in :func:`candidate_core`)."""
ACTIVE_SET_ENTRIES = 2 ** 18
"""The recipe tries the :data:`ACTIVE_SET_KINDS` where ``n (n + m)`` is at most this: each candidate's KKT solve holds a
dense ``n x n`` factor and ``m x n`` rows per instance (2 MiB here in float64; a batch of 1024 then needs 2 GiB for
one candidate at a time). The small sizes of the bundled and check families are within it (mpc small: 28160); mpc
large (1.45 million) and transport large (51 million) are not."""
COMPANION_SHARE = 0.25
"""A kind whose best search trial took at most this share of the chosen configuration's time (or that trains
nothing: ``Candidate.correction`` False) rides along the learning curve (trained at every size until one of its
trainings takes longer than the curve's at that size; where better, it takes over): see :func:`fit_predictor`. A
candidate that trains nothing rides whatever its time: its trial is the ranking and the validation counts, which
at the search size can take more than a quarter of a small network's training (sparse_pca, stop 41: the uncorrected
expansion 0.7 s against 1.1 s for the chosen 64 x 64 correction, so it stayed at 499 instances, its candidates
capped at 256 by that size, 121 of 256 validation iterations, with 542 s of the 600 unused)."""
TANGENT_SHARE = 0.25
"""The share of the time left that a trial may spend on the derivatives of a ``neighbor_tangent`` candidate (the
instances done by then are its anchors)."""
NEIGHBOR_CHOICES = 8
"""An uncorrected neighbour candidate (``Candidate.correction`` False) predicts from this many nearest training
instances to start with (the recipe may double it: :data:`MAX_CHOICES`), and the one of smallest residual is used
(:func:`~amortcvx.predictors.predict`): on mpc small with 4000 stored instances the tangent expansion's median C
iterations are 1 against 8 from the nearest one alone (mean 16 against 26, cold 37; where a constraint binds, median
38 against 56). A trained correction is fitted to the nearest one's input only, so trained candidates use that
one."""
CANDIDATE_RESERVE = 16
"""While an uncorrected candidate rides the learning curve, the curve leaves this many times that candidate's last
trial time (not counting new derivatives, nor an active-set classifier's fit: the step reuses both; transport, stop
42, before that rule: a classifier trial of 25.6 s at 32000 instances, most of it the fit, kept 410 s, so neither
active-set kind went on to 64000 and the recipe ended at 222 s of its 600) for the step after it that doubles its
candidates: on kalman the step's 7
trials (16 to 1024 candidates) took 10.4 s against 0.6 s for the 8-candidate trial (stop 33). Without it the curve
of a network whose loss kept falling took the budget first (kalman, stop 34: 42 of 66 validation iterations with
8 candidates at 16000 instances, no doubling)."""
MAX_CHOICES = 4096
"""The recipe tries an uncorrected candidate's :attr:`Candidate.choices` doubled from :data:`NEIGHBOR_CHOICES` up
to this many and keeps the count of fewest validation iterations. Measured (small sizes, SCS, eps 1e-4, 8000
training instances, 200 held-out instances, median C iterations from the bare prediction, for 8 / 64 / 256 / 1024
candidates): portfolio 12 / 10 / 8 / 1 (cold 17), kalman 54 / 47.5 / 47 / 39 (cold 66.5; derivatives at the first
3561 instances), lasso 34 / - / - / 30 (cold 39). With 16000 training instances and derivatives at all of them,
1024 / 2048 / 4096 / 8192 candidates: kalman 34.5 / 33 / 30 / 29 (0.52 / 0.50 / 0.45 / 0.44 of cold), lasso 27 / - /
26.5 / 26 (cold 39). Where the stored instances are dense enough, one of many neighbours often lies on the query's
piece of the solution map, and the optimality residual finds it. The ranking is a few sparse products per candidate
(:func:`~amortcvx.predictors.predict` ranks them in groups): for the 200 instances, with their C solves, 4.2 / 7.6 /
14.5 / 29.1 s for kalman's 1024 / 2048 / 4096 / 8192."""
MAX_WIDTH = 1024
"""The widest hidden layer the capacity step of :func:`fit_predictor` tries."""


@dataclass(frozen=True)
class Candidate:
    """One training configuration.

    Attributes:
        kind: ``"mlp"`` (theta -> z), ``"neighbor_correction"`` (nearest training solution + learned correction),
            ``"neighbor_tangent"`` (nearest training solution moved along the solution map's derivative there +
            learned correction), ``"neighbor_active_set"`` (LPs and QPs: the nearest training instances' optimal
            active sets, each solved exactly on the query's data; nothing trained,
            :class:`~amortcvx.predictors.NeighborActiveSet`) or ``"active_set_classifier"`` (LPs and QPs: the most
            probable active sets by a classifier of each row's side, fitted to the training instances' active
            sets when built, solved the same way; :class:`~amortcvx.predictors.ClassifiedActiveSet`).
        hidden: hidden widths (of the MLP, or of the correction network).
        weight_decay: Adam weight decay.
        residual: add the fixed-point residual after ``k`` unrolled steps to the regression loss (weighted so that
            both terms are 1 at the mean prediction).
        member: seed offset of the training (the members of an ensemble differ only in it).
        ensemble: members averaged (:func:`~amortcvx.predictors.ensemble_predictor`); 1: a single network.
        correction: for the kinds that store their training set (:data:`STORED_KINDS`), whether a correction
            network is trained on top of the neighbour's answer. False: nothing is trained, the prediction is the
            neighbour's answer itself (the plain nearest neighbour, or its first-order expansion for
            ``neighbor_tangent``), and the training fields are normalized away (``hidden=()``, no weight decay,
            no residual loss). On mpc the expansion alone starts SCS at the answer on the instances where no
            constraint binds (median 1 C iteration against 14 cold), where a trained correction, fitted to the
            other instances' larger errors, adds errors that cost 12-13 iterations (docs/training.md).
        choices: for an uncorrected candidate, how many nearest training instances it predicts from (the one
            of smallest residual is used: :func:`~amortcvx.predictors.predict`); the recipe starts at
            :data:`NEIGHBOR_CHOICES` and tries every doubling up to :data:`MAX_CHOICES`, keeping the best. A
            trained correction is fitted to the nearest one's input only and predicts from that one (the field is
            ignored).
    """

    kind: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    weight_decay: float = 0.0
    residual: bool = False
    member: int = 0
    ensemble: int = 1
    correction: bool = True
    choices: int = NEIGHBOR_CHOICES

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if not (isinstance(self.choices, int) and self.choices >= 1):
            raise ValueError(f"choices must be an int of at least 1; got {self.choices!r}")
        if self.ensemble < 1 or self.member < 0:
            raise ValueError(f"ensemble must be >= 1 and member >= 0; got {self.ensemble}, {self.member}")
        if self.correction and self.kind in UNTRAINED_KINDS:
            raise ValueError(f"{self.kind!r} has nothing to train: it takes correction=False")
        if not self.correction:
            if self.kind not in STORED_KINDS:
                raise ValueError(f"only the kinds {STORED_KINDS} predict without a trained correction; got "
                                 f"{self.kind!r}")
            for name, value in (("hidden", ()), ("weight_decay", 0.0), ("residual", False), ("member", 0),
                                ("ensemble", 1)):  # nothing is trained: the training fields do not apply
                object.__setattr__(self, name, value)

    def label(self) -> str:
        if not self.correction:
            more = "" if self.choices == NEIGHBOR_CHOICES else f", {self.choices} candidates"
            return f"{self.kind} uncorrected{more}"
        width = "x".join(str(h) for h in self.hidden)
        loss = "regression+residual" if self.residual else "regression"
        extra = (f" seed+{self.member}" if self.member else "") + (f" ensemble of {self.ensemble}"
                                                                   if self.ensemble > 1 else "")
        return f"{self.kind} {width} wd={self.weight_decay:g} {loss}{extra}"


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe's search space and limits (the defaults are the recipe; change them only to experiment).

    Attributes:
        val_size: validation instances (the first ones ``get_solved`` returns).
        eval_size: validation instances solved on the C solver per trial (exact counts).
        search_size: training instances of the configuration search.
        sizes: training-set sizes of the learning curve (those above ``search_size`` are tried in order while
            the budget allows and the last one paid).
        max_size: beyond the largest of ``sizes``, the curve goes on doubling up to this many training instances
            under the same rule (the budget, and whether the last size paid, usually stop it first).
        alternatives: the one-change-at-a-time steps of the search, in order (an uncorrected candidate is tried
            but never becomes the search's choice: it rides the learning curve as a companion).
        ensemble: members of the ensemble tried last (the chosen configuration and size, trained again with
            other seeds and averaged; the best of the members and the average is kept); 1: none.
        epochs, patience, batch_size, lr: training limits (epochs are also capped by the time left; early
            stopping on the validation loss usually ends a training first).
        dtype: training precision (the networks and their losses; the solved data, the derivatives of the
            tangent kind and the C iteration counts stay in float64). float32 trains an MLP 256x256 on mpc's
            8000 instances 1.8x faster per epoch than float64 and reaches the same validation loss (0.0036 after
            150 epochs) and C iterations.
    """

    val_size: int = 200
    eval_size: int = 100
    search_size: int = 500
    sizes: tuple[int, ...] = (250, 500, 1000, 2000, 4000, 8000, 16000)
    max_size: int = 128000
    alternatives: tuple[dict, ...] = ({"kind": "neighbor_correction", "hidden": (128, 128)},
                                      {"kind": "neighbor_tangent", "hidden": (128, 128)},
                                      {"hidden": (64, 64)}, {"weight_decay": 1e-4}, {"residual": True},
                                      {"kind": "neighbor_tangent", "correction": False},
                                      {"kind": "neighbor_active_set", "correction": False},
                                      {"kind": "active_set_classifier", "correction": False})
    ensemble: int = 3
    epochs: int = 1000
    patience: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    dtype: str = "float32"

    def __post_init__(self):
        if self.val_size < 2 or not 1 <= self.eval_size <= self.val_size:
            raise ValueError(f"need val_size >= 2 and 1 <= eval_size <= val_size; got {self.val_size}, "
                             f"{self.eval_size}")
        if self.search_size < 2 or any(n < 2 for n in self.sizes):
            raise ValueError("training-set sizes must be at least 2")
        if self.max_size < max(self.sizes + (self.search_size,)):
            raise ValueError(f"max_size ({self.max_size}) must be at least the largest training-set size")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1; got {self.ensemble}")

    def validation_rows(self, available: int, seed: int) -> np.ndarray:
        """The validation set's rows among ``get_solved``'s: ``val_size`` rows drawn at random (seeded) from the
        first ``val_size + search_size`` (``available`` where fewer were solved), in the drawn order (the first
        ``eval_size`` are the subset counted on the C solver). Drawn rather than the first rows, so that a source
        whose consecutive rows are correlated (closed-loop trajectories: mpc's sampler gives episodes of 20
        states) is validated over as much of it as the search trains on (35 episodes instead of 10)."""
        head = min(int(available), self.val_size + self.search_size)
        return np.random.default_rng(seed).permutation(head)[:self.val_size]

    def curve_sizes(self) -> list[int]:
        """The learning curve's sizes after the search: ``sizes`` without ``search_size``, in order, then the
        largest doubled while at most ``max_size``."""
        out = sorted(set(self.sizes) - {self.search_size})
        last = max(self.sizes + (self.search_size,))
        while 2 * last <= self.max_size:
            last *= 2
            out.append(last)
        return out


@dataclass(frozen=True)
class TrialResult:
    """One trained configuration and how it did on validation.

    Attributes:
        candidate: the configuration.
        num_train: training instances.
        val_regression: validation regression loss (normalized squared error of the prediction).
        val_median_iterations, val_mean_iterations: exact C iterations from the bare prediction (k = 0) on the
            validation subset.
        best_epoch, epochs: the epoch kept (early stopping) and the epochs run.
        seconds: wall time of the training and its evaluation.
        reference: for an :data:`ACTIVE_SET_KINDS` candidate, the label of the trained configuration (on the same
            instances) whose network is its forward pass and the start of its active sets' solves
            (``NeighborActiveSet``'s ``reference``); "" where none.
    """

    candidate: Candidate
    num_train: int
    val_regression: float
    val_median_iterations: float
    val_mean_iterations: float
    best_epoch: int
    epochs: int
    seconds: float
    reference: str = ""

    def label(self) -> str:
        """The candidate's label, and its reference network's where it has one."""
        return referenced_label(self.candidate, self.reference)

    def iterations(self) -> tuple[float, float]:
        """``(median, mean)`` validation C iterations: how the recipe orders trials (fewer is better)."""
        return self.val_median_iterations, self.val_mean_iterations


def referenced_label(cand: Candidate, reference: str) -> str:
    """``cand``'s label, with its reference network's (:attr:`TrialResult.reference`) where it has one."""
    return cand.label() + (f" from {reference}" if reference else "")


@dataclass(frozen=True)
class CurvePoint:
    """A point of the learning curve: ``configuration`` (a :meth:`Candidate.label`) trained on ``num_train``
    instances. The curve is the search's choice at every size it was trained on and, where the capacity step
    widened it, the wider network from the size where it took over."""

    num_train: int
    val_regression: float
    val_median_iterations: float
    configuration: str = ""


@dataclass(frozen=True)
class RecipeResult:
    """What :func:`fit_predictor` chose and why.

    Attributes:
        model: the chosen predictor (a :class:`WarmStartPredictor`, eval mode).
        candidate: its configuration.
        reference: its reference network's configuration (:attr:`TrialResult.reference`; "" where none).
        num_train: its training-set size.
        val_median_iterations: its validation median of exact C iterations from the bare prediction (k = 0).
        cold_median_iterations: the cold start's median on the same validation instances.
        val_rows: the validation instances' rows among ``get_solved``'s (:meth:`RecipeSettings.validation_rows`);
            the training set is the first ``num_train`` other rows (:meth:`training_rows`).
        trials: every configuration trained, in order.
        curve: the learning curve, by training-set size (:class:`CurvePoint`).
        seconds: wall time of the recipe (data included).
        budget_seconds: the budget it ran under.
        solver_settings: the C solver settings the iterations were counted with.
    """

    model: WarmStartPredictor
    candidate: Candidate
    num_train: int
    val_median_iterations: float
    cold_median_iterations: float
    val_rows: tuple[int, ...]
    trials: tuple[TrialResult, ...]
    curve: tuple[CurvePoint, ...]
    seconds: float
    budget_seconds: float
    solver_settings: dict
    reference: str = ""

    def label(self) -> str:
        """The chosen configuration's label (:meth:`TrialResult.label`)."""
        return referenced_label(self.candidate, self.reference)

    def training_rows(self) -> np.ndarray:
        """The chosen model's training instances' rows among ``get_solved``'s."""
        return _training_rows(np.asarray(self.val_rows), len(self.val_rows) + self.num_train)[:self.num_train]

    def format(self) -> str:
        """A plain-text report: the trials, the choice, and the learning curve."""
        lines = [f"recipe: {len(self.trials)} trainings in {self.seconds:.0f} s (budget {self.budget_seconds:.0f} s);"
                 f" cold start: median {self.cold_median_iterations:g} C iterations on validation",
                 f"{'configuration':48s} {'n':>5s} {'val loss':>9s} {'median it':>9s} {'epochs':>7s} {'s':>6s}"]
        for t in self.trials:
            lines.append(f"{t.label():48s} {t.num_train:5d} {t.val_regression:9.3g} "
                         f"{t.val_median_iterations:9g} {t.epochs:7d} {t.seconds:6.1f}")
        lines.append(f"chosen: {self.label()}, n = {self.num_train}: median {self.val_median_iterations:g} "
                     f"C iterations ({self.val_median_iterations / max(self.cold_median_iterations, 1e-12):.2f} of "
                     "cold)")
        if self.val_median_iterations >= self.cold_median_iterations:
            lines.append(f"NO CONFIGURATION BEAT THE COLD START on validation ({self.val_median_iterations:g} against "
                         f"{self.cold_median_iterations:g} median C iterations): expect calibration to keep the cold "
                         "start")
        lines.append("learning curve: n, validation loss, median C iterations, configuration")
        lines += [f"  {p.num_train:6d} {p.val_regression:9.3g} {p.val_median_iterations:9g}  {p.configuration}"
                  for p in self.curve]
        return "\n".join(lines)


def applies(kind: str, pp: ParametricProblem) -> bool:
    """Whether the recipe tries predictor ``kind`` on ``pp``: every kind, except the :data:`ACTIVE_SET_KINDS` where the
    problem is not an LP or QP (other cones than zero and nonnegative) or its KKT solves are too large
    (:data:`ACTIVE_SET_ENTRIES`)."""
    if kind not in ACTIVE_SET_KINDS:
        return True
    return polish_allowed(pp.form, pp.cones) and pp.n * (pp.n + pp.m) <= ACTIVE_SET_ENTRIES


def solved_prefix(get_solved: Callable[[int], SolvedSet], count: int, asked: int) -> tuple[SolvedSet, int]:
    """At least ``count`` solved rows from ``get_solved``, asking for ``asked`` instances first and past the failed
    ones until there are (rows count solved instances, fewer than those asked for where some failed: sparse_pca,
    stop 33, 693 of 694). Returns the solved set and the instances asked for.

    Raises:
        ValueError: the source gives no more solved instances before ``count``.
    """
    solved = get_solved(asked)
    while len(solved) < count:
        more = asked + count - len(solved)
        again = get_solved(more)
        if len(again) <= len(solved):
            raise ValueError(f"get_solved({more}) returned {len(again)} solved instances; {count} are needed")
        asked, solved = more, again
    return solved, asked


def _training_rows(val_rows: np.ndarray, available: int) -> np.ndarray:
    """The rows below ``available`` that are not validation rows, in order (training sets grow by prefixes)."""
    return np.setdiff1d(np.arange(int(available)), val_rows)


def c_iterations(pp: ParametricProblem, algorithm: str, model: nn.Module | None, solved: SolvedSet, *,
                 settings=None, solver_settings: dict | None = None, k: int = 0) -> np.ndarray:
    """Exact C iterations (fresh solver objects) from the predictions of ``model`` (None: cold starts).

    The prediction is refined by ``k`` plain torch steps (``k = 0``: the estimates of the step SCS takes first,
    see :attr:`OutputSpace.prediction_warm_start`) and handed to the C solver. A solve that does not end optimal
    counts the iterations it ran (so a bad predictor is not hidden).
    """
    theta = torch.as_tensor(solved.theta).to("cpu", torch.float64)
    data = pp.canonicalize_vector(theta)
    warm: list[WarmStart | None] = [None] * len(solved)
    if model is not None:
        space = output_space(algorithm)
        settings = model.meta.algorithm_settings() if settings is None and hasattr(model, "meta") else settings
        alg = make_algorithm(algorithm, data, settings)
        with torch.no_grad():
            z0 = predict(model, space, alg, theta)
            if k == 0:
                ws = space.prediction_warm_start(alg, z0)
            else:
                ws = space.warm_start(alg, run(alg, space.to_state(alg, z0), k).state)
        ws = {f: v.detach().cpu().numpy() for f, v in ws.items()}
        warm = [WarmStart(**{f: v[i] for f, v in ws.items()}) for i in range(len(solved))]
    results = solve_batch(data.instances(), algorithm, warm, settings=solver_settings, exact_iterations=True,
                          workers=1)
    return np.array([r.iterations for r in results], dtype=float)


def _normalization(pp, algorithm, settings, train_set: SolvedSet,
                   target: torch.Tensor | None = None) -> tuple[WarmStartPredictor, torch.Tensor]:
    """A predictor shell whose normalization is the one :func:`train` will fit on ``train_set``, and the
    set's :func:`~amortcvx.training.trainer.targets` it was fitted on (``target``, where the caller has them)."""
    space = output_space(algorithm)
    meta = PredictorMeta(fingerprint=pp.fingerprint, algorithm=algorithm, settings=settings_dict(settings),
                         num_params=pp.num_params, out_dim=space.dim(pp.n, pp.m))
    shell = WarmStartPredictor(meta, core=nn.Identity()).to(train_set.theta.dtype)
    if target is None:
        target = targets(pp, algorithm, settings, train_set, len(train_set))
    shell.fit_normalization(train_set.theta, target)
    return shell, target


class _RateKey(NamedTuple):
    """What a training's measured rate is kept by in :func:`fit_predictor` (:class:`Candidate` fields)."""

    kind: str
    residual: bool
    correction: bool
    hidden: tuple[int, ...]


def _network_size(hidden: tuple[int, ...], pp: ParametricProblem) -> int:
    """Weights of an MLP ``num_params -> hidden -> n + m`` (a training's cost per epoch grows with it)."""
    widths = (pp.num_params, *hidden, pp.n + pp.m)
    return sum(a * b for a, b in zip(widths, widths[1:]))


def scaled_rate(kind: str, rate: float, measured: int, n: int) -> float:
    """Seconds per epoch per training instance on ``n`` instances of a kind whose training took ``rate`` on
    ``measured``: the same for an MLP, ``rate * n / measured`` for the kinds that store their training set and
    search all of it for every instance (:data:`STORED_KINDS`)."""
    return rate * n / measured if kind in STORED_KINDS else rate


class AnchorDerivatives:
    """The derivatives of a :class:`~amortcvx.predictors.NeighborTangent` at the first instances of the recipe's
    training sets (they grow by prefixes), each computed once: ``self(train_part, shell)`` gives them at the first
    instances of ``train_part`` in the units of ``shell``'s normalization, at most :data:`TANGENT_BYTES` of them and
    what :data:`TANGENT_SHARE` of the time left before ``deadline`` allows. A set larger than any before extends
    them from where they end, once per size (where the time share stops an extension, later calls at that size
    take what is there). Kept in the units of the normalization they were first computed in."""

    def __init__(self, pp: ParametricProblem, algorithm: str, settings, deadline: float,
                 say: Callable[[str], None] = lambda message: None):
        self.pp, self.algorithm, self.settings, self.deadline, self.say = pp, algorithm, settings, deadline, say
        self.jac: torch.Tensor | None = None  # (anchors, d, p), in the units of in_std and out_std
        self.in_std: torch.Tensor | None = None
        self.out_std: torch.Tensor | None = None
        self.asked = 0  # the most anchors asked for so far
        self.seconds = 0.0  # spent computing them
        self.cap = 0  # anchors within TANGENT_BYTES (known at the first call)

    def __call__(self, train_part: SolvedSet, shell: WarmStartPredictor) -> torch.Tensor:
        row_bytes = int(shell.out_std.shape[0]) * self.pp.num_params * torch.finfo(TANGENT_DTYPE).bits // 8
        self.cap = max(2, TANGENT_BYTES // row_bytes)
        anchors = min(self.cap, len(train_part))
        if anchors > self.asked:
            t0 = time.perf_counter()
            self.asked = anchors
            have = 0 if self.jac is None else len(self.jac)
            left = max(self.deadline - time.perf_counter(), 0.0)
            new = solution_tangents(self.pp, self.algorithm, self.settings,
                                    train_part.subset(torch.arange(have, anchors)), shell.in_std, shell.out_std,
                                    dtype=TANGENT_DTYPE, deadline=time.perf_counter() + TANGENT_SHARE * left)
            if self.jac is None:
                self.jac, self.in_std, self.out_std = new, shell.in_std, shell.out_std
            else:
                new = renormalized(new, shell.in_std, shell.out_std, self.in_std, self.out_std)
                self.jac = torch.cat([self.jac, new])
            took = time.perf_counter() - t0
            self.seconds += took
            size = self.jac.numel() * self.jac.element_size() / 2 ** 20
            self.say(f"  (derivatives at the first {len(self.jac)} training instances, {len(new)} new in "
                     f"{took:.1f} s; {size:.0f} MiB)")
        return renormalized(self.jac[:anchors], self.in_std, self.out_std, shell.in_std, shell.out_std)

    def full(self) -> bool:
        """Whether the derivatives are at their memory cap (:data:`TANGENT_BYTES`): a larger set gives no more
        anchors."""
        return self.jac is not None and len(self.jac) >= self.cap

    def seconds_for(self, n: int) -> float:
        """The seconds a call with a set of ``n`` instances would spend on new derivatives, at the rate measured so
        far and within the time share (0 where it would compute none, or none were computed yet)."""
        if self.jac is None or min(self.cap, n) <= self.asked or self.seconds == 0.0:
            return 0.0
        left = max(self.deadline - time.perf_counter(), 0.0)
        return min((min(self.cap, n) - len(self.jac)) * self.seconds / len(self.jac), TANGENT_SHARE * left)


def candidate_core(cand: Candidate, pp, algorithm, settings, train_set: SolvedSet,
                   tangents: Callable[[SolvedSet, WarmStartPredictor], torch.Tensor] | None = None,
                   normalization: tuple[WarmStartPredictor, torch.Tensor] | None = None,
                   split: torch.Tensor | None = None,
                   fit_classifier: Callable[[ClassifiedActiveSet], None] | None = None) -> nn.Module | None:
    """The core module of ``cand`` for :func:`~amortcvx.training.trainer.train` (None: its MLP, which ``train``
    builds); ``tangents(train_set, shell)`` gives the derivatives at the first instances of the set (a
    ``neighbor_tangent``'s anchors; default: at every instance, :func:`solution_tangents`); ``normalization``:
    :func:`_normalization` of the set, where the caller has it; ``split``: the set's active sets (the
    :data:`ACTIVE_SET_KINDS`'; default :func:`training_splits`), where the caller has them. An
    ``active_set_classifier``'s classifier is fitted here by ``fit_classifier(core)`` (default:
    :meth:`~amortcvx.predictors.ClassifiedActiveSet.fit`)."""
    if cand.kind == "mlp":
        return None  # train() builds its MLP with cand.hidden
    shell, target = _normalization(pp, algorithm, settings, train_set) if normalization is None else normalization
    keys = (train_set.theta - shell.in_mean) / shell.in_std
    values = (target - shell.out_mean) / shell.out_std
    choices = 1 if cand.correction else cand.choices
    if cand.kind == "neighbor_correction":
        return NeighborCorrection(keys, values, hidden=cand.hidden, choices=min(choices, len(keys)))
    if cand.kind in ACTIVE_SET_KINDS:
        split = training_splits(pp, algorithm, settings, train_set) if split is None else split
        if cand.kind == "neighbor_active_set":
            return NeighborActiveSet(keys, values, split, choices=min(choices, len(keys)))
        core = ClassifiedActiveSet(keys, values, split, choices=min(choices, len(keys)))
        (fit_classifier or ClassifiedActiveSet.fit)(core)
        return core
    jac = (solution_tangents(pp, algorithm, settings, train_set, shell.in_std, shell.out_std, dtype=TANGENT_DTYPE)
           if tangents is None else tangents(train_set, shell)).to(values.device)
    return NeighborTangent(keys[:len(jac)], values[:len(jac)], jac, hidden=cand.hidden,
                           choices=min(choices, len(jac)))


SPLIT_CHUNK = 4096
""":func:`training_rows` reads this many instances at a time."""


class TrainingRows(NamedTuple):
    """What a kind that stores its training set reads from each instance's solution, on that instance's data."""

    target: torch.Tensor  # (N, d): the fixed-point targets (:func:`~amortcvx.training.trainer.targets`)
    split: torch.Tensor | None  # (N, m) int8: the optimal active sets (LPs and QPs; else None)


def training_rows(pp: ParametricProblem, algorithm: str, settings, train_set: SolvedSet) -> TrainingRows:
    """The targets and the optimal active sets (``alg.active_set.of`` at the solutions,
    :class:`~amortcvx.iterations.polish.ActiveSets`) of the instances of ``train_set``: one setup of the torch
    algorithm per :data:`SPLIT_CHUNK` instances (with a parameter in ``A``, a factorization per instance)."""
    space = output_space(algorithm)
    target, split = [], []
    for part, alg in chunk_algorithms(pp, algorithm, settings, train_set, SPLIT_CHUNK):
        target.append(space.target(alg, part.x, part.y, part.s))
        if alg.active_set is not None:
            fields = {"x": part.x, "y": part.y} | ({} if part.s is None else {"s": part.s})
            split.append(alg.active_set.of(**{k: v.to(part.theta) for k, v in fields.items()}))
    return TrainingRows(torch.cat(target), torch.cat(split) if split else None)


def training_splits(pp: ParametricProblem, algorithm: str, settings, train_set: SolvedSet) -> torch.Tensor:
    """The optimal active sets (N, m) int8 of the instances of ``train_set`` (:func:`training_rows`; LPs and QPs
    only)."""
    split = training_rows(pp, algorithm, settings, train_set).split
    if split is None:
        raise ValueError("active sets need an LP or QP (zero and nonnegative cones only)")
    return split


def renormalized(jac: torch.Tensor, in_std: torch.Tensor, out_std: torch.Tensor, new_in_std: torch.Tensor,
                 new_out_std: torch.Tensor) -> torch.Tensor:
    """Derivatives ``dz/du`` (N, d, p) in normalized units (``u = (theta - in_mean) / in_std``, ``z / out_std``) in
    the units of another normalization: ``jac * (out_std / new_out_std) * (new_in_std / in_std)`` (the means do not
    enter a derivative)."""
    return jac * (out_std / new_out_std).to(jac)[None, :, None] * (new_in_std / in_std).to(jac)[None, None, :]


def uncorrected_model(cand: Candidate, pp, algorithm, settings, train_set: SolvedSet,
                      tangents: Callable[[SolvedSet, WarmStartPredictor], torch.Tensor] | None = None,
                      rows: Callable[[SolvedSet], TrainingRows] | None = None,
                      fit_classifier: Callable[[ClassifiedActiveSet], None] | None = None,
                      reference: WarmStartPredictor | None = None) -> WarmStartPredictor:
    """The predictor of a candidate without a trained correction (``cand.correction`` False): its core
    (:func:`candidate_core`, the correction network left at zero) with the normalization :func:`train` would fit
    on ``train_set``, in float64, eval mode. No correction is trained (an ``active_set_classifier``'s classifier is
    fitted: ``fit_classifier``, see :func:`candidate_core`). ``rows(train_set)``: the set's :class:`TrainingRows`
    (default: :func:`training_rows`, read where needed). ``reference`` (:data:`ACTIVE_SET_KINDS` only): a predictor
    trained on ``train_set``, whose core (copied) becomes the core's ``reference`` (its forward pass, and where its
    active sets' solves start: :class:`~amortcvx.predictors.NeighborActiveSet`)."""
    if cand.correction:
        raise ValueError(f"{cand.label()} trains a correction; uncorrected_model builds the others")
    if reference is not None and cand.kind not in ACTIVE_SET_KINDS:
        raise ValueError(f"only the kinds {ACTIVE_SET_KINDS} take a reference network; got {cand.kind!r}")
    stored = None if rows is None else rows(train_set)
    normalization = _normalization(pp, algorithm, settings, train_set, None if stored is None else stored.target)
    model = normalization[0]
    model.core = candidate_core(cand, pp, algorithm, settings, train_set, tangents, normalization,
                                None if stored is None else stored.split, fit_classifier)
    if reference is not None:
        for mean, std in (("in_mean", "in_std"), ("out_mean", "out_std")):  # the same to the training precision
            scale = getattr(model, std)
            if any(bool(((getattr(reference, name).to(scale) - getattr(model, name)).abs() > 1e-4 * scale).any())
                   for name in (mean, std)):
                raise ValueError(f"the reference network has another normalization ({mean}, {std}): it must be trained "
                                 "on the same instances")
        model.core.reference = copy.deepcopy(reference.core)
    return model.to(torch.float64).eval()


def _residual_weight(pp, algorithm, settings, train_set: SolvedSet, k: int) -> float:
    """``1 / residual`` of the mean prediction after ``k`` steps: both loss terms start near 1."""
    shell, _ = _normalization(pp, algorithm, settings, train_set)
    space = output_space(algorithm)
    sub = train_set.subset(torch.arange(min(len(train_set), 256)))
    with torch.no_grad():
        alg = make_algorithm(algorithm, pp.canonicalize_vector(sub.theta), settings)
        z0 = shell.out_mean.expand(len(sub), -1)
        res = losses(alg, space, z0, z0, shell.out_std, k, LossWeights(regression=0.0, residual=1.0))["residual"]
    return 1.0 / max(float(res), 1e-12)


def _probe_rate(pp, algorithm, settings, config: TrainConfig, core: nn.Module | None, train_part: SolvedSet,
                num_val: int) -> float:
    """Seconds per training instance per epoch, estimated from one timed mini-batch (losses, backward, Adam step;
    the second of two, so one-time factorizations do not count) plus the validation pass of each epoch."""
    space = output_space(algorithm)
    meta = PredictorMeta(fingerprint=pp.fingerprint, algorithm=algorithm, settings=settings_dict(settings),
                         num_params=pp.num_params, out_dim=space.dim(pp.n, pp.m))
    dtype = getattr(torch, config.dtype)
    model = WarmStartPredictor(meta, core=copy.deepcopy(core), hidden=config.hidden).to(device=config.device,
                                                                                        dtype=dtype)
    batch = train_part.subset(torch.arange(min(config.batch_size, len(train_part)))).to(config.device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    factors = FactorCache()
    target = targets(pp, algorithm, settings, batch, len(batch), factors)  # once per training, as in train()
    elapsed = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        out = _batch_losses(pp, algorithm, settings, space, model, batch, config, factors, target)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        elapsed = time.perf_counter() - t0
    return elapsed / len(batch) * (1.0 + 0.5 * num_val / len(train_part))


def fit_predictor(pp: ParametricProblem, algorithm: str, get_solved: Callable[[int], SolvedSet], *,
                  budget_seconds: float = 600.0, k: int = 5, seed: int = 0, device: str = "cpu", settings=None,
                  solver_settings: dict | None = None, recipe: RecipeSettings = RecipeSettings(),
                  progress: bool = True) -> RecipeResult:
    """Choose and train a warm-start predictor on validation data within ``budget_seconds``.

    Args:
        pp: the compiled problem (form matching ``algorithm``).
        algorithm: ``"scs"`` or ``"osqp"`` (the torch iteration and the C solver that counts iterations).
        get_solved: ``get_solved(n)`` returns the first ``n`` solved instances (a :class:`SolvedSet`, possibly
            fewer if some failed); the first ``recipe.val_size`` are validation, the rest training.
        budget_seconds: wall-time budget for data, training and validation (the recipe stops starting new
            trainings when the estimate of the next one does not fit; a training's epochs are capped by the
            time left).
        k: unrolled torch steps of the residual loss.
        seed: seeds every training.
        device: where training runs.
        settings: the torch iteration's settings (defaults if None).
        solver_settings: C solver settings for counting iterations (e.g. ``{"eps_abs": 1e-4, "eps_rel": 1e-4}``).
        recipe: the search space and limits.
        progress: print one line per training.

    Returns:
        :class:`RecipeResult` (``.model`` is the chosen predictor; ``.format()`` the report).
    """
    t_start = time.perf_counter()
    deadline = t_start + float(budget_seconds)
    settings = SETTINGS[algorithm]() if settings is None else settings
    solver_settings = dict(solver_settings or {})
    say = print if progress else (lambda *_: None)
    dtype = getattr(torch, recipe.dtype)

    asked = {"n": 0, "seconds_per_instance": 0.0}  # the cost of new instances from get_solved, for estimates

    val_rows: np.ndarray | None = None  # drawn at the first call of data(), at search_size

    def data(n_train: int) -> tuple[SolvedSet, SolvedSet]:
        """The validation set and the first ``n_train`` training instances (fewer where the source ends)."""
        nonlocal val_rows
        t0 = time.perf_counter()
        want = recipe.val_size + n_train
        if val_rows is not None:  # every validation row, however small n_train
            want = max(want, int(val_rows.max()) + 1)
        # every validation row drawn in the search, past the instances the source failed (sparse_pca, stop 33: the
        # curve's 250 instances after the search's 500 asked for 694 instances, of which 693 were solved, for a
        # validation row 693)
        need = 0 if val_rows is None else int(val_rows.max()) + 1
        solved, want = solved_prefix(get_solved, need, want)
        solved = solved.to("cpu", torch.float64)  # train() casts to the training precision
        new = want - asked["n"]
        if new > 0:
            asked["seconds_per_instance"] = (time.perf_counter() - t0) / new
            asked["n"] = want
        if len(solved) < recipe.val_size + 2:
            raise ValueError(f"get_solved returned {len(solved)} solved instances; the recipe needs at least "
                             f"{recipe.val_size + 2}")
        if val_rows is None:
            val_rows = recipe.validation_rows(len(solved), seed)
        return solved.subset(val_rows), solved.subset(_training_rows(val_rows, len(solved))[:n_train])

    val, train_set = data(recipe.search_size)
    eval_set = val.subset(torch.arange(recipe.eval_size))
    cold = c_iterations(pp, algorithm, None, eval_set, settings=settings, solver_settings=solver_settings)
    cold_median = float(np.median(cold))
    say(f"recipe: {pp.n} variables, {pp.m} rows, {pp.num_params} parameters; cold start median "
        f"{cold_median:g} C iterations on {len(eval_set)} validation instances")
    factors = FactorCache()
    loss_cfg = TrainConfig(k=0, weights=LossWeights(), batch_size=256, progress=False, dtype=recipe.dtype,
                           device=device)
    # seconds per epoch per training instance (uncorrected candidates: seconds per instance of the whole trial,
    # mostly derivatives), and the set size it was measured at, by (kind, residual, correction, width): a wider
    # network's epochs cost more (kalman, stop 30: the capacity step's 512x512 network, timed by the 256x256
    # network's rate, ran 253 s and the recipe 718 s of its 600 s budget)
    rates: dict[_RateKey, tuple[float, int]] = {}

    def rate_key(cand: Candidate) -> _RateKey:
        return _RateKey(cand.kind, cand.residual, cand.correction, cand.hidden)

    def rate_at(cand: Candidate, n: int) -> float | None:
        """Seconds per epoch per training instance of ``cand`` on ``n`` instances, from its kind's last training
        (None before one): the kinds that store their training set (:data:`STORED_KINDS`) search all of it for
        every instance, so their rate grows in proportion to ``n``. An uncorrected candidate's rate is per
        instance of the whole trial (its derivatives: a fixed cost per instance)."""
        key = rate_key(cand)
        known = rates.get(key)
        if not cand.correction:
            return None if known is None else known[0]
        if known is None:  # the same training at another width: scaled by the network's size, from the largest
            # measured (a small network's time is mostly overhead: scaled up from 64x64, mpc_param_dyn's 512x512 at
            # 16000 instances came to 277 s, from its 256x256 there 95 s, and the capacity step was skipped)
            other = [k for k in rates if k._replace(hidden=key.hidden) == key]
            if not other:
                return None
            largest = max(other, key=lambda k: _network_size(k.hidden, pp))
            rate, measured = rates[largest]
            known = (rate * _network_size(key.hidden, pp) / _network_size(largest.hidden, pp), measured)
        return scaled_rate(cand.kind, *known, n)

    trials: list[TrialResult] = []
    models: dict[int, WarmStartPredictor] = {}
    parts: dict[int, SolvedSet] = {}  # the training set of each trial (an ensemble's members share one)

    def estimate(cand: Candidate, n: int) -> float:
        """Seconds for new instances up to ``n`` plus a training of ``cand`` on ``n`` (to ~3 patience windows)."""
        rate = rate_at(cand, n)
        if rate is None:  # the costliest training measured (an uncorrected trial's rate is per instance, not epoch)
            rate = max((r for key, (r, _) in rates.items() if key.correction), default=0.0)
        more = max(0, recipe.val_size + n - asked["n"]) * asked["seconds_per_instance"]
        return more + rate * n * (min(recipe.epochs, 3 * recipe.patience) if cand.correction else 1)

    tangents = AnchorDerivatives(pp, algorithm, settings, deadline, say)
    read: list[TrainingRows] = []  # the training sets' rows read so far (the sets grow by prefixes)

    def rows_of(part: SolvedSet) -> TrainingRows:
        """The :class:`TrainingRows` of ``part``, the first instances of the training order, each read once (reading
        them sets up the torch algorithm on the instances: with a parameter in ``A``, a factorization each;
        huber_fit, stop 37: about 10 s of every trial of the active sets at 16000 instances)."""
        if not read or len(part) > len(read[0].target):
            have = len(read[0].target) if read else 0
            new = training_rows(pp, algorithm, settings, part.subset(torch.arange(have, len(part))))
            read[:] = [new if not read else TrainingRows(
                torch.cat([read[0].target, new.target]),
                None if new.split is None else torch.cat([read[0].split, new.split]))]
        n = len(part)
        return TrainingRows(read[0].target[:n], None if read[0].split is None else read[0].split[:n])

    # an uncorrected trial's seconds without computing new derivatives or fitting a classifier (the candidate step's
    # trials on the same set reuse both)
    own_seconds: dict[int, float] = {}
    classifiers: dict[int, dict] = {}  # an active-set classifier's fitted weights by training-set size
    fitting = {"seconds": 0.0}  # seconds spent fitting classifiers

    def fit_classifier(core: ClassifiedActiveSet) -> None:
        """Fit ``core``'s classifier once per training-set size (the sets are prefixes of one order, and the fit is
        deterministic): the candidate step's trials of more candidates on one set reuse it."""
        n = core.keys.shape[0]
        if n in classifiers:
            core.classifier.load_state_dict(classifiers[n])
        else:
            t0 = time.perf_counter()
            core.fit()
            fitting["seconds"] += time.perf_counter() - t0
            classifiers[n] = copy.deepcopy(core.classifier.state_dict())

    def reserve() -> float:
        """Seconds the curve leaves for the candidate step (:data:`CANDIDATE_RESERVE` times each uncorrected kind's
        last trial)."""
        last = {trials[i].candidate.kind: own_seconds[i] for i in sorted(own_seconds)
                if trials[i].candidate.choices < MAX_CHOICES}
        return CANDIDATE_RESERVE * sum(last.values())

    def reference_of(cand: Candidate, train_part: SolvedSet) -> int | None:
        """For an active-set candidate, the trial of the trained network it starts from: the best by validation
        iterations among the trained trials on the same instances (their normalization is the candidate's; None where
        there is none, as past the curve's end). Degenerate LPs need it (an active set's solves are the solutions
        nearest the start); elsewhere it changes the first candidate only."""
        if cand.kind not in ACTIVE_SET_KINDS:
            return None
        same = [i for i in models if trials[i].num_train == len(train_part)]
        return min(same, key=lambda i: trials[i].iterations(), default=None)

    references: dict[int, int] = {}  # an active-set trial -> the trial of its reference network

    def trial(cand: Candidate, train_part: SolvedSet, limit: float | None = None) -> TrialResult:
        """``cand`` trained (within ``limit`` seconds where given, else the budget left) or built on ``train_part``,
        judged on validation and recorded."""
        t0 = time.perf_counter()
        ref = None
        if cand.correction:
            model, best_epoch, ran = trained(cand, train_part, t0, limit)
        else:  # no correction to train: the neighbours' answers (and derivatives), or the classifier's active sets
            spent = tangents.seconds + fitting["seconds"]
            ref = reference_of(cand, train_part)
            model = uncorrected_model(cand, pp, algorithm, settings, train_part, tangents, rows_of, fit_classifier,
                                      None if ref is None else models[ref])
            best_epoch, ran = 0, 0
            spent = tangents.seconds + fitting["seconds"] - spent
        rates[rate_key(cand)] = ((time.perf_counter() - t0) / max(ran, 1) / len(train_part), len(train_part))
        result = judged(cand, model, len(train_part), best_epoch, ran, t0,
                        "" if ref is None else trials[ref].label())
        if ref is not None:
            references[len(trials) - 1] = ref
        parts[len(trials) - 1] = train_part
        if not cand.correction:
            own_seconds[len(trials) - 1] = result.seconds - spent
        return result

    def trained(cand: Candidate, train_part: SolvedSet, t0: float,
                limit: float | None = None) -> tuple[WarmStartPredictor, int, int]:
        """``cand`` trained on ``train_part`` with its epochs capped by the time left (and by ``limit`` seconds): the
        model (CPU, eval mode), its best epoch and the epochs run."""
        left = deadline - t0 if limit is None else min(deadline - t0, limit)
        weights = LossWeights(regression=1.0, residual=_residual_weight(pp, algorithm, settings, train_part, k)
                              if cand.residual else 0.0)
        config = TrainConfig(k=k if cand.residual else 0, weights=weights, epochs=recipe.epochs,
                             patience=recipe.patience, batch_size=recipe.batch_size, lr=recipe.lr,
                             weight_decay=cand.weight_decay, seed=seed + cand.member, device=device,
                             dtype=recipe.dtype,
                             hidden=cand.hidden, progress=False)
        core = candidate_core(cand, pp, algorithm, settings, train_part, tangents)
        rate = rate_at(cand, len(train_part))
        if rate is None:  # no training of this kind yet: time one mini-batch
            rate = _probe_rate(pp, algorithm, settings, config, core, train_part, len(val))
        epochs = int(max(3, min(recipe.epochs, 0.8 * left / (rate * len(train_part)))))
        config = dataclasses.replace(config, epochs=epochs)
        out = train(pp, algorithm, train_part, val, config, settings=settings, core=core)
        return out.model.to("cpu").eval(), out.best_epoch, len(out.history)

    def judged(cand: Candidate, model: WarmStartPredictor, num_train: int, best_epoch: int, ran: int,
               t0: float, reference: str = "") -> TrialResult:
        """Validation loss and exact C iterations of a trained model, recorded as a trial."""
        reg = evaluate_losses(pp, algorithm, settings, model, val.to(device, dtype), loss_cfg, factors)["regression"]
        its = c_iterations(pp, algorithm, model, eval_set, settings=settings, solver_settings=solver_settings)
        result = TrialResult(cand, num_train, float(reg), float(np.median(its)), float(np.mean(its)),
                             best_epoch, ran, time.perf_counter() - t0, reference)
        trials.append(result)
        if cand.correction:  # an uncorrected model is rebuilt where chosen: its derivatives are most of the memory
            models[len(trials) - 1] = model
        say(f"  {result.label():48s} n={num_train:5d}  val loss {reg:8.3g}  median C it "
            f"{result.val_median_iterations:g} (mean {result.val_mean_iterations:.1f})  epochs {ran}  "
            f"{result.seconds:.1f} s")
        return result

    def better(a: TrialResult, b: TrialResult) -> bool:
        return a.iterations() < b.iterations()

    # 1. configuration search at search_size, one change at a time from the current best; an uncorrected candidate
    # is tried but not chosen here: it trains nothing that more data or width would improve beyond its stored
    # derivatives (mpc_param_dyn, stop 30: chosen by the mean at a tie of medians, its curve stopped at 2000
    # instances, where the MLP's had gone on to 64000 and 44.5 of 56), so it rides the curve as a companion, and
    # where it is the best at a size it becomes the choice without ending the curve
    best_i = 0
    trial(Candidate(), train_set)
    for change in recipe.alternatives:
        cand = dataclasses.replace(trials[best_i].candidate, **change)
        if cand == trials[best_i].candidate or not applies(cand.kind, pp):
            continue
        if time.perf_counter() + estimate(cand, len(train_set)) > deadline:
            say(f"  (budget: skipping {cand.label()})")
            continue
        if better(trial(cand, train_set), trials[best_i]) and cand.correction:
            best_i = len(trials) - 1
    chosen = trials[best_i].candidate

    # 2. learning curve: the chosen configuration on the other training-set sizes; a larger size replaces the
    # choice when it lowers the validation iterations. The curve keeps growing while more data pays: fewer
    # validation iterations, or a validation loss at least 5% lower than at the previous size (the loss is the
    # steadier signal; medians of C iterations on eval_size instances move in steps)
    def step_paid(result: TrialResult, before: TrialResult) -> bool:
        """Whether a step up (more data, or capacity) to ``result``, the last trial, paid: fewer validation
        iterations than the best so far (it then becomes the best), or a validation loss at least 5% lower than
        ``before``'s."""
        nonlocal best_i
        fewer = better(result, trials[best_i])
        if fewer:
            best_i = len(trials) - 1
        return fewer or result.val_regression < 0.95 * before.val_regression

    on_curve: list[int] = [best_i]  # the trials of the learning curve, in the order trained
    # companions: the best search trial of every other kind that trained in at most COMPANION_SHARE of the
    # choice's time; each is trained again at every size of the curve (a neighbour kind gains more from data than
    # the search size shows: its stored instances grow denser), and takes over the curve where it is better
    # (a kind with and without a trained correction count apart: the uncorrected expansion costs next to nothing)
    others: dict[tuple[str, bool], int] = {}
    for i, t in enumerate(trials):
        key = (t.candidate.kind, t.candidate.correction)
        if key != (chosen.kind, chosen.correction) and (key not in others or better(t, trials[others[key]])):
            others[key] = i
    # (a candidate that trains nothing rides in any case: its trial is the ranking and the validation counts, at any
    # size about as long as a small MLP's trial at the search size)
    companions = [trials[i].candidate for i in others.values()
                  if trials[i].seconds <= COMPANION_SHARE * trials[best_i].seconds
                  or not trials[i].candidate.correction]
    untrained = [c for c in companions if not c.correction]  # they go on alone where the curve ends (below)

    def grow(cand: Candidate, sizes: list[int], last: TrialResult,
             kept: Callable[[], float] = reserve) -> tuple[int | None, Candidate]:
        """Train ``cand`` (and the companions) at ``sizes`` in order while the budget allows (leaving ``kept()``
        seconds) and each size paid; returns the index of ``cand``'s trial where more data stopped paying (None where
        the budget, the sizes or the source ended the curve) and the configuration the curve ended with (a companion
        that took over)."""
        nonlocal best_i
        for n in sizes:
            if time.perf_counter() + estimate(cand, n) > deadline - kept():
                say(f"  (budget: no training on n={n})")
                return None, cand
            _, part = data(n)
            if n > recipe.search_size and len(part) <= last.num_train:
                say(f"  (no more solved instances than {last.num_train}: stopping the curve)")
                return None, cand  # get_solved has no more instances
            result = trial(cand, part)
            at = len(trials) - 1
            on_curve.append(at)
            if n <= recipe.search_size:  # a point of the curve below the search size, not a step up
                continue
            paid = step_paid(result, last)
            last = result
            for comp in list(companions):
                if time.perf_counter() + estimate(comp, n) > deadline - kept():
                    continue
                own = max(i for i, t in enumerate(trials) if t.candidate == comp)  # its last trial
                if comp.kind == "neighbor_tangent" and own != best_i and tangents.seconds_for(n) > result.seconds:
                    # not the best so far, and its new derivatives alone would take longer than the curve's training
                    # (mpc_param_dyn, stop 34: 77 s per 500 instances, three times, against MLP trainings of 18-21 s)
                    say(f"  ({comp.label()}'s derivatives at n={len(part)} would take longer than the curve's "
                        "training: it rides no further)")
                    companions.remove(comp)
                    continue
                # a rider's training gets at most the curve's own trial time at this size (kalman, stop 44: a
                # neighbour correction's patience ran 395 epochs in 201 s at 8000 instances against the curve's 41 s,
                # after 31 s at 4000; the expansion it rode beside had no budget left for 16000)
                if better(trial(comp, part, limit=result.seconds), trials[best_i]):
                    best_i = len(trials) - 1
                    if not comp.correction:
                        # the best so far, but it trains nothing that more data would improve beyond its stored
                        # derivatives: the curve goes on with its own configuration (mpc_param_dyn, stop 30: taking
                        # over by the mean at a tie of medians, the expansion stopped the curve at 2000 instances)
                        say(f"  ({comp.label()} is the best so far at n={len(part)}; the curve goes on)")
                        continue
                    say(f"  ({comp.label()} takes over the curve at n={len(part)})")  # a trained companion
                    companions.remove(comp)
                    on_curve.append(best_i)
                    cand, last, paid = comp, trials[-1], True
                elif trials[-1].seconds > result.seconds:
                    # no longer a cheap rider (a stored set's cost grows with the square of its size): at the
                    # next size it would take the budget of the curve's own training
                    say(f"  ({comp.label()} took longer than the curve at n={len(part)}: it rides no further)")
                    companions.remove(comp)
            if not paid:
                say(f"  (more data did not pay at n={result.num_train}: stopping the curve)")
                return at, cand
        return None, cand

    def sizes_after(num: int) -> list[int]:
        """The curve's sizes after the one a training set of ``num`` instances was asked at: where the source failed
        some instances, a set asked at ``n`` holds fewer (sparse_pca, stop 41: 1987 asked at 2000, where the sizes
        above 1987 began at 2000 again, gave no more instances and ended the expansion's sizes alone there)."""
        asked_at = min((n for n in {*recipe.curve_sizes(), recipe.search_size} if n >= num), default=num)
        return [n for n in recipe.curve_sizes() if n > asked_at]

    def climb(cand: Candidate, sizes: list[int], start: TrialResult,
              kept: Callable[[], float] = reserve) -> Candidate:
        """The learning curve of the trained configuration ``cand`` from its trial ``start``: :func:`grow` on
        ``sizes``, and, where more data stopped paying with budget left (the network may be what saturates: the
        search at search_size favours small ones), the configuration twice as wide at the largest size trained;
        where that pays, it becomes the configuration and its curve goes on to larger sizes. Returns the
        configuration the curve ended with."""
        stalled, cand = grow(cand, sizes, start, kept)
        while stalled is not None and max(cand.hidden) < MAX_WIDTH:  # (the curve's configuration is a trained one)
            at = trials[stalled]
            wide = dataclasses.replace(cand, hidden=tuple(min(MAX_WIDTH, 2 * h) for h in cand.hidden))
            if time.perf_counter() + estimate(wide, at.num_train) > deadline - kept():
                say(f"  (budget: no wider network at n={at.num_train})")
                break
            result = trial(wide, parts[stalled])
            if not step_paid(result, at):
                say(f"  (a wider network did not pay at n={at.num_train})")
                break
            on_curve.append(len(trials) - 1)
            stalled, cand = grow(wide, sizes_after(at.num_train), result, kept)
        return cand

    chosen = climb(chosen, recipe.curve_sizes(), trials[best_i])
    # the candidates that train nothing go on up the sizes alone where the curve ended (its training no longer fitted
    # the budget, or more data stopped paying for it), while the budget allows and leaves the candidate step its
    # reserve: they need only more solved instances (and an expansion its derivatives at them, within the time share
    # of AnchorDerivatives), and their stored instances only grow denser, which their
    # counts with few candidates do not show (huber_fit, stop 37: the active sets' validation medians with 8
    # candidates were 33 at 2000, 4000 and 8000 instances; on held-out instances, with 1024 candidates, 27 at 2000
    # and 24 at 8000, with 4096 at 8000, 1; in stop 36 the curve stopped at 4000 instances for the budget of its
    # next training and the recipe ended with 196 s of its 600 unused)
    for comp in untrained:  # also those that stopped riding for their cost: the curve no longer waits on them
        last = max(t.num_train for t in trials if t.candidate == comp)
        expansion = comp.kind == "neighbor_tangent"
        for n in sizes_after(last):
            if expansion and tangents.full():
                # its anchors are the instances with derivatives: a larger set adds none (robust_ls, stop 41: from
                # 13865 anchors at 16000 instances to 128000, the same predictor, the instances solved for nothing)
                say(f"  ({comp.label()}: its derivatives are at their memory cap, {tangents.cap} anchors; no larger "
                    "set)")
                break
            derivatives = tangents.seconds_for(n) if expansion else 0.0
            if time.perf_counter() + estimate(comp, n) + derivatives > deadline - reserve():
                say(f"  (budget: no trial of {comp.label()} on n={n})")
                break
            _, part = data(n)
            if len(part) <= last:
                break  # get_solved has no more instances
            if better(trial(comp, part), trials[best_i]):
                best_i = len(trials) - 1
            last = len(part)

    # 3. more candidates for each uncorrected kind (its trial on the largest set, chosen or riding along; the best kind
    # first): its count doubled up to MAX_CHOICES, every count tried (the medians can stay flat before they fall:
    # kalman 47.5 / 47 / 47 / 39 at 64 / 128 / 256 / 1024), the best kept; it becomes the choice where it beats it
    # (each trial reuses the stored derivatives: its cost is the ranking and the C counts)
    def rank(i: int) -> tuple[float, float, int]:
        return *trials[i].iterations(), -trials[i].num_train

    def start(riders: list[int]) -> int:
        """Where a kind's candidates are doubled: its largest stored set, the densest (they train nothing; their counts
        with few candidates do not show what more candidates find there: above)."""
        return max(riders, key=lambda i: trials[i].num_train)

    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(trials):
        if not t.candidate.correction:
            by_kind.setdefault(t.candidate.kind, []).append(i)
    for at in sorted((start(riders) for riders in by_kind.values()), key=rank):  # the best kind first
        base, part = trials[at], parts[at]
        count, last = base.candidate.choices, own_seconds[at]  # (the derivatives are there: not counted)
        while 2 * count <= min(MAX_CHOICES, base.num_train):
            count *= 2
            if time.perf_counter() + 2 * last > deadline:  # the trial before had half as many candidates
                say(f"  (budget: no trial of {count} candidates)")
                break
            result = trial(dataclasses.replace(base.candidate, choices=count), part)
            last = own_seconds[len(trials) - 1]
            if better(result, trials[at]):
                at = len(trials) - 1
        if better(trials[at], trials[best_i]):
            best_i = at

    # 3b. where nothing beats the cold start on validation, the best trained kind of the search that no curve trained
    # climbs a curve of its own with the budget left: the search at search_size ranks the kinds by what they do with
    # few instances, not by what they do with many (robust_ls, stop 52: the MLP 256x256 at 500 instances 45 validation
    # iterations against the tangent's 38, so its curve never ran, and the recipe ended with 200 s of its 600 unused
    # and a choice at 37 against the cold start's 33; an MLP 512x512 trained on 30,400 instances outside the recipe
    # gave 33 on the test instances, against 40 for the recipe's choice)
    if trials[best_i].val_median_iterations >= cold_median:
        climbed = {trials[i].candidate.kind for i in on_curve}
        fallback = [i for i, t in enumerate(trials) if t.candidate.correction and t.candidate.kind not in climbed]
        if fallback:
            first = min(fallback, key=lambda i: trials[i].iterations())
            say(f"  (no choice beats the cold start: {trials[first].candidate.label()} climbs its own curve)")
            companions.clear()
            on_curve.append(first)
            climb(trials[first].candidate, sizes_after(trials[first].num_train), trials[first], kept=lambda: 0.0)

    # 4. an ensemble: the chosen configuration at the chosen size trained again with other seeds and averaged
    # with the chosen model; the best of the members and their average by validation iterations is kept
    if recipe.ensemble > 1 and not trials[best_i].candidate.correction:
        say("  (the choice trains nothing, so its members would be alike: no ensemble)")
    elif recipe.ensemble > 1:
        base = trials[best_i]
        extra = recipe.ensemble - 1
        # members trained for fewer epochs than the choice (capped by the time left) only weaken the average:
        # start only when the measured cost of the choice, once per member, fits
        if time.perf_counter() + extra * max(base.seconds, estimate(base.candidate, base.num_train)) > deadline:
            say(f"  (budget: no ensemble of {recipe.ensemble})")
        else:
            t0 = time.perf_counter()
            part = parts[best_i]
            tried = [best_i]
            for j in range(1, recipe.ensemble):
                trial(dataclasses.replace(base.candidate, member=j), part)
                tried.append(len(trials) - 1)
            judged(dataclasses.replace(base.candidate, ensemble=recipe.ensemble),
                   ensemble_predictor([models[i] for i in tried]).eval(), base.num_train, base.best_epoch,
                   base.epochs, t0)
            tried.append(len(trials) - 1)
            for i in tried:  # the members alone are candidates too
                if better(trials[i], trials[best_i]):
                    best_i = i
    # by size; at the size where a wider network took over, the narrower one first
    curve = tuple(CurvePoint(trials[i].num_train, trials[i].val_regression, trials[i].val_median_iterations,
                             trials[i].candidate.label())
                  for i in sorted(on_curve, key=lambda i: (trials[i].num_train, i)))
    best = trials[best_i]
    ref = references.get(best_i)
    model = models[best_i] if best_i in models else uncorrected_model(best.candidate, pp, algorithm, settings,
                                                                      parts[best_i], tangents, rows_of,
                                                                      fit_classifier,
                                                                      None if ref is None else models[ref])
    result = RecipeResult(model=model, candidate=best.candidate, num_train=best.num_train, reference=best.reference,
                          val_median_iterations=best.val_median_iterations, cold_median_iterations=cold_median,
                          val_rows=tuple(int(i) for i in val_rows), trials=tuple(trials), curve=curve,
                          seconds=time.perf_counter() - t_start,
                          budget_seconds=float(budget_seconds), solver_settings=solver_settings)
    say(result.format())
    return result


def solved_source(pp: ParametricProblem, algorithm: str, params: dict[str, np.ndarray], *,
                  solver_settings: dict | None = None) -> Callable[[int], SolvedSet]:
    """A ``get_solved`` for :func:`fit_predictor` from a parameter batch, solved on demand in memory (tests,
    benchmarks; ``AmortizedSolver.fit`` passes its on-disk dataset instead).

    Instances are solved by the C solver at ``solver_settings`` (default: tight, eps 1e-8) the first time they
    are asked for; ``get_solved(n)`` returns the optimally solved ones among the first ``n``.
    """
    theta = pp.parameter_vector(params, dtype=torch.float64)
    settings = {"eps_abs": 1e-8, "eps_rel": 1e-8} if solver_settings is None else dict(solver_settings)
    done: list = []

    def get_solved(n: int) -> SolvedSet:
        n = min(int(n), theta.shape[0])
        if n > len(done):
            data = pp.canonicalize_vector(theta[len(done):n])
            done.extend(solve_batch(data.instances(), algorithm, None, settings=settings, exact_iterations=False,
                                    workers=1))
        ok = [i for i in range(n) if done[i].status == Status.OPTIMAL and np.all(np.isfinite(done[i].x))]
        x = torch.as_tensor(np.stack([done[i].x for i in ok]))
        y = torch.as_tensor(np.stack([done[i].y for i in ok]))
        s = torch.as_tensor(np.stack([done[i].s for i in ok])) if algorithm == "scs" else None
        return SolvedSet(theta[ok], x, y, s)

    return get_solved


__all__ = ["ACTIVE_SET_ENTRIES", "ACTIVE_SET_KINDS", "KINDS", "MAX_CHOICES", "STORED_KINDS", "UNTRAINED_KINDS",
           "AnchorDerivatives", "Candidate", "CurvePoint", "RecipeResult", "RecipeSettings", "TrainingRows",
           "TrialResult", "applies", "c_iterations", "candidate_core", "fit_predictor", "scaled_rate",
           "solved_prefix", "solved_source", "training_rows", "training_splits", "uncorrected_model"]
