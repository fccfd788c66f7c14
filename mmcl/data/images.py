"""mmcl's one image decoder: ``load_image`` raises naming what is wrong, ``decode_image`` skips.

Both accept what ``datasets`` stores for images (``{"bytes", "path"}`` dicts), raw bytes, file
paths, PIL images and uint8 arrays or tensors (H, W), (H, W, C) or (C, H, W), and return an RGB
PIL image. Training drops unreadable samples and counts them (``decode_image`` -> None);
evaluation and the command line stop with the reason (``load_image`` -> ValueError / TypeError).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["load_image", "decode_image"]

# What PIL raises for a missing, truncated, corrupt or oversized file.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(item) -> Image.Image:
    """One image as an RGB PIL image, decoded now (a truncated file fails here, not later).

    Args:
        item: a PIL image; a path (str / PathLike); raw encoded bytes; a ``datasets.Image`` cell
            ``{"bytes": ..., "path": ...}``; or a uint8 array / tensor (H, W), (H, W, C), (C, H, W).

    Raises:
        ValueError: a path that does not exist, or data that does not decode (names the file).
        TypeError: an unsupported type, or an array that is not uint8.
    """
    if isinstance(item, Image.Image):
        return _decoded(item, "<PIL image>")
    if isinstance(item, dict):  # an undecoded `datasets.Image` cell
        if item.get("bytes") is not None:
            return _open(io.BytesIO(item["bytes"]), item.get("path") or "<image bytes>")
        item = item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return _open(io.BytesIO(item), "<image bytes>")
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise ValueError(f"image file not found: {os.fspath(item)}")
        return _open(item, os.fspath(item))
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return Image.fromarray(_hwc(item)).convert("RGB")
    raise TypeError(f"cannot read an image from {type(item).__name__}; pass a PIL image, a path or a uint8 array")


def decode_image(item) -> Image.Image | None:
    """``load_image(item)``, or None when it cannot be read (missing, corrupt, unsupported)."""
    try:
        return load_image(item)
    except (ValueError, TypeError):
        return None


def _hwc(array: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) or (H, W, C) array from (H, W), (H, W, C) or (C, H, W)."""
    if array.dtype != np.uint8:
        raise TypeError(f"a raw image array must be uint8, got {array.dtype} (float tensors are pixel values)")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"a raw image array must be (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    return array


def _open(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {name}: {err}") from None


def _decoded(image: Image.Image, name: str) -> Image.Image:
    # PIL decodes lazily; converting forces it, so a truncated file fails now, not inside a transform.
    try:
        return image.convert("RGB")
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {name}: {err}") from None
