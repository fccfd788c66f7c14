"""Contrastive batches: ``build_dataset`` -> (dataset, collate_fn), and ``build_dataloader`` over it.

Every random choice (the epoch's order, the caption drawn from a list, each augmentation, CutMix)
is a function of ``(seed, epoch, sample index)``, not of global RNG state or worker ids. So the
same seed gives the same batches with any ``num_workers``, under Accelerate's sharding, and after a
resume (``mmcl.data.stream.BatchStream``, which cuts the same epoch orders into batches).
"""
from __future__ import annotations

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmcl.data.config import DataConfig, validate_config
from mmcl.data.images import decode_image
from mmcl.data.sources import check_columns, load_source, undecoded
from mmcl.data.transforms import build_image_transform, build_uint8_transform, cutmix, processor_geometry


def _sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of sample indices in ``epoch``, (num_samples,): a (seed, epoch)-seeded permutation."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` keys in ``epoch_order(num_samples, seed, epoch, shuffle)``.

    ``set_epoch(epoch)`` picks the epoch (Accelerate's ``DataLoader.set_epoch`` reaches it).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples, self.seed, self.shuffle = int(num_samples), int(seed), bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This epoch's full order of sample indices, (num_samples,)."""
        return epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)

    def __iter__(self):
        for index in self.order():
            yield (self.epoch, int(index))

    def __len__(self) -> int:
        return self.num_samples


class ContrastiveDataset(Dataset):
    """Wraps a ``datasets.Dataset``: item ``(epoch, index)`` -> dict of tensors, or a skip marker."""

    def __init__(self, ds, *, image_column, caption_column, label_column, pixel_transform,
                 view_transform, seed, same_views=False):
        self.ds, self.seed, self.same_views = ds, int(seed), bool(same_views)
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.pixel_transform, self.view_transform = pixel_transform, view_transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        return self.make_item(self.ds[index], epoch, index)

    def make_item(self, row: dict, epoch: int, index: int) -> dict:
        """One row (image, caption, label columns) -> dict of tensors, or a skip marker naming the
        reason ("missing_image", "corrupt_image", "missing_caption"). Streams call this per sample."""
        raw = row.get(self.image_column)
        image = decode_image(raw) if raw is not None else None  # None: skipped, and counted
        caption = None
        if self.caption_column is not None:
            caption = row.get(self.caption_column)
            if isinstance(caption, (list, tuple)):
                caption = [c for c in caption if isinstance(c, str)]
                rng = np.random.default_rng([self.seed, epoch, index, 1])
                caption = caption[int(rng.integers(len(caption)))] if caption else None
            if not isinstance(caption, str):
                caption = None
        label = row.get(self.label_column) if self.label_column is not None else 0
        if image is None or (self.caption_column is not None and caption is None) or label is None:
            reason = ("missing_image" if raw is None else "corrupt_image" if image is None
                      else "missing_caption" if label is not None else "missing_label")
            return {"skipped": True, "reason": reason, "index": index, "epoch": epoch}
        item = {"index": index, "epoch": epoch}
        # Augmentations draw from torch's global CPU generator: seed it per sample, and restore it
        # afterwards so the caller's RNG stream is untouched. Only the CPU generator: torch.manual_seed
        # also queues a CUDA/XPU/MTIA reseed, formatting a traceback each time in a process that never
        # initialised those devices (a DataLoader worker): 0.27 ms of the 0.77 ms a CIFAR sample took.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
            if self.pixel_transform is not None:
                item["pixel_values"] = self.pixel_transform(image)
            if self.view_transform is not None:
                item["view1"] = self.view_transform(image)
                # A deterministic view (augmented later, on the device) is made once for both keys.
                item["view2"] = item["view1"] if self.same_views else self.view_transform(image)
        if caption is not None:
            item["caption"] = caption
        if self.label_column is not None:
            item["labels"] = int(label)
        if "__key__" in row:  # a streamed sample's key (webdataset's name for it)
            item["key"] = row["__key__"]
        return item


class ContrastiveCollator:
    """Stacks items into a batch, tokenizes captions, applies CutMix, counts skipped samples."""

    def __init__(self, processor, *, image_keys, size, text, labels, max_text_length, cutmix, seed):
        self.processor, self.image_keys, self.size = processor, tuple(image_keys), size
        self.text, self.labels, self.max_text_length = text, labels, max_text_length
        self.cutmix, self.seed = float(cutmix), int(seed)

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if not it.get("skipped")]
        batch: dict = {"num_skipped": len(items) - len(good), "index": torch.tensor([it["index"] for it in good],
                                                                                   dtype=torch.long)}
        if good and "key" in good[0]:
            batch["key"] = [it["key"] for it in good]
        for key in self.image_keys:
            if key == "view2" and good and all(it["view2"] is it["view1"] for it in good):
                batch[key] = batch["view1"]  # one un-augmented view stands for both
                continue
            batch[key] = (torch.stack([it[key] for it in good]) if good
                          else torch.empty(0, 3, *self.size))
        if self.text:
            if good:
                tokens = self.processor.tokenize([it["caption"] for it in good], max_length=self.max_text_length)
                batch["input_ids"] = tokens["input_ids"]
                batch["attention_mask"] = tokens["attention_mask"]
            else:
                batch["input_ids"] = torch.empty(0, 0, dtype=torch.long)
                batch["attention_mask"] = torch.empty(0, 0, dtype=torch.long)
        if self.labels:
            batch["labels"] = torch.tensor([it["labels"] for it in good], dtype=torch.long)
        if self.cutmix > 0:
            # Two-view batches mix their views (clip+simclr too); image-text batches their one image.
            views = [k for k in ("view1", "view2") if k in batch] or ["pixel_values"]
            keys = [(it["epoch"], it["index"]) for it in items] or [(0, 0)]
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, 2, *keys[0], len(items)))
            mixed, partner, lam, _ = cutmix([batch[k] for k in views], self.cutmix, gen)
            batch.update(zip(views, mixed))
            batch["mix_partner"], batch["mix_lambda"] = partner, lam
        return batch


def build_dataset(cfg: DataConfig, processor, *, text: bool, views: bool, seed: int = 0, dataset=None,
                  device_views: bool = False, stream: bool = False) -> tuple[ContrastiveDataset, ContrastiveCollator]:
    """The dataset of contrastive samples and the collate_fn that batches them.

    Args:
        cfg: the data config (source, columns, augmentation, ...).
        processor: the model's processor (``model.processor``): image_size, image_mean, image_std,
            ``preprocess_images`` and, with ``text``, ``tokenize(texts, max_length)``.
        text: batches hold ``pixel_values`` (B, 3, H, W) and the tokenized caption ``input_ids`` /
            ``attention_mask`` (B, L); pixel_values use ``cfg.augment``, or the "clip" preset when
            ``views`` is set too.
        views: batches hold ``view1``, ``view2`` (B, 3, H, W), two independent views from
            ``cfg.augment``. ``labels`` (B,) is added when ``cfg.label_column`` is set; with
            ``cfg.cutmix > 0`` the views (without ``views``: ``pixel_values``) are CutMix-ed and
            ``mix_partner`` (B,) / ``mix_lambda`` (B,) describe the mixing. Every batch has
            ``num_skipped`` (int, unreadable samples dropped from it, so B may be smaller than
            asked, even 0) and ``index`` (B,) its rows.
        seed: seeds captions drawn from lists, augmentations and CutMix.
        dataset: a ready ``datasets.Dataset`` to use instead of ``cfg.source``.
        device_views: the caller augments the views on the device (``DeviceAugment``), so
            ``augment='none'`` (identical, un-augmented views) is allowed. With ``augment='none'``
            the views are then uint8 (B, 3, H, W), resized and cropped but not normalised, and
            ``view2`` is the same tensor as ``view1`` (unless CutMix copies them).
        stream: load no rows: the dataset only turns streamed rows into items (``make_item``).

    Returns:
        ``(dataset, collate_fn)``: the dataset takes ``(epoch, index)`` keys (see ``ResumableSampler``).
    """
    size = _check_request(cfg, processor, text=text, views=views, device_views=device_views)
    ds = None if stream else _source_rows(cfg, text=text, seed=seed, dataset=dataset)
    pixel_transform = None
    if text:
        pixel_transform = build_image_transform("clip" if views else cfg.augment, processor, cfg.image_size)
    uint8_views = views and device_views and cfg.augment == "none"
    view_transform = None
    if views:
        view_transform = (build_uint8_transform(processor, cfg.image_size) if uint8_views
                          else build_image_transform(cfg.augment, processor, cfg.image_size))
    wrapped = ContrastiveDataset(
        ds, image_column=cfg.image_column, caption_column=cfg.caption_column if text else None,
        label_column=cfg.label_column, pixel_transform=pixel_transform, view_transform=view_transform,
        seed=seed, same_views=uint8_views,
    )
    image_keys = (["pixel_values"] if text else []) + (["view1", "view2"] if views else [])
    collator = ContrastiveCollator(processor, image_keys=image_keys, size=size, text=text,
                                   labels=cfg.label_column is not None, max_text_length=cfg.max_text_length,
                                   cutmix=cfg.cutmix, seed=seed)
    return wrapped, collator


def build_dataloader(cfg: DataConfig, processor, *, text: bool, views: bool, batch_size: int, seed: int = 0,
                     dataset=None, shuffle: bool = True, drop_last: bool | None = None,
                     device_views: bool = False) -> DataLoader:
    """A DataLoader over ``build_dataset(cfg, processor, text=..., views=..., ...)`` (see there).

    Args:
        batch_size: samples per batch (per process under Accelerate).
        seed: seeds the order too (``loader.sampler`` is a ``ResumableSampler``: ``set_epoch``).
        shuffle: shuffle each epoch.
        drop_last: default True when the dataset holds at least one full batch.
        cfg, processor, text, views, dataset, device_views: as for ``build_dataset``.
    """
    _check_batch_size(batch_size)
    wrapped, collator = build_dataset(cfg, processor, text=text, views=views, seed=seed, dataset=dataset,
                                      device_views=device_views)
    if drop_last is None:
        drop_last = len(wrapped) >= batch_size
    # A private generator: DataLoader draws its worker base seed from it, not from torch's global RNG,
    # so iterating the loader leaves the training loop's random stream untouched.
    return DataLoader(wrapped, batch_size=batch_size, sampler=ResumableSampler(len(wrapped), seed=seed,
                      shuffle=shuffle), collate_fn=collator, num_workers=cfg.num_workers, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(int(seed)))


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_request(cfg, processor, *, text: bool, views: bool, device_views: bool) -> tuple[int, int]:
    """Raise naming the argument when the request cannot be served; the batches' (H, W)."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be an mmcl.data.DataConfig, got {type(cfg).__name__}")
    validate_config(cfg)
    if not (text or views):
        raise ValueError("nothing to load: set text=True (image-text pairs), views=True (two views) or both")
    if views and cfg.augment in ("none", "clip") and not device_views:
        raise ValueError(f"two-view batches (views=True) need two random views: set augment to 'simclr' or "
                         f"'mocov2' (augment={cfg.augment!r} would make both views identical)")
    if text and not callable(getattr(processor, "tokenize", None)):
        raise TypeError("text=True tokenizes captions: processor must have tokenize(texts, max_length)")
    size, _, _ = processor_geometry(processor, cfg.image_size)
    return size


def _source_rows(cfg, *, text: bool, seed: int, dataset):
    """The rows to serve: ``dataset`` or ``cfg.source`` (split, max_samples), only the used columns,
    images left undecoded."""
    if dataset is None:
        ds = load_source(cfg.source, cfg.split, seed=seed, image_column=cfg.image_column)
    elif isinstance(dataset, datasets.Dataset):
        ds = dataset
    else:
        raise TypeError(f"dataset must be a datasets.Dataset (pick a split of a DatasetDict), "
                        f"got {type(dataset).__name__}")
    check_columns(ds, image_column=cfg.image_column, caption_column=cfg.caption_column if text else None,
                  label_column=cfg.label_column)
    if cfg.max_samples is not None and cfg.max_samples < len(ds):
        ds = ds.select(range(cfg.max_samples))
    keep = [c for c in (cfg.image_column, cfg.caption_column if text else None, cfg.label_column) if c]
    return undecoded(ds.select_columns(keep), cfg.image_column)
