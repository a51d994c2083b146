"""A trained classifier of an LP's or QP's optimal active set (``core_kind = "active_set_classifier"``).

:class:`~amortcvx.predictors.NeighborActiveSet` takes its candidate active sets from the stored instances: it is
exact where one of them lies on the query's piece of the solution map. Where the active set changes in many rows at
once from instance to instance, none does (active_set_qp small, 70 inequality rows: none of 200 held-out instances'
active sets among those of 16000 training instances; the nearest one's differs in 17 rows, median). A network that
says, for each row, on which side it is (lower bound active, inactive, upper bound active: the values of a split,
:class:`~amortcvx.iterations.polish.ActiveSets`) learns what decides each row, and its guesses combine into active
sets no training instance had: there 95% of the rows right, 3 rows wrong (median), and the exact active set among
the 256 most probable splits for half of the held-out instances, among the 1024 most probable for 70%.

The candidates are the ``choices`` most probable splits under the network's rows taken as independent: its most
probable side in every row, with the second most probable side in the rows of a subset of the
:func:`flip_rows` least certain rows (a row's cost of a flip: the log-probability it gives up), cheapest subsets
first. :func:`~amortcvx.predictors.predict` solves each on the query's data and keeps the one of smallest optimality
residual, exactly as for the neighbours' active sets (the classifier's most probable split first).

The core stores its training set like :class:`~amortcvx.predictors.NeighborActiveSet` (its forward pass, the
prediction of a caller without the problem's data, is the nearest stored solution or its ``reference`` network's
prediction, and each candidate's solve starts from that point; its splits are the classifier's training labels) and
fits its classifier on them (:meth:`ClassifiedActiveSet.fit`), by cross-entropy with early stopping on a tenth held
out.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from amortcvx.predictors.model import CORE_KINDS, mlp
from amortcvx.predictors.neighbor import NeighborActiveSet

CLASSES = (-1, 0, 1)
"""A row's sides, the values of a split: lower bound active, inactive, upper bound (or the row) active."""
CLASSIFIER_HIDDEN = (256, 256)
"""The classifier's hidden widths (active_set_qp small, 16000 instances: 94.8% of the rows right with 256 x 256,
95.1% with 512 x 512, at three times the training time)."""
FLIP_SPARE = 3
""":func:`flip_rows`: the candidates' flips are among the ``ceil(log2(choices)) + FLIP_SPARE`` least certain rows."""
SUBSET_ENTRIES = 2 ** 22
"""The most subset costs :func:`most_probable_flips` holds at once (rows of the batch at a time)."""


