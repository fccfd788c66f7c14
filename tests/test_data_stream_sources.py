"""`data.streaming: true` on finite sources (image folders, cached datasets names, digits,
save_to_disk directories): row ranges split over workers, exact resume, bad images skipped,
boundary errors. References: the row-range rule and the split/shuffle rules re-implemented with
math and numpy (tests/helpers/streams.py), labels from the folder names on disk."""
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from helpers.streams import (  # noqa: F401 (processor: a fixture)
    CLASSES, NUMBERS, folder_labels, pairs, png, processor, reference_ranges, reference_rows, resumed_through_checkpoint,
    write_folder,
)

from mmcl.data import DataConfig, load_eval_dataset, load_source
from mmcl.data.ranges import RowRange, expand_ranges, row_ranges
from mmcl.data.shards import worker_shards
from mmcl.data.stream import ShardBatchStream, build_stream

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """71 images of 3 classes (R = 71: ranges of 2 rows, the last of 1)."""
    return write_folder(tmp_path_factory.mktemp("imgs") / "animals", {"bird": 20, "cat": 29, "dog": 22})


def test_row_range_rule_depends_on_the_row_count_alone():
    for rows in (1, 2, 63, 64, 65, 71, 999, 64000, 64001, 200_003):
        got = [range(a, b) for a, b in row_ranges(rows)]
        assert got == reference_ranges(rows), rows
        assert sum(len(r) for r in got) == rows and len(got) == math.ceil(rows / min(1000, math.ceil(rows / 64)))
    assert len(row_ranges(64000)) == 64 and len(row_ranges(200_003)) == 201


def test_image_folder_streams_every_row_once_per_epoch_over_two_workers(folder, processor):
    """2 workers, a 4-row buffer, batches of 5: each worker's keys follow the split/shuffle rules over
    the 36 ranges, epoch 0 reads each of the 71 rows once, and each label is its file's class folder."""
    cfg = DataConfig(source=str(folder), streaming=True, num_workers=2, shuffle_buffer=4, label_column="label",
                     augment="simclr")
    stream = build_stream(cfg, processor, text=False, views=True, batch_size=5, seed=7)
    got = [stream.next() for _ in range(18)]
    stream.close()
    ranges = reference_ranges(71)
    assert len(ranges) == 36 and [len(r) for r in ranges[-2:]] == [2, 1]
    keys = [[f"animals/{i}" for i in r] for r in ranges]
    refs = [reference_rows(keys, seed=7, slot=w, slots=2, buffer=4, epochs=3) for w in range(2)]
    for n, batch in enumerate(got):
        w, c = n % 2, n // 2
        assert batch["key"] == [k for _, k in refs[w][5 * c:5 * c + 5]], n
        assert batch["view1"].shape == (5, 3, 16, 16) and not torch.equal(batch["view1"], batch["view2"])
    read0 = [k for w in range(2) for k in sum((b["key"] for b in got[w::2]), [])[:sum(e == 0 for e, _ in refs[w])]]
    assert Counter(read0) == Counter(f"animals/{i}" for i in range(71))
    classes = folder_labels(folder)
    for batch in got:
        for key, label in zip(batch["key"], batch["labels"].tolist()):
            assert CLASSES[label] == classes[int(key.split("/")[1])], key


def test_resume_mid_range_continues_with_the_same_batches(processor, tmp_path):
    """digits streamed (1500 train rows: 63 ranges of 24): the state after 3 batches (mid-range, full
    buffers) through the checkpoint files gives the same next 9 batches, pixels and tokens included."""
    cfg = DataConfig(source="digits", streaming=True, num_workers=2, shuffle_buffer=6, label_column="label")
    make = lambda: build_stream(cfg, processor, text=True, views=False, batch_size=3, seed=9)  # noqa: E731
    full = make()
    reference = [full.next() for _ in range(12)]
    full.close()
    state, resumed = resumed_through_checkpoint(make, 3, tmp_path)
    assert len(resumed.stream_args["shards"]) == len(reference_ranges(len(load_source("digits", "train"))))
    assert all(s["buffer"].shape[0] == 6 and s["member"] % 24 for s in state["workers"] if s is not None), state
    for n in range(3, 12):
        batch = resumed.next()
        assert batch["key"] == reference[n]["key"], n
        assert all(k.startswith("digits/") for k in batch["key"])
        assert torch.equal(batch["pixel_values"], reference[n]["pixel_values"]), n
        assert torch.equal(batch["input_ids"], reference[n]["input_ids"]), n
        assert torch.equal(batch["labels"], reference[n]["labels"]), n
    resumed.close()


