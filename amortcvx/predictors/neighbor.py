"""A predictor that uses the training set's structure: the nearest neighbour's solution plus a learned correction.

In normalized units (``u = (theta - in_mean) / in_std``, targets ``(z* - out_mean) / out_std``; see
:class:`~amortcvx.predictors.model.WarmStartPredictor`)::

    j(u)  = argmin_i ||u - u_i||_2                       (nearest stored training instance)
    core(u) = z_j + net([u, u - u_j])                    (its optimal fixed-point variable, corrected)

``net`` is an MLP whose last layer starts at zero, so an untrained core is exactly the nearest-neighbour warm
start, and training can only move it where the loss says so. While training (``module.training``), an
instance never counts as its own neighbour (leave-one-out): otherwise the correction would learn zero.

The stored instances are buffers (saved with the weights, never pickled code); the core declares
``core_kind = "neighbor_correction"`` and ``config()``, so :meth:`WarmStartPredictor.load` rebuilds it from the
file alone (see :data:`amortcvx.predictors.model.CORE_KINDS`).

:class:`NeighborTangent` starts the correction from the neighbour's solution moved along the solution map's
derivative there, ``z_j + J_j (u - u_j)`` (its ``tangents`` are one more buffer; ``core_kind =
"neighbor_tangent"``).

:class:`NeighborActiveSet` (LPs and QPs) stores each instance's optimal active set instead, and predicts the query's
optimum on the active sets of its nearest stored instances (``core_kind = "neighbor_active_set"``).

All three can also predict from the ``choices`` nearest stored instances (:meth:`NeighborCorrection.candidates`, one
prediction each, nearest first); which one to use needs the problem's data and is chosen by
:func:`~amortcvx.predictors.fixed_point.predict`. The forward pass uses the nearest one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from amortcvx.predictors.model import CORE_KINDS, core_from_description, describe_core, mlp


class NeighborCorrection(nn.Module):
    """``u -> z_nn(u) + net([u, u - u_nn(u)])`` over stored normalized instances ``(keys, values)``.

    Args:
        keys: (N, p) normalized parameter vectors of the stored instances.
        values: (N, d) their normalized optimal fixed-point variables.
        hidden: hidden widths of the correction MLP.
        chunk: rows of stored instances compared per pass (bounds memory at ``B x chunk``).
        choices: how many nearest stored instances :meth:`candidates` predicts from (the forward pass uses the
            nearest only); a caller with the problem's data picks among them
            (:func:`~amortcvx.predictors.fixed_point.predict`).
    """

    core_kind = "neighbor_correction"
    fixed_dtype: tuple[str, ...] = ()
    """Buffers that keep their dtype through module conversions (``.double()``, ``.to(dtype)``): only their device
    changes (:meth:`_apply`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, hidden: Sequence[int] = (128, 128),
                 chunk: int = 4096, choices: int = 1):
        super().__init__()
        if keys.ndim != 2 or values.ndim != 2 or keys.shape[0] != values.shape[0] or keys.shape[0] < 2:
            raise ValueError(f"keys (N, p) and values (N, d) need the same N >= 2; got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        if not (isinstance(choices, int) and 1 <= choices <= keys.shape[0]):
            raise ValueError(f"choices must be an int from 1 to the stored instances ({keys.shape[0]}); got "
                             f"{choices!r}")
        self.hidden = tuple(int(h) for h in hidden)
        self.chunk = int(chunk)
        self.choices = choices
        self.register_buffer("keys", keys.detach().clone())
        self.register_buffer("values", values.detach().clone())
        p, d = keys.shape[1], values.shape[1]
        self.net = None if self.untrained else mlp(2 * p, d, self.hidden)
        if self.net is not None:
            with torch.no_grad():
                self.net[-1].weight.zero_()
                self.net[-1].bias.zero_()

    untrained = False
    """Whether the core has no correction network at all (the kinds with nothing to train): the prediction is the
    stored answer itself."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.net is None:  # files saved when these cores kept a correction network at zero
            for key in [k for k in state_dict if k.startswith(prefix + "net.")]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Module conversions of every tensor but the buffers named in :attr:`fixed_dtype`, which only change
        device."""
        kept = {name: self._buffers.pop(name) for name in self.fixed_dtype}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        for name, t in kept.items():
            self._buffers[name] = t.to(fn(t.new_zeros(0)).device)
        return self

    def config(self) -> dict:
        """What :meth:`from_config` needs to rebuild this core with empty buffers of the right shapes."""
        return {"num": int(self.keys.shape[0]), "num_params": int(self.keys.shape[1]),
                "out_dim": int(self.values.shape[1]), "hidden": list(self.hidden), "chunk": self.chunk,
                "choices": self.choices}

    @classmethod
    def from_config(cls, config: dict) -> NeighborCorrection:
        num, p, d = int(config["num"]), int(config["num_params"]), int(config["out_dim"])
        return cls(torch.zeros(num, p), torch.zeros(num, d), hidden=config["hidden"], chunk=config["chunk"],
                   choices=int(config.get("choices", 1)))

    def neighbors(self, u: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Indices (B, k) of the ``k`` nearest stored instances of each row of ``u``, nearest first (itself
        excluded while training)."""
        best_d = torch.full((u.shape[0], 0), float("inf"), dtype=u.dtype, device=u.device)
        best_i = torch.zeros((u.shape[0], 0), dtype=torch.long, device=u.device)
        keys, norms = self.keys.to(u), self.key_norms(u)
        uu = u.detach().square().sum(1, keepdim=True)
        for start in range(0, keys.shape[0], self.chunk):
            block = keys[start:start + self.chunk]
            kk = norms[start:start + self.chunk]
            d2 = (uu + kk - 2 * u.detach() @ block.T).clamp_min(0)
            if self.training:  # leave-one-out: a copy of the query (up to the rounding of d2) is not its neighbour
                copy = d2 <= 1e-10 * (uu + kk).clamp_min(1e-300)
                d2 = torch.where(copy, torch.full_like(d2, float("inf")), d2)
            val, idx = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
            # merged with the best so far, the earlier chunk first among equals (as a running minimum would)
            both_d, both_i = torch.cat([best_d, val], dim=1), torch.cat([best_i, idx + start], dim=1)
            order = torch.sort(both_d, dim=1, stable=True).indices[:, :k]
            best_d, best_i = both_d.gather(1, order), both_i.gather(1, order)
        return best_i

    def _per_content(self, name: str, buffer: torch.Tensor, compute: Callable[[], torch.Tensor],
                     *extra) -> torch.Tensor:
        """``compute()``, kept as ``name`` and computed again only when ``buffer``'s content may have changed (its
        storage, version or device: a ``load_state_dict`` or a move) or ``extra`` differs."""
        key = (buffer.data_ptr(), buffer._version, buffer.device, *extra)
        if not hasattr(self, "_kept"):
            self._kept: dict[str, tuple[tuple, torch.Tensor]] = {}
        if name not in self._kept or self._kept[name][0] != key:
            self._kept[name] = (key, compute())
        return self._kept[name][1]

    def key_norms(self, like: torch.Tensor) -> torch.Tensor:
        """(N,): the stored keys' squared norms ``||k_j||^2`` in ``like``'s dtype and on its device (where a search
        compares the keys with the queries ``like``), computed once per content of ``keys`` (:meth:`_per_content`):
        every search reads them (portfolio large, 900 keys of 3000 parameters: 1.4 ms per search at batch 1 when
        summed anew)."""
        return self._per_content("norms", self.keys, lambda: self.keys.to(like).square().sum(1), like.dtype,
                                 like.device)

    def neighbor(self, u: torch.Tensor) -> torch.Tensor:
        """Index (B,) of the nearest stored instance of each row of ``u`` (itself excluded while training)."""
        return self.neighbors(u, 1)[:, 0]

    def anchor(self, j: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
        """The stored answer the correction starts from: the neighbours' solutions ``z_j``."""
        return self.values.to(du)[j]

    def _predict_from(self, u: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        du = u - self.keys.to(u)[j]
        if self.net is None:
            return self.anchor(j, du)
        return self.anchor(j, du) + self.net(torch.cat([u, du], dim=1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._predict_from(u, self.neighbor(u))

    def candidates(self, u: torch.Tensor) -> torch.Tensor:
        """(B, choices, d): the prediction from each of the ``choices`` nearest stored instances, nearest first
        (the first is :meth:`forward`'s)."""
        return torch.cat(list(self.candidate_groups(u, self.choices)), dim=1)

    def candidate_groups(self, u: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        """The columns of :meth:`candidates` in groups of ``size`` (the last may be smaller), (B, g, d) each, nearest
        first, each group computed in one pass: for a caller that ranks a group at a time and keeps only the best,
        without holding all ``choices`` (64 candidates of mpc large's 2328 entries at batch 1024 would be 1.2 GB in
        float64)."""
        j = self.neighbors(u, self.choices)
        B = u.shape[0]
        for start in range(0, j.shape[1], size):
            part = j[:, start:start + size]
            g = part.shape[1]
            rows = self._predict_from(u.repeat_interleave(g, dim=0), part.reshape(-1))
            yield rows.view(B, g, -1)


class NeighborTangent(NeighborCorrection):
    """``u -> z_nn + J_nn (u - u_nn) + net([u, u - u_nn])``: the nearest stored solution moved along the solution
    map's derivative there (a first-order expansion), plus the learned correction.

    Where the parameters are few and the training instances dense (an MPC controller's initial state), the
    solution map is piecewise smooth (piecewise affine for LPs and QPs) and a neighbour often lies on the same
    piece: the expansion is then exact to first order (on an affine piece, exact). ``tangents`` (N, d, p) are
    ``dz*/du`` at the stored instances in normalized units
    (:func:`~amortcvx.training.tangents.solution_tangents`), stored in :data:`TANGENT_DTYPE` whatever the module's
    precision (``.to``, ``.double()``, ``.cuda()`` move them to the new device and keep their dtype).
    """

    core_kind = "neighbor_tangent"
    fixed_dtype = ("tangents",)  # in TANGENT_DTYPE whatever the module's

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, tangents: torch.Tensor,
                 hidden: Sequence[int] = (128, 128), chunk: int = 4096, choices: int = 1):
        super().__init__(keys, values, hidden=hidden, chunk=chunk, choices=choices)
        want = (keys.shape[0], values.shape[1], keys.shape[1])
        if tuple(tangents.shape) != want:
            raise ValueError(f"tangents must have shape (N, d, p) = {want}; got {tuple(tangents.shape)}")
        self.register_buffer("tangents", tangents.detach().to(TANGENT_DTYPE, copy=True))

    @classmethod
    def from_config(cls, config: dict) -> NeighborTangent:
        num, p, d = int(config["num"]), int(config["num_params"]), int(config["out_dim"])
        return cls(torch.zeros(num, p), torch.zeros(num, d), torch.zeros(num, d, p), hidden=config["hidden"],
                   chunk=config["chunk"], choices=int(config.get("choices", 1)))

    def anchor(self, j: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
        return super().anchor(j, du) + expansion(self.tangents, j, du)


class NeighborActiveSet(NeighborCorrection):
    """The ``choices`` distinct active sets of the nearest stored instances, each solved exactly on the query's data
    (LPs and QPs).

    An LP's or QP's solution map is piecewise affine, one piece per optimal active set, and on a piece the solution
    is the solution of the equality-constrained problem on its active rows. Where a stored instance's optimal
    active set (its ``split``, :class:`~amortcvx.iterations.polish.ActiveSets`) is the query's, solving the query's
    KKT system on it gives the query's optimum exactly, however far apart the two instances' solutions are; the
    stored instance need only lie on the same piece. Nothing is trained and no derivatives are stored (a
    :class:`NeighborTangent` is exact on the same pieces, at ``d p`` stored numbers per instance and a derivative
    computation each, against ``m`` bytes here); the price is one KKT solve per candidate and instance at
    prediction time.

    ``splits`` (N, m) int8 are the stored instances' splits; ``keys`` and ``values`` as for
    :class:`NeighborCorrection` (no correction network: :attr:`~NeighborCorrection.untrained`). The forward pass is the
    nearest stored solution (what a caller without the problem's data gets), or the prediction of a ``reference``
    core where one is given; :meth:`split_groups` gives the splits, nearest first and each once (neighbours often
    share theirs: :meth:`distinct_neighbors`), which :func:`~amortcvx.predictors.predict` solves on the batch's data
    (``alg.active_set``), each from the forward pass's point, and ranks by their optimality residual with that point.

    ``reference``: a core in this core's units (normalized parameters to normalized fixed-point variables: a network
    trained on the same instances, such as the recipe's at the same training-set size), saved with it. Where an
    active set's KKT system is singular (a degenerate LP's: more active rows than variables, or an optimal face wider
    than a point), its solutions form an affine set, and the solve gives about the one nearest its start
    (:func:`~amortcvx.iterations.polish.equality_qp`): a start near the optimum makes the right active set give an
    optimum. The nearest stored solution is a poor start where nearby parameters have far-apart solutions; a
    regression network's prediction is a better one (degenerate_lp small, 16000 training instances, the classifier's
    256 most probable active sets, SCS at eps 1e-4 on 200 held-out instances: median C iterations 56 with every solve
    started at zero, 13.5 from the nearest stored solution's point, 1 from an MLP's; docs/training.md).
    """

    core_kind = "neighbor_active_set"
    fixed_dtype = ("splits",)  # int8
    untrained = True  # its answers are the active sets' solves: no correction network (a zero one cost 12 ms per
    # call on portfolio large, a 6000 x 6061 product)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, splits: torch.Tensor, chunk: int = 4096,
                 choices: int = 1, reference: nn.Module | None = None):
        super().__init__(keys, values, hidden=(), chunk=chunk, choices=choices)
        if splits.ndim != 2 or splits.shape[0] != keys.shape[0]:
            raise ValueError(f"splits must have shape (N, m) with N = {keys.shape[0]}; got {tuple(splits.shape)}")
        self.register_buffer("splits", splits.detach().to(torch.int8, copy=True))
        self.reference = reference

    def config(self) -> dict:
        more = {} if self.reference is None else {"reference": describe_core(self.reference)}
        return {**super().config(), "rows": int(self.splits.shape[1]), **more}

    @staticmethod
    def reference_from_config(config: dict) -> nn.Module | None:
        """The ``reference`` core :meth:`config` describes (untrained weights), or None."""
        if "reference" not in config:
            return None
        return core_from_description(config["reference"], int(config["num_params"]), int(config["out_dim"]))

    @classmethod
    def from_config(cls, config: dict) -> NeighborActiveSet:
        num, p, d = int(config["num"]), int(config["num_params"]), int(config["out_dim"])
        return cls(torch.zeros(num, p), torch.zeros(num, d), torch.zeros(num, int(config["rows"]), dtype=torch.int8),
                   chunk=config["chunk"], choices=int(config.get("choices", 1)),
                   reference=cls.reference_from_config(config))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The ``reference``'s prediction where there is one, else the nearest stored solution."""
        return super().forward(u) if self.reference is None else self.reference(u)

    def split_ids(self) -> torch.Tensor:
        """(N,) int64: equal for stored instances whose splits are equal (computed once per content of
        ``splits``, :meth:`_per_content`)."""
        return self._per_content("ids", self.splits, lambda: torch.unique(self.splits, dim=0, return_inverse=True)[1])

    def distinct_neighbors(self, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, k) of the nearest stored instances with ``k`` distinct splits, nearest first, among the
        :data:`DISTINCT_REACH` ``k`` nearest, and the count of distinct splits found per row (B,); a row's slots past
        its count hold its nearest instance again (a copy of an earlier candidate, which never wins a ranking)."""
        near = self.neighbors(u, min(self.keys.shape[0], DISTINCT_REACH * k))
        ids = self.split_ids()[near]
        ordered, order = ids.sort(dim=1, stable=True)  # equal ids keep their distance order: the first is nearest
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        first = torch.zeros_like(first).scatter_(1, order, first)  # the nearest instance of each split
        keep = first & (first.cumsum(dim=1) <= k)
        count = keep.sum(dim=1)
        pos = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept ones first, in order
        j = near.gather(1, pos)
        slot = torch.arange(j.shape[1], device=j.device)
        return torch.where(slot[None] < count[:, None], j, near[:, :1]), count

    def split_groups(self, u: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        """The ``choices`` distinct splits of the nearest stored instances (:meth:`distinct_neighbors`) in groups of
        ``size`` (the last may be smaller), (B, g, m) int8 each, nearest first; no group past every row's count."""
        j, count = self.distinct_neighbors(u, self.choices)
        for start in range(0, int(count.max()), size):
            yield self.splits[j[:, start:start + size]]


DISTINCT_REACH = 4
""":class:`NeighborActiveSet` takes its ``choices`` distinct splits from this many times ``choices`` nearest stored
instances: neighbours often share their active set, and each candidate costs a KKT solve (huber_fit small, 8000
stored instances, 50 held-out queries, medians: 562 distinct splits among the 1024 nearest, 2249 among the 4096
nearest; 1888 and 7066 nearest for 1024 and 4096 distinct, docs/training.md)."""

TANGENT_DTYPE = torch.float32
"""The precision of a :class:`NeighborTangent`'s stored derivatives: half the memory of float64, so twice the anchors
in the same bytes (they are most of a tangent predictor's size: kalman small, ``d = 234``, ``p = 24``, 22 KB per
anchor), at an error of ``1e-7`` relative in ``J du``, far below any solver tolerance a warm start is checked at
(kalman small, 16000 anchors: the same C iterations as with float64 derivatives; docs/training.md)."""

GATHER_BYTES = 2 ** 27
"""On a GPU, :func:`expansion` gathers the derivative matrices of at most this many bytes at a time."""


def expansion(tangents: torch.Tensor, j: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """``J_j du`` per row: ``tangents[j[b]] @ du[b]`` (B, d), for ``tangents`` (N, d, p), ``j`` (B,), ``du`` (B, p),
    computed in the derivatives' precision and returned in ``du``'s.

    On the CPU one matrix-vector product per row, on views of the stored matrices (:func:`expansion_by_rows`):
    gathering the ``(B, d, p)`` matrices first allocates and copies them, which costs more than the products
    (measured, 1 thread, float64: MPC large, d = 2328, p = 24, 64 rows 1.3 against 6.5 ms, 512 rows 27 against
    113 ms; MPC small, d = 320, p = 8, 512 rows 1.6 against 2.3 ms). On a GPU, where a kernel per row would cost
    more than the copy, batched gathers and products (:func:`expansion_gathered`).
    """
    tangents, low = tangents.to(du.device), du.to(tangents.dtype)
    fn = expansion_by_rows if du.device.type == "cpu" else expansion_gathered
    return fn(tangents, j, low).to(du.dtype)


def expansion_by_rows(tangents: torch.Tensor, j: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """:func:`expansion` as one matrix-vector product per row."""
    if j.numel() == 0:
        return du.new_zeros((0, tangents.shape[1]))
    return torch.stack([tangents[i] @ row for i, row in zip(j.tolist(), du)])


def expansion_gathered(tangents: torch.Tensor, j: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """:func:`expansion` as batched gathers and products, at most :data:`GATHER_BYTES` of matrices each."""
    rows = max(1, GATHER_BYTES // max(1, tangents[0].numel() * tangents.element_size()))
    return torch.cat([torch.bmm(tangents[j[s:s + rows]], du[s:s + rows, :, None])[:, :, 0]
                      for s in range(0, max(1, j.shape[0]), rows)])


CORE_KINDS[NeighborCorrection.core_kind] = NeighborCorrection.from_config
CORE_KINDS[NeighborTangent.core_kind] = NeighborTangent.from_config
CORE_KINDS[NeighborActiveSet.core_kind] = NeighborActiveSet.from_config
