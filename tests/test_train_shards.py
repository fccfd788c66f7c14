"""Training on streamed webdataset shards: exact resume after SIGKILL (one process with 2 workers,
and 2 processes x 2 workers through `accelerate launch`), every mode and evaluator on shards, bad
data skipped and logged by reason; an image folder streamed as row ranges (data.streaming=true).
Shards and references come from tests/helpers/streams.py."""
import json
import math
import os

import pytest
import torch
from helpers.streams import (  # noqa: F401 (shards: a fixture)
    NUMBERS, bad_shards, pairs, reference_ranges, reference_rows, shards, tar_keys, write_folder,
)

from mmcl.data.shard_writer import write_shards
from mmcl.train import checkpoint as ckpt

def _keys_by_step(out, rank=0) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out, f"keys_{rank}.jsonl"))]
    by_step: dict = {}
    for row in rows:  # a resumed run appends to the crashed run's file: the later line wins
        by_step[row["step"]] = row["key"]
    return by_step


def _same_final_weights(a_dir, b_dir) -> list:
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "final" / "model.safetensors")), load_file(str(b_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _shard_args(pattern, *extra) -> list:
    return [f"data.source={pattern}", "data.num_workers=2", "data.shuffle_buffer=5", "train.batch_size=3",
            "train.max_steps=7", "checkpoint.every=2", "eval.enabled=false", *extra]


@pytest.mark.slow
def test_fit_killed_mid_shard_resumes_with_the_same_batches_and_weights(shards, tmp_path):
    """CLIP with dropout on 6 shards, 2 workers, a 5-row buffer: SIGKILLed when step 5's batch
    arrives, resumed from step 4's checkpoint (taken mid-shard), every step's sample keys and the
    final weights equal an uninterrupted run's."""
    import signal

    from train_helpers import run_python, write_tokenizer

    pattern, _ = shards
    tok = write_tokenizer(tmp_path / "tok")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    r = run_python(["tests/scripts/shards_fit.py", "clip", str(full), tok, "0", *_shard_args(pattern)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_python(["tests/scripts/shards_fit.py", "clip", str(crashed), tok, "5", *_shard_args(pattern)])
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    state = ckpt.load_state(ckpt.latest_checkpoint(crashed))
    assert state["step"] == 4
    workers = state["data"]["ranks"][0]["workers"]
    assert any(w["member"] % 4 for w in workers) and all(len(w["buffer"]) for w in workers), workers
    r = run_python(["tests/scripts/shards_fit.py", "clip", str(crashed), tok, "0", *_shard_args(pattern),
                    "checkpoint.resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    a, b = _keys_by_step(full), _keys_by_step(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 8)) and all(a[s] == b[s] for s in a), (a, b)
    assert not _same_final_weights(full, crashed)


@pytest.mark.slow
def test_two_processes_two_workers_resume_exactly_through_accelerate(shards, tmp_path):
    """2 processes x 2 workers (4 readers, 6 shards) through a real `accelerate launch`: each rank's
    batches are disjoint, together they read every key once per epoch, and a SIGKILLed run
    resumed from its mid-epoch checkpoint sees the same batches and ends with the same weights."""
    import subprocess
    import sys

    from train_helpers import REPO, write_tokenizer

    pattern, paths = shards
    tok = write_tokenizer(tmp_path / "tok")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    args = _shard_args(pattern, "train.max_steps=6")

    def launch(out, kill_at, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "tests/scripts/shards_fit.py", "clip", str(out), tok, str(kill_at), *args, *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO,
                   OMP_NUM_THREADS="1")
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    r = launch(full, 0)
    assert r.returncode == 0, r.stderr[-4000:]
    r = launch(crashed, 5)
    assert r.returncode != 0
    assert ckpt.load_state(ckpt.latest_checkpoint(crashed))["step"] == 4
    r = launch(crashed, 0, "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        a, b = _keys_by_step(full, rank), _keys_by_step(crashed, rank)
        assert sorted(a) == sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (rank, a, b)
    assert not _same_final_weights(full, crashed)
    # Every rank's batches follow the documented rule: rank r's step n+1 is its worker n mod 2's
    # next 3 rows, worker w of rank r being reader 2r + w of 4 (tiny_overrides' seed is 3).
    keys = [tar_keys(p) for p in paths]
    for rank in (0, 1):
        refs = [reference_rows(keys, seed=3, slot=2 * rank + w, slots=4, buffer=5, epochs=6) for w in (0, 1)]
        got = _keys_by_step(full, rank)
        for n in range(6):
            assert got[n + 1] == [k for _, k in refs[n % 2][3 * (n // 2):3 * (n // 2) + 3]], (rank, n)


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    """12 image-caption samples without labels in 3 shards (a retrieval evaluation set)."""
    out = tmp_path_factory.mktemp("captions")
    write_shards(pairs(12).remove_columns("label"), out, shard_size=4, progress=False)
    return str(out / "{00000..00002}.tar")


@pytest.mark.parametrize("mode, metric", [("clip", "retrieval_mean_recall"), ("clip+simclr", "zeroshot_top1"),
                                          ("simclr", "knn_top1"), ("moco", "knn_top1")])
def test_every_mode_trains_and_evaluates_on_shards(mode, metric, shards, caption_shards, tmp_path):
    """Training streams the shards; the evaluator reads a bounded held-out set from shards too:
    recall@k on captioned shards without labels, zero-shot with class names, kNN against a
    memory bank read from the training shards."""
    from train_helpers import tiny_overrides, write_tokenizer

    from mmcl.train import fit, load_config
    from mmcl.train.evaluation import Evaluator

    pattern, _ = shards
    tok = write_tokenizer(tmp_path / "tok")
    held_out = caption_shards if mode == "clip" else pattern
    cfg = load_config(None, tiny_overrides(mode, tmp_path / "out", tok, steps=2, batch=4) + [
        f"data.source={pattern}", "data.max_samples=null", f"data.eval_source={held_out}", "data.eval_max_samples=10",
        "data.shuffle_buffer=8", f"eval.class_names=[{','.join(NUMBERS)}]", "eval.knn_k=3",
        "eval.knn_train_samples=15"])
    results = fit(cfg)
    assert results["step"] == 2 and math.isfinite(results["loss"])
    assert 0.0 <= results[metric] <= 1.0, results
    evaluator = Evaluator(cfg)
    evaluator._load()
    assert len(evaluator._eval_ds) == 10
    if metric == "knn_top1":
        assert len(evaluator._train_ds) == 15 and evaluator._train_ds["label"][:3] == [0, 1, 2]


def test_fit_on_bad_shards_skips_and_logs_each_reason(shards, tmp_path):
    """A corrupt image, an uncaptioned image, a caption without image, a truncated tar, a 0-byte
    and a member-less tar beside one good shard: training runs through more than two epochs and
    logs every reason's count (each bad thing is met once per epoch)."""
    from train_helpers import tiny_overrides, write_tokenizer

    from mmcl.train import fit, load_config

    _, good = shards
    bad = bad_shards(tmp_path / "bad")
    tok = write_tokenizer(tmp_path / "tok")
    source = "[" + ",".join([good[0], *bad]) + "]"  # 6 good samples per epoch: a0, b0 and good[0]'s 4
    out = tmp_path / "out"
    results = fit(load_config(None, tiny_overrides("clip", out, tok, steps=7, batch=2) + [
        f"data.source={source}", "data.max_samples=null", "data.shuffle_buffer=3", "eval.enabled=false"]))
    assert results["step"] == 7 and math.isfinite(results["loss"])
    last = [json.loads(line) for line in open(out / "logs" / "metrics.jsonl")][-1]
    epochs = last["epoch"]  # 14 good samples: the third epoch has begun
    assert epochs == 2
    per_epoch = {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1, "truncated_shard": 1, "empty_shard": 2}
    for reason, n in per_epoch.items():
        assert 2 * n <= last[f"skipped/{reason}"] <= 3 * n, (reason, last)
    assert last["skipped/missing_label"] == 0
    assert last["skipped_images"] == sum(last[f"skipped/{r}"] for r in ("corrupt_image", "missing_caption",
                                                                          "missing_image"))


def test_fit_streams_an_image_folder_over_two_workers(tmp_path):
    """SimCLR on an image folder (train/ test/ class folders) with data.streaming=true and 2
    workers: step n+1's keys are worker n mod 2's next rows by the documented rules (17 one-row
    ranges), and the kNN evaluation reads a bounded held-out set from the test/ folder."""
    from train_helpers import tiny_overrides

    from mmcl.train import fit, load_config
    from mmcl.train.evaluation import Evaluator

    root = tmp_path / "pets"
    write_folder(root / "train", {"cat": 9, "dog": 8})
    write_folder(root / "test", {"cat": 3, "dog": 4})
    cfg = load_config(None, tiny_overrides("simclr", tmp_path / "out", "unused", steps=5, batch=4) + [
        f"data.source={root}", "data.streaming=true", "data.num_workers=2", "data.max_samples=null",
        "data.shuffle_buffer=3", "data.label_column=label", f"data.eval_source={root}", "data.eval_max_samples=5",
        "eval.knn_k=3", "eval.knn_train_samples=10"])
    keys: dict = {}
    results = fit(cfg, on_batch=lambda step, batch: keys.__setitem__(step, batch["key"]))
    assert results["step"] == 5 and math.isfinite(results["loss"]) and 0.0 <= results["knn_top1"] <= 1.0
    rows = [[f"pets/{i}" for i in r] for r in reference_ranges(17)]
    refs = [reference_rows(rows, seed=3, slot=w, slots=2, buffer=3, epochs=4) for w in (0, 1)]
    for n in range(5):
        assert keys[n + 1] == [k for _, k in refs[n % 2][4 * (n // 2):4 * (n // 2) + 4]], (n, keys)
    evaluator = Evaluator(cfg)
    evaluator._load()
    assert len(evaluator._eval_ds) == 5 and len(evaluator._train_ds) == 10


@pytest.mark.slow
def test_two_processes_split_an_image_folders_row_ranges_through_accelerate(tmp_path):
    """2 processes x 2 workers (4 readers over 17 one-row ranges) through a real `accelerate launch`:
    rank r's worker w is reader 2r + w, each rank's steps follow the documented rules, and the four
    readers' first batches are disjoint."""
    import subprocess
    import sys

    from train_helpers import REPO

    root = write_folder(tmp_path / "pets", {"cat": 9, "dog": 8})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "tests/scripts/shards_fit.py", "simclr", str(out), "unused", "0", f"data.source={root}",
           "data.streaming=true", "data.num_workers=2", "data.shuffle_buffer=3", "data.label_column=label",
           "train.batch_size=2", "train.max_steps=4", "eval.enabled=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [[f"pets/{i}" for i in r] for r in reference_ranges(17)]
    firsts = []
    for rank in (0, 1):
        refs = [reference_rows(rows, seed=3, slot=2 * rank + w, slots=4, buffer=3, epochs=3) for w in (0, 1)]
        got = _keys_by_step(out, rank)
        for n in range(4):
            assert got[n + 1] == [k for _, k in refs[n % 2][2 * (n // 2):2 * (n // 2) + 2]], (rank, n, got)
        firsts += got[1] + got[2]
    assert len(set(firsts)) == 8


@pytest.mark.slow
def test_fit_on_an_image_folder_killed_mid_range_resumes_with_the_same_batches_and_weights(tmp_path):
    """SimCLR streaming a 71-image folder (36 ranges of 2 rows) with 2 workers: SIGKILLed at step
    5, resumed from step 4's checkpoint (whose position holds the shard count), every step's keys
    and the final weights equal an uninterrupted run's."""
    import signal

    from train_helpers import run_python

    root = write_folder(tmp_path / "pets", {"bird": 20, "cat": 29, "dog": 22})
    args = ["simclr", "unused", f"data.source={root}", "data.streaming=true", "data.num_workers=2",
            "data.shuffle_buffer=5", "data.label_column=label", "train.batch_size=3", "train.max_steps=7",
            "checkpoint.every=2", "eval.enabled=false"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"

    def run(out, kill_at, *extra):
        mode, tok, *overrides = args
        return run_python(["tests/scripts/shards_fit.py", mode, str(out), tok, str(kill_at), *overrides, *extra])

    r = run(full, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(crashed, 5)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    state = ckpt.load_state(ckpt.latest_checkpoint(crashed))
    assert state["step"] == 4 and state["data"]["ranks"][0]["num_shards"] == 36
    assert any(w["member"] % 2 for w in state["data"]["ranks"][0]["workers"]), state["data"]
    r = run(crashed, 0, "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _keys_by_step(full), _keys_by_step(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 8)) and all(a[s] == b[s] for s in a), (a, b)
    assert not _same_final_weights(full, crashed)
