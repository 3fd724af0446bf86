"""Input bookkeeping shared by gpsparse's kernels: cache keys of input tensors and batch-shape checks."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["input_version", "same_input", "check_batch_shapes"]


def input_version(x: Tensor) -> int:
    """The in-place version counter of ``x`` (``-1`` for inference tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return -1


def same_input(ref: weakref.ref, version: int, copy: Tensor, x: Tensor) -> bool:
    """Whether ``x`` equals the cached input: the same object at the same version, else ``torch.equal`` to ``copy``.

    The identity test is O(1); the fallback compares values in O(n·d) (a new
    tensor holding the same inputs still hits the cache).
    """
    if version >= 0 and ref() is x and input_version(x) == version:
        return True
    return x.shape == copy.shape and x.dtype == copy.dtype and x.device == copy.device and torch.equal(x.detach(), copy)


def check_batch_shapes(x1: Tensor, x2: Tensor, batch_shape: torch.Size) -> None:
    """Raise ``ValueError`` unless the batch shapes of ``x1 (*b1, n, d)``, ``x2 (*b2, m, d)`` and the kernel agree."""
    try:
        torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"batch shapes of x1 {tuple(x1.shape[:-2])}, x2 {tuple(x2.shape[:-2])} and the kernel "
            f"{tuple(batch_shape)} do not broadcast"
        ) from None
