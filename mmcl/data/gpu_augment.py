"""Batched augmentation on the device: random resized crop, flip, colour jitter and grayscale.

The CPU presets augment one PIL image at a time in DataLoader workers; on a GPU that becomes the
bottleneck for small towers. Here one batch (B, 3, H, W) is augmented at once on whatever device it
lives on, each sample with its own random parameters. The parameters are drawn first
(``sample_augment_params``) and applied second (``apply_augment``), so a test can replay each
sample through torchvision's functional ops with the same numbers.

Semantics follow torchvision's tensor ops: crop then bilinear resize (no antialiasing, i.e.
``F.resized_crop(..., antialias=False)``), ``hflip``, ColorJitter's four adjustments in a random
order per sample, ``rgb_to_grayscale`` with 3 output channels.

``DeviceAugment`` is the training loop's use of it (``data.augment_on_device``): the loader then
only decodes, resizes and crops (one uint8 view per sample, a quarter of the bytes of a float32
view), and both views are augmented here with a preset of ``mmcl.data.augment``, without blur.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmcl.data.augment import DEVICE_PRESETS

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class AugmentParams:
    """Per-sample parameters for a batch of B images.

    crop (B, 4) long: top, left, height, width; flip (B,) bool; jitter (B,) bool: colour jitter on;
    factors (B, 4) float: brightness, contrast, saturation factors and hue shift; order (B, 4) long:
    the order the four adjustments run in; gray (B,) bool.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor


