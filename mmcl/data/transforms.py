"""CPU augmentation (PIL image -> (3, H, W) tensor) from the preset table, and CutMix within a batch."""
from __future__ import annotations

import math

import torch
from torchvision import transforms as T

from mmcl.data.augment import AUGMENT_PRESETS, VIEW_PRESETS, ViewPreset


def processor_geometry(processor, image_size: int | None) -> tuple[tuple[int, int], tuple, tuple]:
    """(H, W), mean and std to produce for ``processor``, with ``image_size`` overriding its size."""
    for attr in ("image_size", "image_mean", "image_std"):
        if not hasattr(processor, attr):
            raise TypeError(
                f"processor must expose image_size, image_mean and image_std (an mmcl DualProcessor); "
                f"{type(processor).__name__} has no {attr!r}"
            )
    if image_size is not None:
        size = (int(image_size), int(image_size))
    else:
        size = processor.image_size
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"processor.image_mean/image_std must have 3 values each, got {mean} and {std}")
    return size, mean, std


def build_image_transform(augment: str, processor, image_size: int | None = None):
    """A callable PIL RGB image -> (3, H, W) float32 tensor for one augmentation preset.

    Presets:
        ``"clip"``: the processor's own preprocessing (``processor.preprocess_images``) when
            ``image_size`` is None, so training sees exactly what the tower sees at inference;
            with an ``image_size`` override, resize (bicubic) + centre crop + normalise.
        ``"none"``: resize (bicubic) the short side + centre crop + normalise with the processor's
            mean and std; deterministic.
        ``"simclr"``, ``"mocov2"``: the view presets of ``mmcl.data.augment.VIEW_PRESETS`` (SimCLR's:
            RandomResizedCrop(scale 0.08-1), flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale
            p=0.2, Gaussian blur p=0.5; MoCo v2's: scale 0.2-1, ColorJitter(0.4, 0.4, 0.4, 0.1),
            the flip last), then normalise.
    Random presets draw from torch's global generator; the loader seeds it per sample.
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {AUGMENT_PRESETS}, got {augment!r}")
    size, mean, std = processor_geometry(processor, image_size)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if augment == "clip" and image_size is None and hasattr(processor, "preprocess_images"):
        return _ProcessorTransform(processor)
    if augment in ("clip", "none"):
        return T.Compose([*_resize_crop(size), *finish])
    return T.Compose([*view_ops(VIEW_PRESETS[augment], size), *finish])


def view_ops(preset: ViewPreset, size: tuple[int, int]) -> list:
    """The torchvision PIL ops of a view preset, in its order: crop, (flip,) jitter, grayscale,
    blur, (flip)."""
    flip = T.RandomHorizontalFlip(p=preset.flip_p)
    ops = [T.RandomResizedCrop(size, scale=preset.scale, interpolation=T.InterpolationMode.BICUBIC)]
    ops += [flip] if preset.flip_first else []
    ops += [T.RandomApply([T.ColorJitter(*preset.jitter)], p=preset.jitter_p), T.RandomGrayscale(p=preset.gray_p)]
    if preset.blur_p > 0:
        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)  # about a tenth of the image side, odd, as in SimCLR
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=preset.blur_p))
    ops += [] if preset.flip_first else [flip]
    return ops


def build_uint8_transform(processor, image_size: int | None = None):
    """PIL RGB image -> (3, H, W) uint8 tensor: the "none" preset's resize and centre crop, neither
    converted to float nor normalised. For views augmented on the training device, which then
    receives a quarter of the bytes of a float32 view."""
    size, _, _ = processor_geometry(processor, image_size)
    return T.Compose([*_resize_crop(size), T.PILToTensor()])


def _resize_crop(size):
    """The deterministic geometry of the "none"/"clip" presets: bicubic short-side resize, centre crop."""
    return [T.Resize(min(size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]


class _ProcessorTransform:
    """The tower's own preprocessing for one image (picklable, for DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor.preprocess_images([image])[0].float()


def cutmix(images: torch.Tensor, prob: float, generator: torch.Generator):
    """CutMix within a batch: each sample, with probability ``prob``, gets a box from another.

    Args:
        images: (B, 3, H, W), or a list of such tensors (the views of one batch), all mixed with the
            same partner and box so the views of a sample stay consistent.
        prob: probability that a sample is mixed.
        generator: a CPU ``torch.Generator`` (the loader seeds it from the batch's sample keys).

    Returns:
        ``(mixed, partner, lam, boxes)``: the mixed tensor(s); partner (B,) long, the sample each
        one took its box from (itself when unmixed); lam (B,) float, the fraction of the image still
        its own; boxes (B, 4) long, y0, y1, x0, x1 of the pasted box (empty when unmixed).
    """
    views = images if isinstance(images, (list, tuple)) else [images]
    b, _, h, w = views[0].shape
    partner = torch.arange(b)
    lam = torch.ones(b)
    boxes = torch.zeros(b, 4, dtype=torch.long)
    mixed = [v.clone() for v in views]
    if b < 2 or prob <= 0:
        return (mixed if isinstance(images, (list, tuple)) else mixed[0]), partner, lam, boxes
    apply = torch.rand(b, generator=generator) < prob
    for i in torch.nonzero(apply).flatten().tolist():
        j = int(torch.randint(b - 1, (1,), generator=generator))
        j = j + 1 if j >= i else j  # a partner other than itself
        ratio = math.sqrt(1.0 - float(torch.rand((), generator=generator)))
        cy, cx = int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator))
        hh, ww = int(h * ratio), int(w * ratio)
        y0, y1 = max(cy - hh // 2, 0), min(cy + hh // 2, h)
        x0, x1 = max(cx - ww // 2, 0), min(cx + ww // 2, w)
        for src, dst in zip(views, mixed):
            dst[i, :, y0:y1, x0:x1] = src[j, :, y0:y1, x0:x1]
        partner[i] = j
        lam[i] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        boxes[i] = torch.tensor([y0, y1, x0, x1])
    return (mixed if isinstance(images, (list, tuple)) else mixed[0]), partner, lam, boxes
