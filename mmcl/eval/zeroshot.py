"""Zero-shot classification: class names x prompt templates -> a text classifier over image embeddings.

CLIP's procedure (Radford et al., 2021): each class name is put into every template, the texts are
embedded and L2-normalised, averaged per class and renormalised. An image is then classified by
softmax(logit_scale * cos(image, class)). With one template "{}" this is exactly the model's own
image-text softmax over the class names.

A sigmoid model (SigLIP: one with a `logit_bias`) scores each class on its own:
σ(logit_scale * cos(image, class) + logit_bias) is the probability that the image matches that
class's prompts, independently of the other classes (as transformers' zero-shot pipeline does
for SigLIP), so a row need not sum to 1. Top-1 / top-5 rank the same logits either way.
"""
from __future__ import annotations

from typing import Sequence

import datasets
import torch
import torch.nn.functional as F

from mmcl.eval._checks import positive_int
from mmcl.eval.embed import embed_images, embed_texts

__all__ = ["ZeroShotClassifier", "IMAGENET_TEMPLATES", "DEFAULT_TEMPLATES", "build_class_embeddings"]

# The 80 prompts CLIP used for ImageNet zero-shot classification, in CLIP's order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# A short, cheap default: the 7-prompt subset CLIP's authors found to work about as well as all 80.
DEFAULT_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)

TEMPLATE_SETS = {"default": DEFAULT_TEMPLATES, "imagenet": IMAGENET_TEMPLATES, "none": ("{}",)}


def _check_class_names(class_names) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError("class_names must be a list of strings, e.g. ['cat', 'dog']")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; give at least one class name")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class_names has duplicates, which would make the labels ambiguous: {duplicates}")
    return names


def _check_templates(templates) -> list[str]:
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        raise ValueError(
            f"templates={templates!r}: pass a list of prompts containing '{{}}' or one of {sorted(TEMPLATE_SETS)}"
        )
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty; give at least one prompt such as 'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"every template must be a string containing '{{}}' for the class name, got {t!r}")
    return templates


def build_class_embeddings(model, class_names, templates=None, *, batch_size: int = 256, progress: bool = False):
    """Class embeddings (C, P): per class, the mean of the normalised text embeddings of all its
    prompts, renormalised (CLIP's zero-shot classifier weights)."""
    names = _check_class_names(class_names)
    templates = _check_templates(templates)
    # str.replace rather than str.format: a class name or template may itself contain braces.
    texts = [t.replace("{}", name) for name in names for t in templates]
    text_embeds = embed_texts(model, texts, batch_size=batch_size, normalize=True, progress=progress)
    per_class = text_embeds.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


class ZeroShotClassifier:
    """Classify images among `class_names` with an image-text model and no training.

    Args:
        model: an `mmcl.DualEncoder` (anything with `encode_image`, `encode_text`, `logit_scale()`
            and a `processor`; a `logit_bias` that is not None makes it a sigmoid model).
        class_names: C class names, e.g. ["cat", "dog"]; label i of a dataset means class_names[i].
        templates: prompts with "{}" for the class name; None -> DEFAULT_TEMPLATES; the strings
            "imagenet" (CLIP's 80), "default" or "none" (the bare class name) pick a built-in set.
        batch_size: images (and 4x as many texts) per forward pass.
        progress: show tqdm progress bars.
    """

    def __init__(self, model, class_names, templates=None, batch_size: int = 64, progress: bool = True):
        self.model = model
        self.batch_size = positive_int("batch_size", batch_size)
        self.progress = progress
        self.class_names = _check_class_names(class_names)
        self.templates = _check_templates(templates)
        self.class_embeddings = build_class_embeddings(
            model, self.class_names, self.templates, batch_size=4 * self.batch_size, progress=False
        )  # (C, P)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sigmoid(self) -> bool:
        """True for a sigmoid (SigLIP) model: `predict` gives independent per-class probabilities."""
        return getattr(self.model, "logit_bias", None) is not None

    def logits(self, images, *, image_column: str = "image") -> torch.Tensor:
        """(N, C) logits, logit_scale * cos(image, class) (+ logit_bias for a sigmoid model),
        float32 on CPU.

        `images`: PIL images, file paths, uint8 arrays, a float pixel tensor (N, 3, H, W) from
        `model.processor`, or a `datasets.Dataset` with an `image_column`.
        """
        feats = embed_images(
            self.model, images, image_column=image_column, batch_size=self.batch_size, progress=self.progress
        )
        with torch.inference_mode():
            scale = self.model.logit_scale().detach().float().cpu()
            bias = self.model.logit_bias.detach().float().cpu() if self.sigmoid else 0.0
        return scale * feats @ self.class_embeddings.T + bias

    def predict(self, images, *, image_column: str = "image") -> torch.Tensor:
        """(N, C) class probabilities for N images: softmax over the C classes, or for a
        sigmoid model σ(logit) of each class independently; see `logits`."""
        logits = self.logits(images, image_column=image_column)
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)

    def evaluate(
        self, dataset, image_column: str = "image", label_column: str = "label", *, return_predictions: bool = False
    ) -> dict:
        """Top-1 and top-5 accuracy on a `datasets.Dataset` of images and labels.

        Labels are integers indexing `class_names`, or strings equal to a class name. With fewer
        than 5 classes "top5" is top-C (always 1.0). Returns {"top1", "top5", "num_samples"}; with
        `return_predictions`, also "predictions" and "labels", (N,) long tensors of class indices.
        """
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        if label_column not in dataset.column_names:
            raise ValueError(f"label_column {label_column!r} is not in the dataset; columns: {dataset.column_names}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        labels = self._label_indices(dataset[label_column], label_column)
        logits = self.logits(dataset, image_column=image_column)
        topk = logits.topk(min(5, self.num_classes), dim=1).indices
        hits = topk == labels[:, None]
        result = {
            "top1": hits[:, 0].double().mean().item(),
            "top5": hits.any(dim=1).double().mean().item(),
            "num_samples": len(dataset),
        }
        if return_predictions:
            result["predictions"], result["labels"] = topk[:, 0], labels
        return result

    def _label_indices(self, values, column: str) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.class_names)}
        out = []
        for v in values:
            if isinstance(v, str):
                if v not in index:
                    raise ValueError(f"label {v!r} in column {column!r} is not one of class_names")
                out.append(index[v])
            elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.num_classes:
                out.append(v)
            else:
                raise ValueError(
                    f"label {v!r} in column {column!r} is not a class index in [0, {self.num_classes}) "
                    "or a class name"
                )
        return torch.tensor(out, dtype=torch.long)
