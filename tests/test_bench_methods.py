"""bench/bench_methods.py's command line: the GPU mode refuses to run without CUDA, bad
arguments are refused before anything trains."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_methods.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_exits_2_without_cuda():
    proc = subprocess.run([sys.executable, str(BENCH), "--gpu", "--no-write"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CUDA" in proc.stderr and "without --gpu" in proc.stderr


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--steps-fraction", "0", "--no-write"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--steps-fraction" in proc.stderr
    proc = subprocess.run([sys.executable, str(BENCH), "--rows", "swav", "--no-write"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "no row matches" in proc.stderr
