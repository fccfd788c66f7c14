"""What every loss shares: the boundary validators, `resolve_impl` and the dispatch to the naive,
chunked and Triton row/column logsumexps, the materialised logits and row dots, and the mean over
ranks of a gathered loss."""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from mmcl import distributed, kernels
from mmcl.chunked import similarity_lse_chunked

IMPLS = ("auto", "naive", "chunked", "triton")
# Above this many logits "auto" stops materialising them on CPU (4096 x 4096 fp32 = 64 MiB).
AUTO_CHUNKED_MIN_LOGITS = 4096 * 4096
# On CUDA "auto" materialises fp32 logits up to this size (16,384 x 16,384), Triton above it.
AUTO_NAIVE_MAX_LOGIT_BYTES = 1 << 30


# --------------------------------------------------------------------------- validation


def _check_features(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def _check_pair(name_a: str, a, name_b: str, b, same_batch: bool = True) -> None:
    _check_features(name_a, a)
    _check_features(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dim, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if same_batch and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (row i of one is the positive of row i "
            f"of the other), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _positive_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device; raises unless it is a finite number > 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point scalar, got dtype {value.dtype}")
        v = float(value.detach())
        tensor = value.reshape(()).to(like.device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        tensor = torch.tensor(v, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    else:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return tensor


def _finite_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device; raises unless it is one finite number."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point scalar, got dtype {value.dtype}")
        v, tensor = float(value.detach()), value.reshape(()).to(like.device)
    else:
        v = float(value)
        tensor = torch.tensor(v, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return tensor


# --------------------------------------------------------------------------- dispatch


def resolve_impl(impl: str, device: torch.device, num_logits: int, dtype: torch.dtype | None = None) -> str:
    """The implementation a loss will use for `num_logits` = B·N logits on `device`.

    "auto" on CUDA: "naive" while the fp32 logits fit the budget (B·N·4 bytes ≤
    AUTO_NAIVE_MAX_LOGIT_BYTES = 1 GiB, e.g. B = N = 16,384, or the MoCo queue shape 256 × 65,536):
    one cuBLAS product (in the inputs' dtype for 16-bit inputs) plus torch's fp32 softmax is
    fastest there and the memory is affordable. Above it, "triton" (memory O((B + N)·D)).
    Float64 stays on the torch paths (the kernels compute in fp32). On CPU, and on CUDA when
    `mmcl.kernels.is_available` says no (with a warning above the budget): "chunked" from
    AUTO_CHUNKED_MIN_LOGITS = 4096² logits on, "naive" below. Forcing an implementation that
    cannot run raises ValueError; nothing else falls back.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        ok, why = kernels.is_available(device)
        if not ok:
            raise ValueError(f'impl="triton" cannot run on {device} tensors: {why}')
        return impl
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype != torch.float64:
        if num_logits * 4 <= AUTO_NAIVE_MAX_LOGIT_BYTES:
            return "naive"
        ok, why = kernels.is_available(device)
        if ok:
            return "triton"
        warnings.warn(f'impl="auto": the Triton kernels cannot run ({why}); using "chunked"', stacklevel=3)
    return "chunked" if num_logits >= AUTO_CHUNKED_MIN_LOGITS else "naive"


def _similarity_lse_naive(query, key, scale, *, exclude=None, mask_diagonal=False, columns=False):
    """The contract of `mmcl.kernels.similarity_lse` from materialised (B, N) logits."""
    logits = _logits(query, key, scale)
    if mask_diagonal:
        exclude = torch.arange(query.shape[0], device=query.device)
    if exclude is not None:
        columns_idx = torch.arange(key.shape[0], device=query.device)
        logits = logits.masked_fill(exclude[:, None] == columns_idx[None, :], float("-inf"))
    return logits.logsumexp(1), (logits.logsumexp(0) if columns else None)


def _lse_function(impl: str):
    """The per-device row/column logsumexp of `impl`, all with the contract of
    `mmcl.kernels.similarity_lse`: (query (B, D), key (N, D), scale, *, exclude=None,
    mask_diagonal=False, columns=False) -> (row_lse (B,), col_lse (N,) | None)."""
    if impl == "triton":
        return kernels.similarity_lse
    if impl == "chunked":
        return similarity_lse_chunked
    if impl == "naive":
        return _similarity_lse_naive
    raise ValueError(f'impl must be "naive", "chunked" or "triton" here, got {impl!r}')


def _row_dot(a: torch.Tensor, b: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    if impl == "triton":  # fp32 accumulation without fp32 copies of the features
        return kernels.row_dot(a, b)
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(-1)


def _logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Materialised `scale * a @ b.T`, fp32 or wider. 16-bit inputs multiply in their own dtype
    (tensor cores, as under torch autocast) and only the products are widened for the softmax."""
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return (a @ b.T).float() * scale
    dtype = torch.promote_types(a.dtype, torch.float32)
    return scale * a.to(dtype) @ b.to(dtype).T


def _mean_over_ranks(rank_sum: torch.Tensor, count: int, gathered: bool, local_loss: bool) -> torch.Tensor:
    """A loss from this rank's share `rank_sum` of a sum over `count` terms of all ranks.

    Either way backward seeds rank_sum with world_size / count, so the DDP-averaged gradients
    are those of the global mean. `local_loss` only changes the value returned: this rank's
    share scaled to a mean (world_size · rank_sum / count; the ranks' values average to the
    global mean) instead of the global mean itself (one all-reduce of a scalar).
    """
    if not gathered:
        return rank_sum / count
    if local_loss:
        return rank_sum * (distributed.world_size() / count)
    return distributed.all_reduce_sum_with_grad(rank_sum) / count
