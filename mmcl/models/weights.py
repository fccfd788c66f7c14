"""Reading weight files without unpickling, and loading them into a module.

Weights come as safetensors or as a torch state dict read with `weights_only=True` (tensors
and plain containers only, never arbitrary pickled objects).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch state-dict file (read with weights_only=True).

    Unwraps the usual checkpoint containers ({"state_dict": ...}, {"model": ...}) and the
    "module." prefix that DistributedDataParallel adds.
    """
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"could not read weights file {path!r} as safetensors or as a torch state dict with "
                f"weights_only=True ({type(exc).__name__}: {exc})"
            ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path!r} does not hold a flat dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` by name; if no name matches but every tensor matches in order
    and shape (a checkpoint from another implementation of the same network, such as the
    EfficientNet-Lite0 release for timm's `tf_efficientnet_lite0`), load it by position.
    Anything else raises a ValueError that names `source` and the first mismatches."""
    own = module.state_dict()
    if set(state) == set(own):
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"weights in {source!r} do not fit the model: shapes differ for {bad[:5]}")
        module.load_state_dict(state, strict=True)
        return
    same_order = len(state) == len(own) and all(
        a.shape == b.shape for a, b in zip(state.values(), own.values())
    )
    if same_order and not (set(state) & set(own)):
        module.load_state_dict(dict(zip(own.keys(), state.values())), strict=True)
        return
    missing = sorted(set(own) - set(state))[:5]
    unexpected = sorted(set(state) - set(own))[:5]
    raise ValueError(
        f"weights in {source!r} do not fit the model: {len(state)} tensors vs {len(own)} expected; "
        f"missing e.g. {missing}, unexpected e.g. {unexpected}"
    )
