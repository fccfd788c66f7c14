"""Turning a ``DataConfig.source`` into a ``datasets.Dataset`` and reading its images safely."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# Files ``save_to_disk`` leaves in a Dataset (state.json, dataset_info.json) or DatasetDict directory.
_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def load_source(source: str, split: str = "train", *, seed: int = 0):
    """Load ``source`` as a ``datasets.Dataset`` (see ``resolve_source``)."""
    return resolve_source(source, split, seed=seed)[0]


def load_splits(source: str, *, seed: int = 0):
    """Every split of ``source`` as ``({split name: datasets.Dataset}, base_dir)``.

    A file is one split, "train" (as ``datasets`` names it); "digits" has "train" and "test" (each
    built when first asked for); a directory has its saved or folder splits; a ``datasets`` name
    must be in the local cache (nothing is downloaded). base_dir (or None) resolves relative image
    paths in the rows. Raises ValueError naming the source when it cannot be read.
    """
    import datasets

    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if source == "digits":
        from mmcl.data.digits import load_digits_dataset

        return _LazySplits({s: (lambda s=s: load_digits_dataset(s, seed=seed)) for s in ("train", "test")}), None
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"source {source!r}: unsupported file type {suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        # CSV/JSON image paths are relative to the file that lists them.
        return {"train": ds}, str(path.parent)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            return (dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}), None
        try:
            return dict(datasets.load_dataset("imagefolder", data_dir=str(path))), str(path)
        except Exception as err:  # datasets raises several types for "nothing usable here"
            raise ValueError(f"cannot read {source!r} as an image folder or a saved dataset: {err}") from None
    if not _is_dataset_name(source):
        raise ValueError(f"source {source!r} does not exist (no such file or directory)")
    try:
        return dict(datasets.load_dataset(source)), None
    except Exception as err:  # the hub is offline here: say what was tried and why it failed
        raise ValueError(_not_cached(source, err)) from err


def _is_dataset_name(source: str) -> bool:
    """Neither "digits", an existing path, nor something that looks like one (a datasets name)."""
    path = Path(source).expanduser()
    return not (source == "digits" or path.exists() or os.sep in source or source.startswith(".")
                or path.suffix.lower() in FILE_BUILDERS)


def _not_cached(source: str, err: Exception) -> str:
    return (f"source {source!r} is neither 'digits', an existing file or directory, nor a datasets name in "
            f"the local cache ({type(err).__name__}: {err})")


class _LazySplits(dict):
    """Builds a split only when asked for, so 'digits' does not build both splits for one."""

    def __init__(self, factories: dict):
        super().__init__({k: None for k in factories})
        self._factories = factories

    def __getitem__(self, key):
        if super().__getitem__(key) is None:
            super().__setitem__(key, self._factories[key]())
        return super().__getitem__(key)


def resolve_source(source: str, split: str = "train", *, seed: int = 0):
    """Load one split of ``source`` as a ``datasets.Dataset``.

    Args:
        source: ``"digits"``; a ``.parquet``/``.csv``/``.tsv``/``.json``/``.jsonl`` file (the whole
            file is the split, whatever ``split`` says); an image-folder directory (optional
            ``metadata.csv``/``metadata.jsonl``, optional split sub-folders); a directory written by
            ``save_to_disk``; or a ``datasets`` name available in the local cache.
        split: which split to take from a directory, a saved ``DatasetDict`` or a named dataset.
        seed: seeds the digits' train/test split.

    Returns:
        ``(dataset, base_dir)``: base_dir (or None) resolves relative image paths in the rows.

    Raises:
        ValueError: the path does not exist, the split is missing, or the name is not cached.
    """
    import datasets

    if isinstance(source, str) and source and _is_dataset_name(source):
        try:  # only the asked split is loaded from the cache
            return datasets.load_dataset(source, split=split), None
        except Exception as err:
            raise ValueError(_not_cached(source, err) + f" (split {split!r})") from err
    splits, base_dir = load_splits(source, seed=seed)
    if Path(source).expanduser().is_file():
        return splits["train"], base_dir
    if split not in splits:
        raise ValueError(f"source {source!r} has no split {split!r}; splits: {sorted(splits)}")
    return splits[split], base_dir


def absolute_image_paths(ds, image_column: str, base_dir: str | None):
    """``ds`` with relative image paths (a string column) made absolute against base_dir."""
    feature = ds.features.get(image_column)
    if base_dir is None or not (getattr(feature, "dtype", None) in ("string", "large_string")):
        return ds
    return ds.map(lambda row: {image_column: row[image_column] if os.path.isabs(row[image_column])
                               else os.path.join(base_dir, row[image_column])})


def check_columns(ds, *, image_column: str, caption_column: str | None, label_column: str | None) -> None:
    """Raise ValueError naming a missing column and listing the ones that exist."""
    available = list(ds.column_names)
    for role, name in (("image_column", image_column), ("caption_column", caption_column),
                       ("label_column", label_column)):
        if name is not None and name not in available:
            raise ValueError(f"{role}={name!r} is not a column of the dataset; available columns: {available}")


def undecoded(ds, image_column: str):
    """``ds`` with its image column left as bytes/paths, so a corrupt file is caught per sample."""
    import datasets

    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class ImageReader:
    """Decode one cell of an image column into an RGB PIL image; ``None`` when it cannot be read.

    Accepts what ``datasets`` stores for images (``{"bytes", "path"}`` dicts), raw bytes, file paths
    (relative ones resolved against ``base_dir``), PIL images and (H, W[, C]) uint8 arrays.
    """

    def __init__(self, base_dir: str | None = None):
        self.base_dir = base_dir

    def __call__(self, value):
        from PIL import Image

        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict):
                if value.get("bytes") is not None:
                    image = Image.open(io.BytesIO(value["bytes"]))
                elif value.get("path"):
                    image = Image.open(self._resolve(value["path"]))
                else:
                    return None
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, (str, os.PathLike)):
                image = Image.open(self._resolve(str(value)))
            elif isinstance(value, np.ndarray):
                image = Image.fromarray(value)
            else:
                return None
            # PIL decodes lazily: force it here so a truncated file fails now, not inside a transform.
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError):
            return None

    def _resolve(self, path: str) -> str:
        if self.base_dir is not None and not os.path.isabs(path):
            return os.path.join(self.base_dir, path)
        return path


def load_eval_dataset(cfg, *, seed: int = 0):
    """The held-out ``datasets.Dataset`` of ``cfg`` (eval_source / eval_split), or None.

    With ``cfg.source == "digits"`` and no ``eval_source``, the digits' test split is used, so the
    demo evaluates on digits never seen in training. Relative image paths in CSV/JSON rows are made
    absolute so evaluation code can open them directly.
    """
    source = cfg.eval_source or ("digits" if cfg.source == "digits" else None)
    if source is None:
        return None
    ds, base_dir = resolve_source(source, cfg.eval_split, seed=seed)
    check_columns(ds, image_column=cfg.image_column, caption_column=None, label_column=None)
    return absolute_image_paths(ds, cfg.image_column, base_dir)
