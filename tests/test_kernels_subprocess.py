"""Kernel checks that need a process of their own: CPU tensors without the interpreter, the
real Triton compiler for sm_90 (no GPU needed), the gathered loss on two gloo processes, and the
benchmark script's smoke mode."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_NO_INTERPRETER_SCRIPT = """
import torch
from mmcl.losses import clip_loss, resolve_impl
from mmcl.kernels.row_dot import row_dot_triton
from mmcl.kernels.similarity_lse import similarity_lse_triton
x = torch.randn(4, 8)
for call in (lambda: clip_loss(x, x, 10.0, impl="triton"),
             lambda: similarity_lse_triton(x, x, torch.tensor(10.0)),
             lambda: row_dot_triton(x, x)):
    try:
        call()
    except ValueError as exc:
        assert "CUDA" in str(exc) and "TRITON_INTERPRET" in str(exc), exc
    else:
        raise SystemExit("no ValueError")
assert resolve_impl("auto", torch.device("cpu"), 16) != "triton"
print("ok")
"""


def test_cpu_tensors_without_interpreter_raise_value_error():
    # triton reads TRITON_INTERPRET when the kernels are decorated, so this needs a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


_AOT_SCRIPT = """
import json, torch
from mmcl.kernels.aot import compile_for_target
print(json.dumps(compile_for_target(90, dtypes=(torch.bfloat16, torch.float32), dim=768)))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never lowers the kernels; Triton's real compiler (sm_90, no GPU needed)
    does, with the launch configuration of D=768: every variant compiles (both backward modes),
    its D loop is software-pipelined and ptxas reports no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    # Per dtype: 3 forward, 4 fused backward and 4 gemm-backward (grad tile) variants, 2 row-dot kernels.
    assert len(rows) == 2 * (3 + 4 + 4 + 2)
    assert {row["kernel"] for row in rows} == {"forward", "backward", "grad_tile", "row_dot_forward", "row_dot_backward"}
    for row in rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0, row
        if not row["kernel"].startswith("row_dot"):
            assert row["pipelined"], row


# --------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_gathered_clip_loss_with_triton_on_two_processes(tmp_path, bwd_mode):
    """Item 4 of the kernels' issue: each rank's rows against all gathered columns, gradients
    flowing back to the columns' owners (2 gloo processes via `accelerate launch`), with either
    backward mode chosen through $MMCL_TRITON_BWD."""
    with socket.socket() as sock:  # a free port: parallel launches must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "result.json"
    script = os.path.join(ROOT, "tests", "scripts", "dist_kernels.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", script, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1",
           "MMCL_TRITON_BWD": bwd_mode}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    per_rank = json.loads(out.read_text())
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert [r["bwd_mode"] for r in per_rank] == [bwd_mode, bwd_mode]
    for result in per_rank:
        assert len(result["cases"]) == 2
        for case in result["cases"]:
            label = f"rank {result['rank']}, local_loss={case['local_loss']}"
            assert case["loss_err"] < 2e-5, f"{label}: loss differs by {case['loss_err']:.3e}"
            assert case["grad_err"] < 2e-5, f"{label}: feature gradients differ by {case['grad_err']:.3e}"
            assert case["scale_grad_err"] < 2e-5, f"{label}: scale gradient differs by {case['scale_grad_err']:.3e}"


def test_bench_script_smoke_mode(tmp_path):
    """bench/bench_kernels.py end to end on CPU (interpreter, tiny sizes); it must not record
    interpreter timings in bench/RESULTS.md."""
    results = os.path.join(ROOT, "bench", "RESULTS.md")
    before = open(results).read() if os.path.exists(results) else None
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--smoke", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for provider in ("triton", "triton-gemm"):
        assert f"correctness of {provider} at D=32: max relative error" in proc.stdout, proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 64 ") or line.startswith("| 97 ")]
    providers = sorted(r.split("|")[3].strip() for r in rows)
    assert providers == sorted(["triton", "triton-gemm", "naive", "open_clip"] * 2), f"rows {rows}\n{proc.stdout}"
    full_ms = [float(r.split("|")[6]) for r in rows]
    assert all(t > 0 for t in full_ms), f"full fwd+bwd times {full_ms}"
    after = open(results).read() if os.path.exists(results) else None
    assert after == before, "the smoke run changed bench/RESULTS.md"
