"""Streamed webdataset shards: splitting over ranks and workers, seeded order, bad data, exact resume.

References are independent of mmcl's reader: sample keys come from Python's tarfile, orders from
the rule in mmcl.data.shards' docstring re-implemented here with numpy.
"""
import io
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.streams import (  # noqa: F401 (processor, shards: fixtures)
    bad_shards, pairs, png, processor, reference_rows, resumed_through_checkpoint, shards, tar_keys,
)
from PIL import Image

from mmcl.data import DataConfig
from mmcl.data.shards import SampleStream, expand_shards, read_shard, worker_shards
from mmcl.data.stream import ShardBatchStream, build_stream
from mmcl.train import checkpoint as ckpt

def test_split_rule_covers_every_shard_once_per_epoch():
    for n, slots in ((6, 4), (7, 3), (5, 5)):
        for epoch in range(3):
            parts = [worker_shards(n, epoch=epoch, slot=s, slots=slots, seed=11) for s in range(slots)]
            assert sorted(i for p in parts for i in p) == list(range(n)), (n, slots, epoch, parts)
    assert worker_shards(7, epoch=0, slot=0, slots=2, seed=11) != worker_shards(7, epoch=1, slot=0, slots=2, seed=11)
    with pytest.raises(ValueError, match=r"6 shard\(s\) cannot be split over 8 readers.*data.resampled"):
        worker_shards(6, epoch=0, slot=0, slots=8, seed=0)
    drawn = worker_shards(3, epoch=2, slot=5, slots=8, seed=1, resampled=True)
    assert drawn == [int(i) for i in np.random.default_rng([1, 2, 5, 1]).integers(0, 3, 1)]


def test_stream_order_and_epoch_coverage_match_the_documented_rule(shards, processor):
    """2 workers, a 5-row buffer, batches of 3: every batch's keys equal the reference, and in
    epoch 0 the two workers together read every written key exactly once."""
    pattern, paths = shards
    keys = [tar_keys(p) for p in paths]
    cfg = DataConfig(source=pattern, num_workers=2, shuffle_buffer=5, label_column="label")
    stream = build_stream(cfg, processor, text=True, views=False, batch_size=3, seed=4)
    got = [stream.next() for _ in range(22)]
    stream.close()
    refs = [reference_rows(keys, seed=4, slot=w, slots=2, buffer=5, epochs=4) for w in range(2)]
    for n, batch in enumerate(got):
        w, c = n % 2, n // 2
        want = [k for _, k in refs[w][3 * c:3 * c + 3]]
        assert batch["key"] == want, f"batch {n} (worker {w}): {batch['key']} != {want}"
        assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["input_ids"].shape[0] == 3
    epoch0 = [k for w in range(2) for e, k in refs[w] if e == 0]
    read0 = [k for w in range(2) for k in sum((b["key"] for b in got[w::2]), [])[:sum(e == 0 for e, _ in refs[w])]]
    assert Counter(read0) == Counter(epoch0) == Counter(k for ks in keys for k in ks)
    assert len(epoch0) == 23


def test_resume_mid_shard_continues_with_the_same_batches(shards, processor, tmp_path):
    """State after 3 batches (worker 1 mid-shard; through the checkpoint's safetensors + JSON) -> batches
    4..15 equal those of an uninterrupted stream."""
    pattern, _ = shards
    cfg = DataConfig(source=pattern, num_workers=2, shuffle_buffer=6, augment="clip")
    make = lambda: build_stream(cfg, processor, text=True, views=False, batch_size=3, seed=9)  # noqa: E731
    full = make()
    reference = [full.next() for _ in range(15)]
    full.close()
    state, resumed = resumed_through_checkpoint(make, 3, tmp_path)
    assert any(s["buffer"].shape[0] > 0 and s["member"] % 4 for s in state["workers"]), state
    for n in range(3, 15):
        batch = resumed.next()
        assert batch["key"] == reference[n]["key"], n
        assert torch.equal(batch["pixel_values"], reference[n]["pixel_values"]), n
        assert torch.equal(batch["input_ids"], reference[n]["input_ids"]), n
    resumed.close()


def test_resampled_mode_draws_shards_with_replacement(shards):
    pattern, paths = shards
    keys = [tar_keys(p) for p in paths]
    with pytest.raises(ValueError, match="cannot be split over 8 readers"):
        SampleStream(expand_shards(pattern), slot=0, slots=8, seed=2, buffer_size=3)
    stream = SampleStream(expand_shards(pattern), slot=5, slots=8, seed=2, buffer_size=3, resampled=True)
    got = []
    while len(got) < 12:
        _, row = stream.next_row()
        got.append((stream.epoch, row["__key__"]))
    assert got == reference_rows(keys, seed=2, slot=5, slots=8, buffer=3, epochs=20, resampled=True)[:12]


