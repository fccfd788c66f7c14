"""Streamed sources: webdataset shards, data files and whole datasets, split, shuffled, resumable.

A *shard* is one unit read from its start: a ``.tar`` in img2dataset's layout (members
``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` and/or ``KEY.json``, grouped into samples by
webdataset's own tar iterators), or, with ``data.streaming``, one parquet / CSV / JSON / arrow file
read through ``datasets.load_dataset(..., streaming=True)``, or a ``RowRange`` (mmcl.data.ranges)
of a *finite source*: any other source mmcl.data.sources reads ("digits", an image folder, a
``save_to_disk`` directory, a datasets name in the local cache). A finite source is loaded once
per process by ``sources.load_source`` (memory-mapped arrow, images left undecoded) and cut into
contiguous row ranges of ``min(1000, ceil(R / 64))`` rows (R rows in the split; the last range
may be shorter): 64 ranges up to 64,000 rows, ranges of 1000 rows above, whatever the number of
processes or workers. Every shard row becomes an mmcl row ``{image_column, caption_column, label_column,
"__key__"}``; a finite source's key is ``<source name>/<row index>`` (the folder's name, "digits"
or the datasets name; the row's index in the split).

The documented rules (tests recompute them independently):

* **Splitting.** A run has ``slots = world_size * max(num_workers, 1)`` readers; rank r's worker w
  is slot ``r * max(num_workers, 1) + w``. In epoch e the shards are permuted by
  ``numpy.random.default_rng([seed, e]).permutation(N)`` and slot s reads ``perm[s::slots]``, so
  every shard (every sample) is read once per epoch by the whole run; N < slots raises unless
  ``resampled``, where slot s reads ``ceil(N / slots)`` shards drawn with replacement by
  ``default_rng([seed, e, s, 1]).integers(0, N, size)``.
* **Shuffling.** Each slot passes its rows through a buffer of ``buffer_size``: it fills the
  buffer, then for every further row takes out ``buffer[i]`` and puts the row in its place; at the
  end of its epoch it takes the rest out one at a time (``buffer[i]`` swapped with the last, popped).
  The t-th take-out of the epoch uses ``i = shuffle_draw(seed, e, s, t) % len(buffer)``.
* **Position.** A slot's state is (epoch, shard cursor, rows read from it, take-outs, whether it
  still reads, and the buffer as (shard cursor, row number) references). Restoring re-reads only
  the shards those references name, so a resumed stream yields exactly what it would have yielded.
"""
from __future__ import annotations

import glob
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

__all__ = ["SKIP_REASONS", "is_finite_source", "expand_shards", "is_stream_source", "worker_shards",
           "shuffle_draw", "read_shard", "SampleStream", "read_samples"]

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                      ".arrow": "arrow"}
# Why a sample (or a whole shard) was skipped: the keys of the logged ``skipped/<reason>`` counts.
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "missing_label", "truncated_shard",
                "empty_shard")
# What tarfile / the tar iterators raise for a file cut short or not a tar at all.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def is_finite_source(source) -> bool:
    """Whether ``source`` is one path or name that mmcl.data.sources loads whole (digits, an image
    folder, a save_to_disk directory, a datasets name, ...), not .tar shards or data files."""
    if not isinstance(source, str) or not source:
        return False
    return Path(source).suffix.lower() not in {".tar", *DATA_FILE_BUILDERS}


def _as_list(source) -> list[str]:
    return [source] if isinstance(source, str) else list(source)


def is_stream_source(source, streaming: bool = False) -> bool:
    """Whether ``source`` is read as a stream: .tar shards always; with ``streaming`` also data
    files (one path, a glob or a list) and any one finite source (``is_finite_source``)."""
    if not isinstance(source, (str, list, tuple)):
        return False
    paths = _as_list(source)
    if not paths or not all(isinstance(p, str) for p in paths):
        return False
    suffixes = {Path(p).suffix.lower() for p in paths}  # "shards/{00000..00099}.tar" -> ".tar"
    if suffixes == {".tar"}:
        return True
    if not streaming:
        return False
    return suffixes <= set(DATA_FILE_BUILDERS) or (isinstance(source, str) and is_finite_source(source))


