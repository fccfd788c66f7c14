"""mmcl: contrastive representation learning with images and text."""
from __future__ import annotations

__version__ = "0.1.0"

# Everything loads on first use, so that `import mmcl` (and the `mmcl --help` parser behind it) does
# not pay for torch, transformers or datasets.
_LAZY = {
    "clip_loss": "mmcl.losses",
    "siglip_loss": "mmcl.losses",
    "info_nce": "mmcl.losses",
    "nt_xent": "mmcl.losses",
    "supcon_loss": "mmcl.losses",
    "LogitScale": "mmcl.losses",
    "DualEncoder": "mmcl.models",
    "MomentumEncoder": "mmcl.methods.moco",
    "FeatureQueue": "mmcl.methods.moco",
    "ZeroShotClassifier": "mmcl.zeroshot",
}

# Subpackages that `mmcl.NAME` reaches without importing them first.
_SUBMODULES = ("losses", "chunked", "distributed", "kernels")

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY or name in _SUBMODULES:
        import importlib

        if name in _SUBMODULES:
            return importlib.import_module(f"mmcl.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmcl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
