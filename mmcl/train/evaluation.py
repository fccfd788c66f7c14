"""The `eval:` config section and evaluation during and after training.

The objective's eval_kind decides what is measured on the held-out data of the data config:
"zeroshot" (image-text methods): zero-shot top-1 / top-5 with class names x prompt templates, or
image<->text recall@k when the held-out data has captions but no labels; "knn" (image-only
methods): kNN top-1 of held-out image embeddings against training image embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmcl.data import EVAL_TEMPLATES, load_eval_dataset, load_source
from mmcl.data.shards import is_stream_source
from mmcl.data.sources import bounded_samples
from mmcl.eval import embed_images, knn_accuracy
from mmcl.eval.embed import IMAGE_FEATURES, iter_image_batches
from mmcl.methods import objective_class
from mmcl.retrieval import evaluate as retrieval_evaluate
from mmcl.zeroshot import ZeroShotClassifier

# Held-out and kNN memory-bank images are decoded and preprocessed once and kept as pixel tensors
# (on the CPU) when they take at most this many bytes, so periodic evaluations only run the model
# (CIFAR-10's 60,000 images at 32x32 take 737 MB).
PIXEL_CACHE_BYTES = 1 << 30


@dataclass
class EvalConfig:
    """The `eval:` section."""

    enabled: bool = True
    max_samples: int | None = None  # held-out samples used by evaluation
    # "eval": mmcl.data's EVAL_TEMPLATES for the digits (else zeroshot's default); a list; None: zeroshot default
    templates: str | list | None = "eval"
    class_names: list | None = None  # None: the label column's ClassLabel names
    knn_k: int = 20
    knn_temperature: float = 0.1
    knn_train_samples: int | None = 5000  # training images in the kNN memory bank; null: all of them
    # kNN on "embeddings" (the projection head's output) or "tower" (the image tower's features
    # before the head: the representation SimCLR / MoCo / BYOL evaluate)
    knn_features: str = "embeddings"
    batch_size: int = 128

    def validate(self) -> None:
        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        for name in ("knn_k", "batch_size"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"eval.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("max_samples", "knn_train_samples"):
            value = getattr(self, name)
            if value is not None and not positive_int(value):
                raise ValueError(f"eval.{name} must be null or an int >= 1, got {value!r}")
        if not self.knn_temperature > 0:
            raise ValueError(f"eval.knn_temperature must be > 0, got {self.knn_temperature}")
        if self.knn_features not in IMAGE_FEATURES:
            raise ValueError(f"eval.knn_features must be one of {', '.join(IMAGE_FEATURES)}, got {self.knn_features!r}")


def _subset(ds, n: int, seed: int):
    """A seeded random subset of n rows: files are often sorted by label (CIFAR-10's parquet is),
    so the first n rows could be a single class."""
    return ds if n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


class Evaluator:
    """Loads the held-out data once; `__call__(model)` returns a dict of metrics (may be empty).

    kind "zeroshot": zero-shot classification of the held-out images with class names × prompt
    templates (for the digits, mmcl.data.EVAL_TEMPLATES, none of which is used in training).
    kind "knn": kNN (k, temperature from the eval config) of held-out image embeddings against
    training image embeddings (un-augmented), both from the current model.

    Args:
        cfg: the training Config.
        kind: "zeroshot" | "knn"; None: the eval_kind of cfg's objective.
    """

    def __init__(self, cfg, kind: str | None = None, pixel_cache_bytes: int = PIXEL_CACHE_BYTES):
        self.cfg = cfg
        self.kind = kind if kind is not None else objective_class(cfg).eval_kind
        self._eval_ds = self._train_ds = None
        self._loaded = self._retrieval = False
        self.pixel_cache_bytes = pixel_cache_bytes  # for all cached splits together
        self._pixels: dict = {}

    def _label_column(self, ds) -> str | None:
        col = self.cfg.data.label_column or "label"
        return col if ds is not None and col in ds.column_names else None

    def _load(self) -> None:
        self._loaded = True
        data, ecfg = self.cfg.data, self.cfg.eval
        ds = load_eval_dataset(data, seed=self.cfg.seed)
        if ds is None:
            return
        if self._label_column(ds) is None:
            # Image-text data without labels (Flickr8k, COCO captions): image<->text retrieval.
            if self.kind == "zeroshot" and data.caption_column in ds.column_names:
                self._retrieval = True
            else:
                return
        if ecfg.max_samples is not None and ecfg.max_samples < len(ds):
            ds = _subset(ds, ecfg.max_samples, self.cfg.seed)
        self._eval_ds = ds
        if self.kind == "knn":
            if is_stream_source(data.source, data.streaming):  # a bounded memory bank from the stream
                train = bounded_samples(data.source, self.cfg.eval.knn_train_samples or data.eval_max_samples,
                                        split=data.split, seed=self.cfg.seed, image_column=data.image_column,
                                        label_column=data.label_column or "label")
            else:
                train = load_source(data.source, data.split, seed=self.cfg.seed, image_column=data.image_column)
            limit = min(len(train), self.cfg.eval.knn_train_samples or len(train))
            self._train_ds = _subset(train, limit, self.cfg.seed)

    def class_names(self, ds) -> list[str]:
        if self.cfg.eval.class_names:
            return list(self.cfg.eval.class_names)
        feature = ds.features[self._label_column(ds)]
        names = getattr(feature, "names", None)
        if not names:
            raise ValueError("zero-shot evaluation needs class names: set eval.class_names or use a ClassLabel column")
        return list(names)

    def templates(self):
        t = self.cfg.eval.templates
        if t == "eval":
            if self.cfg.data.source == "digits":
                return list(EVAL_TEMPLATES)
            return None
        return t

    @torch.no_grad()
    def __call__(self, model) -> dict:
        if not self.cfg.eval.enabled:
            return {}
        if not self._loaded:
            self._load()
        if self._eval_ds is None:
            return {}
        was_training = model.training
        model.eval()
        try:
            if self._retrieval:
                return self._recall(model)
            if self.kind == "zeroshot":
                return self._zero_shot(model)
            return self._knn(model)
        finally:
            model.train(was_training)

    def _zero_shot(self, model) -> dict:
        ds = self._eval_ds
        clf = ZeroShotClassifier(model, self.class_names(ds), self.templates(),
                                 batch_size=self.cfg.eval.batch_size, progress=False)
        res = clf.evaluate(ds, image_column=self.cfg.data.image_column, label_column=self._label_column(ds))
        return {"zeroshot_top1": res["top1"], "zeroshot_top5": res["top5"]}

    def _recall(self, model) -> dict:
        res = retrieval_evaluate(model, self._eval_ds, image_column=self.cfg.data.image_column,
                       caption_column=self.cfg.data.caption_column, batch_size=self.cfg.eval.batch_size,
                       progress=False)
        return {f"retrieval_{k}": v for k, v in res.items() if "R@" in k or k == "mean_recall"}

    def _knn(self, model) -> dict:
        train, test = self._train_ds, self._eval_ds
        col, bs = self.cfg.data.image_column, self.cfg.eval.batch_size
        train_label = self._label_column(train)
        if train_label is None:
            return {}
        kw = {"image_column": col, "batch_size": bs, "features": self.cfg.eval.knn_features}
        f_train = embed_images(model, self._cached_pixels("train", model, train), **kw)
        f_test = embed_images(model, self._cached_pixels("test", model, test), **kw)
        y_train = torch.as_tensor(train[train_label])
        y_test = torch.as_tensor(test[self._label_column(test)])
        k = min(self.cfg.eval.knn_k, len(train))
        acc = knn_accuracy(f_train, y_train, f_test, y_test, k=k, temperature=self.cfg.eval.knn_temperature)
        return {"knn_top1": float(acc)}

    def _cached_pixels(self, name: str, model, ds):
        """ds's images as one preprocessed pixel tensor, made on the first call, when it fits in
        what is left of `pixel_cache_bytes`; otherwise ds itself (decoded at every evaluation)."""
        if name in self._pixels:
            return self._pixels[name]
        height, width = getattr(model.processor, "image_size", (None, None))
        used = sum(p.numel() * p.element_size() for p in self._pixels.values())
        if not (height and width) or used + len(ds) * 3 * height * width * 4 > self.pixel_cache_bytes:
            return ds
        batches = iter_image_batches(model, ds, image_column=self.cfg.data.image_column,
                                     batch_size=self.cfg.eval.batch_size, device="cpu")
        self._pixels[name] = torch.cat(list(batches))
        return self._pixels[name]


def print_report(results: dict, final_dir: Path) -> None:
    """Print the final metrics of `fit` and where the model went (main process)."""
    if "zeroshot_top1" in results:
        print(f"mmcl: zero-shot top-1 {results['zeroshot_top1']:.4f} (top-5 {results['zeroshot_top5']:.4f}) "
              f"on held-out data after {results['step']} steps, {results['train_seconds']:.0f} s of training")
    if "retrieval_mean_recall" in results:
        recalls = ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}" for k, v in results.items()
                            if k.startswith("retrieval_") and "R@" in k)
        print(f"mmcl: retrieval on held-out data after {results['step']} steps: {recalls}")
    if "knn_top1" in results:
        print(f"mmcl: kNN top-1 {results['knn_top1']:.4f} on held-out data after {results['step']} steps")
    print(f"mmcl: model saved to {final_dir} (load it with mmcl.DualEncoder.from_pretrained)")
