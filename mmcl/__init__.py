"""mmcl: contrastive representation learning with images and text."""
from __future__ import annotations

from mmcl.losses import LogitScale, clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss

__version__ = "0.1.0"

# Heavier parts (transformers, datasets) load on first use.
_LAZY = {
    "DualEncoder": "mmcl.models",
    "MomentumEncoder": "mmcl.methods.moco",
    "FeatureQueue": "mmcl.methods.moco",
    "ZeroShotClassifier": "mmcl.zeroshot",
}

__all__ = ["clip_loss", "siglip_loss", "info_nce", "nt_xent", "supcon_loss", "LogitScale", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmcl' has no attribute {name!r}")