def test_a_bad_image_in_a_folder_is_skipped_and_counted(tmp_path, processor):
    folder = write_folder(tmp_path / "few", {"cat": 4, "dog": 3}, bad="dog/broken.png")
    classes = folder_labels(folder)
    bad_row = classes.index("dog") + sorted(os.listdir(folder / "dog")).index("broken.png")
    cfg = DataConfig(source=str(folder), streaming=True, shuffle_buffer=3, label_column="label", augment="simclr")
    stream = build_stream(cfg, processor, text=False, views=True, batch_size=7, seed=1)
    first, second = stream.next(), stream.next()  # epoch 0's 7 good rows, then epoch 1's first 7
    stream.close()
    good = sorted(f"few/{i}" for i in range(8) if i != bad_row)
    assert sorted(first["key"]) == good == sorted(second["key"])
    assert first["skipped"]["corrupt_image"] == 1 and first["num_skipped"] == 1
    assert sum(first["skipped"].values()) == 1


def cached_name(cache: Path, tmp_path: Path) -> str:
    """'mmcltest/pets' in a datasets cache at ``cache``: loaded once from parquet files by datasets'
    parquet builder, its prepared directory placed where an offline load of the name looks."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in (("train", 13), ("test", 5)):
        files[split] = [str(tmp_path / f"{split}.parquet")]
        pairs(rows + (split == "test")).select(range(split == "test", rows + (split == "test"))).to_parquet(
            files[split][0])
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="pets", config_name="default", hash="local",
                      data_files=DataFilesDict.from_local_or_remote(files, base_path=str(tmp_path)))
    builder.download_and_prepare()
    config_dir = Path(builder.cache_dir).parent.parent  # <name>/<config id>/<version>/<hash>
    (cache / "mmcltest___pets").mkdir(parents=True)
    shutil.move(str(config_dir), str(cache / "mmcltest___pets" / "default"))
    return "mmcltest/pets"


def test_a_cached_datasets_name_streams_offline(tmp_path, monkeypatch, processor):
    """HF_HUB_OFFLINE=1 (conftest): the name resolves from the local cache alone."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    name = cached_name(tmp_path / "cache", tmp_path)
    cfg = DataConfig(source=name, streaming=True, shuffle_buffer=1, label_column="label", eval_source=name,
                     eval_max_samples=3)
    stream = build_stream(cfg, processor, text=True, views=False, batch_size=4, seed=2)
    got = [stream.next() for _ in range(3)]
    stream.close()
    order = worker_shards(13, epoch=0, slot=0, slots=1, seed=2)  # 13 rows: 13 ranges of one row
    assert sum((b["key"] for b in got), []) == [f"{name}/{j}" for j in order[:12]]
    assert sum((b["labels"].tolist() for b in got), []) == [j % 10 for j in order[:12]]
    held_out = load_eval_dataset(cfg)  # the test split's rows 1..5 of pairs(6): 3 of them, seeded
    assert len(held_out) == 3 and set(held_out["caption"]) <= {f"a photo of the digit {NUMBERS[i]}"
                                                               for i in range(1, 6)}
    assert len(load_source(name, "train")) == 13 and len(load_source(name)) == 5  # not streamed: the same names
    with pytest.raises(ValueError, match=r"source 'mmcltest/pets': split 'validation' does not exist"):
        load_source(name, "validation")
    with pytest.raises(ValueError, match=r"data.split='validation'.*available splits: \['train', 'test'\]"):
        build_stream(DataConfig(source=name, split="validation", streaming=True), processor, text=True,
                     views=False, batch_size=2)
    with pytest.raises(ValueError, match=r"data.source='mmcltest/absent'.*not.*local cache"):
        build_stream(DataConfig(source="mmcltest/absent", streaming=True), processor, text=True, views=False,
                     batch_size=2)


