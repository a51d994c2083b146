"""Training layer: losses through the unrolled torch solvers and the training loop."""

from amortcvx.training.losses import LossWeights, losses
from amortcvx.training.recipe import Candidate, RecipeResult, RecipeSettings, fit_predictor, solved_source
from amortcvx.training.trainer import (
    SolvedSet,
    TrainConfig,
    TrainResult,
    evaluate_losses,
    load_checkpoint,
    settings_dict,
    train,
    train_state_path,
)

__all__ = ["Candidate", "LossWeights", "RecipeResult", "RecipeSettings", "SolvedSet", "TrainConfig", "TrainResult",
           "evaluate_losses", "fit_predictor", "load_checkpoint", "losses", "settings_dict", "solved_source", "train",
           "train_state_path"]