def expand_shards(source) -> list[str]:
    """The shard paths of ``source``: a brace pattern, a glob, or a list of either, in order (a
    finite source's shards are ``mmcl.data.ranges.expand_ranges``').

    Raises:
        ValueError: naming a pattern that matches nothing or a listed path that does not exist.
    """
    items = _as_list(source)
    paths: list[str] = []
    for item in items:
        expanded = []
        for name in braceexpand(os.path.expanduser(item)):
            if glob.has_magic(name):
                matched = sorted(glob.glob(name))
                if not matched:
                    raise ValueError(f"shard pattern {item!r} matches no file")
                expanded += matched
            else:
                expanded.append(name)
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing and len(missing) == len(expanded) and len(expanded) > 1:
            raise ValueError(f"shard pattern {item!r} matches no file (e.g. {missing[0]} does not exist)")
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"{len(missing)} of the {len(expanded)} shard(s) of data source {item!r} do not "
                             f"exist: {shown}")
        paths += expanded
    if not paths:
        raise ValueError(f"data source {source!r} names no shard")
    return paths


def worker_shards(num_shards: int, *, epoch: int, slot: int, slots: int, seed: int,
                  resampled: bool = False) -> list[int]:
    """The shard indices slot ``slot`` of ``slots`` reads in ``epoch``, in order (module docstring).

    Raises:
        ValueError: fewer shards than slots without ``resampled``.
    """
    if not resampled and num_shards < slots:
        raise ValueError(
            f"{num_shards} shard(s) cannot be split over {slots} readers (processes x data.num_workers): "
            "write more shards, lower data.num_workers, or set data.resampled=true to draw shards with replacement")
    if resampled:
        size = math.ceil(num_shards / slots)
        return [int(i) for i in np.random.default_rng([seed, epoch, slot, 1]).integers(0, num_shards, size)]
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)[slot::slots]]


