"""Memoise a locked text tower's features (LiT training with a fixed caption set).

A fully locked tower in eval mode is a fixed function of its tokens, so the features of a caption
seen before can be reused instead of recomputed: with the demo's few hundred distinct captions the
text tower runs only during the first epoch. The cache sits on the tower *instance* (its forward is
wrapped), so the model's state dict and save_pretrained are unchanged, and it refuses towers with
trainable parameters, whose features change every step.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn


class _CachedForward:
    def __init__(self, tower: nn.Module, max_entries: int):
        self.tower, self.forward = tower, tower.forward
        self.max_entries = max_entries
        self.cache: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or any(p.requires_grad for p in self.tower.parameters()):
            return self.forward(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids.cpu(), mask.cpu())]
        first_seen: dict = {}
        for i, k in enumerate(keys):  # each new caption once, even if repeated in the batch
            if k not in self.cache and k not in first_seen:
                first_seen[k] = i
        missing = list(first_seen.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            with torch.no_grad():
                fresh = self.forward(input_ids=input_ids[idx],
                                     attention_mask=None if attention_mask is None else attention_mask[idx])
            for i, row in zip(missing, fresh):
                self.cache[keys[i]] = row.detach()
                if len(self.cache) > self.max_entries:
                    self.cache.popitem(last=False)
        rows = []
        for i, k in enumerate(keys):
            if k in self.cache:
                self.cache.move_to_end(k)
                rows.append(self.cache[k])
            else:  # evicted within this very batch (tiny cache): recompute that row alone
                with torch.no_grad():
                    rows.append(self.forward(input_ids=input_ids[i:i + 1],
                                             attention_mask=None if attention_mask is None else mask[i:i + 1])[0])
        return torch.stack(rows)


def cache_locked_text_tower(model, max_entries: int = 100_000) -> _CachedForward:
    """Wrap `model.text_tower`'s forward with a feature cache; returns the wrapper (hits/misses).

    Raises:
        ValueError: the model has no text tower, or the tower has trainable parameters.
    """
    tower = getattr(model, "text_tower", None)
    if tower is None:
        raise ValueError("model.cache_text_features needs a text tower")
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("model.cache_text_features needs a fully locked text tower "
                         "(model.lock_text=true, model.lock_text_unlocked_layers=0)")
    if isinstance(tower.forward, _CachedForward):
        return tower.forward
    wrapper = _CachedForward(tower, max_entries)
    tower.forward = wrapper  # instance attribute: nn.Module.__call__ finds it, state_dict is untouched
    return wrapper
