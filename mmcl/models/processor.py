"""DualProcessor: the preprocessing that belongs to a DualEncoder's towers.

The image half is either a transformers image processor (towers loaded from a transformers
directory that ships one) or `TransformImageProcessor`, a resize / centre-crop / normalise
pipeline on torchvision transforms described by a few numbers (timm, torchvision, open_clip and
config-built towers). The text half is a transformers tokenizer or open_clip's BPE tokenizer.
Everything is saved as JSON plus the transformers files; nothing is pickled.
"""
from __future__ import annotations

import json
import os

import torch

from mmcl.models.towers.open_clip import OpenCLIPTokenizer

PROCESSOR_FILE = "mmcl_processor.json"


def _check_images(images) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images must be a non-empty list of PIL images, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL image, got {type(img).__name__}")
    return [img.convert("RGB") for img in images]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


class TransformImageProcessor:
    """Resize the shorter side to size / crop_pct, centre-crop to size (H, W), scale to [0, 1]
    and normalise with mean/std. Images → (B, 3, H, W) float32."""

    def __init__(self, size, mean, std, crop_pct: float = 1.0, interpolation: str = "bicubic"):
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"image size must be an int or (H, W) of positive ints, got {size}")
        for name, value in (("image_mean", mean), ("image_std", std)):
            if len(tuple(value)) != 3:
                raise ValueError(f"{name} must hold 3 floats (one per RGB channel), got {value}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"image_std must be > 0, got {std}")
        if not 0 < float(crop_pct) <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation must be bicubic, bilinear or nearest, got {interpolation!r}")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation

    @property
    def resize_to(self) -> int:
        return int(round(min(self.size) / self.crop_pct))

    def __call__(self, images: list) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode(self.interpolation)
        out = []
        for img in images:
            img = TF.resize(img, [self.resize_to], interpolation=mode)
            img = TF.center_crop(img, list(self.size))
            x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
            out.append(TF.normalize(x, list(self.mean), list(self.std)))
        return torch.stack(out)

    def to_json(self) -> dict:
        return {"kind": "transforms", "size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    def to_transformers(self):
        """The same steps as a transformers CLIPImageProcessor (for export_to_transformers)."""
        from transformers import CLIPImageProcessor
        from transformers.image_utils import PILImageResampling

        resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
                    "nearest": PILImageResampling.NEAREST}[self.interpolation]
        return CLIPImageProcessor(
            do_resize=True, size={"shortest_edge": self.resize_to}, resample=resample, do_center_crop=True,
            crop_size={"height": self.size[0], "width": self.size[1]}, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(self.mean), image_std=list(self.std), do_convert_rgb=True,
        )


class DualProcessor:
    """Image preprocessing and tokenisation for one DualEncoder.

    image_size (H, W), image_mean / image_std (3 floats each);
    preprocess_images(list of PIL) -> (B, 3, H, W); tokenize(list of str) -> {"input_ids": (B, L),
    "attention_mask": (B, L)}; __call__(images=..., text=...) -> both.
    pad_to_max_length: pad every text to the maximum length instead of the batch's longest
    (SigLIP's text tower pools its last position, so it sees the padding it was trained with).
    """

    def __init__(self, image_processor, tokenizer=None, text_max_length: int | None = None,
                 pad_to_max_length: bool = False):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.text_max_length = text_max_length
        self.pad_to_max_length = bool(pad_to_max_length)

    # ------------------------------------------------------------------ images
    @property
    def _is_transforms(self) -> bool:
        return isinstance(self.image_processor, TransformImageProcessor)

    @property
    def image_size(self) -> tuple[int, int]:
        if self._is_transforms:
            return self.image_processor.size
        p = self.image_processor
        size = p.crop_size if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None) else p.size
        size = dict(size)
        if "height" in size:
            return (int(size["height"]), int(size["width"]))
        edge = size.get("shortest_edge")
        return (int(edge), int(edge))

    @property
    def image_mean(self) -> tuple[float, float, float]:
        src = self.image_processor.mean if self._is_transforms else self.image_processor.image_mean
        return tuple(float(v) for v in src)

    @property
    def image_std(self) -> tuple[float, float, float]:
        src = self.image_processor.std if self._is_transforms else self.image_processor.image_std
        return tuple(float(v) for v in src)

    def preprocess_images(self, images) -> torch.Tensor:
        """List of PIL images (any mode; converted to RGB) → (B, 3, H, W) float32."""
        images = _check_images(images)
        if self._is_transforms:
            return self.image_processor(images)
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    # ------------------------------------------------------------------ text
    def tokenize(self, texts, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """List of strings → {"input_ids": (B, L) long, "attention_mask": (B, L) long}, padded to
        the longest text (to max_length with pad_to_max_length) and truncated to max_length
        (default: what the text tower accepts)."""
        if self.tokenizer is None:
            raise ValueError(
                "this model's processor has no tokenizer (image-only model, or a text tower built from a "
                "config): pass tokenizer=<tokenizer dir or object> to DualEncoder.from_towers"
            )
        texts = _check_texts(texts)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if max_length is not None and self.text_max_length is not None and max_length > self.text_max_length:
            raise ValueError(f"max_length={max_length} exceeds the text tower's {self.text_max_length} positions")
        limit = max_length or self.text_max_length
        if not hasattr(self.tokenizer, "save_pretrained"):  # open_clip's fixed-length BPE
            return self.tokenizer(texts, max_length=limit)
        if limit is None:
            limit = min(getattr(self.tokenizer, "model_max_length", 512), 512)
        padding = "max_length" if self.pad_to_max_length else True
        enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=limit, return_tensors="pt")
        ids = enc["input_ids"].long()
        # A tokenizer without an attention mask (SigLIP's) means every position is attended.
        mask = enc["attention_mask"].long() if "attention_mask" in enc else torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, images=None, text=None, max_length: int | None = None) -> dict:
        if images is None and text is None:
            raise ValueError("pass images=, text= or both")
        out = {}
        if images is not None:
            out["pixel_values"] = self.preprocess_images(images)
        if text is not None:
            out.update(self.tokenize(text, max_length=max_length))
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {"text_max_length": self.text_max_length}
        if self.pad_to_max_length:
            meta["pad_to_max_length"] = True
        if self._is_transforms:
            meta["image"] = self.image_processor.to_json()
        else:
            meta["image"] = {"kind": "transformers"}
            self.image_processor.save_pretrained(directory)
        if self.tokenizer is None:
            meta["text"] = None
        elif hasattr(self.tokenizer, "save_pretrained"):
            meta["text"] = {"kind": "transformers"}
            self.tokenizer.save_pretrained(directory)
        else:
            meta["text"] = self.tokenizer.to_json()
        with open(os.path.join(directory, PROCESSOR_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> "DualProcessor":
        path = os.path.join(directory, PROCESSOR_FILE)
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read processor file {path!r}: {exc}") from exc
        img = meta["image"]
        if img["kind"] == "transforms":
            image_processor = TransformImageProcessor(img["size"], img["mean"], img["std"], img["crop_pct"],
                                                      img["interpolation"])
        else:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(directory)
        tokenizer = None
        if meta.get("text"):
            if meta["text"]["kind"] == "transformers":
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(directory)
            else:
                tokenizer = OpenCLIPTokenizer(meta["text"]["context_length"])
        return cls(image_processor, tokenizer, meta.get("text_max_length"), meta.get("pad_to_max_length", False))
