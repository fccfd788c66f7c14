"""Local data sources for evaluation from the command line: never downloads anything.

A source is one of
- "digits": scikit-learn's handwritten digits through `mmcl.data.load_digits_dataset` (train/test);
- a .parquet, .csv, .json or .jsonl file (one split, "train", as `datasets` names it);
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict of splits);
- an image folder (class sub-folders, optionally under train/ test/ split folders).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["load_splits", "pick_split", "load_source", "subsample", "class_names_of", "holdout_split"]

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# Which split to evaluate on when several exist and none is named, in order of preference.
_EVAL_PREFERENCE = ("test", "validation", "valid", "val", "train")


def load_splits(source: str, *, image_column: str = "image") -> dict:
    """All splits of a local source as {split name: datasets.Dataset}; ValueError naming what is wrong."""
    import datasets

    datasets.disable_progress_bars()  # loading a local file is quick; its bars would only clutter stderr
    if source == "digits":
        try:
            from mmcl.data import load_digits_dataset
        except ImportError as err:
            raise ValueError(f"the built-in 'digits' source needs mmcl.data.load_digits_dataset: {err}") from None
        return _LazySplits({s: (lambda s=s: load_digits_dataset(s)) for s in ("train", "test")})
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"data source not found: {source} (give a parquet/CSV/JSON file, a dataset directory or 'digits')"
        )
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data file {source} must end in one of {sorted(_FILE_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        return {"train": _resolve_image_paths(ds, image_column, path.parent)}
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    try:
        return dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
    except Exception as err:  # datasets raises several types for "nothing usable here"
        raise ValueError(f"cannot read {source} as an image folder or saved dataset: {err}") from None


class _LazySplits(dict):
    """Builds a split only when asked for, so 'digits' does not build both splits for one."""

    def __init__(self, factories: dict):
        super().__init__({k: None for k in factories})
        self._factories = factories

    def __getitem__(self, key):
        if super().__getitem__(key) is None:
            super().__setitem__(key, self._factories[key]())
        return super().__getitem__(key)


def _resolve_image_paths(ds, image_column: str, base: Path):
    """CSV/JSON rows name image files; make them datasets Images, relative paths from the file's folder."""
    import datasets

    feature = ds.features.get(image_column)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return ds

    def absolute(row):
        p = row[image_column]
        return {image_column: p if os.path.isabs(p) else str(base / p)}

    return ds.map(absolute).cast_column(image_column, datasets.Image())


def pick_split(splits: dict, split: str | None, *, default: str | None = None, what: str = "--split") -> str:
    """The split name to use: `split` if given (must exist), else the only one, else `default` or
    the first of test/validation/train present."""
    names = list(splits)
    if split is not None:
        if split not in splits:
            raise ValueError(f"{what} {split!r} does not exist; available splits: {names}")
        return split
    if len(names) == 1:
        return names[0]
    for name in ((default,) if default else ()) + _EVAL_PREFERENCE:
        if name in splits:
            return name
    raise ValueError(f"several splits exist ({names}); choose one with {what}")


def load_source(source: str, split: str | None = None, *, image_column: str = "image", max_samples: int | None = None):
    """One split of a local source as a `datasets.Dataset` (`max_samples` random rows if given)."""
    splits = load_splits(source, image_column=image_column)
    ds = splits[pick_split(splits, split)]
    return subsample(ds, max_samples)


def subsample(ds, max_samples: int | None, seed: int = 0):
    """`max_samples` rows drawn without replacement (seeded, kept in their original order), or all.

    Random rather than the first rows: many sources (image folders above all) are sorted by class.
    """
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise ValueError(f"--max-samples must be positive, got {max_samples}")
    import numpy as np

    rows = np.random.default_rng(seed).choice(len(ds), size=max_samples, replace=False)
    return ds.select(np.sort(rows))


def holdout_split(ds, fraction: float = 0.2, seed: int = 0):
    """Deterministic (train, test) split of one dataset, for sources that ship a single split."""
    parts = ds.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def class_names_of(ds, label_column: str) -> list[str] | None:
    """Class names from a ClassLabel column, else None."""
    import datasets

    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return None
