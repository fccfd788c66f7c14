"""Turning a ``DataConfig.source`` into a ``datasets.Dataset`` and reading its images safely."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def load_source(source: str, split: str = "train", *, seed: int = 0):
    """Load ``source`` as a ``datasets.Dataset`` (see ``resolve_source``)."""
    return resolve_source(source, split, seed=seed)[0]


def resolve_source(source: str, split: str = "train", *, seed: int = 0):
    """Load ``source`` as a ``datasets.Dataset``.

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

    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if source == "digits":
        from mmcl.data.digits import load_digits_dataset

        return load_digits_dataset(split, seed=seed), None
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    looks_like_path = os.sep in source or source.startswith(".") or suffix in _FILE_BUILDERS
    if path.is_file():
        if suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"source {source!r}: unsupported file type {suffix!r}; use one of {sorted(_FILE_BUILDERS)}"
            )
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        # CSV/JSON image paths are relative to the file that lists them.
        return ds, str(path.parent)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"source {source!r} has no split {split!r}; splits: {sorted(loaded)}")
                loaded = loaded[split]
            return loaded, None
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        if split not in loaded:
            raise ValueError(f"image folder {source!r} has no split {split!r}; splits: {sorted(loaded)}")
        return loaded[split], str(path)
    if looks_like_path:
        raise ValueError(f"source {source!r} does not exist (no such file or directory)")
    try:
        return datasets.load_dataset(source, split=split), None
    except Exception as err:  # the hub is offline here: say what was tried and why it failed
        raise ValueError(
            f"source {source!r} is neither 'digits', an existing file or directory, nor a datasets "
            f"name with split {split!r} in the local cache ({type(err).__name__}: {err})"
        ) from err


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
    if base_dir is not None and ds.features[cfg.image_column].dtype == "string":
        reader = ImageReader(base_dir)
        ds = ds.map(lambda row: {cfg.image_column: reader._resolve(row[cfg.image_column])})
    return ds
