"""Integrity of checkpoint directories: each file's size and sha256, recorded in the COMPLETE marker.

    {"format": "mmcl-checkpoint/1", "step": 4, "files": {"model.safetensors": {"size": ..., "sha256": ...}, ...}}

`verify_checkpoint` compares a directory with its marker. A marker that is a bare step number
(written before checksums existed) cannot be verified; then the safetensors headers are checked
against the file sizes, which catches a truncated file but not changed bytes.

In a multi-process run `verify_checkpoint_on_ranks` reads the files once per machine: each
machine's local main process hashes its own copy and the verdicts are combined, so a checkpoint
damaged as any machine reads it counts as damaged on all of them.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from mmcl import distributed

MARKER_FORMAT = "mmcl-checkpoint/1"


def file_record(path: Path) -> dict:
    """{"size": bytes, "sha256": hex digest} of the file at `path`."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def read_marker(path) -> dict | None:
    """The COMPLETE marker of checkpoint `path` as a dict; None if it predates checksums (a bare step)."""
    text = (Path(path) / "COMPLETE").read_text()
    try:
        marker = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{Path(path) / 'COMPLETE'} is damaged: not JSON ({err})") from err
    return marker if isinstance(marker, dict) else None


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file's header parses and its tensors cover the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} has {size} bytes, too few for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{path.name} is truncated: its header needs {8 + n} bytes, the file has {size}"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated or padded: its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def verify_checkpoint(path) -> tuple[list[str], bool]:
    """Check checkpoint directory `path` against its COMPLETE marker.

    Returns:
        (problems, verified): one line per damaged or missing file (empty: intact), and whether
        checksums were checked (False for a checkpoint written before they were recorded: then
        only the safetensors headers are checked against the file sizes).
    """
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        return [f"{path} has no COMPLETE marker"], False
    try:
        marker = read_marker(path)
    except ValueError as err:
        return [str(err)], False
    if marker is None:
        problems = [p for f in sorted(path.glob("*.safetensors")) if (p := _safetensors_problem(f))]
        if not (path / "model.safetensors").is_file():
            problems.insert(0, "model.safetensors is missing")
        return problems, False
    problems = []
    for name, record in marker.get("files", {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        found = file_record(f)
        if found["size"] != record["size"]:
            problems.append(f"{name} has {found['size']} bytes, the checkpoint recorded {record['size']}")
        elif found["sha256"] != record["sha256"]:
            problems.append(f"{name} does not match its recorded sha256 (its bytes changed)")
    return problems, True


# --------------------------------------------------------------------------- across processes


def verify_checkpoint_on_ranks(path, accelerator) -> tuple[list[str], bool]:
    """`verify_checkpoint` for a multi-process run; a collective, so every process calls it.

    Only each machine's local main process (accelerator.is_local_main_process) reads and hashes
    `path`, on its machine's file system; the others wait. Every process returns the same verdict:
    damaged if any machine found a problem (the problems are this machine's, or one line saying
    another machine found them; that machine prints its own), verified only if every machine
    checked the checksums.
    """
    problems, verified = [], True
    if accelerator.is_local_main_process:
        try:
            problems, verified = verify_checkpoint(path)
        except OSError as err:  # unreadable here: damaged for this machine, and no process is left waiting
            problems, verified = [f"{Path(path).name} cannot be read: {err}"], False
        if problems and not accelerator.is_main_process:
            print(f"mmcl: process {accelerator.process_index}: checkpoint {path} is damaged as this machine "
                  f"reads it: {'; '.join(problems)}", flush=True)
    damaged = distributed.any_rank(bool(problems), accelerator.device)
    unverified = distributed.any_rank(not verified, accelerator.device)
    if damaged and not problems:
        problems = [f"{Path(path).name} is damaged as another machine reads it (that machine's log names the files)"]
    return problems, not unverified


def same_checkpoints_on_ranks(paths: list[Path], accelerator) -> None:
    """Raise ValueError unless every process lists the same checkpoint steps (a collective), so
    that all of them verify the same candidates in the same order."""
    steps = [int(p.name.split("_")[-1]) for p in paths]
    device = accelerator.device
    if not (distributed.same_on_all_ranks(len(steps), device)
            and distributed.same_on_all_ranks(sum(s * (i + 1) for i, s in enumerate(steps)), device)):
        parent = paths[0].parent if paths else "the checkpoints folder"
        raise ValueError(f"the processes of this run see different checkpoints in {parent} (this one: "
                         f"{[p.name for p in paths]}); checkpoint.resume needs output_dir on a file system "
                         "that every machine shares")
