"""A finite source (digits, image folder, save_to_disk directory, cached datasets name) as shards.

The source's split is loaded once per process by ``mmcl.data.sources.load_source`` (memory-mapped
arrow, images left undecoded) and cut into contiguous ``RowRange`` shards of
``min(1000, ceil(R / 64))`` rows each, R being the split's rows (the last range may be shorter):
the rule depends on R alone, never on the number of processes or workers. ``mmcl.data.shards``
streams them like any other shard; a row's key is ``<source name>/<row index in the split>``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mmcl.data.sources import load_source, undecoded

__all__ = ["RANGE_ROWS", "RANGE_COUNT", "RowRange", "row_ranges", "expand_ranges", "finite_rows", "source_name"]

# The row-range rule of a finite source (module docstring): at most this many rows per range, and
# this many ranges until the ranges reach that size.
RANGE_ROWS, RANGE_COUNT = 1000, 64
_FETCH_ROWS = 64  # rows fetched from the arrow table at a time


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` of one split of a finite source, read as one shard.

    ``seed`` and ``image_column`` are ``sources.load_source``'s (the digits' train/test split; the
    column whose relative paths are resolved), so every process loads the same rows.
    """

    source: str
    split: str | None
    start: int
    stop: int
    seed: int = 0
    image_column: str = "image"

    def __str__(self) -> str:
        return f"{self.source} (split {self.split}) rows {self.start}..{self.stop - 1}"

    def rows(self, start: int = 0, columns: tuple = ()):
        """Rows ``(row number in the range, row)`` from ``start`` on: ``{column: value or None,
        "__key__": "<source name>/<row index>"}`` for each named column, fetched a few at a time."""
        ds = finite_rows(self.source, self.split, seed=self.seed, image_column=self.image_column)
        wanted = [c for c in dict.fromkeys(columns) if c]
        ds, name = ds.select_columns([c for c in wanted if c in ds.column_names]), source_name(self.source)
        for a in range(self.start + start, self.stop, _FETCH_ROWS):
            b = min(a + _FETCH_ROWS, self.stop)
            chunk = ds[a:b]
            for i in range(b - a):
                row = {c: chunk[c][i] if c in chunk else None for c in wanted}
                row["__key__"] = f"{name}/{a + i}"
                yield a + i - self.start, row


def row_ranges(num_rows: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` row ranges of a finite source of ``num_rows`` rows (module docstring)."""
    size = min(RANGE_ROWS, math.ceil(num_rows / RANGE_COUNT)) if num_rows > 0 else 1
    return [(a, min(a + size, num_rows)) for a in range(0, num_rows, size)]


_LOADED: dict = {}  # (source, split, seed, image_column, modification time) -> Dataset, per process


def finite_rows(source: str, split: str | None, *, seed: int = 0, image_column: str = "image"):
    """One split of a finite source as ``sources.load_source`` reads it, images left undecoded;
    loaded once per process (DataLoader workers forked later share the memory-mapped table).

    Raises:
        ValueError: from ``load_source``: no such path, a name not in the cache, no such split.
    """
    path = Path(source).expanduser()
    key = (source, split, int(seed), image_column, path.stat().st_mtime_ns if path.exists() else None)
    if key not in _LOADED:
        _LOADED[key] = undecoded(load_source(source, split, seed=seed, image_column=image_column), image_column)
    return _LOADED[key]


def expand_ranges(source: str, split: str | None, *, seed: int = 0, image_column: str = "image") -> list[RowRange]:
    """The ``RowRange`` shards of a finite source's ``split`` (module docstring: the rule), (N,).

    Raises:
        ValueError: the source cannot be loaded (see ``finite_rows``) or its split has no rows.
    """
    ds = finite_rows(source, split, seed=seed, image_column=image_column)
    if len(ds) == 0:
        raise ValueError(f"data source {source!r} (split {split!r}) has no rows")
    return [RowRange(source, split, a, b, int(seed), image_column) for a, b in row_ranges(len(ds))]


def source_name(source: str) -> str:
    """The name in a finite source's sample keys: a path's last part, else the source itself."""
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source
