"""Data for contrastive training: sources through 🤗 datasets, augmentation presets, loaders."""
from mmcl.data.config import AUGMENT_PRESETS, MODES, DataConfig
from mmcl.data.digits import DIGIT_CLASS_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, load_digits_dataset
from mmcl.data.loader import ContrastiveCollator, ContrastiveDataset, ResumableSampler, build_dataloader
from mmcl.data.sources import ImageReader, load_eval_dataset, load_source
from mmcl.data.transforms import build_image_transform, cutmix

__all__ = [
    "AUGMENT_PRESETS", "MODES", "DataConfig", "DIGIT_CLASS_NAMES", "EVAL_TEMPLATES", "TRAIN_TEMPLATES",
    "load_digits_dataset", "ContrastiveCollator", "ContrastiveDataset", "ResumableSampler",
    "build_dataloader", "ImageReader", "load_eval_dataset", "load_source", "build_image_transform", "cutmix",
]
