"""Fused Triton similarity-softmax kernels (installed as `mmcl.kernels`).

Contract shared with `mmcl.chunked.similarity_lse_chunked`: row (and column) logsumexps of
`scale * Q @ K.T`, differentiable in Q, K and scale, without storing the (B, N) logits.
"""
from __future__ import annotations

import os

import torch


try:
    # Imported eagerly so that the function `similarity_lse` below, defined after it, is what
    # the package attribute of that name stays bound to (a lazy submodule import would rebind
    # it to the module). TRITON_INTERPRET is read here, when the kernels are decorated.
    from mmcl.kernels.row_dot import row_dot_triton
    from mmcl.kernels.similarity_lse import _interpreted, similarity_lse_triton
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: report it through is_available
    _IMPORT_ERROR = exc


def is_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for running the kernels on tensors of `device`."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpreted():
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 was set after triton's kernels were compiled; set it before importing mmcl"
    return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"


def similarity_lse(query, key, scale, *, mask_diagonal=False, columns=False):
    """Row (and column) logsumexp of `scale * query @ key.T`; see `similarity_lse_triton`."""
    if _IMPORT_ERROR is not None:
        raise ValueError(f"the Triton kernels are unavailable: triton is not importable ({_IMPORT_ERROR})")
    return similarity_lse_triton(query, key, scale, mask_diagonal=mask_diagonal, columns=columns)


def row_dot(a, b):
    """(B,) fp32 row-wise dot products of a (B, D) and b (B, D); see `row_dot_triton`."""
    if _IMPORT_ERROR is not None:
        raise ValueError(f"the Triton kernels are unavailable: triton is not importable ({_IMPORT_ERROR})")
    return row_dot_triton(a, b)
