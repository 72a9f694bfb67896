"""Training: state, compiled step, checkpoints, logging and the fit loop."""
from __future__ import annotations

from recjax.train.checkpoint import Checkpointer
from recjax.train.fit import FitResult, fit
from recjax.train.logging import JsonlLogger, ProgressBar, plot_curves
from recjax.train.state import TrainState, create_train_state
from recjax.train.step import make_pmap_train_step, make_train_step, replicate, split_for_pmap, unreplicate

__all__ = [
  "Checkpointer", "FitResult", "JsonlLogger", "ProgressBar", "TrainState", "create_train_state", "fit",
  "make_pmap_train_step", "make_train_step", "plot_curves", "replicate", "split_for_pmap", "unreplicate",
]