def shuffle_draw(seed: int, epoch: int, slot: int, t: int) -> int:
    """The random integer of the t-th take-out from slot ``slot``'s shuffle buffer in ``epoch``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(slot), int(t)]).generate_state(1)[0])


def read_shard(path, *, image_column: str = "image", caption_column: str | None = "caption",
               label_column: str | None = None, start: int = 0, counts: Counter | None = None):
    """Rows ``(row number, row)`` of one shard from row ``start`` on: a file path, or a finite
    source's ``mmcl.data.ranges.RowRange`` (any shard with ``rows(start, columns)``).

    A truncated or unreadable tar ends at its last complete sample (a sample cut short is yielded
    with the members it has, so it is skipped later for what it lacks) and adds 1 to
    ``counts["truncated_shard"]``; a shard without rows adds 1 to ``counts["empty_shard"]`` (``counts`` None: nothing is counted).
    """
    if not isinstance(path, (str, os.PathLike)):
        yield from path.rows(start, (image_column, caption_column, label_column))
        return
    if os.path.getsize(path) == 0:
        if counts is not None and start == 0:
            counts["empty_shard"] += 1
        return
    cut: list = []  # the error that ended a truncated tar
    rows = _tar_rows(path, cut) if path.lower().endswith(".tar") else _file_rows(path, start)
    first = start if path.lower().endswith(".tar") else 0
    number, any_row = start, False
    for index, raw in enumerate(rows):
        any_row = True
        if index < first:
            continue
        yield number, _row(raw, path, number, image_column, caption_column, label_column)
        number += 1
    if counts is not None and cut:
        counts["truncated_shard"] += 1
    elif counts is not None and not any_row and start == 0:
        counts["empty_shard"] += 1


def _tar_rows(path: str, cut: list):
    """webdataset's samples of one tar; a cut-short or unreadable tar ends the member stream (the
    error goes into ``cut``), so the samples completed before it are still yielded."""
    def members(f):
        try:
            for member in tar_file_iterator(f):
                yield {**member, "__url__": path}
        except _TAR_ERRORS as err:
            cut.append(err)

    with open(path, "rb") as f:
        # A duplicate member name is skipped (webdataset's grouping raises on it): counted as a cut.
        yield from group_by_keys(members(f), handler=lambda err: cut.append(err) or True)


def _file_rows(path: str, start: int):
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(path).suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=path, split="train", streaming=True, **kwargs)
    for name, feature in ds.features.items() if ds.features else ():
        if isinstance(feature, datasets.Image):  # keep bytes: decoding happens per sample, after shuffling
            ds = ds.cast_column(name, datasets.Image(decode=False))
    yield from ds.skip(start) if start else ds


def _row(raw: dict, path: str, number: int, image_column, caption_column, label_column) -> dict:
    """One mmcl row from a tar sample (``{"__key__", "jpg", "txt", ...}``) or a data-file row."""
    if "__key__" not in raw:  # a data-file row already has mmcl's columns
        row = {k: raw.get(k) for k in (image_column, caption_column, label_column) if k}
        row["__key__"] = f"{Path(path).name}/{number}"
        return row
    meta = {}
    if raw.get("json") is not None:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    image = next((raw[s] for s in IMAGE_SUFFIXES if raw.get(s) is not None), None)
    row = {image_column: image, "__key__": raw["__key__"]}
    if caption_column:
        text = raw.get("txt")
        text = text.decode("utf-8", "replace").strip() if text is not None else None
        # The metadata's own column first (it may hold a list of captions, drawn from per epoch).
        row[caption_column] = meta.get(caption_column) or text or meta.get("caption")
    if label_column:
        label = meta.get(label_column)
        if label is None and raw.get("cls") is not None:
            try:
                label = int(raw["cls"].decode().strip())
            except (ValueError, UnicodeDecodeError):
                label = None  # skipped as "missing_label"
        row[label_column] = label
    return row


class SampleStream:
    """The endless, resumable row stream of one slot (module docstring: the rules it follows).

    Args:
        shards: every shard of the source (file paths, or a finite source's RowRanges), (N,).
        slot, slots: this reader and the number of readers in the run.
        seed: seeds shard orders and shuffle draws.
        buffer_size: rows in the shuffle buffer (1: rows in shard order).
        resampled: draw shards with replacement.
        columns: ``read_shard``'s image_column / caption_column / label_column.
    """

    def __init__(self, shards: list, *, slot: int, slots: int, seed: int, buffer_size: int,
                 resampled: bool = False, columns: dict | None = None):
        self.shards, self.slot, self.slots, self.seed = list(shards), int(slot), int(slots), int(seed)
        self.buffer_size, self.resampled, self.columns = max(int(buffer_size), 1), bool(resampled), columns or {}
        self.counts: Counter = Counter()  # shard-level skips since the caller last emptied it
        self.epoch, self.shard, self.member, self.drawn, self.reading = 0, 0, 0, 0, True
        self.buffer: list = []  # [((shard cursor, row number), row)]
        self._rows, self._order, self._epoch_rows, self._empty_epochs = None, None, 0, 0
        worker_shards(len(self.shards), epoch=0, slot=self.slot, slots=self.slots, seed=self.seed,
                      resampled=self.resampled)  # raises now when the shards cannot be split

    def order(self) -> list[int]:
        """This epoch's shard indices for this slot."""
        if self._order is None:
            self._order = worker_shards(len(self.shards), epoch=self.epoch, slot=self.slot, slots=self.slots,
                                        seed=self.seed, resampled=self.resampled)
        return self._order

    def shard_id(self, cursor: int) -> int:
        """The index into ``shards`` of this epoch's shard number ``cursor``."""
        return self.order()[cursor]

    def _read_from(self, cursor: int, member: int):
        order = self.order()
        for j in range(cursor, len(order)):
            if j > cursor:
                self.shard, self.member = j, 0
            start = member if j == cursor else 0
            for m, row in read_shard(self.shards[order[j]], start=start, counts=self.counts, **self.columns):
                yield j, m, row

    def _pull(self):
        if self._rows is None:
            self._rows = self._read_from(self.shard, self.member)
        for j, m, row in self._rows:
            self.shard, self.member = j, m + 1
            self._epoch_rows += 1
            return (j, m), row
        return None

    def _take(self, replacement=None):
        i = shuffle_draw(self.seed, self.epoch, self.slot, self.drawn) % len(self.buffer)
        self.drawn += 1
        if replacement is not None:
            out, self.buffer[i] = self.buffer[i], replacement
            return out
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def next_row(self) -> tuple[tuple[int, int], dict]:
        """The next ``((shard cursor, row number), row)``; ``self.epoch`` is the row's epoch."""
        while True:
            if self.reading:
                got = self._pull()
                if got is not None:
                    if len(self.buffer) < self.buffer_size:
                        self.buffer.append(got)
                        continue
                    return self._take(got)
                self.reading = False
            if self.buffer:
                return self._take()
            self._next_epoch()

    def _next_epoch(self) -> None:
        self._empty_epochs = 0 if self._epoch_rows else self._empty_epochs + 1
        if self._empty_epochs and (not self.resampled or self._empty_epochs >= 20):
            names = [str(self.shards[i]) for i in self.order()]
            raise ValueError(f"no readable sample in the shards of data reader {self.slot}: {names[:5]}")
        self.epoch, self.shard, self.member, self.drawn, self.reading = self.epoch + 1, 0, 0, 0, True
        self._rows, self._order, self._epoch_rows = None, None, 0

    def state_dict(self) -> dict:
        """The position: plain ints and a (len(buffer), 2) int64 array of row references."""
        refs = np.asarray([ref for ref, _ in self.buffer], dtype=np.int64).reshape(-1, 2)
        return {"epoch": self.epoch, "shard": self.shard, "member": self.member, "drawn": self.drawn,
                "reading": self.reading, "buffer": refs}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``: re-reads the shards that the buffer's rows came from."""
        self.epoch, self.shard, self.member = int(state["epoch"]), int(state["shard"]), int(state["member"])
        self.drawn, self.reading = int(state["drawn"]), bool(state["reading"])
        self._rows, self._order, self._epoch_rows = None, None, 1
        refs = [(int(j), int(m)) for j, m in np.asarray(state["buffer"]).reshape(-1, 2)]
        found: dict = {}
        for j in sorted({j for j, _ in refs}):
            wanted = {m for jj, m in refs if jj == j}
            for m, row in read_shard(self.shards[self.shard_id(j)], **self.columns):
                if m in wanted:
                    found[(j, m)] = row
                if m >= max(wanted):
                    break
        lost = [ref for ref in refs if ref not in found]
        if lost:
            raise ValueError(f"cannot resume the data stream: shard {self.shards[self.shard_id(lost[0][0])]} "
                             f"no longer holds row {lost[0][1]} (were the shards rewritten?)")
        self.buffer = [(ref, found[ref]) for ref in refs]


def read_samples(source, limit: int, *, image_column: str = "image", caption_column: str | None = "caption",
                 label_column: str | None = None, counts: Counter | None = None):
    """The first ``limit`` rows of shards or data files (in their listed order) as a
    ``datasets.Dataset`` with an Image column, for evaluation (a bounded held-out set)."""
    import datasets

    columns = {"image_column": image_column, "caption_column": caption_column, "label_column": label_column}
    rows: list = []
    for path in expand_shards(source):
        for _, row in read_shard(path, counts=counts, **columns):
            image = row.get(image_column)
            if image is None:
                continue
            if isinstance(image, (bytes, bytearray)):
                row[image_column] = {"bytes": bytes(image), "path": None}
            rows.append(row)
            if len(rows) >= limit:
                break
        if len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"the streamed source {source!r} holds no readable sample")
    keep = [c for c in (image_column, caption_column, label_column, "__key__") if c and any(r.get(c) is not None
                                                                                           for r in rows)]
    table = {c: [r.get(c) for r in rows] for c in keep}
    ds = datasets.Dataset.from_dict(table)
    return ds.cast_column(image_column, datasets.Image())
