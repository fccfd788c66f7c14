"""Atomic training checkpoints in safetensors + JSON (nothing is pickled).

A checkpoint is a directory `output_dir/checkpoints/step_00000123/` holding

    model.safetensors       the trained model's state (shared tensors handled by safetensors)
    extra.safetensors       other modules: MoCo key encoder, queue (may be absent)
    state.safetensors       every tensor of optimizer / scheduler / scaler / RNG state
    state.json              the rest of that state, with tensors replaced by references
    COMPLETE                written last

It is written to a temporary sibling directory and renamed into place, so a run killed at any
moment leaves either a complete checkpoint or none; `latest_checkpoint` also ignores any
directory without COMPLETE (e.g. on file systems where rename is not atomic).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    """The `checkpoint:` section: how often to write checkpoints, how many to keep, where to resume."""

    every: int = 0  # steps; 0: only the final model
    keep: int = 2  # newest complete checkpoints kept
    resume: str | None = None  # None | "auto" (the newest in output_dir, if any) | a checkpoint directory

    def validate(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"checkpoint.every must be an int >= 0, got {self.every!r}")
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 1:
            raise ValueError(f"checkpoint.keep must be an int >= 1, got {self.keep!r}")
        if self.resume is not None and not isinstance(self.resume, str):
            raise ValueError(f"checkpoint.resume must be null, 'auto' or a path, got {self.resume!r}")


# --------------------------------------------------------------------------- nested state ↔ JSON + tensors


def _encode(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep their types
        return {"__dict__": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, path) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, path) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    raise ValueError(f"unreadable checkpoint entry {obj!r}")


def save_state(state: dict, directory: Path, name: str = "state") -> None:
    tensors: dict = {}
    encoded = _encode(state, tensors, "state")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    with open(directory / f"{name}.json", "w") as f:
        json.dump(encoded, f)


def load_state(directory: Path, name: str = "state") -> dict:
    tensors = load_file(str(directory / f"{name}.safetensors"))
    with open(directory / f"{name}.json") as f:
        return _decode(json.load(f), tensors)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- directories


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "COMPLETE").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def temporary_dir(output_dir, step: int) -> Path:
    """Where a checkpoint is assembled before its rename (the same name on every rank)."""
    final = checkpoint_dir(output_dir, step)
    return final.parent / f".tmp-{final.name}"


def begin_checkpoint(output_dir, step: int) -> Path:
    """Main process: an empty temporary directory for the checkpoint of `step`."""
    tmp = temporary_dir(output_dir, step)
    if tmp.exists():  # left over by a run killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, output_dir, step: int, model, extra_modules: dict, state: dict, keep: int) -> Path:
    """Main process: write model / extra modules / state into `tmp`, mark it COMPLETE, rename it
    into place, then delete all but the newest `keep` complete checkpoints.

    Args:
        model: the (unwrapped) trained module.
        extra_modules: name -> module saved in extra.safetensors (key encoder, queue).
        state: nested dict of numbers / strings / tensors / numpy arrays (optimizer, data, ...).
    """
    final = checkpoint_dir(output_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    if extra_modules:
        extra = {f"{name}.{k}": v.detach().cpu().contiguous()
                 for name, mod in extra_modules.items() for k, v in mod.state_dict().items()}
        save_file(extra, str(tmp / "extra.safetensors"))
    save_state(state, tmp)
    (tmp / "COMPLETE").write_text(str(step))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path, model, extra_modules: dict) -> dict:
    """Load model / extra modules in place from a checkpoint directory; return its state dict."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path} is not a complete mmcl checkpoint (no COMPLETE marker)")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if extra_modules:
        extra = load_file(str(path / "extra.safetensors"))
        for name, mod in extra_modules.items():
            prefix = name + "."
            mod.load_state_dict({k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)})
    return load_state(path)


def rank_data_state(state: dict, rank: int, world: int) -> dict:
    """This rank's data position from a checkpoint's state (a stream keeps one per rank)."""
    data = state["data"]
    if "ranks" not in data:
        return data
    if len(data["ranks"]) != world:
        raise ValueError(f"the checkpoint's data stream positions are for {len(data['ranks'])} processes; "
                         f"resume a streamed source with the same number of processes (got {world})")
    return data["ranks"][rank]
