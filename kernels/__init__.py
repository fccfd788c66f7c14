"""Fused Triton similarity-softmax kernels (installed as `mmcl.kernels`).

Contract shared with `mmcl.chunked.similarity_lse_chunked`: row (and column) logsumexps of
`scale * Q @ K.T`, differentiable in Q, K and scale, without storing the (B, N) logits.
"""
from __future__ import annotations

import os

import torch


def is_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for running the kernels on tensors of `device`."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc})"
    device = torch.device(device)
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"


def similarity_lse(query, key, scale, *, mask_diagonal=False, columns=False):
    from mmcl.kernels.similarity_lse import similarity_lse_triton

    return similarity_lse_triton(query, key, scale, mask_diagonal=mask_diagonal, columns=columns)
