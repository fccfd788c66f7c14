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

COMPLETE is JSON: the step and, for every other file, its size and sha256 (computed from the
bytes just written). `verify_checkpoint` checks them; `resume_path(..., "auto")` skips a damaged
newest checkpoint for the newest intact one. A checkpoint whose COMPLETE is a bare step number
(written before checksums existed) still loads: its safetensors headers are checked against the
file sizes, but its contents are unverified. When a write fails (full disk, I/O error,
permission), the temporary directory is removed, older checkpoints are untouched and
`CheckpointWriteError` names the path and the free space.
"""
from __future__ import annotations

import errno
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

from mmcl import distributed
from mmcl.train.integrity import MARKER_FORMAT, file_record, read_marker, verify_checkpoint  # noqa: F401 (API)
from mmcl.train.integrity import same_checkpoints_on_ranks, verify_checkpoint_on_ranks

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    """The `checkpoint:` section: how often to write checkpoints, how many to keep, where to resume
    and whether a resume may change settings that change the run's meaning (mmcl.train.faults)."""

    every: int = 0  # steps; 0: only the final model
    keep: int = 2  # newest complete checkpoints kept
    resume: str | None = None  # None | "auto" (the newest intact one in output_dir, if any) | a checkpoint directory
    resume_allow_changes: bool = False  # resume although the config changed the run's meaning (logged)

    def validate(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"checkpoint.every must be an int >= 0, got {self.every!r}")
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 1:
            raise ValueError(f"checkpoint.keep must be an int >= 1, got {self.keep!r}")
        if self.resume is not None and not isinstance(self.resume, str):
            raise ValueError(f"checkpoint.resume must be null, 'auto' or a path, got {self.resume!r}")
        if not isinstance(self.resume_allow_changes, bool):
            raise ValueError(f"checkpoint.resume_allow_changes must be true or false, got {self.resume_allow_changes!r}")


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


