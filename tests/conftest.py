"""Shared test setup: offline Hugging Face, one CPU thread, Triton's CPU interpreter, seeded RNGs.

`python -m pytest -q -m "not slow"` is the inner loop; `slow` (registered in pyproject.toml) marks
the tests that launch subprocesses, train for more than ~50 steps or take more than a few seconds.
"""
import os
import random

# Before anything imports transformers, datasets or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' tensors are tiny: a second intra-op thread buys nothing and, on a shared machine, its
# spin-waits double the suite's time. Subprocesses inherit it. OMP_NUM_THREADS=2 pytest overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; on a GPU machine they run for real.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
