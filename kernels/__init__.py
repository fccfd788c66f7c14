"""Fused Triton similarity-softmax kernels (installed as `mmcl.kernels`).

`similarity_lse` (kernels/lse.py): row (and column) logsumexps of `scale * Q @ K.T`,
differentiable in Q, K and scale, without storing the (B, N) logits; the contract of
`mmcl.chunked.similarity_lse_chunked`. `row_dot` (kernels/dot.py): the positive logits.
`sigmoid_pair_loss` (kernels/siglip.py): SigLIP's summed sigmoid loss on the same tiles, the
contract of `mmcl.chunked.sigmoid_pair_loss_chunked`.
`is_available` is the one place that decides whether the kernels can run on a device.
"""
from __future__ import annotations

import os

import torch

try:
    # TRITON_INTERPRET is read here, when the kernels are decorated.
    from mmcl.kernels._common import interpreted
    from mmcl.kernels.dot import row_dot
    from mmcl.kernels.lse import similarity_lse
    from mmcl.kernels.siglip import sigmoid_pair_loss
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: report it through is_available
    _IMPORT_ERROR = exc

    def _unavailable(*args, **kwargs):
        raise ValueError(f"the Triton kernels are unavailable: triton is not importable ({_IMPORT_ERROR})")

    similarity_lse = row_dot = sigmoid_pair_loss = _unavailable

__all__ = ["is_available", "similarity_lse", "row_dot", "sigmoid_pair_loss"]


def is_available(device) -> tuple[bool, str]:
    """(usable, reason) for running the kernels on tensors of `device`; reason is "" if usable."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreted():
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 was set after triton's kernels were compiled; set it before importing mmcl"
    return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
