"""The gathered losses through a real 2-process `accelerate launch` on CPU (gloo)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def _free_port() -> int:
    with socket.socket() as s:  # parallel launches must not fight over the default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: Path, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def check_gathered_losses(out: Path, impls: list[str], dtypes: list[str], tolerances: dict[str, float]) -> None:
    """Every case of tests/scripts/dist_losses.py, on both ranks, within its dtype's tolerance."""
    per_rank = json.loads(out.read_text())
    assert [r["rank"] for r in per_rank] == [0, 1] and all(r["world_size"] == 2 for r in per_rank)
    for result in per_rank:
        seen = {(c["loss"], c["shards"], c["impl"], c["dtype"]) for c in result["cases"]}
        assert len(seen) == len(result["cases"]) == 6 * 2 * len(impls) * len(dtypes), sorted(seen)
        for case in result["cases"]:
            label = (f"rank {result['rank']} ({case['rows']} rows, {case['shards']} shards): {case['loss']}, "
                     f"impl={case['impl']}, {case['dtype']}")
            tol = tolerances[case["dtype"]]
            assert case["loss_err"] < tol, f"{label}: loss differs by {case['loss_err']:.3e}"
            assert case["grad_err"] < tol, f"{label}: DDP-averaged gradients differ by {case['grad_err']:.3e}"
        red = result["reductions"]  # all_reduce_logsumexp, gather_with_grad, all_reduce_sum_with_grad
        assert red["lse_inf_agrees"] and red["lse_grad_finite"], red
        assert max(red["lse_err"], red["lse_grad_err"], red["gather_err"], red["gather_grad_err"]) < 1e-12, red


def test_gathered_losses_equal_one_process_on_the_whole_batch(tmp_path):
    """clip_loss (local_loss True/False), nt_xent and supcon_loss with gather=True on 2 ranks, even
    and uneven shards, naive and chunked: loss and DDP-averaged gradients as one float64 process
    on the whole batch (relative errors below 1e-12 in float64, 1e-6 in fp32)."""
    out = tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_losses.py", str(out), "--impls", "naive,chunked", "--dtypes", "float64,float32")
    check_gathered_losses(out, ["naive", "chunked"], ["float64", "float32"], {"float64": 1e-12, "float32": 1e-6})
