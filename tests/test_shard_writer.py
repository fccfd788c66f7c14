"""mmcl.data.shard_writer and `mmcl shards`: shards read back with the webdataset package, 🤗 datasets'
webdataset builder and tarfile, compared with the source read by PIL and datasets directly."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tiny_dual_encoder import real_images

from mmcl.cli import main
from mmcl.data.shard_writer import SIZES_FILE, write_shards

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # the last two are re-encoded as PNG
COPIED = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _encode(image, fmt) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """13 rows: 11 writable in five formats and three modes (one caption string per row, or a list),
    one corrupt image, one row without a usable caption."""
    root = tmp_path_factory.mktemp("shard_source")
    images = real_images(11)
    formats = [FORMATS[i % len(FORMATS)] for i in range(11)]
    cells = [_encode(im if fmt != "JPEG" else im.convert("RGB"), fmt) for im, fmt in zip(images, formats)]
    captions = [[f"photo {i}", f"picture number {i}"] if i % 2 else [f"image {i} é"] for i in range(11)]
    cells.insert(4, b"\xff\xd8\xff\xe0 not really a jpeg")  # row 4: unreadable
    captions.insert(4, ["a caption of a broken image"])
    cells.insert(9, cells[0])  # row 9: a good image without a caption
    captions.insert(9, ["", "   "])
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "score": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in cells], "captions": captions,
                                     "label": [i % 3 for i in range(13)], "score": [i / 4 for i in range(13)]},
                                    features=features)
    ds.to_parquet(str(root / "data.parquet"))
    good = [r for r in range(13) if r not in (4, 9)]
    fmt_of = {r: f for r, f in zip(good, formats)}
    return dict(root=root, parquet=root / "data.parquet", cells=cells, captions=captions, good=good, fmt_of=fmt_of)


def _samples(paths):
    """Every sample of the shards, in order, as the webdataset package groups them."""
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def test_round_trip_keeps_bytes_pixels_captions_and_metadata(source, tmp_path, capsys):
    out = tmp_path / "shards"
    paths = write_shards(str(source["parquet"]), out, shard_size=4, caption_column="captions")
    assert paths == [str(out / f"{i:05d}.tar") for i in range(3)]
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("wrote 11 samples in 3 shards") and f"{out}/{{00000..00002}}.tar" in summary, summary
    assert "skipped 2 (unreadable image: 1, no caption: 1)" in summary, summary
    assert json.loads((out / SIZES_FILE).read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 3}
    samples = _samples(paths)
    assert [s["__key__"] for s in samples] == [f"{i // 4:05d}{i % 4:04d}" for i in range(11)]
    for sample, row in zip(samples, source["good"]):
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["source_index"] == row
        fmt, cell = source["fmt_of"][row], source["cells"][row]
        ext = COPIED.get(fmt, "png")
        assert {k for k in sample if not k.startswith("__")} == {ext, "txt", "json"}, (row, sorted(sample))
        if fmt in COPIED:
            assert sample[ext] == cell, f"row {row}: {fmt} bytes changed"
        np.testing.assert_array_equal(_rgb(sample[ext]), _rgb(cell), err_msg=f"row {row} ({fmt})")
        captions = source["captions"][row]
        assert sample["txt"].decode("utf-8") == captions[0] == meta["caption"]
        assert meta["captions"] == captions
        assert meta["label"] == row % 3 and meta["score"] == pytest.approx(row / 4)
    # img2dataset's member order: each sample's image, txt and json members are consecutive.
    for path, size in zip(paths, (4, 4, 3)):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        keys = [n.split(".")[0] for n in names]
        assert len(names) == 3 * size and all(keys[i] == keys[i + 1] == keys[i + 2] for i in range(0, len(keys), 3))
        assert [n.split(".", 1)[1] for n in names[1::3]] == ["txt"] * size
        assert [n.split(".", 1)[1] for n in names[2::3]] == ["json"] * size


def test_digits_through_datasets_webdataset_builder(tmp_path):
    from mmcl.data import load_digits_dataset

    paths = write_shards("digits", tmp_path / "d", shard_size=7, max_samples=20, seed=3, progress=False)
    ref = load_digits_dataset("train", seed=3)
    read = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train")
    assert len(read) == 20 and len(paths) == 3
    rows = [m["source_index"] for m in read["json"]]
    assert rows == sorted(rows) and len(set(rows)) == 20  # seeded random rows, kept in source order
    expected = np.sort(np.random.default_rng(3).choice(len(ref), size=20, replace=False))
    assert rows == expected.tolist()
    for sample, row in zip(read, rows):
        np.testing.assert_array_equal(np.asarray(sample["png"].convert("RGB")), np.asarray(ref[row]["image"]))
        assert sample["txt"] == ref[row]["caption"][0] and sample["json"]["caption"] == ref[row]["caption"]
        assert sample["json"]["label"] == ref[row]["label"]


def test_image_folder_csv_and_saved_dataset(tmp_path):
    images = real_images(6)
    folder = tmp_path / "folder"
    files = []
    for i, im in enumerate(images):
        (folder / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        files.append(folder / ("cat" if i % 2 else "dog") / f"im{i}.png")
        im.save(files[-1])
    paths = write_shards(str(folder), tmp_path / "f", shard_size=4, caption_column=None, progress=False)
    samples = _samples(paths)
    assert len(samples) == 6 and all(set(s) - {"__key__", "__url__", "__local_path__"} == {"png", "json"}
                                     for s in samples)
    by_bytes = {f.read_bytes(): f.parent.name for f in files}
    names = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").features["label"].names
    assert sorted(by_bytes[s["png"]] for s in samples) == sorted(by_bytes.values())
    assert all(names[json.loads(s["json"])["label"]] == by_bytes[s["png"]] for s in samples)

    listing = tmp_path / "list" / "pairs.csv"  # relative image paths, resolved against the CSV's folder
    listing.parent.mkdir()
    (listing.parent / "img").mkdir()
    lines = ["file,text"]
    for i, im in enumerate(images[:3]):
        im.convert("RGB").save(listing.parent / "img" / f"{i}.jpg", quality=90)
        lines.append(f"img/{i}.jpg,caption number {i}")
    listing.write_text("\n".join(lines) + "\n")
    samples = _samples(write_shards(str(listing), tmp_path / "c", shard_size=2, image_column="file",
                                    caption_column="text", progress=False))
    assert [s["jpg"] for s in samples] == [(listing.parent / "img" / f"{i}.jpg").read_bytes() for i in range(3)]
    assert [s["txt"].decode() for s in samples] == [f"caption number {i}" for i in range(3)]

    ds = datasets.Dataset.from_dict({"image": images[:5], "caption": [f"c{i}" for i in range(5)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    splits = datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, 5))})
    splits.save_to_disk(str(tmp_path / "s"))
    train = _samples(write_shards(str(tmp_path / "s"), tmp_path / "st", shard_size=10, progress=False))
    test = _samples(write_shards(str(tmp_path / "s"), tmp_path / "ss", shard_size=10, split="test", progress=False))
    assert [s["txt"] for s in train] == [b"c0", b"c1", b"c2"] and [s["txt"] for s in test] == [b"c3", b"c4"]
    for s, im in zip(test, images[3:5]):  # PIL images stored by datasets come back with their pixels
        np.testing.assert_array_equal(_rgb(s["png"]), np.asarray(im.convert("RGB")))


def _digests(paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_shuffle_is_seeded_and_output_reproducible(source, tmp_path):
    kw = dict(shard_size=3, caption_column="captions", progress=False)
    plain = write_shards(str(source["parquet"]), tmp_path / "a", **kw)
    again = write_shards(str(source["parquet"]), tmp_path / "b", **kw)
    assert _digests(plain) == _digests(again)  # no time stamps or owners in the headers
    shuffled = write_shards(str(source["parquet"]), tmp_path / "c", shuffle=True, seed=5, **kw)
    rows = [json.loads(s["json"])["source_index"] for s in _samples(shuffled)]
    reference = [int(r) for r in np.random.default_rng(5).permutation(13) if r in source["good"]]
    assert rows == reference and rows != source["good"]
    other = write_shards(str(source["parquet"]), tmp_path / "d", shuffle=True, seed=6, **kw)
    assert [json.loads(s["json"])["source_index"] for s in _samples(other)] != rows


def test_interrupted_write_leaves_only_complete_shards(source, tmp_path, monkeypatch):
    import mmcl.data.shard_writer as writer

    calls = []
    real = writer._encoded_image

    def failing(cell):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(cell)

    monkeypatch.setattr(writer, "_encoded_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(source["parquet"]), tmp_path / "o", shard_size=2, caption_column="captions", progress=False)
    left = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert left == ["00000.tar", "00001.tar"]  # rows 0-3 (row 4 unreadable); row 5's shard removed
    assert len(_samples([tmp_path / "o" / n for n in left])) == 4


def test_bad_arguments_raise_naming_them(source, tmp_path):
    parquet = str(source["parquet"])
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(ValueError, match="shard_size"):
            write_shards(parquet, tmp_path / "x", shard_size=bad)
    with pytest.raises(ValueError, match="image_column='img'.*available columns"):
        write_shards(parquet, tmp_path / "x", image_column="img", caption_column="captions")
    with pytest.raises(ValueError, match="caption_column='caption'"):
        write_shards(parquet, tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        write_shards(str(tmp_path / "missing.parquet"), tmp_path / "x")
    with pytest.raises(TypeError, match="source must be"):
        write_shards(42, tmp_path / "x")
    with pytest.raises(ValueError, match="names .tar shards already"):
        write_shards(str(tmp_path / "old" / "{00000..00003}.tar"), tmp_path / "x")
    with pytest.raises(ValueError, match="max_samples"):
        write_shards(parquet, tmp_path / "x", caption_column="captions", max_samples=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_shards(parquet, tmp_path / "file", caption_column="captions")
    write_shards(parquet, tmp_path / "full", shard_size=20, caption_column="captions", progress=False)
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(parquet, tmp_path / "full", caption_column="captions")
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"junk", "path": None}], "caption": ["x"]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "caption": datasets.Value("string")}))
    with pytest.raises(ValueError, match=r"no sample .*unreadable image: 1"):
        write_shards(broken, tmp_path / "y")
    assert not any((tmp_path / "x").glob("*.tar")) and not any((tmp_path / "y").glob("*.tar"))


def _mmcl(*args):
    exe = Path(sys.executable).with_name("mmcl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmcl.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=240, env=env)


def _one_line_error(returncode, stderr, fragment):
    lines = stderr.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith("mmcl: error:"), stderr
    assert fragment in lines[0] and "Traceback" not in stderr, lines[0]


@pytest.mark.slow  # two subprocesses
def test_cli_writes_shards_and_reports_bad_paths(source, tmp_path, capsys):
    out = tmp_path / "cli"
    done = _mmcl("shards", "--data", source["parquet"], "--out", out, "--shard-size", 5, "--caption-column", "captions")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("wrote 11 samples in 3 shards"), done.stderr
    assert len(_samples(sorted(out.glob("*.tar")))) == 11
    missing = _mmcl("shards", "--data", tmp_path / "nope.parquet", "--out", tmp_path / "o", "--shard-size", 5)
    _one_line_error(missing.returncode, missing.stderr, "nope.parquet")
    for argv, fragment in (
        (["--out", out, "--shard-size", "5", "--caption-column", "captions"], "already holds shards"),
        (["--out", tmp_path / "z", "--shard-size", "0"], "--shard-size must be at least 1"),
        (["--out", tmp_path / "z", "--shard-size", "5", "--max-samples", "0"], "--max-samples"),
        (["--out", tmp_path / "z", "--shard-size", "5", "--caption-column", "text"], "caption_column='text'"),
    ):
        capsys.readouterr()
        status = main(["shards", "--data", str(source["parquet"])] + [str(a) for a in argv])
        _one_line_error(status, capsys.readouterr().err, fragment)
    assert main(["shards", "--data", str(source["parquet"]), "--out", str(tmp_path / "q"), "--shard-size", "20",
                 "--caption-column", "none", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    samples = _samples([tmp_path / "q" / "00000.tar"])
    assert len(samples) == 12 and all("txt" not in s for s in samples)  # image-only: only row 4 is skipped


def test_mmcl_stream_reads_written_shards_like_the_source(source, tmp_path):
    """The shard reader with the source's own column names gets the source's images and captions."""
    from mmcl.data.shards import expand_shards, read_shard

    write_shards(str(source["parquet"]), tmp_path / "r", shard_size=4, caption_column="captions", progress=False)
    paths = expand_shards(str(tmp_path / "r" / "{00000..00002}.tar"))
    rows = [row for path in paths for _, row in read_shard(path, image_column="image", caption_column="captions",
                                                          label_column="label")]
    assert [r["__key__"] for r in rows] == [f"{i // 4:05d}{i % 4:04d}" for i in range(11)]
    for row, source_row in zip(rows, source["good"]):
        assert row["captions"] == source["captions"][source_row] and row["label"] == source_row % 3
        np.testing.assert_array_equal(_rgb(row["image"]), _rgb(source["cells"][source_row]))
