"""fit on image-text data without labels (Flickr8k-style: a list of captions per image) reports
image<->text recall@k on the held-out data, equal to mmcl.retrieval.evaluate on the saved model."""
import datasets
import pytest
from train_helpers import tiny_overrides, write_tokenizer

from mmcl.data import load_digits_dataset
from mmcl.train import fit, load_config


def _captioned_parquet(path, split: str, rows: int) -> str:
    # Real images (the digits) with several captions each and no label column, as Flickr8k has.
    ds = load_digits_dataset(split, seed=0).select(range(rows))
    names = ds["label"]
    captions = [[f"a handwritten {n}", f"the digit {n}", f"a small drawing of {n}"] for n in names]
    out = datasets.Dataset.from_dict({"image": ds["image"], "captions": captions})
    out.to_parquet(str(path))
    return str(path)


def test_fit_reports_recall_on_captioned_eval_data(tmp_path):
    train = _captioned_parquet(tmp_path / "train.parquet", "train", 48)
    dev = _captioned_parquet(tmp_path / "dev.parquet", "test", 20)
    overrides = tiny_overrides("clip", tmp_path / "run", write_tokenizer(tmp_path / "tok"), steps=2) + [
        f"data.source={train}", f"data.eval_source={dev}", "data.caption_column=captions", "data.max_samples=null"]
    results = fit(load_config(None, overrides))
    keys = {k for k in results if k.startswith("retrieval_")}
    assert {"retrieval_image_to_text_R@1", "retrieval_text_to_image_R@10", "retrieval_mean_recall"} <= keys

    from mmcl.models import DualEncoder
    from mmcl.retrieval import evaluate

    model = DualEncoder.from_pretrained(results["final_dir"])
    expected = evaluate(model, datasets.load_dataset("parquet", data_files=dev)["train"],
                        caption_column="captions", progress=False)
    for key in keys:
        assert results[key] == pytest.approx(expected[key.removeprefix("retrieval_")], abs=1e-6), key


def test_eval_subsets_are_seeded_random_rows_not_the_first_ones():
    from mmcl.train.evaluation import _subset

    # Sorted by label, as CIFAR-10's parquet files are: the first 20 rows are all class 0.
    ds = datasets.Dataset.from_dict({"label": [c for c in range(10) for _ in range(20)]})
    picked = _subset(ds, 20, seed=0)
    assert len(picked) == 20 and len(set(picked["label"])) > 3
    assert picked["label"] == _subset(ds, 20, seed=0)["label"]  # reproducible
    assert _subset(ds, 500, seed=0) is ds
