"""Float64 comparisons shared by the loss tests."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

F64 = torch.float64


def leaf(*shape, dtype=F64) -> torch.Tensor:
    """Random unit rows (normalised in float64, then cast to `dtype`) that require grad."""
    return F.normalize(torch.randn(*shape, dtype=F64), dim=-1).to(dtype).requires_grad_()


def assert_close(actual, expected, what: str, atol: float = 1e-10, rtol: float = 1e-9) -> None:
    """allclose in float64; the failure names `what`, the largest difference and where it is."""
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual - expected).abs()
        where = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3e} at {where}")
