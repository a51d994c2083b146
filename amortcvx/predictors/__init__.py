"""Predictors layer: torch modules mapping parameters to an algorithm's fixed-point variable."""

from amortcvx.predictors.fixed_point import OUTPUT_SPACES, OutputSpace, output_space
from amortcvx.predictors.model import (
    SETTINGS,
    PredictorMeta,
    WarmStartPredictor,
    atomic_torch_save,
    mlp,
)

__all__ = ["OUTPUT_SPACES", "SETTINGS", "OutputSpace", "PredictorMeta", "WarmStartPredictor", "atomic_torch_save",
           "mlp", "output_space"]
