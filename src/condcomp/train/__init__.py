"""Trainer, checkpoints and metrics log."""

from condcomp.train.checkpoint import CheckpointError
from condcomp.train.trainer import Trainer, TrainingError, TrainResult, evaluate, load_model

__all__ = ["CheckpointError", "Trainer", "TrainingError", "TrainResult", "evaluate", "load_model"]
