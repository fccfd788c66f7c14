"""scikit-learn's handwritten digits as an image-text dataset: the demo's built-in data.

Each 8x8 grey digit becomes an upscaled RGB PIL image with a label and a list of captions made from
``TRAIN_TEMPLATES``. ``EVAL_TEMPLATES`` share no template with them, so a zero-shot check on the
held-out split measures whether the text tower generalises beyond the training phrasing.
"""
from __future__ import annotations

import functools

import datasets
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGIT_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}, written by hand.",
    "a scan of a handwritten digit {}.",
    "a small blurry {}.",
    "a drawing of the numeral {}.",
    "{}",
    "a white {} on a black background.",
)

EVAL_TEMPLATES = (
    "an image of the number {}.",
    "a picture of a {}.",
    "this is a {}.",
    "a digit {}.",
)

assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES), "train and eval templates must be disjoint"

TEST_SIZE = 297  # 1,797 digits -> 1,500 train / 297 test


@functools.lru_cache(maxsize=4)  # datasets are immutable; building one takes ~1 s
def load_digits_dataset(split: str = "train", seed: int = 0, image_size: int = 32):
    """The handwritten digits as a ``datasets.Dataset`` with columns image, label, caption.

    Args:
        split: ``"train"`` (1,500 images) or ``"test"`` (297), a stratified split fixed by ``seed``.
        seed: seeds the split; the same seed always gives the same rows in the same order.
        image_size: side of the upscaled square RGB images (the originals are 8x8).

    Returns:
        ``datasets.Dataset``: ``image`` (PIL RGB, image_size x image_size), ``label``
        (ClassLabel over ``DIGIT_CLASS_NAMES``), ``caption`` (list of strings, one per template in
        ``TRAIN_TEMPLATES``, all naming the digit).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for the digits, got {split!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_SIZE, stratify=digits.target, random_state=seed
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    images, labels, captions = [], [], []
    for i in chosen:
        # Pixel values are 0..16; stretch to 0..255 before upscaling so the digit fills the range.
        grey = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        pil = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        images.append(pil.convert("RGB"))
        label = int(digits.target[i])
        labels.append(label)
        captions.append([t.format(DIGIT_CLASS_NAMES[label]) for t in TRAIN_TEMPLATES])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(DIGIT_CLASS_NAMES)),
            "caption": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "caption": captions}, features=features
    )
