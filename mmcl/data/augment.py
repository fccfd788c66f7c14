"""The augmentation presets: one table read by the CPU transforms and the device augmenter.

A view preset is the random part of a two-view recipe (crop scale, colour jitter, grayscale,
flip, blur). ``mmcl.data.transforms`` builds torchvision PIL pipelines from it, one image at a
time in the DataLoader workers (``data.augment``); ``mmcl.data.gpu_augment.DeviceAugment``
applies the same numbers to whole batches on the training device (``data.augment_on_device``),
without the Gaussian blur: at 32x32 the CIFAR protocols (MoCo's CIFAR-10 demo, lightly's
benchmark) leave it out as well.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ViewPreset", "VIEW_PRESETS", "AUGMENT_PRESETS", "DEVICE_PRESETS"]


@dataclass(frozen=True)
class ViewPreset:
    """The random augmentation of one view.

    scale: RandomResizedCrop's area range; jitter: ColorJitter's (brightness, contrast,
    saturation, hue), applied with probability jitter_p; gray_p: RandomGrayscale; flip_p:
    horizontal flip; blur_p: Gaussian blur (sigma 0.1-2, kernel about a tenth of the side), CPU
    views only; flip_first: flip right after the crop (SimCLR's order) rather than last (MoCo v2's).
    """

    scale: tuple[float, float]
    jitter: tuple[float, float, float, float]
    jitter_p: float = 0.8
    gray_p: float = 0.2
    flip_p: float = 0.5
    blur_p: float = 0.5
    flip_first: bool = False

    def device_kwargs(self) -> dict:
        """The keyword arguments of ``GPUAugment`` / ``sample_augment_params`` for this preset."""
        return {"scale": self.scale, "jitter": self.jitter, "jitter_p": self.jitter_p, "gray_p": self.gray_p,
                "flip_p": self.flip_p}


VIEW_PRESETS = {
    # SimCLR (arXiv:2002.05709, appendix A).
    "simclr": ViewPreset(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), flip_first=True),
    # MoCo v2 (arXiv:2003.04297): SimCLR's recipe with a milder crop and jitter.
    "mocov2": ViewPreset(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1)),
    # MoCo's CIFAR-10 demo: RandomResizedCrop(32) at torchvision's default scale, MoCo v2's jitter.
    "moco_cifar": ViewPreset(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0),
}

# ``data.augment``: deterministic "none" / "clip" (the tower's own preprocessing) and two view presets.
AUGMENT_PRESETS = ("none", "clip", "simclr", "mocov2")
# ``data.augment_on_device``: every view preset, as keyword arguments of the batched augmenter.
DEVICE_PRESETS = {name: preset.device_kwargs() for name, preset in VIEW_PRESETS.items()}
