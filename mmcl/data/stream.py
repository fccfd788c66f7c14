"""An endless, resumable, sharded stream of batches over epochs.

mmcl.data's dataset makes every sample's augmentation a function of (seed, epoch, index), and
``epoch_order`` each epoch's order a function of (seed, epoch). This stream cuts that order into global
batches of B × world samples, hands rank r its r-th slice of each, and remembers (epoch,
batches consumed). Resuming rebuilds the same epoch order and starts after the consumed batches,
so a resumed run sees exactly the batches an uninterrupted one would have seen. One DataLoader
serves every epoch: its workers live for the whole run and keep prefetching across epoch ends.
This is mmcl's resume mechanism for data: ``state_dict`` goes into the training checkpoint.

Streamed sources (webdataset shards; with ``data.streaming`` data files and any other source, cut
into row ranges, mmcl.data.ranges) go through
``ShardBatchStream`` instead, with the same interface: each DataLoader worker is one endless
``SampleStream`` (mmcl.data.shards) that makes its own batches and sends its position with each.
Workers never run dry (each moves on to its next epoch), so batch n of a rank comes from its
worker n mod W; the stream keeps the position each worker sent with its last consumed batch, and a
resumed stream restarts every worker there (``build_stream`` picks the stream for a config).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcl.data.loader import build_dataset, epoch_order
from mmcl.data.ranges import RowRange, expand_ranges, finite_rows
from mmcl.data.shards import (SKIP_REASONS, SampleStream, expand_shards, is_finite_source, is_stream_source,
                              worker_shards)
from mmcl.data.sources import check_columns


class BatchStream:
    """Batches of ``batch_size`` for this rank, from ``dataset`` through ``collate_fn``.

    Args:
        dataset: takes ``(epoch, index)`` keys, as ``build_dataset``'s first result does.
        collate_fn: list of items -> batch dict (``build_dataset``'s second result).
        batch_size: per-rank batch size B.
        num_workers: DataLoader worker processes (0: load in this process).
        rank, world_size: this process and the number of processes.
        seed: seeds each epoch's order (``epoch_order``).
    """

    def __init__(self, dataset, collate_fn, batch_size: int, *, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        self.dataset, self.collate_fn, self.num_workers = dataset, collate_fn, int(num_workers)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.position = 0, 0
        self._iterator = None
        self.batches_per_epoch = len(self._epoch_batches(0))

    def _epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        return [(epoch, int(i)) for i in epoch_order(len(self.dataset), self.seed, epoch)]

    def _epoch_batches(self, epoch: int) -> list[list]:
        order = self._epoch_order(epoch)
        global_batch = self.batch_size * self.world_size
        n = len(order) // global_batch  # drop the incomplete tail: every rank gets full batches
        if n == 0:
            raise ValueError(
                f"the training data has {len(order)} samples, fewer than one global batch of {global_batch} "
                f"(train.batch_size={self.batch_size} x {self.world_size} processes): lower train.batch_size"
            )
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [order[i * global_batch + lo:i * global_batch + hi] for i in range(n)]

    def _batches_from(self, epoch: int, position: int):
        """Every batch from (epoch, position) on, through all later epochs: one DataLoader (one
        set of workers, prefetching across epoch boundaries) serves the whole run."""
        while True:
            yield from self._epoch_batches(epoch)[position:]
            epoch, position = epoch + 1, 0

    def _start(self) -> None:
        if self.position >= self.batches_per_epoch:  # the checkpoint was taken at the very end of an epoch
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % (2**63))
        # Pinned batches let the copies to the GPU (non_blocking) overlap the previous step.
        self._iterator = iter(DataLoader(self.dataset, batch_sampler=self._batches_from(self.epoch, self.position),
                                         collate_fn=self.collate_fn, num_workers=self.num_workers,
                                         generator=generator, pin_memory=torch.cuda.is_available()))

    def next(self) -> dict:
        """The next batch (a dict from the collate_fn); moves to the next epoch when one ends."""
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stop the DataLoader's workers now; a later `next` starts them again where it left off.

        The batch sampler never ends, so the workers would otherwise live until the stream is
        garbage collected, and a process forked meanwhile (another DataLoader's worker) would
        inherit them.
        """
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        """``{"epoch", "position"}``: the epoch and how many of its batches were consumed."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict``: the next batch is the one after the consumed ones."""
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _WorkerBatches(IterableDataset):
    """DataLoader worker k serves logical worker (k + first) mod W: batches of one SampleStream."""

    def __init__(self, stream_args: dict, make_item, collate_fn, batch_size: int, workers: int, rank: int,
                 states: list, first: int):
        self.stream_args, self.make_item, self.collate_fn = stream_args, make_item, collate_fn
        self.batch_size, self.workers, self.rank, self.states, self.first = batch_size, workers, rank, states, first

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.workers
        stream = SampleStream(slot=self.rank * self.workers + worker, **self.stream_args)
        if self.states[worker] is not None:
            stream.load_state_dict(self.states[worker])
        good_epoch = stream.epoch  # the epoch of the latest usable sample
        while True:
            items, skipped = [], Counter()
            while len(items) < self.batch_size:
                (cursor, member), row = stream.next_row()
                item = self.make_item(row, stream.epoch, stream.shard_id(cursor) * 2**24 + member)
                if item.get("skipped"):
                    skipped[item["reason"]] += 1
                    if stream.epoch > good_epoch + 1:  # a whole epoch without one usable sample
                        raise ValueError(f"data reader {stream.slot} read a whole epoch of its shards without a "
                                         f"usable sample (skipped: {dict(skipped)}); check data.image_column / "
                                         "data.caption_column / data.label_column against the shards")
                else:
                    items.append(item)
                    good_epoch = stream.epoch
            batch = self.collate_fn(items)
            batch["num_skipped"] = sum(skipped.values())
            skipped.update(stream.counts)
            stream.counts.clear()
            batch["skipped"] = {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}
            batch["stream_state"] = {"worker": worker, **stream.state_dict()}
            yield batch


def _as_is(batch):
    return batch


class ShardBatchStream:
    """Batches of ``batch_size`` for this rank from streamed shards; ``BatchStream``'s interface.

    Args:
        shards: every shard (``expand_shards``: file paths or RowRanges), (N,).
        make_item: ``ContrastiveDataset.make_item`` (row, epoch, index) -> item.
        collate_fn: list of items -> batch dict.
        batch_size: per-rank batch size B (every batch is full: skipped samples are replaced).
        num_workers: DataLoader workers W (0: read in this process, as one worker).
        rank, world_size: this process and the number of processes.
        seed, shuffle_buffer, resampled, columns: see ``mmcl.data.shards.SampleStream``.

    Batches also hold ``key`` (list of B sample keys) and ``skipped`` ({reason: count} since the
    worker's previous batch, mmcl.data.shards.SKIP_REASONS).

    Raises:
        ValueError: fewer shards than world_size x max(num_workers, 1) without ``resampled``.
    """

    per_rank_state = True  # each rank's workers have their own positions: the checkpoint keeps all ranks'

    def __init__(self, shards, make_item, collate_fn, batch_size: int, *, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                 columns: dict | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.workers, self.num_workers = max(int(num_workers), 1), int(num_workers)
        self.stream_args = {"shards": list(shards), "slots": world_size * self.workers, "seed": int(seed),
                            "buffer_size": int(shuffle_buffer), "resampled": bool(resampled), "columns": columns}
        worker_shards(len(shards), epoch=0, slot=0, slots=world_size * self.workers, seed=seed,
                      resampled=resampled)  # fewer shards than readers: raise before training starts
        self.make_item, self.collate_fn, self.batch_size, self.rank = make_item, collate_fn, batch_size, rank
        self.batches, self.epoch, self.states = 0, 0, [None] * self.workers
        self._iterator = None

    def _start(self) -> None:
        dataset = _WorkerBatches(self.stream_args, self.make_item, self.collate_fn, self.batch_size, self.workers,
                                 self.rank, list(self.states), self.batches % self.workers)
        # A private generator: the DataLoader draws its workers' base seed from it, not from the
        # training loop's global RNG (whose stream a resumed run restores exactly).
        generator = torch.Generator().manual_seed(int(self.stream_args["seed"]) + 1000003 * self.batches)
        self._iterator = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                                         generator=generator, pin_memory=torch.cuda.is_available()))

    def next(self) -> dict:
        """The next batch of this rank (worker ``batches mod W``'s next one)."""
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        state = batch.pop("stream_state")
        self.states[int(state["worker"])] = state
        self.batches += 1
        self.epoch = int(state["epoch"])
        return batch

    def close(self) -> None:
        """Stop the workers now; a later ``next`` restarts them where the consumed batches end."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        """``{"kind": "shards", "batches", "num_workers", "num_shards", "workers": [each worker's position
        or None]}``."""
        workers = [None if s is None else {k: v for k, v in s.items() if k != "worker"} for s in self.states]
        return {"kind": "shards", "batches": self.batches, "num_workers": self.num_workers,
                "num_shards": len(self.stream_args["shards"]), "workers": workers}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict`` of the same rank (same shards, workers and seed).

        Raises:
            ValueError: another kind of stream, another data.num_workers, or another shard count; a
                state without a shard count (written before finite sources were cut into row ranges,
                when a save_to_disk directory's arrow files were its shards) for row-range shards.
        """
        if state.get("kind") != "shards":
            raise ValueError("the checkpoint's data position is not a shard stream's: the data source changed")
        if int(state["num_workers"]) != self.num_workers:
            raise ValueError(f"the checkpoint was written with data.num_workers={state['num_workers']}; "
                             f"resume with the same value (got {self.num_workers})")
        shards = self.stream_args["shards"]
        if "num_shards" in state and int(state["num_shards"]) != len(shards):
            raise ValueError(f"the checkpoint's data position is for {int(state['num_shards'])} shards, but "
                             f"data.source now has {len(shards)}: resume with the same shards (a finite source: "
                             "the same rows), or start a new run")
        if "num_shards" not in state and any(isinstance(s, RowRange) for s in shards):
            raise ValueError("the checkpoint's data position predates streaming this data.source as row ranges "
                             "(a save_to_disk directory was streamed as its arrow files then); its position "
                             "cannot be continued exactly: start a new run")
        self.close()
        self.batches = int(state["batches"])
        self.states = [None if s is None else dict(s) for s in state["workers"]]
        self.epoch = max([int(s["epoch"]) for s in self.states if s is not None] or [0])


