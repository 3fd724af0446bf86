"""Flatten batched operands to the ``(B, nnz)`` / ``(B, n, k)`` layout of the Functions, and back.

Two layouts, chosen to minimise work:

* values without batch dimensions (one matrix): every batch dimension of the
    right-hand side is folded into its columns, ``(*batch, n, k) → (1, n, batch·k)``,
    so the whole batch is one SpMM / one Krylov run with per-column convergence;
* batched values: values and right-hand side are broadcast to a common batch
    shape and flattened to ``B`` blocks of a block-diagonal matrix.

The expansion of the values is done by torch (differentiable), so the
gradient of broadcast values is summed back by autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["flatten_operands"]


def flatten_operands(values: Tensor, rhs: Tensor, n: int) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Lay out ``values (*vb, nnz)`` and ``rhs (n,) | (*rb, n, k)`` as ``(B, nnz)`` and ``(B, n, k)``.

    Returns the flattened values, the flattened right-hand side and a function
    mapping a ``(B, m, k)`` result back to the broadcast shape
    ``(*batch, m, k)`` (or ``(m,)`` for a vector right-hand side).

    Raises
    ------
    ValueError
        If ``rhs`` does not have ``n`` rows or the batch shapes do not broadcast.
    """
    vector = rhs.dim() == 1
    if vector:
        rhs = rhs.unsqueeze(-1)
    if rhs.dim() < 2 or rhs.shape[-2] != n:
        raise ValueError(f"right-hand side of shape {tuple(rhs.shape)} does not match an operator with {n} columns")
    vbatch, rbatch = values.shape[:-1], rhs.shape[:-2]
    try:
        batch = torch.broadcast_shapes(vbatch, rbatch)
    except RuntimeError as err:
        raise ValueError(
            f"batch shapes {tuple(vbatch)} (matrix) and {tuple(rbatch)} (right-hand side) do not broadcast"
        ) from err
    k = rhs.shape[-1]
    if values.dim() == 1 or vbatch.numel() == 1:
        return _fold_columns(values.reshape(1, -1), rhs, batch, k, vector)
    num = batch.numel()
    values2d = values.expand(*batch, values.shape[-1]).reshape(num, -1)
    rhs3d = rhs.expand(*batch, n, k).reshape(num, n, k)

    def unflatten(out: Tensor) -> Tensor:
        out = out.reshape(*batch, out.shape[-2], k)
        return out.squeeze(-1) if vector else out

    return values2d, rhs3d, unflatten


def _fold_columns(values2d: Tensor, rhs: Tensor, batch: torch.Size, k: int, vector: bool):
    n = rhs.shape[-2]
    num = batch.numel()
    if num == 1:
        rhs3d = rhs.reshape(1, n, k)
    else:
        rhs3d = rhs.expand(*batch, n, k).reshape(num, n, k).permute(1, 0, 2).reshape(1, n, num * k)

    def unflatten(out: Tensor) -> Tensor:
        m = out.shape[-2]
        if num == 1:
            out = out.reshape(*batch, m, k)
        else:
            out = out.reshape(m, num, k).permute(1, 0, 2).reshape(*batch, m, k)
        return out.squeeze(-1) if vector else out

    return values2d, rhs3d, unflatten
