"""Kernel checks that need a process of their own: CPU tensors without the interpreter, the
real Triton compiler for sm_90 (no GPU needed), the gathered loss on two gloo processes, and the
benchmark script's smoke mode."""
import json
import os
import subprocess
import sys

import pytest
from helpers.gathered import check_gathered_losses
from helpers.launch import SCRIPTS, accelerate_launch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_NO_INTERPRETER_SCRIPT = """
import torch
from mmcl.losses import clip_loss, resolve_impl
from mmcl.kernels import is_available, row_dot, similarity_lse
x = torch.randn(4, 8)
assert not is_available("cpu")[0] and "TRITON_INTERPRET" in is_available("cpu")[1]
for call in (lambda: clip_loss(x, x, 10.0, impl="triton"),
             lambda: similarity_lse(x, x, torch.tensor(10.0)),
             lambda: row_dot(x, x)):
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
print(json.dumps(compile_for_target(90, dtypes=(torch.bfloat16, torch.float16, torch.float32), dims=(128, 768))))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never lowers the kernels; Triton's real compiler (sm_90, no GPU needed)
    does, with the launch configuration of each dtype: every variant compiles without register
    spills; in 16 bits every S tile runs on wgmma at least n64 wide; the forward's column-tile
    loop and D loop are one software-pipelined loop (the softmax sits in the loop that waits on
    the async copies: see `mmcl.kernels.aot._pipelining`); the S→G kernel's loads are async."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    # Per dtype and D: 2 forward and 2 S→G variants; per dtype 2 row-dot kernels.
    assert len(rows) == 3 * (2 * 4 + 2)
    assert {row["kernel"] for row in rows} == {"forward", "softmax_grad", "row_dot_forward", "row_dot_backward"}
    for row in rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0, row
        assert row["ctas_per_sm"] >= 1, row
        if row["kernel"].startswith("row_dot"):
            continue
        assert row["pipelined"], row
        if row["kernel"] == "forward":
            assert row["pipelined_across_tiles"], row
        if row["dtype"] != "torch.float32":  # fp32 without TF32 runs on FMAs
            widths = [int(shape.split("n")[1].split("k")[0]) for shape in row["wgmma"]]
            assert widths and min(widths) >= 64, row
    # Two CTAs per SM where the registers allow it: the S→G kernel, and in 16 bits the row-only
    # forward (capped at 128 registers without spilling).
    two = [row for row in rows if row["kernel"] == "softmax_grad"
           or (row["kernel"] == "forward" and row["variant"] != "clip" and row["dtype"] != "torch.float32")]
    assert len(two) == 3 * 2 * 2 + 2 * 2 and all(row["ctas_per_sm"] >= 2 for row in two), two


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_gathered_losses_with_triton_on_two_processes(tmp_path):
    """clip_loss (local_loss True/False), nt_xent and supcon_loss with gather=True and
    impl="triton" (interpreted) on 2 gloo processes via `accelerate launch`, even and uneven shards:
    each rank's rows against all ranks' columns with per-row excluded columns and merged column
    statistics; loss and DDP-averaged gradients as one float64 process on the whole batch (relative
    errors below 1e-6)."""
    out = tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_losses.py", str(out), "--impls", "triton", "--dtypes", "float32",
                      "--batch", "45", "--dim", "48",  # several 32-wide tiles under the interpreter
                      timeout=600, env={"TRITON_INTERPRET": "1"})
    check_gathered_losses(out, ["triton"], ["float32"], {"float32": 1e-6})


@pytest.mark.slow
def test_bench_script_smoke_mode(tmp_path):
    """bench/bench_kernels.py end to end on CPU (interpreter, tiny sizes): every case and dtype,
    a launch variant, correctness checks first; it must not record interpreter timings in
    bench/RESULTS.md."""
    results = os.path.join(ROOT, "bench", "RESULTS.md")
    before = open(results).read() if os.path.exists(results) else None
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--smoke", "--repeats", "1",
                           "--variants", "no-split"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for kind in ("clip", "queue", "local"):
        for provider in ("triton", "triton:no-split"):
            for dtype in ("torch.bfloat16", "torch.float32"):
                assert f"correctness of {provider} ({kind}, D=32, {dtype}): max relative error" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith(("| clip", "| queue", "| local"))]
    rows = [line.split("|")[1:-1] for line in table]
    got = sorted((r[0].strip(), r[4].strip(), r[5].strip()) for r in rows)
    expected = [(kind, dtype, provider) for dtype in ("bfloat16", "float32")
                for kind, providers in (("clip", ("triton", "naive", "open_clip", "triton:no-split")),
                                        ("queue", ("triton", "naive", "triton:no-split")),
                                        ("local", ("triton", "naive", "triton:no-split")))
                for provider in providers]
    assert got == sorted(expected), proc.stdout
    assert all(float(r[8]) > 0 for r in rows), proc.stdout  # full fwd+bwd ms
    for r in rows:  # the kernels' matmul passes: no dK for the detached queue
        if r[5].strip().startswith("triton"):
            assert r[11].strip() == ("1+2" if r[0].strip() == "queue" else "1+3"), r
    after = open(results).read() if os.path.exists(results) else None
    assert after == before, "the smoke run changed bench/RESULTS.md"
