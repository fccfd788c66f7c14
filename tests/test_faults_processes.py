"""Faults that need real processes: a SIGTERM from outside (as a scheduler sends it), a rank
SIGKILLed in a 2-process gloo `accelerate launch`, a checkpoint whose stored config uses the
key names of the code that wrote it, and which processes hash a checkpoint on resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers.launch import SCRIPTS, accelerate_launch, launch_command
from train_helpers import REPO, tiny_overrides, write_tokenizer

from mmcl.train import checkpoint as ckpt
from mmcl.train import fit, load_config
from mmcl.train.saved import load_saved_config

SCRIPT = str(Path(REPO) / "tests" / "scripts" / "faults_fit.py")
FAST = ["eval.enabled=false", "train.trackers=[jsonl]"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO,
       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _same_final_weights(a: Path, b: Path) -> list[str]:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path):
    """SIGTERM sent from outside while the run is at step 2 of 6: it finishes that step, writes a
    checkpoint, prints why it stopped and exits 0 without a final model; checkpoint.resume=auto ends
    bit-identical to an uninterrupted run."""
    tok = write_tokenizer(tmp_path / "tok")
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["train.max_steps=6", "checkpoint.every=4", "train.num_threads=1", *FAST]  # same BLAS sums here and there
    proc = subprocess.Popen([sys.executable, SCRIPT, "clip", str(cut), tok, "-1", "0", *common], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("mmcl-test: step 2 done"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received: stopped after step " in out, out
    stopped = int(out.split("stopped after step ")[1].split()[0])
    assert 2 <= stopped < 6 and "stopped_early=True" in out, out
    assert [p.name for p in ckpt.list_checkpoints(cut)] == [ckpt.checkpoint_dir(cut, stopped).name]
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(cut, stopped)) == ([], True)
    assert not (cut / "final").exists()

    fit(load_config(None, tiny_overrides("clip", full, tok, dropout=0.1, samples=40) + common))
    res = fit(load_config(None, tiny_overrides("clip", cut, tok, dropout=0.1, samples=40) + common +
                          ["checkpoint.resume=auto"]))
    assert res["step"] == 6 and not res["stopped_early"]
    differ = _same_final_weights(full, cut)
    assert not differ, f"weights differ after SIGTERM + resume: {differ[:5]}"


def _launch(out: Path, tok: str, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd, env = launch_command(SCRIPT, "clip", str(out), tok, *args, env={"PYTHONPATH": REPO})
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str, float]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out, err, time.time()


@pytest.mark.slow
def test_signal_to_one_rank_then_a_killed_rank_then_an_exact_resume(tmp_path):
    """2 processes (gloo), 4 steps, checkpoints every 2, beside an uninterrupted 2-process run:
    1. SIGUSR1 to rank 1 alone at step 1: both ranks stop after the same step with a checkpoint,
       and the launch exits 0.
    2. Resumed, rank 1 is SIGKILLed in step 3 (after step 2's checkpoint). Rank 0 does not hang:
       within train.collective_timeout_s the launch fails with a message naming rank 1 and the
       last checkpoint, which verifies (both ranks' RNG files included).
    3. `accelerate launch ... checkpoint.resume=auto` ends with exactly the uninterrupted run's weights."""
    tok = write_tokenizer(tmp_path / "tok")
    full, cut = tmp_path / "full", tmp_path / "cut"
    timeout_s = 30
    common = ["train.max_steps=4", "checkpoint.every=2", f"train.collective_timeout_s={timeout_s}", *FAST]
    reference = _launch(full, tok, "-1", "0", *common)

    first = _launch(cut, tok, "1", "3", *common)
    for line in first.stdout:
        if line.startswith("mmcl-test: step 1 done"):
            os.kill(int((cut / "pid_1").read_text()), signal.SIGUSR1)
            break
    rc, out, err, _ = _finish(first)
    assert rc == 0, err[-3000:]
    assert "mmcl: SIGUSR1 received: stopped after step " in out, out
    stopped = int(out.split("stopped after step ")[1].split()[0])
    assert stopped in (1, 2) and [p.name for p in ckpt.list_checkpoints(cut)] == [f"step_0000000{stopped}"], out

    rc, out, err, ended = _finish(_launch(cut, tok, "1", "3", *common, "checkpoint.resume=auto"))
    assert rc != 0 and (cut / "killed_at").is_file(), err[-3000:]
    elapsed = ended - float((cut / "killed_at").read_text())
    assert elapsed < timeout_s, f"the survivor took {elapsed:.1f} s to stop (timeout {timeout_s} s)"
    assert "mmcl: rank 1 stopped answering" in err, err[-3000:]
    assert f"the last checkpoint is {ckpt.checkpoint_dir(cut, 2)}" in err, err[-3000:]
    assert not any(p.name.startswith(".tmp") for p in (cut / "checkpoints").iterdir())  # nothing half-written
    assert ckpt.latest_checkpoint(cut) == ckpt.checkpoint_dir(cut, 2)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(cut, 2)) == ([], True)
    assert {"rng_0.json", "rng_1.json"} <= set(ckpt.read_marker(ckpt.checkpoint_dir(cut, 2))["files"])

    rc, out, err, _ = _finish(reference)
    assert rc == 0, err[-3000:]
    rc, out, err, _ = _finish(_launch(cut, tok, "-1", "0", *common, "checkpoint.resume=auto"))
    assert rc == 0, err[-3000:]
    assert f"resumed from {ckpt.checkpoint_dir(cut, 2)} at step 2" in out, out
    differ = _same_final_weights(full, cut)
    assert not differ, f"weights differ after the stop, the lost rank and the resume: {differ[:5]}"


@pytest.mark.slow
def test_resume_hashes_once_per_machine_and_every_process_agrees(tmp_path):
    """2 processes (gloo) resume from checkpoints of steps 2 and 4. On one machine only its local
    main process (rank 0) hashes step 4 and both resume from it. As two machines (each rank its
    machine's local main process) whose second copy of step 4 reads differently, both ranks hash,
    both fall back to step 2 and an explicit resume from step 4 is refused on both, each naming what
    it knows; ranks that list different checkpoints are refused on both."""
    out, result = tmp_path / "run", tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_resume_verify.py", str(out), str(result), env={"PYTHONPATH": REPO})
    rank0, rank1 = json.loads(result.read_text())
    step_2, step_4 = ckpt.checkpoint_dir(out, 2), ckpt.checkpoint_dir(out, 4)
    files_4 = sorted(f"{step_4.name}/{name}" for name in ckpt.read_marker(step_4)["files"])
    files_2 = sorted(f"{step_2.name}/{name}" for name in ckpt.read_marker(step_2)["files"])
    assert "model.safetensors" in ckpt.read_marker(step_4)["files"]
    for case in ("one_machine", "one_machine_explicit"):
        assert rank0[case]["path"] == rank1[case]["path"] == step_4.name, (rank0[case], rank1[case])
        assert rank0[case]["hashed"] == files_4 and rank1[case]["hashed"] == [], case

    for r in (rank0, rank1):
        assert r["two_machines"]["path"] == step_2.name, r["two_machines"]
        assert r["two_machines"]["hashed"] == sorted(files_4 + files_2)
    assert (f"checkpoint {step_4} is damaged: {step_4.name} is damaged as another machine reads it"
            in rank0["two_machines"]["printed"]) and "resuming from step_00000002 instead" in rank0["two_machines"]["printed"]
    own = "model.safetensors does not match its recorded sha256"
    assert f"process 1: checkpoint {step_4} is damaged as this machine reads it: {own}" in rank1["two_machines"]["printed"]
    refused = rank0["two_machines_explicit"].get("error", ""), rank1["two_machines_explicit"].get("error", "")
    assert "is damaged: step_00000004 is damaged as another machine reads it" in refused[0], refused
    assert f"is damaged: {own}" in refused[1], refused

    assert "processes of this run see different checkpoints" in rank0["different_listing"]
    assert "processes of this run see different checkpoints" in rank1["different_listing"]


STORED_CONFIG_COMMIT = "a80476193def983ef0994fe4ea06e563f2008480"  # checkpoints store their config, old key names


@pytest.mark.slow
def test_checkpoint_storing_a_config_with_earlier_key_names_resumes(tmp_path, capsys):
    """The code of STORED_CONFIG_COMMIT (loss.queue_size, train.grad_accum_steps, train.save_every,
    ... and a config.json in every checkpoint) trains MoCo for 4 steps. Today's code resumes its
    step-2 checkpoint: the stored config compares equal under today's names (only output_dir
    differs, a harmless change), the run ends with the old run's exact weights, and a changed batch
    size is still refused."""
    root = tmp_path / "then"
    root.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", STORED_CONFIG_COMMIT, "mmcl", "kernels"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the repository history (commit {STORED_CONFIG_COMMIT[:7]}) is not available")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    (root / "mmcl" / "kernels").symlink_to(root / "kernels")  # installed as mmcl.kernels
    tok = write_tokenizer(tmp_path / "tok")
    old_run = tmp_path / "old"
    overrides = [o.replace("data.image_size", "model.image_size").replace("moco.queue_size", "loss.queue_size")
                 for o in tiny_overrides("moco", old_run, tok, steps=4, batch=6, samples=40)]
    overrides += ["loss.momentum=0.9", "train.grad_accum_steps=2", "train.save_every=2", "train.num_threads=1", *FAST]
    code = "import sys; from mmcl.train import fit, load_config; fit(load_config(None, sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *overrides], cwd=tmp_path, env={**ENV, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    step_2 = ckpt.checkpoint_dir(old_run, 2)
    stored = json.loads((step_2 / "config.json").read_text())
    assert "moco" not in stored and stored["loss"]["queue_size"] == 24 and stored["train"]["grad_accum_steps"] == 2

    cfg = load_saved_config(old_run)
    cfg.output_dir, cfg.checkpoint.resume = str(tmp_path / "new"), str(step_2)
    capsys.readouterr()
    results = fit(cfg)
    printed = capsys.readouterr().out.splitlines()
    harmless = [line for line in printed if "changed harmless settings" in line]
    assert harmless == [f"mmcl: resuming with changed harmless settings: output_dir: '{old_run}' -> '{cfg.output_dir}'"], printed
    assert not any("changed settings (" in line for line in printed), printed
    differ = _same_final_weights(old_run, Path(results["final_dir"]).parent)
    assert results["step"] == 4 and not differ, f"weights differ from the run that wrote the checkpoint: {differ[:5]}"

    cfg.train.batch_size = 4
    with pytest.raises(ValueError, match=r"(?s)change the run's meaning:\n  train.batch_size: 6 -> 4\n"):
        fit(cfg)