def sample_augment_params(batch_size: int, height: int, width: int, *, scale=(0.08, 1.0),
                          ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                          gray_p=0.2, generator: torch.Generator | None = None,
                          device=None) -> AugmentParams:
    """Draw per-sample parameters as torchvision's RandomResizedCrop / ColorJitter would.

    The crop takes the first of 10 (area, log-ratio) draws that fits inside the image, else the
    central crop of the closest allowed aspect ratio, as ``RandomResizedCrop.get_params`` does.
    ``generator`` must live on ``device`` (default CPU).
    """
    if batch_size < 1 or height < 1 or width < 1:
        raise ValueError(f"batch_size, height and width must be >= 1, got {batch_size}, {height}, {width}")
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"jitter is (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter}")
    kw = {"generator": generator, "device": device}
    b, tries = batch_size, 10
    area = height * width * torch.empty(b, tries, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                          generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # index of the first fitting draw
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(b, 2, **kw)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    lo = torch.tensor([max(0.0, 1 - jitter[0]), max(0.0, 1 - jitter[1]), max(0.0, 1 - jitter[2]), -jitter[3]],
                      device=device)
    hi = torch.tensor([1 + jitter[0], 1 + jitter[1], 1 + jitter[2], jitter[3]], device=device)
    factors = lo + (hi - lo) * torch.rand(b, 4, **kw)
    return AugmentParams(
        crop=torch.stack([top, left, h, w], dim=1),
        flip=torch.rand(b, **kw) < flip_p,
        jitter=torch.rand(b, **kw) < jitter_p,
        factors=factors,
        order=torch.argsort(torch.rand(b, 4, **kw), dim=1),
        gray=torch.rand(b, **kw) < gray_p,
    )


def resized_crop(images: torch.Tensor, crop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each image to its box and resize bilinearly: (B, C, H, W), crop (B, 4) -> (B, C, h, w).

    Matches ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=False)`` of each
    crop: the source coordinate of an output pixel is clamped into its own crop, so no pixel outside
    the box leaks in at the edges.
    """
    b, _, height, width = images.shape
    out_h, out_w = size
    crop = crop.to(device=images.device, dtype=images.dtype if images.is_floating_point() else torch.float32)
    top, left, ch, cw = crop.unbind(1)
    oy = torch.arange(out_h, device=images.device, dtype=crop.dtype) + 0.5
    ox = torch.arange(out_w, device=images.device, dtype=crop.dtype) + 0.5
    sy = (oy[None] * (ch / out_h)[:, None] - 0.5).clamp(min=0)
    sx = (ox[None] * (cw / out_w)[:, None] - 0.5).clamp(min=0)
    sy = torch.minimum(sy, (ch - 1)[:, None]) + top[:, None]
    sx = torch.minimum(sx, (cw - 1)[:, None]) + left[:, None]
    # Pixel coordinate -> grid_sample's [-1, 1] with align_corners=False.
    gy = (2 * sy + 1) / height - 1
    gx = (2 * sx + 1) / width - 1
    grid = torch.stack([gx[:, None, :].expand(b, out_h, out_w), gy[:, :, None].expand(b, out_h, out_w)], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights."""
    r, g, b = images.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _blend(images, other, factor):
    return (factor[:, None, None, None] * images + (1 - factor[:, None, None, None]) * other).clamp(0, 1)


def _rgb_to_hsv(images):
    r, g, b = images.unbind(1)
    maxc, minc = images.max(dim=1).values, images.min(dim=1).values
    delta = maxc - minc
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)
    sat = torch.where(grey, torch.zeros_like(delta), delta / torch.where(grey, torch.ones_like(maxc), maxc))
    # Sector of the maximum channel, red first on ties, then green.
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    hue = torch.where(is_r, (g - b) / safe, torch.where(is_g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.remainder(hue / 6, 1.0), sat, maxc


def _hsv_to_rgb(hue, sat, val):
    h6 = hue * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = torch.remainder(sector, 6).long()
    p = (val * (1 - sat)).clamp(0, 1)
    q = (val * (1 - sat * frac)).clamp(0, 1)
    t = (val * (1 - sat * (1 - frac))).clamp(0, 1)
    # Per sector (0..5) which of v, t, p, q each of r, g, b takes.
    table = torch.stack([
        torch.stack([val, q, p, p, t, val]),
        torch.stack([t, val, val, q, p, p]),
        torch.stack([p, p, t, val, val, q]),
    ])  # (3, 6, B, H, W)
    idx = sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *sector.shape)
    return table.gather(1, idx).squeeze(1).transpose(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (B,) in [-0.5, 0.5] turns: (B, 3, H, W) -> (B, 3, H, W)."""
    hue, sat, val = _rgb_to_hsv(images)
    hue = torch.remainder(hue + shift[:, None, None], 1.0)
    return _hsv_to_rgb(hue, sat, val)


def _color_op(images, op: int, factor):
    if op == 0:
        return (images * factor[:, None, None, None]).clamp(0, 1)
    if op == 1:
        mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(images, mean, factor)
    if op == 2:
        return _blend(images, grayscale(images), factor)
    return adjust_hue(images, factor)


def apply_augment(images: torch.Tensor, params: AugmentParams, size: tuple[int, int],
                  jitter=(0.4, 0.4, 0.4, 0.1)) -> torch.Tensor:
    """Apply ``params`` to (B, 3, H, W) floats in [0, 1] -> (B, 3, *size), on images' device.

    Adjustments whose strength in ``jitter`` is 0 are skipped, as ColorJitter skips them.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    if params.crop.shape[0] != images.shape[0]:
        raise ValueError(f"params are for {params.crop.shape[0]} images, the batch has {images.shape[0]}")
    dev = images.device
    x = resized_crop(images, params.crop, size)
    flip = params.flip.to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    on, order, factors = params.jitter.to(dev), params.order.to(dev), params.factors.to(dev, x.dtype)
    for stage in range(4):
        for op in range(4):
            if jitter[op] == 0:
                continue
            sel = on & (order[:, stage] == op)
            if sel.any():
                x[sel] = _color_op(x[sel], op, factors[sel, op])
    gray = params.gray.to(dev)
    return torch.where(gray[:, None, None, None], grayscale(x).expand_as(x), x)


class GPUAugment(torch.nn.Module):
    """SimCLR/MoCo-style augmentation of a whole batch on its device, per-sample parameters.

    ``GPUAugment(size=(224, 224))(images)`` with images (B, 3, H, W) floats in [0, 1] (uint8 is
    scaled) returns (B, 3, *size), normalised with ``mean``/``std`` when given. Call it twice for two
    independent views. Defaults are MoCo v2's crop scale and colour jitter, without blur.
    """

    def __init__(self, size, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
                 jitter_p=0.8, gray_p=0.2, mean=None, std=None):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.kwargs = dict(scale=scale, ratio=ratio, flip_p=flip_p, jitter=jitter, jitter_p=jitter_p, gray_p=gray_p)
        self.jitter = jitter
        self.mean = None if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, 3, 1, 1)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        b, _, h, w = images.shape
        # Parameters are drawn where the generator lives (a CPU generator for CUDA images is fine).
        device = generator.device if generator is not None else images.device
        params = sample_augment_params(b, h, w, generator=generator, device=device, **self.kwargs)
        x = apply_augment(images, params, self.size, self.jitter)
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        return x


VIEW_KEYS = ("view1", "view2")


class DeviceAugment:
    """``__call__(batch)`` replaces batch["view1"] / batch["view2"] (B, 3, H, W) by independently
    augmented views of the same size on their device, float32 normalised with the processor's
    mean/std. The input views are uint8 images (what the loader gives for device views) or float
    views already normalised with that mean/std.

    Args:
        preset: a name in ``mmcl.data.augment.DEVICE_PRESETS``.
        processor: the model's processor (image_size, image_mean, image_std).
        generator: optional torch.Generator on the batch's device (tests); default: global RNG.
    """

    def __init__(self, preset: str, processor, generator: torch.Generator | None = None):
        if preset not in DEVICE_PRESETS:
            raise ValueError(f"data.augment_on_device must be one of {', '.join(DEVICE_PRESETS)} or null, got {preset!r}")
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment = GPUAugment(tuple(processor.image_size), mean=processor.image_mean,
                                  std=processor.image_std, **DEVICE_PRESETS[preset])
        self.generator = generator

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        missing = [k for k in VIEW_KEYS if k not in batch]
        if missing:
            raise ValueError(f"data.augment_on_device needs batches with {VIEW_KEYS}, missing {missing}")
        out = dict(batch)
        for key in VIEW_KEYS:
            x = batch[key]
            if x.dtype == torch.uint8:
                images = x.float().div_(255)  # the colour ops work on [0, 1] images
                dtype = torch.float32
            else:  # undo the loader's normalisation
                images = (x.float() * self.std.to(x.device) + self.mean.to(x.device)).clamp_(0, 1)
                dtype = x.dtype
            out[key] = self.augment(images, generator=self.generator).to(dtype)
        return out
