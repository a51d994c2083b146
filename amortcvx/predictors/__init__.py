"""Predictors layer: torch modules mapping parameters to an algorithm's fixed-point variable."""

from amortcvx.predictors.model import PredictorMeta, WarmStartPredictor, atomic_torch_save, mlp

__all__ = ["PredictorMeta", "WarmStartPredictor", "atomic_torch_save", "mlp"]
