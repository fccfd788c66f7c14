"""Data for contrastive training: sources through 🤗 datasets, images, augmentation presets, batches."""
from mmcl.data.augment import AUGMENT_PRESETS, DEVICE_PRESETS, VIEW_PRESETS, ViewPreset
from mmcl.data.config import DataConfig
from mmcl.data.digits import DIGIT_CLASS_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, load_digits_dataset
from mmcl.data.gpu_augment import DeviceAugment, GPUAugment
from mmcl.data.images import decode_image, load_image
from mmcl.data.loader import (
    ContrastiveCollator, ContrastiveDataset, ResumableSampler, build_dataloader, build_dataset, epoch_order,
)
from mmcl.data.sources import load_eval_dataset, load_source, load_splits
from mmcl.data.stream import BatchStream, ShardBatchStream, build_stream
from mmcl.data.transforms import build_image_transform, cutmix

__all__ = [
    "AUGMENT_PRESETS", "DEVICE_PRESETS", "VIEW_PRESETS", "ViewPreset", "DataConfig", "DIGIT_CLASS_NAMES",
    "EVAL_TEMPLATES", "TRAIN_TEMPLATES", "load_digits_dataset", "DeviceAugment", "GPUAugment", "decode_image",
    "load_image", "ContrastiveCollator", "ContrastiveDataset", "ResumableSampler", "build_dataloader",
    "build_dataset", "epoch_order", "load_eval_dataset", "load_source", "load_splits", "BatchStream",
    "ShardBatchStream", "build_stream",
    "build_image_transform", "cutmix",
]
