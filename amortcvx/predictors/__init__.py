"""Predictors layer: torch modules mapping parameters to an algorithm's fixed-point variable."""

from amortcvx.predictors.classifier import ClassifiedActiveSet
from amortcvx.predictors.ensemble import Ensemble, ensemble_predictor
from amortcvx.predictors.fixed_point import OUTPUT_SPACES, OutputSpace, output_space, predict
from amortcvx.predictors.model import (
    CORE_KINDS,
    SETTINGS,
    PredictorMeta,
    WarmStartPredictor,
    atomic_torch_save,
    mlp,
)
from amortcvx.predictors.neighbor import NeighborActiveSet, NeighborCorrection, NeighborTangent

__all__ = ["CORE_KINDS", "OUTPUT_SPACES", "SETTINGS", "ClassifiedActiveSet", "Ensemble", "NeighborActiveSet",
           "NeighborCorrection", "NeighborTangent", "OutputSpace", "PredictorMeta", "WarmStartPredictor",
           "atomic_torch_save", "ensemble_predictor", "mlp", "output_space", "predict"]