def test_split_folders_and_boundary_errors(tmp_path, processor):
    """train/ test/ folders: data.split picks one, eval_source gives a bounded set; a missing path,
    split or column and data.max_samples fail in build_stream, naming the key."""
    root = tmp_path / "splits"
    write_folder(root / "train", {"cat": 3, "dog": 3})
    write_folder(root / "test", {"cat": 2, "dog": 3})
    make = lambda **kw: build_stream(DataConfig(source=str(root), streaming=True, augment="simclr",  # noqa: E731
                                                label_column="label", **kw), processor, text=False, views=True,
                                     batch_size=5)
    stream = make(split="test")
    assert sorted(stream.next()["key"]) == [f"splits/{i}" for i in range(5)]
    stream.close()
    held_out = load_eval_dataset(DataConfig(source=str(root), streaming=True, eval_source=str(root),
                                            eval_max_samples=4))
    assert len(held_out) == 4 and held_out[0]["image"].size == (16, 16)
    with pytest.raises(ValueError, match=r"data.split='val'.*split 'val' does not exist.*\['train', 'test'\]"):
        make(split="val")
    with pytest.raises(ValueError, match=r"data.eval_split='val'.*does not exist"):
        make(eval_source=str(root), eval_split="val")
    with pytest.raises(ValueError, match=r"data.source='.*nowhere'.*does not exist"):
        build_stream(DataConfig(source=str(tmp_path / "nowhere"), streaming=True), processor, text=True,
                     views=False, batch_size=2)
    with pytest.raises(ValueError, match=r"data.label_column='kind' is not a column of data.source=.*\['image', "
                                         r"'label'\]"):
        build_stream(DataConfig(source=str(root), streaming=True, augment="simclr", label_column="kind"),
                     processor, text=False, views=True, batch_size=2)
    with pytest.raises(ValueError, match=r"data.caption_column='caption' is not a column"):
        build_stream(DataConfig(source=str(root), streaming=True), processor, text=True, views=False, batch_size=2)
    with pytest.raises(ValueError, match="data.max_samples=5 does not apply to a streamed source"):
        make(max_samples=5)


def test_save_to_disk_directory_streams_as_row_ranges_and_old_positions_are_refused(tmp_path, processor):
    """9 rows in 3 arrow files: 9 one-row ranges (so 2 workers can share them); a position written
    for another shard count, or without one (the arrow files were the shards), is refused."""
    ds = pairs(9)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    shards = expand_ranges(str(tmp_path / "saved"), "train")
    assert shards == [RowRange(str(tmp_path / "saved"), "train", i, i + 1) for i in range(9)]
    cfg = DataConfig(source=str(tmp_path / "saved"), streaming=True, shuffle_buffer=1, label_column="label",
                     num_workers=2)
    stream = build_stream(cfg, processor, text=True, views=False, batch_size=3, seed=5)
    batches = [stream.next() for _ in range(2)]
    state = stream.state_dict()
    stream.close()
    for w, batch in enumerate(batches):
        rows = [int(k.split("/")[1]) for k in batch["key"]]
        assert rows == worker_shards(9, epoch=0, slot=w, slots=2, seed=5)[:3], (w, batch["key"])
        assert batch["labels"].tolist() == [ds[i]["label"] for i in rows]
        assert batch["key"][0].startswith("saved/")
    assert state["num_shards"] == 9
    ds.select(range(8)).save_to_disk(str(tmp_path / "smaller"))
    smaller = build_stream(DataConfig(**{**cfg.__dict__, "source": str(tmp_path / "smaller")}), processor,
                           text=True, views=False, batch_size=3, seed=5)
    with pytest.raises(ValueError, match="data position is for 9 shards, but data.source now has 8"):
        smaller.load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "num_shards"}
    with pytest.raises(ValueError, match="predates streaming this data.source as row ranges"):
        build_stream(cfg, processor, text=True, views=False, batch_size=3, seed=5).load_state_dict(old)
    # Files keep their rule (one file, one shard): a position without a count still resumes.
    files = ShardBatchStream([str(tmp_path / "a.parquet")], lambda *a: {}, list, 2)
    files.load_state_dict({**old, "num_workers": 0, "workers": [None]})
    assert files.batches == state["batches"] and files.states == [None]


def test_an_image_folder_with_metadata_streams_its_captions(tmp_path, processor):
    """metadata.csv (file_name, caption): each streamed caption is the one written for its row's file."""
    root = tmp_path / "captioned"
    root.mkdir()
    captions = {f"p{i}.png": f"a photo of the digit {NUMBERS[i % 10]}" for i in range(11)}
    for i, name in enumerate(captions):
        (root / name).write_bytes(png(i))
    (root / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},{c}\n" for n, c in captions.items()))
    files = [Path(cell["path"]).name for cell in
             load_source(str(root), "train").cast_column("image", datasets.Image(decode=False))["image"]]
    stream = build_stream(DataConfig(source=str(root), streaming=True, shuffle_buffer=4), processor, text=True,
                          views=False, batch_size=11, seed=0)
    batch = stream.next()
    stream.close()
    assert sorted(batch["key"]) == sorted(f"captioned/{i}" for i in range(11))
    tokens = processor.tokenize([captions[files[int(k.split("/")[1])]] for k in batch["key"]])
    assert torch.equal(batch["input_ids"], tokens["input_ids"])