class ClassifiedActiveSet(NeighborActiveSet):
    """The ``choices`` most probable optimal active sets by a classifier of each row's side, each solved exactly on
    the query's data (LPs and QPs).

    Args:
        keys, values, splits: as for :class:`~amortcvx.predictors.NeighborActiveSet` (the splits are the classifier's
            labels; a row's sides never seen in them are never guessed).
        hidden: the classifier's hidden widths.
        chunk: as for :class:`~amortcvx.predictors.NeighborCorrection`.
        choices: the candidate active sets per instance (the most probable first).
        reference: as for :class:`~amortcvx.predictors.NeighborActiveSet` (the forward pass, and where each
            candidate's solve starts).
    """

    core_kind = "active_set_classifier"
    fixed_dtype = ("splits", "seen")  # int8 and bool

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, splits: torch.Tensor,
                 hidden: Sequence[int] = CLASSIFIER_HIDDEN, chunk: int = 4096, choices: int = 1,
                 reference: nn.Module | None = None):
        super().__init__(keys, values, splits, chunk=chunk, choices=choices, reference=reference)
        self.classifier_hidden = tuple(int(h) for h in hidden)
        self.register_buffer("seen", torch.stack([(self.splits == c).any(dim=0) for c in CLASSES], dim=1))
        self.classifier = mlp(keys.shape[1], len(CLASSES) * splits.shape[1], self.classifier_hidden)

    def config(self) -> dict:
        return {**super().config(), "classifier_hidden": list(self.classifier_hidden)}

    @classmethod
    def from_config(cls, config: dict) -> ClassifiedActiveSet:
        num, p, d, m = int(config["num"]), int(config["num_params"]), int(config["out_dim"]), int(config["rows"])
        return cls(torch.zeros(num, p), torch.zeros(num, d), torch.zeros(num, m, dtype=torch.int8),
                   hidden=config["classifier_hidden"], chunk=config["chunk"], choices=int(config.get("choices", 1)),
                   reference=cls.reference_from_config(config))

    def log_probs(self, u: torch.Tensor) -> torch.Tensor:
        """(B, m, 3): each row's log-probabilities of the sides :data:`CLASSES` (``-inf`` for sides the row never
        took in the training splits)."""
        weight = self.classifier[0].weight
        logits = self.classifier(u.to(weight.dtype)).view(u.shape[0], -1, len(CLASSES))
        return torch.log_softmax(logits.masked_fill(~self.seen, float("-inf")), dim=2)

    def split_groups(self, u: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        """The ``choices`` most probable splits (:func:`most_probable_flips`) in groups of ``size`` (the last may be
        smaller), (B, g, m) int8 each, the most probable first."""
        with torch.no_grad():
            lp = self.log_probs(u)
        top = lp.topk(2, dim=2)
        classes = torch.tensor(CLASSES, dtype=torch.int8, device=u.device)
        first, second = classes[top.indices[..., 0]], classes[top.indices[..., 1]]
        cost = (top.values[..., 0] - top.values[..., 1]).to(torch.float64)  # inf where a row has one side
        rows, subsets, masks = most_probable_flips(cost, self.choices)
        B, U = rows.shape
        other = second.gather(1, rows)
        for start in range(0, subsets.shape[1], size):
            flip = masks[subsets[:, start:start + size]]  # (B, g, U)
            g = flip.shape[1]
            split = first[:, None, :].expand(B, g, first.shape[1]).clone()
            at = rows[:, None, :].expand(B, g, U)
            split.scatter_(2, at, torch.where(flip, other[:, None, :].expand(B, g, U), split.gather(2, at)))
            yield split

    def fit(self, *, epochs: int = 200, patience: int = 10, batch_size: int = 256, lr: float = 1e-3,
            weight_decay: float = 1e-5, seed: int = 0, seconds: float | None = None) -> int:
        """Train the classifier on the stored instances' splits (cross-entropy of each row's side; a tenth of the
        instances held out, the epoch of least held-out loss kept; stops after ``patience`` epochs without a gain or
        after ``seconds``), from weights drawn anew; returns the epochs run. Deterministic for a ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the global generator's state is left as it was
            torch.manual_seed(seed)
            for layer in self.classifier:
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        dtype = self.classifier[0].weight.dtype
        device = self.classifier[0].weight.device
        x = self.keys.to(device, dtype)
        target = (self.splits.to(device).long() + 1)  # the index of each row's side in CLASSES
        num = x.shape[0]
        perm = torch.randperm(num, generator=gen).to(device)
        hold = max(1, num // 10)
        val, train = perm[:hold], perm[hold:]
        opt = torch.optim.Adam(self.classifier.parameters(), lr=lr, weight_decay=weight_decay)

        def loss(rows: torch.Tensor) -> torch.Tensor:  # cross-entropy: the negative log-probability of each side
            return F.nll_loss(self.log_probs(x[rows]).reshape(-1, len(CLASSES)), target[rows].reshape(-1))

        deadline = None if seconds is None else time.perf_counter() + seconds
        best, best_state, bad, ran = math.inf, copy.deepcopy(self.classifier.state_dict()), 0, 0
        was = self.classifier.training
        self.classifier.train()
        try:
            for ran in range(1, epochs + 1):  # noqa: B007 (the count is returned)
                order = train[torch.randperm(len(train), generator=gen).to(device)]
                for i in range(0, len(order), batch_size):
                    opt.zero_grad(set_to_none=True)
                    loss(order[i:i + batch_size]).backward()
                    opt.step()
                with torch.no_grad():
                    held = float(loss(val))
                if held < best:
                    best, best_state, bad = held, copy.deepcopy(self.classifier.state_dict()), 0
                else:
                    bad += 1
                if bad >= patience or (deadline is not None and time.perf_counter() > deadline):
                    break
        finally:
            self.classifier.load_state_dict(best_state)
            self.classifier.train(was)
        return ran


def flip_rows(rows: int, count: int) -> int:
    """How many of ``rows`` least certain rows the flips of ``count`` candidates are among (:data:`FLIP_SPARE`)."""
    return min(rows, max(1, math.ceil(math.log2(max(count, 1)))) + FLIP_SPARE)


def subset_masks(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^size, size) bool: every subset of ``size`` rows, subset ``i`` holding row ``j`` where bit ``j`` of ``i`` is
    set (subset 0: none)."""
    bits = torch.arange(size, device=device)
    return (torch.arange(2 ** size, device=device)[:, None] >> bits[None, :]) & 1 == 1


def most_probable_flips(cost: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``count`` cheapest sets of rows to flip, per instance, for flip costs ``cost`` (B, m) (``inf``: a row
    that cannot flip), among the :func:`flip_rows` cheapest rows.

    Returns ``rows`` (B, U), the candidate rows of each instance, cheapest first; ``subsets`` (B, K) indices into
    ``masks`` (2^U, U) bool (:func:`subset_masks`), cheapest first (subset 0, no flip, first), ``K = min(count,
    2^U)``; where fewer subsets than that have a finite cost, the rest are subset 0 again (a copy of the first
    candidate, which never wins a ranking). Exact where every subset with a row outside the ``U`` cheapest costs more
    than the ``K``-th of those inside (always so for ``K <= U + 1``: no flip and the ``U`` single flips come first)."""
    B, m = cost.shape
    U = flip_rows(m, count)
    rows = cost.topk(U, dim=1, largest=False).indices
    c = cost.gather(1, rows)
    masks = subset_masks(U, cost.device)
    K = min(count, masks.shape[0])
    big = torch.finfo(torch.float64).max / (4 * U)
    weights = masks.to(torch.float64).T  # (U, 2^U)
    step = max(1, SUBSET_ENTRIES // masks.shape[0])
    subsets = []
    for s in range(0, B, step):
        part = c[s:s + step]
        total = part.clamp(max=big) @ weights  # (b, 2^U); a subset with an impossible flip costs at least big
        value, idx = total.sort(dim=1, stable=True)  # among equal costs the lower index (subset 0 first)
        subsets.append(torch.where(value[:, :K] < big, idx[:, :K], torch.zeros_like(idx[:, :K])))
    return rows, torch.cat(subsets) if subsets else torch.zeros(0, K, dtype=torch.long, device=cost.device), masks


CORE_KINDS[ClassifiedActiveSet.core_kind] = ClassifiedActiveSet.from_config
