"""Helpers shared by the kernel modules: input checks, the launch device, the interpreter test."""
from __future__ import annotations

import contextlib

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _probe():
    """Never launched: its type says whether kernels are decorated for the interpreter."""
    pass


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older triton
        return False
    return isinstance(_probe, InterpretedFunction)


def on_device(t: torch.Tensor):
    """Launch on t's GPU: Triton uses the current CUDA device, which may be another one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_features(a, b, names=("query", "key")) -> None:
    """Raise TypeError/ValueError naming the argument unless the kernels can take (a, b):
    non-empty 2-D float32/float16/bfloat16 tensors of one feature dim on one usable device."""
    for name, x in zip(names, (a, b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            hint = ' (use impl="chunked" or "naive" for float64)' if x.dtype == torch.float64 else ""
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, "
                            f"got {x.dtype}{hint}")
    a_name, b_name = names
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} and {b_name} must have the same feature dim, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
    device = a.device
    if device.type == "cpu" and not interpreted():
        raise ValueError("the Triton kernels need CUDA tensors; CPU tensors run only under "
                         "TRITON_INTERPRET=1 (set before triton is imported)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels need CUDA tensors, got tensors on {device}")


def promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in their common dtype (the wider one) when they differ."""
    if a.dtype == b.dtype:
        return a, b
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


def check_column_index(name: str, index, query: torch.Tensor, num_columns: int) -> torch.Tensor:
    """`index` as a contiguous (B,) int64 tensor of one column per query row (-1 = none), on the
    query's device, with values in [-1, num_columns); a TypeError/ValueError naming `name` otherwise."""
    B = query.shape[0]
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of column indices (-1 = none), got "
                        f"{index.dtype if isinstance(index, torch.Tensor) else type(index).__name__}")
    if index.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one column per query row), got {tuple(index.shape)}")
    if index.device != query.device:
        raise ValueError(f"{name} is on {index.device} but query is on {query.device}")
    lo, hi = torch.aminmax(index)  # one host sync, so that a wrong index fails here
    if lo.item() < -1 or hi.item() >= num_columns:
        raise ValueError(f"{name} must hold -1 or column indices in [0, {num_columns}), got values in "
                         f"[{lo.item()}, {hi.item()}]")
    return index.contiguous()
