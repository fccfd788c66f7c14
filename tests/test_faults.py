"""Faults injected into real training runs (in this process): a truncated checkpoint, a full disk
or failing write, a changed config on resume, a SIGUSR1. Each checks that nothing written
before is lost and that the run stops or continues as documented."""
import errno
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_overrides, write_tokenizer

from mmcl.cli import main as cli_main
from mmcl.train import checkpoint as ckpt
from mmcl.train import fit, load_config
from mmcl.train.config import to_dict
from mmcl.train.faults import config_changes

FAST = ["eval.enabled=false", "train.trackers=[jsonl]"]


def _cfg(out, tok, *extra, steps=4, mode="clip"):
    return load_config(None, tiny_overrides(mode, out, tok, steps=steps, dropout=0.1, samples=40) + FAST + list(extra))


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: weights differ in {differ[:5]}"


def _steps(out) -> list[int]:
    return [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(out)]


def _with_earlier_names(config: dict) -> dict:
    """A `to_dict` config as mmcl stored it before the moco / checkpoint sections and
    model.batchnorm existed (train.grad_accum_steps for plain accumulation)."""
    old = json.loads(json.dumps(config))
    moco, ck, bn = old.pop("moco"), old.pop("checkpoint"), old["model"].pop("batchnorm")
    old["loss"].update(queue_size=moco["queue_size"], momentum=moco["key_momentum"],
                       final_momentum=moco["final_momentum"], shuffle_bn=moco["shuffle_bn"])
    old["model"].update(bn_splits=bn["splits"], sync_bn=bn["sync"], image_size=None)
    old["train"].update(save_every=ck["every"], keep_checkpoints=ck["keep"], resume=ck["resume"],
                        resume_allow_changes=ck["resume_allow_changes"],
                        device_augment=old["data"].pop("augment_on_device"))
    plain = old["train"].pop("accumulate_mode") == "plain"
    old["train"]["grad_accum_steps"] = old["train"]["accumulate"] if plain else 1
    if plain:
        old["train"]["accumulate"] = 1
    return old