def build_stream(cfg, processor, *, text: bool, views: bool, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device_views: bool = False):
    """The batch stream of a ``DataConfig``: ``ShardBatchStream`` for a streamed source, else
    ``BatchStream`` over ``build_dataset``. Bad shard paths, and a finite source's missing path,
    uncached name, missing split or missing column, raise ValueError here, naming the key."""
    streamed = is_stream_source(cfg.source, cfg.streaming)
    if cfg.streaming and not streamed:
        raise ValueError(f"data.streaming=true streams one source (a path, 'digits' or a cached datasets name) or "
                         f"a list of .tar / parquet / CSV / JSON / arrow files; data.source={cfg.source!r} is a "
                         "list of something else")
    if not isinstance(cfg.source, str) and not streamed:
        raise ValueError(f"data.source as a list names .tar shards (or data files with data.streaming=true), "
                         f"got {cfg.source!r}")
    if streamed and cfg.max_samples is not None:
        raise ValueError(f"data.max_samples={cfg.max_samples} does not apply to a streamed source (every shard "
                         "is read each epoch): list fewer shards, or set data.max_samples=null")
    if is_stream_source(cfg.eval_source, cfg.streaming):  # a bad held-out source fails now, not at evaluation
        _stream_shards(cfg.eval_source, cfg.eval_split, "eval_", seed=seed, image_column=cfg.image_column)
    shards = _stream_shards(cfg.source, cfg.split, "", seed=seed, image_column=cfg.image_column) if streamed else None
    if streamed and is_finite_source(cfg.source):
        check_columns(finite_rows(cfg.source, cfg.split, seed=seed, image_column=cfg.image_column),
                      image_column=cfg.image_column, caption_column=cfg.caption_column if text else None,
                      label_column=cfg.label_column, prefix="data.", what=f"data.source={cfg.source!r}")
    dataset, collate_fn = build_dataset(cfg, processor, text=text, views=views, seed=seed,
                                        device_views=device_views, stream=streamed)
    if not streamed:
        return BatchStream(dataset, collate_fn, batch_size, num_workers=cfg.num_workers, rank=rank,
                           world_size=world_size, seed=seed)
    columns = {"image_column": cfg.image_column, "caption_column": cfg.caption_column if text else None,
               "label_column": cfg.label_column}
    return ShardBatchStream(shards, dataset.make_item, collate_fn, batch_size,
                            num_workers=cfg.num_workers, rank=rank, world_size=world_size, seed=seed,
                            shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, columns=columns)


def _stream_shards(source, split: str, prefix: str, *, seed: int, image_column: str) -> list:
    """The shards of a streamed source: ``expand_shards``, or a finite source's ``expand_ranges``,
    whose load errors name ``data.<prefix>source`` and ``data.<prefix>split``."""
    if not is_finite_source(source):
        return expand_shards(source)
    try:
        return expand_ranges(source, split, seed=seed, image_column=image_column)
    except ValueError as err:
        raise ValueError(f"data.{prefix}source={source!r} (data.{prefix}split={split!r}) cannot be streamed: "
                         f"{err}") from None
