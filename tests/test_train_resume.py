"""Checkpoints and failure handling of mmcl.train.fit: exact resume after SIGKILL, non-finite
losses (stop naming the step, or skip), corrupt images in the data."""
import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import run_python, tiny_overrides, write_tokenizer

from mmcl.train import fit, load_config
from mmcl.train.checkpoint import list_checkpoints


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """MoCo with dropout, augmented views, a queue, an EMA key encoder and an epoch boundary
    (5 batches per epoch): killed during step 5, resumed from step 4's checkpoint, it ends with
    exactly the weights, key encoder and queue of an uninterrupted run."""
    tok = write_tokenizer(tmp_path / "tok")
    common = ["train.max_steps=7", "checkpoint.every=2", "checkpoint.keep=2", "eval.enabled=false"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"

    # The uninterrupted reference runs in this process (same config, same thread count).
    fit(load_config(None, tiny_overrides("moco", full, tok, dropout=0.1, samples=40) + common))
    r = run_python(["tests/scripts/train_fit.py", "moco", str(crashed), tok, "5", *common])
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(crashed)]
    assert steps == [2, 4]  # checkpoint.keep=2 pruned nothing yet; no step 6; nothing half-written
    assert not any(p.name.startswith(".tmp") for p in (crashed / "checkpoints").iterdir())
    assert not (crashed / "final").exists()

    r = run_python(["tests/scripts/train_fit.py", "moco", str(crashed), tok, "0", *common, "checkpoint.resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 4" in r.stdout

    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(crashed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    ea = load_file(str(list_checkpoints(full)[-1] / "extra.safetensors"))
    eb = load_file(str(list_checkpoints(crashed)[-1] / "extra.safetensors"))
    assert [p.name for p in list_checkpoints(crashed)] == ["step_00000004", "step_00000006"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea) and "queue.features" in ea
    # The resumed run logged the same losses for steps 5-7 as the uninterrupted one.
    def losses(d):
        rows = [json.loads(line) for line in open(d / "logs" / "metrics.jsonl")]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}
    la, lb = losses(full), losses(crashed)
    assert all(la[s] == lb[s] for s in (5, 6, 7))


def test_max_minutes_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """train.max_minutes ends training early (checkpoint, final eval, final model); resuming from
    that checkpoint without the limit ends exactly where an uninterrupted run ends. The loop's
    clock is faked: every step takes 30 s, so a 1-minute budget stops after step 2 of 5."""
    import types

    from mmcl.train import loop

    tok = write_tokenizer(tmp_path / "tok")
    common = ["train.max_steps=5", "eval.enabled=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(load_config(None, tiny_overrides("clip", full, tok, dropout=0.1, samples=40) + common))

    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    advance = lambda step, logs: now.__setitem__(0, 30.0 * step)  # noqa: E731
    res = fit(load_config(None, tiny_overrides("clip", cut, tok, dropout=0.1, samples=40) + common +
                          ["train.max_minutes=1"]), on_step_end=advance)
    assert res["stopped_early"] and res["step"] == 2
    assert [p.name for p in list_checkpoints(cut)] == ["step_00000002"]
    assert (cut / "final" / "model.safetensors").is_file() and "zeroshot_top1" in res
    monkeypatch.undo()

    res = fit(load_config(None, tiny_overrides("clip", cut, tok, dropout=0.1, samples=40) + common +
                          ["checkpoint.resume=auto"]))
    assert res["step"] == 5 and not res["stopped_early"]
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="train.max_minutes"):
        load_config(None, tiny_overrides("clip", cut, tok) + ["train.max_minutes=0"])


def _nan_at(step_to_poison):
    def on_batch(step, batch):
        if step == step_to_poison:
            batch = dict(batch)
            batch["pixel_values"] = batch["pixel_values"].clone()
            batch["pixel_values"][0, 0, 0, 0] = float("nan")  # one NaN pixel poisons the loss
            return batch
    return on_batch


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    cfg = load_config(None, tiny_overrides("clip", tmp_path / "run", write_tokenizer(tmp_path / "tok")) +
                      ["train.max_steps=4", "eval.enabled=false"])
    with pytest.raises(FloatingPointError, match="step 3"):
        fit(cfg, on_batch=_nan_at(3))
    assert not (tmp_path / "run" / "final").exists()


def test_nonfinite_loss_skipped_when_asked(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    cfg = load_config(None, tiny_overrides("clip", tmp_path / "a", tok) + [
        "train.max_steps=3", "eval.enabled=false", "train.skip_nonfinite=true", "checkpoint.every=1",
        "checkpoint.keep=3"])
    res = fit(cfg, on_batch=_nan_at(2))
    assert res["nonfinite_steps"] == 1 and res["step"] == 3
    step1, step2, step3 = (load_file(str(d / "model.safetensors")) for d in list_checkpoints(tmp_path / "a"))
    # The poisoned step 2 changed nothing; steps 1 and 3 trained; nothing became NaN.
    assert all(torch.equal(step1[k], step2[k]) for k in step1)
    assert any(not torch.equal(step2[k], step3[k]) for k in step2)
    assert all(torch.isfinite(v).all() for v in step3.values())


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    """An image folder with captions in metadata.csv, one file truncated: the run trains on the
    rest and reports one skipped image (every sample is drawn: 8 images, batch 4, 2 steps)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path / "imgs"
    folder.mkdir()
    digits = load_digits()
    rows = ["file_name,caption"]
    for i in range(8):
        img = Image.fromarray((digits.images[i] * 15).astype("uint8")).resize((16, 16)).convert("RGB")
        img.save(folder / f"{i}.png")
        rows.append(f"{i}.png,a handwritten {digits.target[i]}")
    data = (folder / "5.png").read_bytes()
    (folder / "5.png").write_bytes(data[: len(data) // 3])  # truncated: unreadable
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, tiny_overrides("clip", tmp_path / "run", write_tokenizer(tmp_path / "tok"), batch=4) +
                      ["train.max_steps=2", "eval.enabled=false", f"data.source={folder}", "data.max_samples=null"])
    res = fit(cfg)
    assert res["skipped_images"] == 1
    assert res["step"] == 2 and res["loss"] == res["loss"]  # finite, trained


def test_batch_of_only_corrupt_images_is_dropped(tmp_path):
    """Batch size 1 over 4 images, one unreadable: its batch is empty and is dropped, the run
    trains its 3 steps on the readable images and counts the skipped one."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["file_name,caption"]
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 30, 200 - 40 * i)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,a small {['zero', 'one', 'two', 'three'][i]}")
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, tiny_overrides("simclr", tmp_path / "run", None, batch=1) + [
        "train.max_steps=3", "eval.enabled=false", f"data.source={folder}", "data.max_samples=null"])
    res = fit(cfg)
    assert res["step"] == 3 and res["skipped_images"] == 1 and res["loss"] == res["loss"]
