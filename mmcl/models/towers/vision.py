"""Image-only towers: timm backbones ("timm:NAME[:WEIGHTS]"), torchvision classifiers
("torchvision:NAME[:WEIGHTS]") and mmcl's CIFAR-stem ResNets ("mmcl:cifar_resnet18[:WEIGHTS]").

The CIFAR ResNets: the ImageNet ResNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) shrinks
a 32x32 image to 8x8 before the first block; every CIFAR benchmark of MoCo / SimCLR (MoCo's
CIFAR-10 demo, solo-learn, lightly) swaps it for a 3x3 stride-1 conv and no pool, so the blocks
see 32x32.
"""
from __future__ import annotations

import torch.nn as nn

from mmcl.models.towers.base import IMAGENET_MEAN, IMAGENET_STD, Tower, as_size
from mmcl.models.weights import load_weights_into, read_state_dict

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR_RESNETS = ("cifar_resnet18", "cifar_resnet34", "cifar_resnet50")


class TimmTower(Tower):
    """A timm image backbone with its classifier removed: forward gives the pooled features."""

    kind = prefix = "timm"

    def __init__(self, name: str, weights: str | None = None):
        import timm

        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as exc:
            raise ValueError(f"timm has no model {name!r} ({exc})") from exc
        if weights:
            load_weights_into(model, read_state_dict(weights), weights)
        model.reset_classifier(0)
        super().__init__(model, "image", getattr(model, "head_hidden_size", None) or model.num_features,
                         getattr(model, "in_chans", 3))
        self.name = name

    @classmethod
    def from_spec(cls, name, weights, modality, pooling="auto"):
        return cls(name, weights)

    @property
    def required_size(self):
        patch = getattr(self.model, "patch_embed", None)
        if patch is not None and getattr(patch, "strict_img_size", False):
            return tuple(patch.img_size)
        return None

    def image_processing(self):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=self.model)
        return {"size": tuple(cfg["input_size"][1:]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "crop_pct": float(cfg.get("crop_pct", 1.0)), "interpolation": cfg.get("interpolation", "bicubic")}

    def gradient_checkpointing_enable(self):
        self.model.set_grad_checkpointing(True)


def _replace_last_linear(model: nn.Module) -> int:
    """Swap the classifier (the last nn.Linear) for an Identity; returns its input size."""
    last = None
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return in_features


class TorchvisionTower(Tower):
    """A torchvision classification model with its classifier replaced by an Identity."""

    kind = prefix = "torchvision"

    def __init__(self, name: str, weights: str | None = None):
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except Exception as exc:
            raise ValueError(f"torchvision has no model {name!r} ({exc})") from exc
        if weights:
            load_weights_into(model, read_state_dict(weights), weights)
        super().__init__(model, "image", _replace_last_linear(model))
        self.name = name

    @classmethod
    def from_spec(cls, name, weights, modality, pooling="auto"):
        return cls(name, weights)

    @property
    def required_size(self):
        size = getattr(self.model, "image_size", None)  # torchvision's ViTs
        return as_size(size) if isinstance(size, int) else None

    def image_processing(self):
        return {"size": self.required_size or (224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "crop_pct": 0.875, "interpolation": "bilinear"}


class CifarResNetTower(TorchvisionTower):
    """torchvision's ResNet with a 3x3 stride-1 stem conv and no max-pool; (B, 3, H, W) -> (B, 512)
    for resnet18/34, (B, 2048) for resnet50. Built with random weights (or from a state dict)."""

    kind = prefix = "mmcl"

    def __init__(self, name: str, weights: str | None = None):
        if name not in CIFAR_RESNETS:
            raise ValueError(f"unknown mmcl tower {name!r}; choose one of {', '.join(CIFAR_RESNETS)}")
        super().__init__(name[len("cifar_"):], None)
        # Same width as the ImageNet stem (64 channels), so every later block is unchanged.
        self.model.conv1 = nn.Conv2d(3, self.model.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                                     bias=False)
        self.model.maxpool = nn.Identity()
        self.name = name
        if weights:
            load_weights_into(self.model, read_state_dict(weights), weights)

    def image_processing(self):
        # CIFAR images are 32x32 already: no resize-then-crop margin.
        return {"size": (32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "crop_pct": 1.0,
                "interpolation": "bilinear"}
