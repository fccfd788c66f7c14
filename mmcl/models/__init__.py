"""Dual-tower models (image + text encoders with projection heads and a logit scale) and their
processor. MoCo's momentum encoder and feature queue live with the method (mmcl.methods.moco) and
stay importable from here."""
from mmcl.models.dual_encoder import DualEncoder, DualEncoderOutput
from mmcl.models.processor import DualProcessor, TransformImageProcessor

__all__ = ["DualEncoder", "DualEncoderOutput", "DualProcessor", "TransformImageProcessor", "MomentumEncoder",
           "FeatureQueue"]


def __getattr__(name: str):
    if name in ("MomentumEncoder", "FeatureQueue"):  # resolved on use: mmcl.methods imports mmcl.losses
        from mmcl.methods import moco

        return getattr(moco, name)
    raise AttributeError(f"module 'mmcl.models' has no attribute {name!r}")
