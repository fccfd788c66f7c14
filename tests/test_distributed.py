"""clip_loss(gather=True) through a real 2-process `accelerate launch` on CPU (gloo)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def _free_port() -> int:
    with socket.socket() as s:  # parallel launches must not fight over the default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_gathered_clip_loss_equals_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_losses.py", str(out))
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2 and all(r["world_size"] == 2 for r in per_rank)
    for rank, result in enumerate(per_rank):
        assert len(result["cases"]) == 6
        for case in result["cases"]:
            label = f"rank {rank} ({case['rows']} rows), local_loss={case['local_loss']}, impl={case['impl']}"
            assert case["loss_err"] < 1e-12, f"{label}: mean loss differs by {case['loss_err']}"
            assert case["grad_err"] < 1e-12, f"{label}: DDP-averaged gradients differ by {case['grad_err']}"
            if not case["local_loss"]:  # the whole matrix on every rank: the same loss everywhere
                assert case["rank_loss_err"] < 1e-12, f"{label}: rank loss differs by {case['rank_loss_err']}"
