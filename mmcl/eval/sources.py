"""Data sources for evaluation from the command line: never downloads anything.

A source is what `mmcl.data.sources.load_splits` reads: "digits" (scikit-learn's handwritten
digits, train/test); a .parquet, .csv, .tsv, .json or .jsonl file (one split, "train", as
`datasets` names it); a directory written by `save_to_disk` (a Dataset, or a DatasetDict of
splits); an image folder (class sub-folders, optionally under train/ test/ split folders); or a
`datasets` name already in the local cache. This module adds the command line's choices: which
split, how many rows, a held-out part when there is one split, the class names.
"""
from __future__ import annotations

__all__ = ["load_splits", "pick_split", "load_source", "subsample", "class_names_of", "holdout_split"]

# Which split to evaluate on when several exist and none is named, in order of preference.
_EVAL_PREFERENCE = ("test", "validation", "valid", "val", "train")


def load_splits(source: str, *, image_column: str = "image") -> dict:
    """All splits of a local source as {split name: datasets.Dataset}; ValueError naming what is wrong.

    `mmcl.data.sources.load_splits` reads the source; image paths listed in CSV/JSON rows become
    absolute and are cast to `datasets.Image`, so every split yields PIL images.
    """
    import datasets

    from mmcl.data import sources

    datasets.disable_progress_bars()  # loading a local file is quick; its bars would only clutter stderr
    splits, base_dir = sources.load_splits(source)
    if base_dir is None:
        return splits
    resolved = {}
    for name, ds in splits.items():
        ds = sources.absolute_image_paths(ds, image_column, base_dir)
        feature = ds.features.get(image_column)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            ds = ds.cast_column(image_column, datasets.Image())
        resolved[name] = ds
    return resolved


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
