"""An endless, resumable, sharded stream of batches over epochs.

mmcl.data's dataset makes every sample's augmentation a function of (seed, epoch, index), and
``epoch_order`` each epoch's order a function of (seed, epoch). This stream cuts that order into global
batches of B × world samples, hands rank r its r-th slice of each, and remembers (epoch,
batches consumed). Resuming rebuilds the same epoch order and starts after the consumed batches,
so a resumed run sees exactly the batches an uninterrupted one would have seen. One DataLoader
serves every epoch: its workers live for the whole run and keep prefetching across epoch ends.
This is mmcl's resume mechanism for data: ``state_dict`` goes into the training checkpoint.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mmcl.data.loader import epoch_order


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