def test_bad_data_is_skipped_and_counted_by_reason(tmp_path, processor):
    paths = bad_shards(tmp_path / "bad")
    stream = SampleStream(paths, slot=0, slots=1, seed=0, buffer_size=2,
                          columns={"image_column": "image", "caption_column": "caption", "label_column": None})
    cfg = DataConfig(source=paths, augment="none")
    dataset, _ = __import__("mmcl.data.loader", fromlist=["build_dataset"]).build_dataset(
        cfg, processor, text=True, views=False, stream=True)
    reasons, good = Counter(), []
    for _ in range(5):  # one epoch: a0..a3 and b0 (b1 is cut short)
        _, row = stream.next_row()
        item = dataset.make_item(row, stream.epoch, 0)
        if item.get("skipped"):
            reasons[item["reason"]] += 1
        else:
            good.append(item["key"])
    assert stream.epoch == 0 and sorted(good) == ["a0", "b0"]
    assert reasons == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}
    assert stream.counts == {"truncated_shard": 1, "empty_shard": 2}
    # Batches stay full: the stream replaces skipped samples and reports the reasons.
    batches = ShardBatchStream(paths, dataset.make_item, _collate(processor), 3, seed=0, shuffle_buffer=2,
                               columns={"image_column": "image", "caption_column": "caption"})
    batch = batches.next()
    assert len(batch["key"]) == 3 and set(batch["key"]) <= {"a0", "b0"}
    assert batch["num_skipped"] >= 3 and batch["skipped"]["truncated_shard"] >= 1
    batches.close()
    # Nothing usable at all (no sample has a label): a clear error, not an endless search.
    dataset, collate = __import__("mmcl.data.loader", fromlist=["build_dataset"]).build_dataset(
        DataConfig(source=paths, label_column="label"), processor, text=True, views=False, stream=True)
    none = ShardBatchStream(paths, dataset.make_item, collate, 2, columns={"label_column": "label"})
    with pytest.raises(ValueError, match=r"a whole epoch .* without a usable sample .*missing_label"):
        none.next()


def _collate(processor):
    from mmcl.data.loader import ContrastiveCollator

    return ContrastiveCollator(processor, image_keys=["pixel_values"], size=(16, 16), text=True, labels=False,
                               max_text_length=None, cutmix=0.0, seed=0)


def test_missing_shards_raise_naming_them(shards, tmp_path, processor):
    pattern, paths = shards
    with pytest.raises(ValueError, match=r"2 of the 8 shard\(s\) .* do not exist: .*00006\.tar, .*00007\.tar$"):
        expand_shards(pattern.replace("00005", "00007"))
    with pytest.raises(ValueError, match=r"matches no file"):
        expand_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(ValueError, match=r"matches no file"):
        expand_shards(str(tmp_path / "x{0..3}.tar"))
    cfg = DataConfig(source=[paths[0], str(tmp_path / "gone.tar")])
    with pytest.raises(ValueError, match="do not exist: .*gone.tar"):
        build_stream(cfg, processor, text=True, views=False, batch_size=2)
    with pytest.raises(ValueError, match="cannot be split over 8 readers"):
        build_stream(DataConfig(source=pattern, num_workers=4), processor, text=True, views=False, batch_size=2,
                     rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"data.streaming=true streams one source .* list of something else"):
        build_stream(DataConfig(source=["a.png", "b.png"], streaming=True), processor, text=True, views=False,
                     batch_size=2)
    with pytest.raises(ValueError, match="data.max_samples=5 does not apply to a streamed source"):
        build_stream(DataConfig(source=pattern, max_samples=5), processor, text=True, views=False, batch_size=2)
    with pytest.raises(ValueError, match=r"held.tar do not exist|do not exist: .*held.tar"):
        build_stream(DataConfig(source=pattern, eval_source=str(tmp_path / "held.tar")), processor, text=True,
                     views=False, batch_size=2)
    with pytest.raises(ValueError, match="positions are for 2 processes; .* same number of processes"):
        ckpt.rank_data_state({"data": {"ranks": [{}, {}]}}, 0, 4)
    with pytest.raises(ValueError, match="data.source as a list names .tar shards"):
        build_stream(DataConfig(source=["a.parquet", "b.parquet"]), processor, text=True, views=False, batch_size=2)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        DataConfig(source=pattern, shuffle_buffer=0)


def test_eval_source_shards_give_a_bounded_dataset(shards):
    from mmcl.data import load_eval_dataset

    pattern, paths = shards
    ds = load_eval_dataset(DataConfig(source=pattern, eval_source=pattern, eval_max_samples=10))
    assert len(ds) == 10 and ds["__key__"] == sum((tar_keys(p) for p in paths), [])[:10]
    assert ds["caption"][3] == "a photo of the digit three" and ds["label"][:4] == [0, 1, 2, 3]
    assert ds[0]["image"].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(ds[5]["image"]), np.asarray(Image.open(io.BytesIO(png(5)))))


def test_streamed_parquet_files_match_their_rows(tmp_path, processor):
    """data.streaming: each parquet file is one shard, read through datasets' streaming reader."""
    files = []
    for part in range(3):
        path = tmp_path / f"part{part}.parquet"
        pairs(5).select(range(part, 5)).to_parquet(str(path))
        files.append(str(path))
    rows = list(read_shard(files[1], start=2))
    assert [m for m, _ in rows] == [2, 3] and rows[0][1]["caption"] == "a photo of the digit three"
    assert rows[0][1]["__key__"] == "part1.parquet/2"
    cfg = DataConfig(source=str(tmp_path / "part*.parquet"), streaming=True, shuffle_buffer=1, num_workers=0)
    stream = build_stream(cfg, processor, text=True, views=False, batch_size=4, seed=0)
    got = sum((stream.next()["key"] for _ in range(3)), [])
    order = worker_shards(3, epoch=0, slot=0, slots=1, seed=0)
    want = [f"part{j}.parquet/{m}" for j in order for m in range(5 - j)]
    assert got == want[:12]
    stream.close()
