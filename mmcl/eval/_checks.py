"""Argument checks shared by the evaluation functions: features and labels at the API boundary."""
from __future__ import annotations

import numbers

import numpy as np
import torch


def as_features(name: str, x) -> torch.Tensor:
    """A (N, D) floating-point tensor from a tensor or array; raises naming `name` otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def as_labels(name: str, y, n: int) -> torch.Tensor:
    """A (N,) long tensor of integer class labels from a tensor, array or list."""
    if isinstance(y, torch.Tensor):
        t = y
    else:
        try:
            t = torch.as_tensor(np.asarray(y))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of integer labels: {err}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels but the features have {n} rows")
    return t.long()


def same_dim(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dim, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value != value:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
