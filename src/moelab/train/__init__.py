"""Training: run configs, the resumable training loop, checkpoints and logs.

from moelab.train import RunConfig, train

result = train(RunConfig.load("configs/reference/ref-8e-top2.yaml"), "runs/ref")
"""

from moelab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.logging import read_log
from moelab.train.trainer import TrainResult, build_optimizer, lr_factor, train

__all__ = [
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lr_factor",
    "read_log",
    "save_checkpoint",
    "train",
]
