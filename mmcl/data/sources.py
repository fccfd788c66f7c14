"""mmcl's one source loader: a ``DataConfig.source`` (or the command line's ``--data``) as splits.

A source is "digits" (scikit-learn's handwritten digits, train/test); a .parquet, .csv, .tsv,
.json or .jsonl file (one split, "train", as ``datasets`` names it); a directory written by
``save_to_disk`` (a Dataset, or a DatasetDict of splits); an image folder (class sub-folders,
optionally under train/ test/ split folders, optional ``metadata.csv``/``metadata.jsonl``); or a
``datasets`` name already in the local cache. Nothing is downloaded. Image paths listed in
CSV/JSON rows are relative to the file that lists them: they are made absolute and the column
becomes a ``datasets.Image``, so every source's image column yields images the same way.
Training, the training evaluator and the command line all read sources through this module.
Webdataset shards (a brace pattern, glob or list of ``.tar`` paths) are streamed in training
(``mmcl.data.stream.build_stream``); read here they give their first ``max_samples`` samples.
With ``data.streaming`` every other source is streamed too: data files through datasets'
streaming reader, the rest as row ranges of the split this module loads (mmcl.data.ranges).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
import numpy as np

from mmcl.data.digits import load_digits_dataset
from mmcl.data.shards import is_finite_source, is_stream_source, read_samples

__all__ = ["load_splits", "load_source", "pick_split", "subsample", "holdout_split", "class_names_of",
           "load_eval_dataset", "bounded_samples", "check_columns", "undecoded"]

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# Files ``save_to_disk`` leaves in a Dataset (state.json, dataset_info.json) or DatasetDict directory.
_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
# A datasets (hub) name: "name" or "namespace/name".
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Which split to take when several exist and none is named, in order of preference.
_SPLIT_PREFERENCE = ("test", "validation", "valid", "val", "train")


def load_splits(source: str, *, seed: int = 0, image_column: str = "image") -> dict:
    """Every split of ``source`` as ``{split name: datasets.Dataset}``.

    "digits" builds each split when first asked for (``seed`` fixes its train/test split).
    Relative image paths in ``image_column`` are resolved against the listing file's folder.
    Raises ValueError naming the source when it cannot be read.
    """
    splits, base_dir = _read(source, seed)
    if base_dir is None:
        return splits
    return {name: _resolved_images(ds, image_column, base_dir) for name, ds in splits.items()}


def load_source(source: str, split: str | None = None, *, seed: int = 0, image_column: str = "image",
                max_samples: int | None = None):
    """One split of ``source`` as a ``datasets.Dataset``.

    Args:
        source: see the module docstring.
        split: the split to take; None takes the only one, else the first of test / validation /
            train present. A file holds one split, returned whatever ``split`` names.
        seed: seeds the digits' train/test split.
        image_column: the column whose relative paths are made absolute (see ``load_splits``).
        max_samples: keep this many seeded random rows (see ``subsample``); None keeps all.

    Raises:
        ValueError: the source does not exist or is not cached, or it has no split ``split``.
    """
    if is_stream_source(source):  # shards: the first max_samples samples, in shard order
        return read_samples(source, max_samples or 2**62, image_column=image_column)
    _check_source(source)
    if split is not None and _is_dataset_name(source):
        try:  # only the asked split is loaded from the cache
            ds = datasets.load_dataset(source, split=split)
        except Exception as err:  # the hub is offline here: say what was tried and why it failed
            try:  # a cached name without that split: pick_split names the splits it has
                cached = dict(datasets.load_dataset(source))
            except Exception:
                cached = None
            if cached is not None:
                pick_split(cached, split, what=f"source {source!r}: split")
            raise ValueError(_not_cached(source, err) + f" (split {split!r})") from err
        return subsample(ds, max_samples)
    splits = load_splits(source, seed=seed, image_column=image_column)
    if Path(source).expanduser().is_file():
        split = None
    return subsample(splits[pick_split(splits, split, what=f"source {source!r}: split")], max_samples)


def pick_split(splits: dict, split: str | None, *, default: str | None = None, what: str = "split") -> str:
    """The split name to use: ``split`` if given (it must exist), else the only one, else
    ``default`` or the first of test / validation / train present. ``what`` names the choice in
    errors (the command line passes "--split")."""
    names = list(splits)
    if split is not None:
        if split not in splits:
            raise ValueError(f"{what} {split!r} does not exist; available splits: {names}")
        return split
    if len(names) == 1:
        return names[0]
    for name in ((default,) if default else ()) + _SPLIT_PREFERENCE:
        if name in splits:
            return name
    raise ValueError(f"several splits exist ({names}); choose one with {what}")


def subsample(ds, max_samples: int | None, seed: int = 0):
    """``max_samples`` rows drawn without replacement (seeded, kept in their original order), or all.

    Random rather than the first rows: many sources (image folders above all) are sorted by class.
    """
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    rows = np.random.default_rng(seed).choice(len(ds), size=max_samples, replace=False)
    return ds.select(np.sort(rows))


def holdout_split(ds, fraction: float = 0.2, seed: int = 0):
    """Deterministic (train, test) split of one dataset, for sources that ship a single split."""
    parts = ds.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def class_names_of(ds, label_column: str) -> list[str] | None:
    """Class names from a ClassLabel column (the digits' label is one), else None."""
    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return None


def load_eval_dataset(cfg, *, seed: int = 0):
    """The held-out ``datasets.Dataset`` of a ``DataConfig`` (eval_source / eval_split), or None.

    With ``cfg.source == "digits"`` and no ``eval_source``, the digits' test split is used, so the
    demo evaluates on digits never seen in training. A streamed ``eval_source`` (shards, or with
    ``cfg.streaming`` any source) gives at most ``cfg.eval_max_samples`` samples (``read_samples``).
    """
    source = cfg.eval_source or ("digits" if cfg.source == "digits" else None)
    if source is None:
        return None
    if is_stream_source(source, cfg.streaming):
        return bounded_samples(source, cfg.eval_max_samples, split=cfg.eval_split, seed=seed,
                               image_column=cfg.image_column, caption_column=cfg.caption_column,
                               label_column=cfg.label_column or "label")
    ds = load_source(source, cfg.eval_split, seed=seed, image_column=cfg.image_column)
    check_columns(ds, image_column=cfg.image_column, caption_column=None, label_column=None)
    return ds


def bounded_samples(source, limit: int, *, split: str | None, seed: int = 0, image_column: str = "image",
                    caption_column: str | None = None, label_column: str | None = None):
    """At most ``limit`` rows of a streamed source, as a ``datasets.Dataset``, for evaluation: the
    first ``limit`` of shards or data files (``read_samples``: their listed order, the named
    columns); of a finite source, ``limit`` seeded random rows of its ``split`` (``subsample``: an
    image folder is sorted by class).

    Raises:
        ValueError: the source cannot be read, has no rows, or lacks ``image_column``.
    """
    if not is_finite_source(source):
        return read_samples(source, limit, image_column=image_column, caption_column=caption_column,
                            label_column=label_column)
    ds = load_source(source, split, seed=seed, image_column=image_column)
    check_columns(ds, image_column=image_column, caption_column=None, label_column=None)
    if len(ds) == 0:
        raise ValueError(f"the streamed source {source!r} (split {split!r}) has no rows")
    return subsample(ds, limit, seed)


def check_columns(ds, *, image_column: str, caption_column: str | None, label_column: str | None,
                  prefix: str = "", what: str = "the dataset") -> None:
    """Raise ValueError naming a missing column (``prefix`` + its role, e.g. "data.caption_column")
    and listing the ones that exist in ``what``."""
    available = list(ds.column_names)
    for role, name in (("image_column", image_column), ("caption_column", caption_column),
                       ("label_column", label_column)):
        if name is not None and name not in available:
            raise ValueError(f"{prefix}{role}={name!r} is not a column of {what}; available columns: {available}")


def undecoded(ds, image_column: str):
    """``ds`` with its image column left as bytes/paths, so a corrupt file is caught per sample."""
    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _read(source: str, seed: int) -> tuple[dict, str | None]:
    """``({split: Dataset}, base_dir)``: base_dir (or None) resolves relative image paths."""
    _check_source(source)
    datasets.disable_progress_bars()  # loading a local file is quick; its bars would only clutter stderr
    if source == "digits":
        return _LazySplits({s: (lambda s=s: load_digits_dataset(s, seed=seed)) for s in ("train", "test")}), None
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"source {source!r}: unsupported file type {suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
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


def _check_source(source) -> None:
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")


def _resolved_images(ds, image_column: str, base_dir: str):
    """``ds`` with a string column of image paths made absolute and cast to ``datasets.Image``."""
    feature = ds.features.get(image_column)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return ds

    def absolute(rows):
        return {image_column: [p if p is None or os.path.isabs(p) else os.path.join(base_dir, p)
                               for p in rows[image_column]]}

    return ds.map(absolute, batched=True).cast_column(image_column, datasets.Image())


def _is_dataset_name(source: str) -> bool:
    """Neither "digits", an existing path, nor a data file's name, and shaped like a datasets name
    ("name" or "namespace/name")."""
    path = Path(source).expanduser()
    if source == "digits" or path.exists() or path.suffix.lower() in FILE_BUILDERS:
        return False
    return _DATASET_NAME.fullmatch(source) is not None


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
