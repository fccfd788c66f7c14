"""One optimizer step's forward/backward: plain (one batch, or summed micro-batch losses) or
cached (GradCache, Gao et al. 2021).

Cached accumulation makes k micro-batches of B one contrastive batch of k·B:

1. embed every micro-batch without a graph (cheap in memory), remembering the RNG state
   before each so that dropout draws the same masks when it is re-run;
2. compute the loss once over all k·B embeddings (leaf tensors) and backpropagate it to get
   d loss / d embedding for every row (and the temperature's gradient);
3. re-run each micro-batch with a graph from its saved RNG state and backpropagate its slice
   of the cached embedding gradient into the towers.

The parameter gradients equal those of one k·B batch (up to float rounding) while only one
micro-batch's activations live at a time. With several processes the towers' gradients are
all-reduced by hand once at the end (DDP's own hooks expect one backward per forward).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mmcl import distributed

ACCUMULATE_MODES = ("cached", "plain")  # train.accumulate_mode: cached_step | plain_step


def _rng_snapshot(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_restore(state, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _cat_keys(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts and parts[0] else {}


def plain_step(model, objective, batches: list[dict], backward, no_sync):
    """Forward + backward of `len(batches)` micro-batches, each its own contrastive batch; the
    losses are averaged (gradients summed / k). Returns (mean loss tensor, logs, keys)."""
    k = len(batches)
    total, logs, keys = 0.0, {}, []
    for i, batch in enumerate(batches):
        ctx = no_sync() if i < k - 1 else contextlib.nullcontext()
        with ctx:
            emb = objective.embed(model, batch)
            scale = emb.pop("scale", None)
            kb = objective.key_embeds(batch)
            loss, logs = objective.loss(emb, kb, scale)
            backward(loss / k)
        keys.append(kb)
        total = total + loss.detach() / k
    return total, logs, _cat_keys(keys)


def cached_step(model, scale_fn, objective, batches: list[dict], backward, no_sync, device):
    """GradCache over `batches`: returns (loss tensor over all k·B rows, logs, keys).

    Args:
        model: the (possibly DDP-wrapped) model whose forward `objective.embed` calls.
        scale_fn: () -> 0-dim logit scale with a graph to its parameter (CLIP), or None.
        backward: accelerator.backward (loss scaling for fp16).
        no_sync: () -> context that disables DDP's gradient all-reduce.
    """
    snapshots, cached, keys = [], [], []
    with no_sync():
        with torch.no_grad():
            # The graph-free pass must not move BatchNorm running statistics: the replay below
            # updates them once per micro-batch, as one ordinary pass would.
            buffers = [b.detach().clone() for b in model.buffers()]
            for batch in batches:
                snapshots.append(_rng_snapshot(device))
                emb = objective.embed(model, batch)
                emb.pop("scale", None)
                cached.append(emb)
                keys.append(objective.key_embeds(batch))
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        names = list(cached[0])
        sizes = [c[names[0]].shape[0] for c in cached]
        leaves = {n: torch.cat([c[n] for c in cached]).detach().requires_grad_(True) for n in names}
        all_keys = _cat_keys(keys)
        scale = scale_fn() if (scale_fn is not None and objective.learns_scale) else None
        loss, logs = objective.loss(leaves, all_keys, scale)
        backward(loss)
        grads = {n: leaves[n].grad for n in names}
        after = _rng_snapshot(device)
        start = 0
        for batch, snap, size in zip(batches, snapshots, sizes):
            _rng_restore(snap, device)
            emb = objective.embed(model, batch)
            emb.pop("scale", None)
            tensors, tensor_grads = [], []
            for n in names:
                g = grads[n]
                if g is None:  # this output does not reach the loss
                    continue
                tensors.append(emb[n])
                tensor_grads.append(g[start:start + size].to(emb[n].dtype))
            if tensors:
                torch.autograd.backward(tensors, tensor_grads)
            start += size
        _rng_restore(after, device)
    if distributed.is_distributed():
        _average_gradients(model)
    return loss.detach(), logs, all_keys


def _average_gradients(model) -> None:
    """What DDP would have done: average every parameter's gradient over the ranks (one bucket
    per dtype to keep the number of collectives small)."""
    world = distributed.world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # ranks must reduce the same tensors: absent gradients become zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
