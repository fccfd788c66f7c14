"""Two-view augmentation on the training device (`data.augment_on_device`), for image-only modes.

With `data.augment: none` the loader only decodes, resizes and crops (one uint8 view per sample,
a quarter of the bytes of a float32 view and no per-sample float work on the CPU); the random crops,
flips, colour jitter and grayscale of each view then run batched on the device through
mmcl.data.gpu_augment, per sample with its own parameters. On a GPU this removes the CPU data
pipeline as the bottleneck of small-image runs (CIFAR-10 with a ResNet-18); on CPU it is still
far cheaper than PIL transforms one image at a time.

No Gaussian blur here: at 32x32 the CIFAR protocols (MoCo's CIFAR-10 demo, lightly's benchmark)
leave it out as well.
"""
from __future__ import annotations

import torch

# (crop scale, colour jitter (brightness, contrast, saturation, hue)) of each preset; both apply
# jitter with p=0.8, grayscale with p=0.2 and a horizontal flip with p=0.5, as the CPU presets do.
PRESETS = {
    "mocov2": {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1)},
    "simclr": {"scale": (0.08, 1.0), "jitter": (0.8, 0.8, 0.8, 0.2)},
    # MoCo's CIFAR-10 demo: RandomResizedCrop(32) at torchvision's default scale, MoCo v2's jitter.
    "moco_cifar": {"scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1)},
}
VIEW_KEYS = ("view1", "view2")


class DeviceAugment:
    """`__call__(batch)` replaces batch["view1"] / batch["view2"] (B, 3, H, W) by independently
    augmented views of the same size on their device, float32 normalised with the processor's
    mean/std. The input views are uint8 images (what the loader gives for device views) or float
    views already normalised with that mean/std.

    Args:
        preset: one of PRESETS.
        processor: the model's processor (image_size, image_mean, image_std).
        generator: optional torch.Generator on the batch's device (tests); default: global RNG.
    """

    def __init__(self, preset: str, processor, generator: torch.Generator | None = None):
        from mmcl.data.gpu_augment import GPUAugment

        if preset not in PRESETS:
            raise ValueError(f"data.augment_on_device must be one of {', '.join(PRESETS)} or null, got {preset!r}")
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment = GPUAugment(tuple(processor.image_size), mean=processor.image_mean,
                                  std=processor.image_std, **PRESETS[preset])
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
