"""Ensembles: the mean prediction of several cores trained on the same data with different seeds.

Averaging removes part of each network's variance, which a single network's regression error carries into the
warm start. :func:`ensemble_predictor` joins trained :class:`~amortcvx.predictors.WarmStartPredictor` s that
share one normalization (the same training set) into one predictor whose core is an :class:`Ensemble`; the
training recipe (:mod:`amortcvx.training.recipe`) builds one and keeps it only when it lowers the validation C
iterations. The class registers ``core_kind = "ensemble"``, so :meth:`WarmStartPredictor.load` rebuilds it from
the file alone (its members must be MLPs or registered kinds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amortcvx.predictors.model import CORE_KINDS, WarmStartPredictor, core_from_description, describe_core


class Ensemble(nn.Module):
    """``u -> mean_i member_i(u)`` (normalized units).

    Args:
        members: cores mapping (B, num_params) -> (B, out_dim).
        num_params, out_dim: their input and output sizes.
    """

    core_kind = "ensemble"

    def __init__(self, members: Sequence[nn.Module], num_params: int, out_dim: int):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.num_params, self.out_dim = int(num_params), int(out_dim)

    def config(self) -> dict:
        """The members' descriptions and the sizes (what :meth:`from_config` needs)."""
        described = [describe_core(m) for m in self.members]
        custom = [d.get("class") for d in described if d["kind"] == "custom"]
        if custom:
            raise ValueError(f"an ensemble with custom members {custom} cannot be described in a file")
        return {"num_params": self.num_params, "out_dim": self.out_dim, "members": described}

    @classmethod
    def from_config(cls, config: dict) -> Ensemble:
        p, d = int(config["num_params"]), int(config["out_dim"])
        return cls([core_from_description(m, p, d) for m in config["members"]], p, d)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(u) for m in self.members]).mean(dim=0)


CORE_KINDS[Ensemble.core_kind] = Ensemble.from_config


def ensemble_predictor(models: Sequence[WarmStartPredictor]) -> WarmStartPredictor:
    """One predictor averaging ``models`` (same problem, algorithm, settings and normalization).

    Raises:
        ValueError: no models, or models made for other problems / settings or with other normalizations
            (trained on other data).
    """
    if not models:
        raise ValueError("ensemble_predictor needs at least one model")
    first = models[0]
    for j, m in enumerate(models[1:], start=1):
        if m.meta != first.meta:
            raise ValueError(f"model {j} was made for {m.meta}, model 0 for {first.meta}")
        for name in ("in_mean", "in_std", "out_mean", "out_std"):
            if not torch.equal(getattr(m, name), getattr(first, name)):
                raise ValueError(f"model {j} has another normalization ({name}) than model 0: members must be "
                                 "trained on the same data")
    core = Ensemble([m.core for m in models], first.meta.num_params, first.meta.out_dim)
    out = WarmStartPredictor(first.meta, core=core)
    out = out.to(device=first.in_mean.device, dtype=first.in_mean.dtype)
    with torch.no_grad():
        for name in ("in_mean", "in_std", "out_mean", "out_std"):
            getattr(out, name).copy_(getattr(first, name))
    return out


__all__ = ["Ensemble", "ensemble_predictor"]
