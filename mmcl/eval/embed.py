"""Embedding helpers: run a model's towers over many images or texts, batched, without gradients.

Images may be PIL images, file paths, raw uint8 arrays/tensors (H, W, C) / (C, H, W), a float
tensor of pixel values already prepared by `model.processor` ((N, 3, H, W) or (3, H, W)), or a
`datasets.Dataset` whose image column holds any of these. Items are decoded one batch at a time
(by `mmcl.data.images.load_image`, which raises naming a file it cannot read), so a folder of a
million files never sits in memory at once.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from mmcl.data.images import load_image
from mmcl.distributed import rank
from mmcl.eval._checks import positive_int

__all__ = ["load_image", "embed_images", "embed_texts", "model_device", "iter_image_batches"]


IMAGE_FEATURES = ("embeddings", "tower")  # what embed_images returns: the head's output, or the tower's


def _show_progress(progress: bool) -> bool:
    return bool(progress) and rank() == 0  # one bar per run, not one per process


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate under `model.eval()` and `torch.inference_mode()`, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _is_pixel_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _as_items(images, image_column: str):
    """Normalise the accepted inputs to something indexable with len(), or a pixel tensor (N, 3, H, W)."""
    if isinstance(images, datasets.Dataset):
        if image_column not in images.column_names:
            raise ValueError(f"image_column {image_column!r} is not in the dataset; columns: {images.column_names}")
        return _DatasetColumn(images, image_column)
    if _is_pixel_tensor(images):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel values must be (N, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        return images
    if isinstance(images, torch.Tensor) and images.dim() == 4:  # a uint8 batch (N, C, H, W) / (N, H, W, C)
        return list(images)
    if isinstance(images, (str, os.PathLike, dict, torch.Tensor, np.ndarray)) or hasattr(images, "convert"):
        return [images]  # a single image
    if isinstance(images, Sequence):
        return images
    raise TypeError(
        f"images must be a list of images/paths, a tensor or a datasets.Dataset, got {type(images).__name__}"
    )


class _DatasetColumn:
    """Lazy view of one column; slicing reads only that slice. An `Image` column is read undecoded
    and decoded by `load_image`, so a corrupt file raises mmcl's ValueError naming its row."""

    def __init__(self, dataset, column: str):
        if isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: slice):
        return self.dataset[index][self.column]


def iter_image_batches(model, images, *, image_column: str = "image", batch_size: int = 64,
                       device=None) -> Iterator[torch.Tensor]:
    """Yield (b, 3, H, W) pixel batches prepared by `model.processor`, on `device` (default: the
    model's)."""
    items = _as_items(images, image_column)
    batch_size = positive_int("batch_size", batch_size)
    device = model_device(model) if device is None else torch.device(device)
    if len(items) == 0:
        raise ValueError("no images given")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        if _is_pixel_tensor(chunk):
            pixels = chunk
        else:
            pixels = model.processor.preprocess_images([_load_at(x, start + i) for i, x in enumerate(chunk)])
        yield pixels.to(device)


def _load_at(item, index: int):
    try:
        return load_image(item)
    except (ValueError, TypeError) as err:
        raise type(err)(f"image {index}: {err}") from None


def _count(images, image_column: str) -> int:
    items = _as_items(images, image_column)
    return len(items)


def embed_images(
    model,
    images,
    *,
    image_column: str = "image",
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = False,
    features: str = "embeddings",
) -> torch.Tensor:
    """Image embeddings (N, P) as float32 on CPU, from `model.encode_image` batch by batch.

    `images`: a `datasets.Dataset` (its `image_column` is used), a list of PIL images / paths /
    uint8 arrays, one such image, or a float pixel tensor (N, 3, H, W) already preprocessed.
    `features`: "embeddings" (the projection head's output, (N, P)) or "tower" (the image tower's
    features before the head, `model.image_features`, (N, F)); either L2-normalised unless
    normalize=False.
    """
    if features not in IMAGE_FEATURES:
        raise ValueError(f"features must be one of {', '.join(IMAGE_FEATURES)}, got {features!r}")
    total = _count(images, image_column)
    out = []
    bar = tqdm(total=total, desc="images", unit="img", disable=not _show_progress(progress))
    with eval_mode(model), bar:
        for pixels in iter_image_batches(model, images, image_column=image_column, batch_size=batch_size):
            if features == "embeddings":
                x = model.encode_image(pixels, normalize=normalize)
            else:
                x = model.image_features(pixels)
                x = torch.nn.functional.normalize(x, dim=-1) if normalize else x
            out.append(x.float().cpu())
            bar.update(pixels.shape[0])
    return torch.cat(out)


def embed_texts(model, texts, *, batch_size: int = 256, normalize: bool = True, progress: bool = False) -> torch.Tensor:
    """Text embeddings (N, P) as float32 on CPU, from `model.processor.tokenize` + `model.encode_text`."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a list of strings")
    if len(texts) == 0:
        raise ValueError("texts is empty")
    batch_size = positive_int("batch_size", batch_size)
    if getattr(model, "has_text_tower", True) is False:
        raise ValueError("this model has no text tower; text embeddings need an image-text model")
    device = model_device(model)
    out = []
    bar = tqdm(total=len(texts), desc="texts", unit="txt", disable=not _show_progress(progress))
    with eval_mode(model), bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            tokens = model.processor.tokenize(chunk)
            ids = tokens["input_ids"].to(device)
            mask = tokens.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            out.append(model.encode_text(ids, attention_mask=mask, normalize=normalize).float().cpu())
            bar.update(len(chunk))
    return torch.cat(out)
