"""Training: nested dataclass configs and `fit`, the Accelerate training loop.

    from mmcl.train import load_config, fit
    metrics = fit(load_config("recipes/configs/clip_digits.yaml", ["train.max_steps=30"]))
"""
from mmcl.methods import LossConfig, MoCoConfig
from mmcl.train.builders import BatchNormConfig, ModelConfig
from mmcl.train.checkpoint import CheckpointConfig
from mmcl.train.config import (
    Config, TrainConfig, from_dict, load_config, parse_overrides, to_dict,
)
from mmcl.train.evaluation import EvalConfig
from mmcl.train.loop import fit
from mmcl.train.optim import LARS, OptimConfig, build_optimizer, build_scheduler, lr_factor, param_groups
from mmcl.train.saved import load_saved_config
from mmcl.train.trackers import JsonlTracker

__all__ = [
    "Config", "ModelConfig", "BatchNormConfig", "LossConfig", "MoCoConfig", "OptimConfig", "TrainConfig",
    "CheckpointConfig", "EvalConfig", "load_config", "load_saved_config", "from_dict", "to_dict",
    "parse_overrides", "fit", "LARS", "build_optimizer", "build_scheduler", "lr_factor", "param_groups",
    "JsonlTracker",
]
