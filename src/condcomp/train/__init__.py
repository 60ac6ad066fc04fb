"""Trainer, checkpoints and metrics log."""

from condcomp.train.checkpoint import CheckpointError
from condcomp.train.trainer import Trainer, TrainingError, TrainingInterrupted, TrainResult, evaluate, load_model

__all__ = ["CheckpointError", "Trainer", "TrainingError", "TrainingInterrupted", "TrainResult", "evaluate", "load_model"]
