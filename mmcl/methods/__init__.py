"""Training methods: one file per method, one registry line each.

    objective = build_objective(cfg, model)     # cfg.mode picks the class

`objective_class` / `build_objective` are the only code that reads the `mode` string; the rest
of mmcl asks the objective (or its class) what it needs (mmcl.methods.base.Objective).
"""
from __future__ import annotations

from mmcl.methods.base import EVAL_KINDS, LossConfig, Objective
from mmcl.methods.byol import BYOLConfig, BYOLObjective
from mmcl.methods.clip import ClipObjective
from mmcl.methods.clip_simclr import ClipSimCLRObjective
from mmcl.methods.moco import FeatureQueue, MoCoConfig, MoCoObjective, MomentumEncoder
from mmcl.methods.pcl import PCLConfig, PCLObjective
from mmcl.methods.siglip import SigLipObjective
from mmcl.methods.simclr import SimCLRObjective

METHODS: dict[str, type[Objective]] = {
    "clip": ClipObjective,
    "simclr": SimCLRObjective,
    "moco": MoCoObjective,
    "clip+simclr": ClipSimCLRObjective,
    "siglip": SigLipObjective,
    "pcl": PCLObjective,
    "byol": BYOLObjective,
}
MODES = tuple(METHODS)


def objective_class(config_or_mode) -> type[Objective]:
    """The Objective class of a config's `mode` (or of a mode string)."""
    mode = config_or_mode if isinstance(config_or_mode, str) else config_or_mode.mode
    if mode not in METHODS:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return METHODS[mode]


def build_objective(config, model) -> Objective:
    """The objective of `config.mode` for `model` (MoCo copies it into its key encoder)."""
    return objective_class(config)(config, model)


__all__ = ["Objective", "LossConfig", "MoCoConfig", "MomentumEncoder", "FeatureQueue", "ClipObjective",
           "ClipSimCLRObjective", "SimCLRObjective", "MoCoObjective", "SigLipObjective", "PCLConfig",
           "PCLObjective", "BYOLConfig", "BYOLObjective", "METHODS", "MODES", "EVAL_KINDS",
           "objective_class", "build_objective"]
