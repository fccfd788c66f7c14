"""The Tower base class: what every tower kind shares.

A tower maps one modality to pooled features:

    forward(pixel_values) (B, C, H, W) or forward(input_ids, attention_mask) (B, L) -> (B, output_dim)

and describes itself with `kind` (saved in config.json), `spec()` (JSON that rebuilds the
architecture without weights), `image_processing()` (size/mean/std for a transforms processor),
`required_size` ((H, W) the tower insists on, or None), `blocks()` (the layer list that `lock`
counts) and `gradient_checkpointing_enable()`. A kind is a subclass that also says how it is built
from a spec string (`from_spec`) and from its saved spec (`from_saved`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("auto", "pooler", "cls", "mean")


def largest_block_list(module: nn.Module) -> list[nn.Module]:
    """The ModuleList/Sequential holding most of the parameters: a network's stack of layers."""
    best, best_params = [], -1
    for sub in module.modules():
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) >= 2:
            n = sum(p.numel() for p in sub.parameters())
            if n > best_params:
                best, best_params = list(sub), n
    return best


def as_size(size) -> tuple[int, int] | None:
    """An image size given as an int (square) or a pair, as an (H, W) tuple; None stays None."""
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


class Tower(nn.Module):
    """One image or text encoder wrapping `self.model`; its state dict keys are `model.*`.

    Class attributes of a kind: `kind` (the saved name), `prefix` (of its spec strings, e.g.
    "timm" for "timm:NAME[:WEIGHTS]"; None for transformers, whose specs are directories, hub
    ids or configs) and `modalities` (which of "image" / "text" it can be).
    """

    kind: str = ""
    prefix: str | None = None
    modalities: tuple[str, ...] = ("image",)

    def __init__(self, model: nn.Module, modality: str, output_dim: int, num_channels: int = 3):
        super().__init__()
        self.model = model
        self.name = type(model).__name__  # kinds built by name store that name
        self.modality = modality
        self.output_dim = int(output_dim)
        self.num_channels = int(num_channels)
        self.vocab_size: int | None = None
        self.max_length: int | None = None

    # ------------------------------------------------------------------ construction (per kind)
    @classmethod
    def from_spec(cls, name: str, weights: str | None, modality: str, pooling: str = "auto") -> "Tower":
        """A tower from the parts of a spec string "PREFIX:NAME[:WEIGHTS]"."""
        raise NotImplementedError(f"{cls.__name__} has no spec strings")

    @classmethod
    def from_saved(cls, spec: dict, modality: str) -> "Tower":
        """The architecture (random weights) described by a saved `spec()`."""
        return cls.from_spec(spec["name"], None, modality)

    @classmethod
    def pair_from_spec(cls, name: str, weights: str | None, image_pooling: str = "auto",
                       text_pooling: str = "auto") -> tuple["Tower", "Tower"]:
        """(image tower, text tower) from one spec given for both; kinds whose one model holds
        both towers override this to build that model once."""
        return (cls.from_spec(name, weights, "image", image_pooling),
                cls.from_spec(name, weights, "text", text_pooling))

    # ------------------------------------------------------------------ description
    def spec(self) -> dict:
        """JSON-serialisable description that rebuilds this architecture (see `from_saved`)."""
        return {"kind": self.kind, "name": self.name}

    @property
    def required_size(self) -> tuple[int, int] | None:
        """The (H, W) this image tower insists on, or None when it takes any size."""
        return None

    def image_processing(self) -> dict:
        """size / mean / std / crop_pct / interpolation for a transforms image processor."""
        return {"size": self.required_size or (224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "crop_pct": 1.0, "interpolation": "bicubic"}

    def default_tokenizer(self):
        """The tokenizer that comes with this text tower, or None."""
        return None

    def default_image_processor(self):
        """An image processor saved with this tower's weights (replacing the transforms one), or None."""
        return None

    # ------------------------------------------------------------------ computing
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, output_dim) features (image towers)."""
        return self.model(pixel_values)

    # ------------------------------------------------------------------ training switches
    def blocks(self) -> list[nn.Module]:
        """The tower's stack of layers, as counted by `lock`."""
        return largest_block_list(self.model)

    def lock(self, unlocked_layers: int) -> None:
        """Freeze every parameter except those of the last `unlocked_layers` blocks and of what is
        registered after the last block (final norm, pooler); 0 freezes everything."""
        blocks = self.blocks()
        if unlocked_layers > len(blocks):
            raise ValueError(f"unlocked_layers={unlocked_layers} but the tower has only {len(blocks)} layers")
        params = list(self.parameters())
        for p in params:
            p.requires_grad_(False)
        if unlocked_layers == 0:
            return
        last_block_ids = {id(p) for p in blocks[-1].parameters()}
        end = max(i for i, p in enumerate(params) if id(p) in last_block_ids)
        for block in blocks[-unlocked_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in params[end + 1:]:
            p.requires_grad_(True)

    def gradient_checkpointing_enable(self) -> None:
        """Turn on the wrapped model's activation checkpointing (raises if it has none)."""
        raise ValueError(f"{self.kind} tower {self.name!r} has no gradient checkpointing switch")
