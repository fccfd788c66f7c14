"""Integrity of checkpoint directories: each file's size and sha256, recorded in the COMPLETE marker.

    {"format": "mmcl-checkpoint/1", "step": 4, "files": {"model.safetensors": {"size": ..., "sha256": ...}, ...}}

`verify_checkpoint` compares a directory with its marker. A marker that is a bare step number
(written before checksums existed) cannot be verified; then the safetensors headers are checked
against the file sizes, which catches a truncated file but not changed bytes.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

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
