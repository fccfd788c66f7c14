"""Towers: one image or text encoder that maps inputs to a pooled feature vector (B, H).

Every tower is a `Tower` (towers/base.py), so DualEncoder never asks where a tower came from.
The kinds, each a Tower subclass named by its saved `kind` (and, but for transformers, its
spec-string prefix):

    transformers   a model directory, a cached hub id or a PretrainedConfig     (towers/hf.py)
    open_clip      "open_clip:NAME[:CHECKPOINT]"                                (towers/open_clip.py)
    timm           "timm:NAME[:WEIGHTS]"                                        (towers/vision.py)
    torchvision    "torchvision:NAME[:WEIGHTS]"                                 (towers/vision.py)
    mmcl           "mmcl:cifar_resnet18[:WEIGHTS]" (also 34, 50): CIFAR-stem    (towers/vision.py)

`build` makes a tower from a spec string, a PretrainedConfig or a saved spec() dict;
`build_pair` makes both towers of a model, sharing one model between them where the two specs
name the same two-tower model (open_clip).
"""
from __future__ import annotations

import os

from mmcl.models.towers.base import IMAGENET_MEAN, IMAGENET_STD, POOLINGS, Tower, largest_block_list
from mmcl.models.towers.hf import HFTower, has_image_processor_files, has_tokenizer_files
from mmcl.models.towers.open_clip import OpenCLIPTokenizer, OpenCLIPTower
from mmcl.models.towers.vision import CifarResNetTower, TimmTower, TorchvisionTower

# The registry: saved kind -> Tower class. A new kind is a Tower subclass and one entry here.
KINDS: dict[str, type[Tower]] = {
    cls.kind: cls for cls in (HFTower, OpenCLIPTower, TimmTower, TorchvisionTower, CifarResNetTower)
}
PREFIXES: dict[str, type[Tower]] = {cls.prefix: cls for cls in KINDS.values() if cls.prefix}
MODALITIES = ("image", "text")

__all__ = ["Tower", "KINDS", "PREFIXES", "POOLINGS", "build", "build_pair", "from_saved", "parse",
           "HFTower", "OpenCLIPTower", "TimmTower", "TorchvisionTower", "CifarResNetTower", "OpenCLIPTokenizer",
           "largest_block_list", "has_tokenizer_files", "has_image_processor_files", "IMAGENET_MEAN",
           "IMAGENET_STD"]


def _check_pooling(pooling) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _check_transformers_path(spec: str, modality: str) -> None:
    """Clear errors for strings that are neither a known prefix nor a usable directory/hub id."""
    prefix = spec.partition(":")[0]
    if ":" in spec and not os.path.exists(spec) and prefix.replace("_", "").isalnum():
        known = ", ".join(f"'{p}:'" for p in PREFIXES)
        raise ValueError(f"unknown tower spec {spec!r}: the prefixes are {known}; "
                         "anything else is a transformers directory or hub id")
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise ValueError(f"{modality}_tower {spec!r} is a file; a transformers tower is a directory")
    if not os.path.isdir(spec) and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"{modality}_tower directory {spec!r} does not exist")


def parse(spec, modality: str) -> tuple[type[Tower], object, str | None]:
    """(kind class, name, weights file or None) of a user spec for the `modality` tower.

    spec: "PREFIX:NAME[:WEIGHTS]" for a registered prefix, else a transformers directory or
    hub id (name = the string) or a transformers PretrainedConfig (name = the config).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        from transformers import PretrainedConfig

        if isinstance(spec, PretrainedConfig):
            return HFTower, spec, None
        raise TypeError(f"{modality}_tower must be a str, a path or a transformers PretrainedConfig, "
                        f"got {type(spec).__name__}")
    prefix, colon, rest = spec.partition(":")
    cls = PREFIXES.get(prefix) if colon else None
    if cls is None:
        _check_transformers_path(spec, modality)
        return HFTower, spec, None
    name, _, weights = rest.partition(":")
    if not name:
        raise ValueError(f"tower spec {spec!r} names no model (expected '{prefix}:NAME[:WEIGHTS_FILE]')")
    if modality not in cls.modalities:
        raise ValueError(f"{prefix} towers are {' or '.join(cls.modalities)} towers, got {spec!r} as the "
                         f"{modality} tower")
    return cls, name, weights or None


def build(spec, modality: str, pooling: str = "auto") -> Tower:
    """The `modality` ("image" | "text") tower of a spec (see `parse`), or of a saved spec()
    dict (then with random weights; `pooling` is the saved one). Pooling ("auto" | "pooler" |
    "cls" | "mean") applies to transformers towers; "auto" picks per model type."""
    if isinstance(spec, dict):
        return from_saved(spec, modality)
    _check_pooling(pooling)
    cls, name, weights = parse(spec, modality)
    return cls.from_spec(name, weights, modality, pooling)


def from_saved(spec: dict, modality: str) -> Tower:
    """Rebuild a tower's architecture (random weights) from its saved spec() (config.json)."""
    cls = KINDS.get(spec.get("kind")) if isinstance(spec, dict) else None
    if cls is None:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown tower kind {kind!r} in saved config (known: {', '.join(KINDS)})")
    return cls.from_saved(spec, modality)


def build_pair(image_spec, text_spec=None, image_pooling: str = "auto",
               text_pooling: str = "auto") -> tuple[Tower, Tower | None]:
    """(image tower, text tower or None) of a model. The same spec given for both towers of a
    kind whose one model holds both (open_clip) builds that model once and shares it."""
    if image_spec is None:
        raise ValueError("image_tower is required (text_tower may be None for an image-only model)")
    image_spec, text_spec = (os.fspath(s) if isinstance(s, os.PathLike) else s for s in (image_spec, text_spec))
    if isinstance(image_spec, str) and image_spec == text_spec:
        _check_pooling(image_pooling)
        _check_pooling(text_pooling)
        cls, name, weights = parse(image_spec, "image")
        parse(text_spec, "text")
        return cls.pair_from_spec(name, weights, image_pooling, text_pooling)
    image = build(image_spec, "image", image_pooling)
    return image, (build(text_spec, "text", text_pooling) if text_spec is not None else None)