def _write_safetensors(write, path: Path) -> None:
    """Run `write(str(path))`; safetensors reports I/O failures (a full disk) as SafetensorError:
    raise them as the OSError they are, naming the path."""
    from safetensors import SafetensorError

    try:
        write(str(path))
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def save_state(state: dict, directory: Path, name: str = "state") -> None:
    tensors: dict = {}
    encoded = _encode(state, tensors, "state")
    _write_safetensors(lambda f: save_file(tensors, f), directory / f"{name}.safetensors")
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


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, I/O error, permission); nothing older was touched."""


def _write_failure(err: OSError, tmp: Path, step: int, remove: bool = True) -> CheckpointWriteError:
    """Remove the half-written `tmp` and describe the failure: the path, the error, the free space."""
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    where = Path(getattr(err, "filename", None) or tmp)
    probe = next((d for d in (where, *where.parents) if d.exists()), Path("/"))
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free on {probe}"
    except OSError:
        free = f"free space on {probe} unknown"
    reason = os.strerror(err.errno) if err.errno else str(err)
    return CheckpointWriteError(err.errno or errno.EIO,
                                f"could not write the checkpoint of step {step} at {where}: {reason} ({free}); "
                                "the partial checkpoint was removed and earlier checkpoints are intact")


def finish_checkpoint(tmp: Path, output_dir, step: int, model, extra_modules: dict, state: dict, keep: int,
                      config: dict | None = None) -> Path:
    """Main process: write model / extra modules / state (/ config.json) into `tmp`, record every
    file's size and sha256 in COMPLETE, rename it into place, then delete all but the newest `keep`
    complete checkpoints.

    Args:
        model: the (unwrapped) trained module.
        extra_modules: name -> module saved in extra.safetensors (key encoder, queue).
        state: nested dict of numbers / strings / tensors / numpy arrays (optimizer, data, ...).
        config: the run's configuration as a dict, stored so a resume can compare it.
    Raises:
        CheckpointWriteError: a write failed; `tmp` is removed, earlier checkpoints are untouched.
    """
    final = checkpoint_dir(output_dir, step)
    try:
        _write_safetensors(lambda f: save_model(model, f), tmp / "model.safetensors")
        if extra_modules:
            extra = {f"{name}.{k}": v.detach().cpu().contiguous()
                     for name, mod in extra_modules.items() for k, v in mod.state_dict().items()}
            _write_safetensors(lambda f: save_file(extra, f), tmp / "extra.safetensors")
        save_state(state, tmp)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        files = {f.name: file_record(f) for f in sorted(tmp.iterdir())}  # the rng_* files of every rank too
        marker = {"format": MARKER_FORMAT, "step": step, "files": files}
        (tmp / "COMPLETE").write_text(json.dumps(marker, indent=1))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        raise _write_failure(err, tmp, step) from err
    _fsync_dir(final.parent)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(accelerator, output_dir, step: int, model, extra_modules: dict, state, keep: int,
                    config: dict | None = None) -> None:
    """Every rank writes its RNG state; the main process writes the rest (`state`, only needed
    there) and renames. A write failing on any rank removes the temporary directory and raises
    CheckpointWriteError on every rank (none is left waiting)."""
    main = accelerator.is_main_process
    tmp = temporary_dir(output_dir, step)
    error = None
    if main:
        try:
            begin_checkpoint(output_dir, step)
        except OSError as err:
            error = _write_failure(err, tmp, step)
    failed = distributed.any_rank(error is not None, accelerator.device)  # also the barrier: tmp exists for all
    if not failed:
        try:
            save_state(rng_state(), tmp, f"rng_{accelerator.process_index}")
        except OSError as err:
            error = _write_failure(err, tmp, step, remove=False)  # the main process removes it
        failed = distributed.any_rank(error is not None, accelerator.device)
    if not failed and main:
        try:
            finish_checkpoint(tmp, output_dir, step, model, extra_modules, state, keep, config)
        except CheckpointWriteError as err:
            error = err
    failed = distributed.any_rank(error is not None, accelerator.device)
    if main and failed:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise error
    if failed:
        raise CheckpointWriteError(errno.EIO, f"another process could not write its part of the checkpoint of step "
                                              f"{step} in {tmp.parent}; see its error")


# --------------------------------------------------------------------------- resuming


_warned_unverified: set = set()


def resume_path(resume, output_dir, verbose: bool = True, accelerator=None) -> Path | None:
    """The checkpoint a run resumes from, verified.

    Args:
        resume: None (start fresh), "auto" (the newest intact checkpoint in output_dir, None if there
            is none) or a checkpoint directory.
        verbose: print what was skipped (the main process; the others stay quiet).
        accelerator: in a multi-process run, every process calls this with its Accelerator; then
            only each machine's local main process hashes the files (`verify_checkpoint_on_ranks`)
            and all processes return the same path or raise the same error.
    Raises:
        ValueError: `resume` names a directory that is not an intact checkpoint, or every
            checkpoint in output_dir is damaged.
    """
    if resume is None:
        return None
    verify = verify_checkpoint if accelerator is None else lambda p: verify_checkpoint_on_ranks(p, accelerator)
    if resume != "auto":
        path = Path(resume)
        problems, verified = verify(path)
        if not (path / "COMPLETE").is_file():
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint directory "
                             "(use 'auto' or a step_* dir)")
        if problems:
            raise ValueError(f"checkpoint.resume={resume!r} is damaged: {'; '.join(problems)} "
                             "(checkpoint.resume=auto picks the newest intact checkpoint)")
        _note_unverified(path, verified, verbose)
        return path
    found = list_checkpoints(output_dir)
    if accelerator is not None:
        same_checkpoints_on_ranks(found, accelerator)
    if not found:
        return None
    damaged = []
    for path in reversed(found):
        problems, verified = verify(path)
        if not problems:
            if damaged and verbose:
                redone = _step(damaged[0][0]) - _step(path)
                print("mmcl: warning: " + "; ".join(f"checkpoint {d} is damaged: {'; '.join(p)}" for d, p in damaged)
                      + f"; resuming from {path.name} instead ({redone} steps are redone)", flush=True)
            _note_unverified(path, verified, verbose)
            return path
        damaged.append((path, problems))
    raise ValueError(f"no intact checkpoint in {Path(output_dir) / 'checkpoints'}: "
                     + "; ".join(f"{d.name}: {p[0]}" for d, p in damaged))


def _step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _note_unverified(path: Path, verified: bool, verbose: bool) -> None:
    if not verified and verbose and path not in _warned_unverified:
        _warned_unverified.add(path)
        print(f"mmcl: {path} was written without checksums: loading it unverified", flush=True)


def read_config(path) -> dict | None:
    """The configuration stored with checkpoint `path` (None for checkpoints written without one)."""
    f = Path(path) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def read_checkpoint(path, model, extra_modules: dict) -> dict:
    """Load model / extra modules in place from a checkpoint directory; return its state dict."""
    from safetensors import SafetensorError

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path} is not a complete mmcl checkpoint (no COMPLETE marker)")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if extra_modules:
            extra = load_file(str(path / "extra.safetensors"))
            for name, mod in extra_modules.items():
                prefix = name + "."
                mod.load_state_dict({k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)})
        return load_state(path)
    except SafetensorError as err:
        raise ValueError(f"checkpoint {path} is damaged: {err}") from err


def rank_data_state(state: dict, rank: int, world: int) -> dict:
    """This rank's data position from a checkpoint's state (a stream keeps one per rank)."""
    data = state["data"]
    if "ranks" not in data:
        return data
    if len(data["ranks"]) != world:
        raise ValueError(f"the checkpoint's data stream positions are for {len(data['ranks'])} processes; "
                         f"resume a streamed source with the same number of processes (got {world})")
    return data["ranks"][rank]
