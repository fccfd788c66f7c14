"""mmcl.data.sources (the one source loader) and mmcl.data.images (the one image decoder)."""
import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.data import DIGIT_CLASS_NAMES, DataConfig, decode_image, load_eval_dataset, load_image, load_source
from mmcl.data.sources import class_names_of, load_splits, pick_split


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pattern(h=5, w=7):
    """A (H, W, 3) uint8 image with distinct pixels, so a transposed decode would not match."""
    return (np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) * 7 % 251).astype(np.uint8)


def test_one_decoder_reads_every_form_the_same(tmp_path):
    pixels = _pattern()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    raw = _png(Image.fromarray(pixels))
    forms = [Image.fromarray(pixels), Image.fromarray(pixels).convert("L").convert("RGB"), str(tmp_path / "a.png"),
             tmp_path / "a.png", raw, bytearray(raw), {"bytes": raw, "path": None},
             {"bytes": None, "path": str(tmp_path / "a.png")}, pixels, pixels.transpose(2, 0, 1),
             torch.from_numpy(pixels.transpose(2, 0, 1).copy())]
    for i, form in enumerate(forms):
        for decoded in (load_image(form), decode_image(form)):
            assert decoded.mode == "RGB" and decoded.size == (7, 5), i
            expected = np.asarray(Image.fromarray(pixels).convert("L").convert("RGB")) if i == 1 else pixels
            np.testing.assert_array_equal(np.asarray(decoded), expected, err_msg=f"form {i}")
    grey = load_image(pixels[:, :, 0])  # (H, W): one channel repeated
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(pixels[:, :, :1], 3, axis=2))


def test_one_decoder_raises_naming_the_file_or_skips(tmp_path):
    full = _png(Image.fromarray(_pattern(40, 40)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    cases = [
        (str(tmp_path / "missing.png"), ValueError, "image file not found: .*missing.png"),
        (str(tmp_path / "broken.png"), ValueError, "cannot read image .*broken.png"),
        (str(tmp_path / "truncated.png"), ValueError, "cannot read image .*truncated.png"),
        ({"bytes": b"garbage", "path": "row7.jpg"}, ValueError, "cannot read image row7.jpg"),
        ({"bytes": None, "path": None}, TypeError, "cannot read an image from NoneType"),
        (np.zeros((4, 4, 3), dtype=np.float32), TypeError, "must be uint8"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), ValueError, r"\(H, W\), \(H, W, C\) or \(C, H, W\)"),
        (3.5, TypeError, "cannot read an image from float"),
    ]
    for item, error, message in cases:
        with pytest.raises(error, match=message):
            load_image(item)
        assert decode_image(item) is None


def test_digits_carry_their_class_names():
    """The demo's data needs no special case: its ClassLabel holds the names, through every loader."""
    for ds in (load_eval_dataset(DataConfig()), load_source("digits", "train"), load_source("digits")):
        assert class_names_of(ds, "label") == list(DIGIT_CLASS_NAMES)
        assert ds.features["label"].int2str(int(ds[0]["label"])) == DIGIT_CLASS_NAMES[ds[0]["label"]]
    assert len(load_source("digits")) == 297  # no split named: the test split is preferred
    assert len(load_source("digits", "train", max_samples=11)) == 11


def test_listed_image_paths_resolve_and_a_file_is_one_split(tmp_path):
    """A TSV listing images relative to its own folder yields decoded PIL images in a "train"
    split, whatever split a training config names; a name that is neither a path nor a cached
    datasets name fails naming what was tried; a missing file or split says so."""
    (tmp_path / "img").mkdir()
    rows = ["path\tlabel"]
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (6, 4), color).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png\t{i % 2}")
    (tmp_path / "list.tsv").write_text("\n".join(rows) + "\n")
    source = str(tmp_path / "list.tsv")
    ds = load_source(source, image_column="path")
    assert list(load_splits(source, image_column="path")) == ["train"]
    assert ds["label"] == [0, 1, 0]
    image = ds[1]["path"]
    assert image.size == (6, 4) and image.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    held_out = load_eval_dataset(DataConfig(source="digits", eval_source=source, image_column="path"))
    assert held_out["label"] == [0, 1, 0] and held_out[2]["path"].getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ValueError, match="nor a datasets name in the local cache"):
        load_splits("mmcl-no-such-dataset")
    with pytest.raises(ValueError, match="nor a datasets name in the local cache.*split 'train'"):
        load_source("mmcl-no-such-dataset", "train")
    with pytest.raises(ValueError, match="does not exist"):
        load_splits(str(tmp_path / "missing.parquet"))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(saved))
    assert len(load_source(str(saved))) == 1  # validation preferred over train
    with pytest.raises(ValueError, match=r"split 'test' does not exist; available splits: \['train', 'validation'\]"):
        load_source(str(saved), "test")
    for bad in (None, "", 3):
        with pytest.raises(ValueError, match="source must be a non-empty string"):
            load_source(bad, "train")
    with pytest.raises(ValueError, match="several splits exist"):
        pick_split({"a": 1, "b": 2}, None)