def test_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    """The newest checkpoint's model.safetensors is cut in half (and a byte of another file is
    flipped): `mmcl checkpoint verify` names both, an explicit resume from it is refused naming the
    file, resume=auto says so and redoes 2 steps from step 2, ending bit-identical to the run's
    own first ending; from_pretrained of a truncated model directory raises a ValueError naming it."""
    tok = write_tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    fit(_cfg(run, tok, "checkpoint.every=2", "checkpoint.keep=3"))
    reference = load_file(str(run / "final" / "model.safetensors"))
    assert _steps(run) == [2, 4]
    marker = ckpt.read_marker(ckpt.checkpoint_dir(run, 4))
    assert {"model.safetensors", "state.safetensors", "state.json", "config.json", "rng_0.json"} <= set(marker["files"])
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 4)) == ([], True)

    newest = ckpt.checkpoint_dir(run, 4)
    weights = newest / "model.safetensors"
    full_size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(full_size // 2)
    state = bytearray((newest / "state.safetensors").read_bytes())
    state[-3] ^= 0xFF  # same size, other bytes: only the checksum can tell
    (newest / "state.safetensors").write_bytes(bytes(state))

    capsys.readouterr()
    assert cli_main(["checkpoint", "verify", str(run)]) == 2
    captured = capsys.readouterr()
    assert "step_00000002: ok" in captured.out, captured.out
    assert f"model.safetensors has {full_size // 2} bytes, the checkpoint recorded {full_size}" in captured.out
    assert "state.safetensors does not match its recorded sha256" in captured.out
    assert "1 of 2 checkpoints are damaged: step_00000004" in captured.err
    assert cli_main(["checkpoint", "verify", str(ckpt.checkpoint_dir(run, 2))]) == 0
    assert cli_main(["checkpoint", "verify", str(tmp_path / "tok")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err

    with pytest.raises(ValueError, match="is damaged: model.safetensors has"):
        fit(_cfg(run, tok, "checkpoint.every=2", "checkpoint.keep=3", f"checkpoint.resume={newest}"))

    damaged_model = tmp_path / "damaged_model"
    shutil.copytree(run / "final", damaged_model)
    with open(damaged_model / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    from mmcl import DualEncoder

    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        DualEncoder.from_pretrained(str(damaged_model))

    capsys.readouterr()
    result = fit(_cfg(run, tok, "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.resume=auto"))
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("mmcl: warning:")]
    assert len(warning) == 1, out
    assert f"checkpoint {newest} is damaged: model.safetensors has {full_size // 2} bytes" in warning[0], out
    assert "resuming from step_00000002 instead (2 steps are redone)" in warning[0], out
    assert result["step"] == 4
    _assert_same_weights(reference, load_file(str(run / "final" / "model.safetensors")), "resumed after fallback")
    assert ckpt.verify_checkpoint(newest) == ([], True)  # step 4 was written again, intact


def test_full_tmpfs_leaves_earlier_checkpoints_intact(tmp_path):
    """A real full disk: the run writes into a small tmpfs that a ballast file fills after the
    first checkpoint. Writing the second fails with ENOSPC: the error names the path and the free
    space, the temporary directory is gone, step 1's checkpoint verifies."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (test_failing_write_* covers the same path by injection)")
    try:
        tok = write_tokenizer(tmp_path / "tok")
        run = mnt / "run"

        def fill_disk(step, logs):
            if step == 1:
                size = sum(f.stat().st_size for f in ckpt.checkpoint_dir(run, 1).iterdir())
                ballast = shutil.disk_usage(mnt).free - size // 2  # room for half a checkpoint
                with open(mnt / "ballast", "wb") as f:
                    f.write(b"\0" * max(ballast, 0))

        with pytest.raises(ckpt.CheckpointWriteError) as info:
            fit(_cfg(run, tok, "checkpoint.every=1", "checkpoint.keep=1", steps=3), on_step_end=fill_disk)
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC, message
        assert "step 2" in message and str(run / "checkpoints") in message and "MiB free on" in message, message
        assert _steps(run) == [1]
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]  # no .tmp-step_00000002
        assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 1)) == ([], True)
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # a log file may still be open


def test_failing_write_is_cleaned_up_and_names_the_path(tmp_path, monkeypatch):
    """ENOSPC injected halfway through writing step 2's state.safetensors (a disk that fills up
    mid-file): the partial directory is removed, step 1 stays intact, the error says where and
    how much space is free."""
    tok = write_tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    real_save_file = ckpt.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if filename.endswith("state.safetensors") and ".tmp-step_00000002" in filename:
            real_save_file(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as f:  # what reached the disk before it was full
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(OSError) as info:
        fit(_cfg(run, tok, "checkpoint.every=1", steps=3))
    message = str(info.value)
    assert isinstance(info.value, ckpt.CheckpointWriteError) and info.value.errno == errno.ENOSPC
    assert "could not write the checkpoint of step 2" in message and "state.safetensors" in message, message
    assert "No space left on device" in message and "MiB free on" in message, message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 1)) == ([], True)
    assert not (run / "final").exists()


def test_changed_config_is_refused_unless_allowed(tmp_path, capsys):
    """Resuming with another learning rate and batch size is refused, listing both (and the global
    batch); harmless changes (logging, evaluation, max_minutes, checkpoint bookkeeping) resume;
    resume_allow_changes=true resumes and logs the change. A stored config with the earlier key
    names is compared under today's names. A checkpoint written before checksums and stored
    configs (COMPLETE holds a bare step) still loads, said once."""
    tok = write_tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    base = ["checkpoint.every=2"]
    fit(_cfg(run, tok, *base, steps=2))

    with pytest.raises(ValueError) as info:
        fit(_cfg(run, tok, *base, "checkpoint.resume=auto", "optim.lr=0.001", "train.batch_size=4", steps=2))
    message = str(info.value)
    assert "optim.lr: 0.0005 -> 0.001" in message and "train.batch_size: 8 -> 4" in message, message
    assert "world size x train.batch_size: 8 -> 4" in message and "checkpoint.resume_allow_changes=true" in message
    listed = [line.split(":")[0].strip() for line in message.splitlines()[1:-1]]
    assert listed == ["optim.lr", "train.batch_size", "world size x train.batch_size"], message  # not checkpoint.resume

    capsys.readouterr()
    res = fit(_cfg(run, tok, *base, "checkpoint.resume=auto", "train.log_every=5", "train.max_minutes=100",
                   "eval.max_samples=10", "checkpoint.keep=4", steps=2))
    out = capsys.readouterr().out
    assert res["step"] == 2 and "resumed from" in out
    assert "changed harmless settings" in out and "train.log_every: 1 -> 5" in out, out

    res = fit(_cfg(run, tok, *base, "checkpoint.resume=auto", "optim.lr=0.001", "checkpoint.resume_allow_changes=true", steps=2))
    out = capsys.readouterr().out
    assert res["step"] == 2 and "resuming with changed settings" in out and "optim.lr: 0.0005 -> 0.001" in out, out

    old = ckpt.checkpoint_dir(run, 2)
    stored = old / "config.json"
    stored.write_text(json.dumps(_with_earlier_names(json.loads(stored.read_text()))))
    marker = ckpt.read_marker(old)
    marker["files"]["config.json"] = ckpt.file_record(stored)
    (old / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(ValueError) as info:
        fit(_cfg(run, tok, *base, "checkpoint.resume=auto", "optim.lr=0.001", steps=2))
    assert str(info.value).splitlines()[1:-1] == ["  optim.lr: 0.0005 -> 0.001"], str(info.value)

    (old / "COMPLETE").write_text("2")  # the marker older mmcl wrote, and no stored config
    (old / "config.json").unlink()
    res = fit(_cfg(run, tok, *base, "checkpoint.resume=auto", "optim.lr=0.001", steps=2))
    out = capsys.readouterr().out
    assert res["step"] == 2 and out.count("written without checksums") == 1 and "stores no config" in out, out
    assert ckpt.verify_checkpoint(old) == ([], False)
    with open(old / "model.safetensors", "r+b") as f:  # without checksums a truncation is still caught
        f.truncate(os.path.getsize(old / "model.safetensors") - 10)
    problems, verified = ckpt.verify_checkpoint(old)
    assert not verified and len(problems) == 1 and problems[0].startswith("model.safetensors is truncated"), problems


def test_config_changes_sorts_keys_into_meaning_and_harmless():
    towers = ["model.image_tower=x", "model.text_tower=y"]
    a = to_dict(load_config(None, towers))
    b = to_dict(load_config(None, towers + [
        "mode=clip+simclr", "loss.impl=naive", "train.max_steps=7", "output_dir=elsewhere", "eval.knn_k=5",
        "train.collective_timeout_s=30", "optim.betas=[0.9, 0.95]", "moco.queue_size=128", "model.batchnorm.splits=2",
        "train.accumulate=2", "train.accumulate_mode=plain", "checkpoint.every=5", "checkpoint.keep=3",
        "checkpoint.resume=auto", "checkpoint.resume_allow_changes=true", "model.image_tower_config={hidden_size: 8}"]))
    changed, harmless = config_changes(a, b)
    assert [c.split(":")[0] for c in changed] == [
        "loss.impl", "moco.queue_size", "mode", "model.batchnorm.splits", "model.image_tower_config", "optim.betas",
        "train.accumulate", "train.accumulate_mode", "train.max_steps"], changed
    assert "model.image_tower_config: None -> {'hidden_size': 8}" in changed
    assert [c.split(":")[0] for c in harmless] == [
        "checkpoint.every", "checkpoint.keep", "checkpoint.resume_allow_changes", "eval.knn_k", "output_dir",
        "train.collective_timeout_s"], harmless
    assert config_changes(a, a) == ([], [])


def test_config_changes_reads_a_config_stored_under_earlier_names():
    """A stored config with loss.queue_size, model.bn_splits, train.save_every, train.grad_accum_steps
    ... compares under today's names: the same run shows no change, a changed queue or
    accumulation shows under moco.* / train.accumulate*."""
    towers = ["model.image_tower=x", "model.text_tower=y", "mode=moco"]
    plain = to_dict(load_config(None, towers + ["train.accumulate=4", "train.accumulate_mode=plain",
                                                "moco.queue_size=1024", "checkpoint.every=2"]))
    old = _with_earlier_names(plain)
    assert old["loss"]["queue_size"] == 1024 and old["train"]["grad_accum_steps"] == 4 and "moco" not in old
    assert config_changes(old, plain) == ([], [])
    cached = to_dict(load_config(None, towers + ["train.accumulate=4", "moco.queue_size=512", "checkpoint.every=3"]))
    changed, harmless = config_changes(old, cached)
    assert changed == ["moco.queue_size: 1024 -> 512", "train.accumulate_mode: 'plain' -> 'cached'"], changed
    assert harmless == ["checkpoint.every: 2 -> 3"], harmless
    assert config_changes(_with_earlier_names(cached), cached) == ([], [])


def test_train_resume_allow_changes_is_a_renamed_key():
    with pytest.raises(ValueError, match=r"train.resume_allow_changes' moved to checkpoint.resume_allow_changes"):
        load_config(None, ["train.resume_allow_changes=true"])
    with pytest.raises(TypeError, match="checkpoint.resume_allow_changes expects bool"):
        load_config(None, ["model.image_tower=x", "model.text_tower=y", "checkpoint.resume_allow_changes=1"])
    section = ckpt.CheckpointConfig(resume_allow_changes="yes")  # built in code, not through the loader
    with pytest.raises(ValueError, match="checkpoint.resume_allow_changes must be true or false"):
        section.validate()
    with pytest.raises(ValueError, match="train.collective_timeout_s must be a number > 0"):
        load_config(None, ["model.image_tower=x", "model.text_tower=y", "train.collective_timeout_s=0"])


def test_sigusr1_checkpoints_at_the_end_of_the_step_and_resumes_exactly(tmp_path, capsys):
    """A real SIGUSR1 sent to this process during step 2: the step finishes, a checkpoint is
    written, fit returns (no final model, no evaluation); checkpoint.resume=auto ends bit-identical to
    an uninterrupted run. The handlers are restored afterwards."""
    tok = write_tokenizer(tmp_path / "tok")
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(_cfg(full, tok, "checkpoint.every=3"))
    before = signal.getsignal(signal.SIGUSR1)

    def on_batch(step, batch):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    capsys.readouterr()
    res = fit(_cfg(cut, tok, "checkpoint.every=3"), on_batch=on_batch)
    out = capsys.readouterr().out
    assert res["stopped_early"] and res["stop_signal"] == "SIGUSR1" and res["step"] == 2, res
    assert "SIGUSR1 received: stopped after step 2 of 4" in out, out
    assert _steps(cut) == [2] and not (cut / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) is before

    res = fit(_cfg(cut, tok, "checkpoint.every=3", "checkpoint.resume=auto"))
    assert res["step"] == 4 and not res["stopped_early"]
    _assert_same_weights(load_file(str(full / "final" / "model.safetensors")),
                         load_file(str(cut / "final" / "model.safetensors")), "resumed after SIGUSR1")
