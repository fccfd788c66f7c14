"""Training: nested dataclass configs and `fit`, the Accelerate training loop.

    from mmcl.train import load_config, fit
    metrics = fit(load_config("recipes/configs/clip_digits.yaml", ["train.max_steps=30"]))
"""
from mmcl.train.config import (
    Config, EvalConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, from_dict, load_config,
    parse_overrides, to_dict,
)
from mmcl.train.loop import fit
from mmcl.train.optim import LARS, build_optimizer, build_scheduler, lr_factor, param_groups
from mmcl.train.trackers import JsonlTracker

__all__ = [
    "Config", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig", "EvalConfig", "load_config",
    "from_dict", "to_dict", "parse_overrides", "fit", "LARS", "build_optimizer", "build_scheduler",
    "lr_factor", "param_groups", "JsonlTracker",
]
