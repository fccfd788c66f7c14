"""Dual-tower models (image + text encoders with projection heads and a logit scale), their
processor, and MoCo's momentum encoder and feature queue."""
from mmcl.models.dual_encoder import DualEncoder, DualEncoderOutput
from mmcl.models.momentum import FeatureQueue, MomentumEncoder
from mmcl.models.processor import DualProcessor, TransformImageProcessor

__all__ = ["DualEncoder", "DualEncoderOutput", "DualProcessor", "TransformImageProcessor", "MomentumEncoder",
           "FeatureQueue"]
