"""Writing webdataset shards: any source mmcl reads, as tar files in img2dataset's layout.

``write_shards(source, out_dir, shard_size=N)`` writes ``out_dir/00000.tar``, ``00001.tar``, ...
each holding up to N samples. Sample ``KEY`` (the shard number then the position in the shard,
``000010003``: shard 1, sample 3) is three consecutive members, as img2dataset writes them:

- ``KEY.jpg`` / ``KEY.png`` / ``KEY.webp``: the image. Encoded JPEG, PNG and WebP files are copied
  byte for byte; any other format, and raw pixels, become a lossless PNG of the image's RGB
  decode (the pixels mmcl's decoder reads from the source).
- ``KEY.txt``: the caption, UTF-8; from a column holding a list of captions, its first one.
- ``KEY.json``: ``"key"``, ``"source_index"`` (the row number in the source split), the caption
  column under its own name with its value (the string, or the list of captions), ``"caption"``
  (the text of KEY.txt, img2dataset's field) when the column has another name, and the value of
  every other column of plain values (numbers, strings, labels, lists of them). So a config that
  reads the source reads its shards with only ``data.source`` changed.

``out_dir/sizes.json`` maps each shard's file name to its number of samples (the file
open_clip's webdataset reader looks for). Every image is decoded once before it is written: an
unreadable image or a row without a caption is left out and counted by reason in the summary
line. A shard is written under a temporary name and renamed once complete, so an interrupted run
never leaves a truncated ``.tar`` behind. Tar headers carry no time stamps or owners: the same
source and arguments give the same bytes.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mmcl.data.images import decode_image
from mmcl.data.shards import is_stream_source
from mmcl.data.sources import check_columns, load_splits, pick_split, subsample, undecoded

__all__ = ["write_shards", "SIZES_FILE"]

SIZES_FILE = "sizes.json"
# PIL's format name -> the member extension; the bytes of these formats are copied unchanged.
_COPIED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_PLAIN_DTYPES = ("bool", "string", "large_string") + tuple(
    f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)) + ("float16", "float32", "float64")
_RESERVED = ("key", "source_index", "caption")


def write_shards(source, out_dir, *, shard_size: int = 1000, image_column: str = "image",
                 caption_column: str | None = "caption", split: str | None = None,
                 max_samples: int | None = None, shuffle: bool = False, seed: int = 0,
                 progress: bool = True) -> list[str]:
    """Write ``source`` as img2dataset-style webdataset shards (layout in the module docstring).

    Args:
        source: anything ``DataConfig.source`` reads (parquet / CSV / JSON file, image folder,
            ``save_to_disk`` directory, "digits", a cached ``datasets`` name), or a
            ``datasets.Dataset``.
        out_dir: the folder to write; created if missing; it must not hold shards already.
        shard_size: samples per shard (the last shard may hold fewer).
        image_column: the column of images (encoded bytes, paths, PIL images or uint8 arrays).
        caption_column: the column of captions (a string, or a list of strings, per row); None
            writes image-only shards (no ``.txt`` member).
        split: the split of a multi-split source; None: the only one, else "train".
        max_samples: write this many seeded random rows (kept in source order); None: all.
        shuffle: write the rows in a ``seed``-ed random order, so that each shard mixes the
            whole source (useful when it is sorted, e.g. an image folder by class).
        seed: seeds ``max_samples`` and ``shuffle``.
        progress: show a progress bar and print the summary line on stderr.

    Returns:
        The shard paths written, in order (``out_dir/00000.tar``, ...).

    Raises:
        ValueError: a bad argument (named), an unreadable source or missing column, an
            ``out_dir`` that is a file or already holds shards, or no writable sample at all.
        TypeError: ``source`` is neither a string nor a ``datasets.Dataset``.
    """
    _check_args(shard_size, image_column, caption_column, shuffle)
    ds, source_rows = _rows(source, split, image_column, caption_column, max_samples, seed)
    out = _prepare_out_dir(out_dir)
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    writer = _ShardWriter(out, shard_size, num_rows=len(ds))
    metadata = _metadata_columns(ds.features, image_column, caption_column)
    skipped = {"unreadable image": 0, "no caption": 0}
    rows = ds.select(order) if shuffle else ds
    bar = _progress_bar(len(ds), progress, out)
    try:
        for position, row in enumerate(rows):
            bar.update(1)
            image = _encoded_image(row[image_column])
            if image is None:
                skipped["unreadable image"] += 1
                continue
            text, captions = _caption(row[caption_column]) if caption_column is not None else (None, None)
            if caption_column is not None and text is None:
                skipped["no caption"] += 1
                continue
            meta = {name: _plain(row[name]) for name in metadata}
            meta["source_index"] = int(source_rows[order[position]])
            if caption_column is not None:
                meta["caption"] = text  # img2dataset's field; a "caption" column of lists replaces it
                meta[caption_column] = text if captions is None else captions
            writer.add(image, text, meta)
    except BaseException:
        writer.abort()  # the shard being written is removed; the complete ones stay
        raise
    finally:
        bar.close()
    paths = writer.close()
    if not paths:
        raise ValueError(f"no sample of {_name(source)} could be written ({_reasons(skipped)})")
    (out / SIZES_FILE).write_text(json.dumps(writer.sizes, indent=1) + "\n", encoding="utf-8")
    if progress:
        print(_summary(out, paths, writer.sizes, skipped), file=sys.stderr)
    return [str(p) for p in paths]


class _ShardWriter:
    """Appends samples to numbered tar files of ``shard_size`` samples, renaming each once full."""

    def __init__(self, out: Path, shard_size: int, num_rows: int):
        self.out, self.shard_size = out, shard_size
        # Widths fixed by the largest possible shard number and position, so every key has one length.
        self.shard_width = max(5, len(str(max(0, math.ceil(num_rows / shard_size) - 1))))
        self.key_width = max(4, len(str(shard_size - 1)))
        self.sizes: dict[str, int] = {}
        self.paths: list[Path] = []
        self._tar, self._count = None, 0

    def add(self, image: tuple[str, bytes], text: str | None, meta: dict) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._temporary(), "w", format=tarfile.PAX_FORMAT)
        key = f"{len(self.paths):0{self.shard_width}d}{self._count:0{self.key_width}d}"
        extension, data = image
        self._member(f"{key}.{extension}", data)
        if text is not None:
            self._member(f"{key}.txt", text.encode("utf-8"))
        self._member(f"{key}.json", json.dumps({"key": key, **meta}, ensure_ascii=False).encode("utf-8"))
        self._count += 1
        if self._count == self.shard_size:  # complete: renamed now, so an interruption keeps it
            self._finish_shard()

    def close(self) -> list[Path]:
        self._finish_shard()
        return list(self.paths)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._temporary().unlink()
            self._tar = None

    def _shard_name(self) -> str:
        return f"{len(self.paths):0{self.shard_width}d}.tar"

    def _temporary(self) -> Path:
        return self.out / f".{self._shard_name()}.partial"

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self._shard_name()
        os.replace(self._temporary(), self.out / name)
        self.sizes[name] = self._count
        self.paths.append(self.out / name)
        self._tar, self._count = None, 0


def _check_args(shard_size, image_column, caption_column, shuffle) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if not isinstance(image_column, str) or not image_column:
        raise ValueError(f"image_column must be a non-empty string, got {image_column!r}")
    if caption_column is not None and (not isinstance(caption_column, str) or not caption_column):
        raise ValueError(f"caption_column must be a non-empty string or None, got {caption_column!r}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")


def _rows(source, split, image_column, caption_column, max_samples, seed):
    """``(rows to write with images left encoded, (len,) their row numbers in the split)``."""
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (str, list, tuple)) and is_stream_source(source):
        raise ValueError(f"source {source!r} names .tar shards already; write_shards reads a source that "
                         "mmcl loads whole (parquet / CSV / JSON, image folder, save_to_disk, digits)")
    elif isinstance(source, str):
        splits = load_splits(source, seed=seed, image_column=image_column)
        ds = splits[pick_split(splits, split, default="train", what=f"source {source!r}: split")]
    else:
        raise TypeError(f"source must be a path, 'digits', a datasets name or a datasets.Dataset, "
                        f"got {type(source).__name__}")
    check_columns(ds, image_column=image_column, caption_column=caption_column, label_column=None)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if len(ds) == 0:
        raise ValueError(f"{_name(source)} has no rows to write")
    source_rows = np.arange(len(ds))
    if max_samples is not None and max_samples < len(ds):  # the rows `subsample` keeps, by number
        source_rows = np.asarray(subsample(datasets.Dataset.from_dict({"row": source_rows}), max_samples,
                                           seed=seed)["row"])
        ds = ds.select(source_rows)
    elif max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    return undecoded(ds, image_column), source_rows


def _prepare_out_dir(out_dir) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir must be a directory path, got {out_dir!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} exists and is not a directory")
    if out.is_dir() and (any(out.glob("*.tar")) or (out / SIZES_FILE).exists()):
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} already holds shards; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tar.partial"):  # left by an interrupted run
        stale.unlink()
    return out


def _encoded_image(cell) -> tuple[str, bytes] | None:
    """``(extension, encoded bytes)`` of one image cell, or None when it does not decode."""
    data = None
    if isinstance(cell, dict):  # an undecoded datasets.Image cell: bytes, or a path to read
        data, cell = cell.get("bytes"), cell.get("path")
    if data is None and isinstance(cell, (str, os.PathLike)):
        try:
            data = Path(cell).read_bytes()
        except OSError:
            return None
    if isinstance(data, (bytes, bytearray)):
        rgb = decode_image(bytes(data))  # mmcl's decoder: what training would read
        if rgb is None:
            return None
        with Image.open(io.BytesIO(data)) as probe:
            extension = _COPIED_FORMATS.get(probe.format)
        return (extension, bytes(data)) if extension else ("png", _png(rgb))
    rgb = decode_image(cell) if cell is not None else None  # a PIL image or a uint8 array
    return None if rgb is None else ("png", _png(rgb))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _caption(value) -> tuple[str | None, list[str] | None]:
    """``(text for KEY.txt, the whole list or None)``; text is None when the row has no caption."""
    if isinstance(value, str):
        return (value if value.strip() else None), None
    if isinstance(value, (list, tuple)):
        captions = [c for c in value if isinstance(c, str) and c.strip()]
        return (captions[0] if captions else None), captions
    return None, None


def _metadata_columns(features, image_column: str, caption_column: str | None) -> list[str]:
    """The columns written into KEY.json: plain values and lists of them, not images or binaries."""
    def plain(feature) -> bool:
        if isinstance(feature, datasets.ClassLabel):
            return True
        if isinstance(feature, datasets.Value):
            return feature.dtype in _PLAIN_DTYPES
        if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
            return plain(feature.feature)
        return False

    return [name for name, feature in features.items()
            if name not in (image_column, caption_column) and name not in _RESERVED and plain(feature)]


def _plain(value):
    """A JSON-ready copy of one cell (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def _progress_bar(total: int, enabled: bool, out: Path):
    return tqdm(total=total, desc=f"writing shards to {out}", unit="sample", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def _name(source) -> str:
    return f"source {source!r}" if isinstance(source, str) else "the dataset"


def _reasons(skipped: dict) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.items())


def _summary(out: Path, paths: list[Path], sizes: dict, skipped: dict) -> str:
    first, last = paths[0].stem, paths[-1].stem
    pattern = str(out / (f"{{{first}..{last}}}.tar" if len(paths) > 1 else f"{first}.tar"))
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    return (f"wrote {sum(sizes.values())} samples in {len(paths)} shards ({megabytes:.1f} MB): {pattern}; "
            f"skipped {sum(skipped.values())} ({_reasons(skipped)})")
