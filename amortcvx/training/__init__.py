"""Training layer: losses through the unrolled torch solvers and the training loop."""

from amortcvx.training.losses import LossWeights, losses
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

__all__ = ["LossWeights", "SolvedSet", "TrainConfig", "TrainResult", "evaluate_losses", "load_checkpoint",
           "losses", "settings_dict", "train",
           "train_state_path"]
