"""Column-wise inner products of ``(*batch, n, k)`` blocks, shared by the Krylov and Lanczos cores.

Both iterations carry ``k`` independent vectors as the columns of one block
and need ``Σ_i a[..., i, c] b[..., i, c]`` for every column ``c`` several
times per step. They are memory-bandwidth-bound, so the fastest way is the
one that reads each operand once and allocates nothing ``(n, k)``-sized:

* one vector (``(n, 1)``, no batch): ``torch.dot``;
* ``k ≤ 32`` columns: the diagonal of the GEMM ``aᵀb`` (the ``k``-fold extra
    flops are free in a bandwidth-bound loop; measured faster than
    ``sum(a*b)`` and ``einsum``);
* wider blocks: ``a*b`` (into a caller-provided buffer when given) summed
    over rows, since above 32 columns ``aᵀb`` costs more flops than it saves in
    memory traffic.

Pure tensor code: imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GEMM_DOT_MAX_COLUMNS", "column_dot"]

#: Widest block whose column dots use the diagonal of the GEMM ``aᵀb``.
GEMM_DOT_MAX_COLUMNS = 32


def column_dot(a: Tensor, b: Tensor, *, buffer: Tensor | None = None) -> Tensor:
    """Column inner products ``Σ_i a[..., i, c] · b[..., i, c]`` of two ``(*batch, n, k)`` blocks.

    Parameters
    ----------
    a, b : Tensor
        ``(*batch, n, k)`` blocks of the same dtype and device (batch
        dimensions broadcast). Not modified.
    buffer : Tensor, optional
        Scratch space of the broadcast shape of ``a`` and ``b``, used (and
        overwritten) only for blocks wider than ``GEMM_DOT_MAX_COLUMNS``
        columns, so that a loop calling this every step allocates nothing.

    Returns
    -------
    Tensor
        ``(*batch, k)``. For an ``(n, k ≤ 32)`` block a view of a small GEMM
        result (do not write into it).

    Examples
    --------
    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> column_dot(a, a)
    tensor([10., 20.])
    """
    k = a.shape[-1]
    if k == 1 and a.dim() == 2 and b.dim() == 2:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
    if k <= GEMM_DOT_MAX_COLUMNS:
        return torch.matmul(a.mT, b).diagonal(dim1=-2, dim2=-1)
    product = torch.mul(a, b) if buffer is None else torch.mul(a, b, out=buffer)
    return product.sum(dim=-2)
