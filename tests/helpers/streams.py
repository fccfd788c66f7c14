"""Streamed-data builders shared by the shard and stream tests: tiny image-caption rows, tars
read back with tarfile alone, the splitting / shuffling / row-range rules of mmcl.data.shards and
mmcl.data.ranges re-implemented with numpy (no mmcl), bad shards, image folders, a processor, and a
stream position taken through real checkpoint files.

    from helpers.streams import pairs, reference_rows, processor, shards  # noqa: F401 (fixtures)
"""
from __future__ import annotations

import io
import math
import tarfile
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from mmcl.data import load_source
from mmcl.data.shard_writer import write_shards
from mmcl.train import checkpoint as ckpt

NUMBERS = "zero one two three four five six seven eight nine".split()
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def png(i: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def pairs(n: int) -> datasets.Dataset:
    """n image-caption-label rows (16x16 noise images, captions from the tiny test vocabulary)."""
    return datasets.Dataset.from_dict({
        "image": [{"bytes": png(i), "path": None} for i in range(n)],
        "caption": [f"a photo of the digit {NUMBERS[i % 10]}" for i in range(n)],
        "label": [i % 10 for i in range(n)],
    }).cast_column("image", datasets.Image())


def tar_keys(path) -> list[str]:
    """The sample keys of one tar in member order, read with tarfile alone."""
    keys = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def reference_rows(keys_per_shard, *, seed, slot, slots, buffer, epochs, resampled=False):
    """[(epoch, key)] of one slot by the documented rule (numpy only, no mmcl)."""
    n, out = len(keys_per_shard), []
    for e in range(epochs):
        if resampled:
            order = np.random.default_rng([seed, e, slot, 1]).integers(0, n, math.ceil(n / slots))
        else:
            order = np.random.default_rng([seed, e]).permutation(n)[slot::slots]
        rows = [k for j in order for k in keys_per_shard[j]]
        buf, t = [], 0
        for r in rows + [None] * buffer:
            if r is not None and len(buf) < buffer:
                buf.append(r)
                continue
            if not buf:
                break
            i = int(np.random.SeedSequence([seed, e, slot, t]).generate_state(1)[0]) % len(buf)
            t += 1
            if r is not None:
                out.append((e, buf[i]))
                buf[i] = r
            else:
                buf[i], buf[-1] = buf[-1], buf[i]
                out.append((e, buf.pop()))
    return out


@pytest.fixture(scope="module")
def processor():
    """mmcl's DualProcessor: 16x16 images, the tiny WordPiece tokenizer of the training tests."""
    from train_helpers import write_tokenizer
    from transformers import AutoTokenizer

    from mmcl.models.processor import DualProcessor, TransformImageProcessor

    tok = AutoTokenizer.from_pretrained(write_tokenizer(tempfile.mkdtemp()))
    return DualProcessor(TransformImageProcessor((16, 16), MEAN, STD), tok, text_max_length=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """23 samples in 6 shards of up to 4 (the last holds 3), written by mmcl's shard writer."""
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(pairs(23), out, shard_size=4, progress=False)
    return str(out / "{00000..00005}.tar"), paths


def bad_shards(root) -> list[str]:
    """A: good a0, corrupt a1, uncaptioned a2, caption-only a3; B: cut inside its 2nd sample;
    C: a 0-byte file; D: a tar without members."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:
        add(tar, "a0.png", png(0)), add(tar, "a0.txt", b"a photo")
        add(tar, "a1.png", b"not an image"), add(tar, "a1.txt", b"a photo")
        add(tar, "a2.png", png(2))
        add(tar, "a3.txt", b"a photo")
    with tarfile.open(root / "b.tar", "w") as tar:
        for i in range(3):
            add(tar, f"b{i}.png", png(10 + i)), add(tar, f"b{i}.txt", b"a photo")
    data = (root / "b.tar").read_bytes()
    cut = data.index(b"b1.png") + 512 + 100  # inside b1.png's data
    (root / "b.tar").write_bytes(data[:cut])
    (root / "c.tar").write_bytes(b"")
    tarfile.open(root / "d.tar", "w").close()
    return [str(root / f"{s}.tar") for s in "abcd"]



CLASSES = ("bird", "cat", "dog")


def write_folder(root: Path, per_class: dict, *, bad: str | None = None) -> Path:
    """An image folder: ``root/<class>/<class><i>.png`` (16x16 noise); ``bad``: that file holds no image."""
    n = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{name}{i}.png").write_bytes(png(100 + n))
            n += 1
    if bad is not None:
        (root / bad).write_bytes(b"not an image at all")
    return root


def reference_ranges(rows: int) -> list[range]:
    """The documented rule, recomputed: min(1000, ceil(R / 64)) rows per range."""
    size = min(1000, -(-rows // 64))
    return [range(a, min(a + size, rows)) for a in range(0, rows, size)]


def folder_labels(folder: Path) -> list[str]:
    """The class folder of each row of the non-streamed loader's train split (read from the path on disk)."""
    ds = load_source(str(folder), "train").cast_column("image", datasets.Image(decode=False))
    return [Path(cell["path"]).parent.name for cell in ds["image"]]


def resumed_through_checkpoint(make, consumed: int, directory):
    """``(state, resumed)``: a stream from ``make()`` consumes ``consumed`` batches and is closed;
    its ``state_dict`` goes through a real checkpoint state file in ``directory`` (safetensors +
    JSON) into a fresh ``make()`` stream, which is returned ready to continue."""
    first = make()
    for _ in range(consumed):
        first.next()
    state = first.state_dict()
    first.close()
    ckpt.save_state({"data": state}, directory)
    resumed = make()
    resumed.load_state_dict(ckpt.load_state(directory)["data"])
    return state, resumed
