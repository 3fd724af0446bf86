"""Validation and conversion of user matrices into ``(values, pattern)`` pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern

__all__ = ["sparse_parts", "check_finite", "check_operand", "detect_symmetric", "declare_symmetry", "symmetrized"]

_ACCEPTED = (torch.sparse_coo, torch.sparse_csr)


def sparse_parts(
    matrix: Tensor, *, symmetric: bool | None = None, symmetrize: bool = True
) -> tuple[Tensor, SparsityPattern]:
    """Split a 2-D torch sparse COO or CSR tensor into ``(values, pattern)``.

    The returned values are a differentiable function of ``matrix.values()``
    (gradients flow back to the tensor), reordered into CSR order.

    Parameters
    ----------
    matrix : Tensor
        ``(m, n)`` sparse COO (coalesced or not: duplicates are summed) or CSR.
    symmetric : bool or None
        Declare the matrix symmetric (``True``), general (``False``), or detect
        it (``None``: pattern equals its transpose and values are exactly
        symmetric). See [`SparsityPattern`][gpsparse.SparsityPattern].

    Raises
    ------
    TypeError
        Dense or other sparse layouts, non-floating values.
    ValueError
        Not 2-D, NaN/Inf values, ``symmetric=True`` for a non-symmetric matrix.
    """
    if not isinstance(matrix, Tensor):
        raise TypeError(f"expected a torch sparse COO or CSR tensor, got {type(matrix).__name__}")
    if matrix.layout not in _ACCEPTED:
        hint = " convert it with A.to_sparse_csr()" if matrix.layout == torch.strided else " convert it to COO or CSR"
        raise TypeError(f"expected a sparse COO or CSR tensor, got layout {matrix.layout};{hint}")
    if matrix.dim() != 2 or matrix.dense_dim() != 0:
        raise ValueError(
            f"expected a 2-D sparse matrix, got shape {tuple(matrix.shape)}; for a batch of matrices sharing "
            "one pattern build SparseLinearOperator(values, pattern=...) with values of shape (*batch, nnz)"
        )
    if not matrix.dtype.is_floating_point:
        raise TypeError(f"sparse matrix values must be floating point, got {matrix.dtype}")
    if matrix.layout == torch.sparse_coo:
        matrix = matrix.coalesce()
        row, col = matrix.indices()
    else:
        crow = matrix.crow_indices().long()
        col = matrix.col_indices().long()
        row = torch.repeat_interleave(torch.arange(matrix.shape[0], device=crow.device), crow[1:] - crow[:-1])
    values = _csr_values(matrix) if matrix.layout == torch.sparse_csr else matrix.values()
    check_finite(values, "sparse matrix values")
    pattern, order = SparsityPattern.from_indices(row, col, tuple(matrix.shape))
    values = values[order]
    return declare_symmetry(values, pattern, symmetric, symmetrize=symmetrize)


def declare_symmetry(values: Tensor, pattern: SparsityPattern, symmetric: bool | None, *, symmetrize: bool = True):
    """Detect (``None``) or check (``True``) symmetry; return values and the pattern declaring it.

    For a symmetric matrix the values are symmetrised, ``(v + v[perm])/2``
    (differentiably: a gradient reaching them flows back symmetrised) unless
    ``symmetrize=False``, which keeps them as given (entry-wise gradients).

    Raises ``ValueError`` for ``symmetric=True`` on a non-symmetric matrix.
    """
    if symmetric is None:
        symmetric = detect_symmetric(values, pattern)
    elif symmetric and not detect_symmetric(values, pattern):
        raise ValueError("symmetric=True but the matrix is not symmetric (pattern or values differ from the transpose)")
    if not symmetric:
        return values, pattern
    pattern = pattern.with_symmetric(True)
    return (symmetrized(values, pattern) if symmetrize else values), pattern


def symmetrized(values: Tensor, pattern: SparsityPattern) -> Tensor:
    """``(v + v[..., transpose_perm]) / 2``: removes rounding-level asymmetry, differentiably."""
    return 0.5 * (values + values[..., pattern.transpose_perm])


def _csr_values(matrix: Tensor) -> Tensor:
    """The values of a CSR tensor, without torch's dense backward of ``torch.sparse_csr_tensor``.

    torch's autograd of ``torch.sparse_csr_tensor(crow, col, values)``
    (``SparseCompressedTensorBackward0``) materialises an ``n × n`` dense
    gradient. When the values are a leaf, gpsparse reads that leaf directly
    (same order), so gradients reach it sparsely; when they are computed from
    other tensors there is no way around torch's backward, and we refuse
    rather than allocate ``n²``.

    Raises
    ------
    ValueError
        A CSR tensor built from non-leaf values that require grad.
    """
    node = matrix.grad_fn
    if node is None or type(node).__name__ != "SparseCompressedTensorBackward0":
        return matrix.values()
    source = node.next_functions[0][0] if node.next_functions else None
    leaf = getattr(source, "variable", None)
    if leaf is not None and leaf.shape == matrix.values().shape and leaf.dtype == matrix.dtype:
        return leaf
    raise ValueError(
        "this CSR tensor was built by torch.sparse_csr_tensor from values that require grad, and torch's own "
        "backward of that constructor forms a dense n × n gradient; build a COO tensor instead "
        "(torch.sparse_coo_tensor(indices, values, size)) or use SparseLinearOperator.from_csr(crow, col, values, size)"
    )


def detect_symmetric(values: Tensor, pattern: SparsityPattern) -> bool:
    """Whether the pattern equals its transpose and the values are symmetric to rounding (O(nnz)).

    The tolerance is ``64·eps·max|v|`` of the values' dtype: asymmetry at
    that level comes from rounding (e.g. a sparse product ``L @ L``) and is
    removed by symmetrising the values.
    """
    if not pattern.pattern_is_symmetric:
        return False
    detached = values.detach()
    if detached.numel() == 0:
        return True
    scale = float(detached.abs().max())
    tol = 64 * torch.finfo(detached.dtype).eps * scale
    return bool((detached - detached[..., pattern.transpose_perm]).abs().max() <= tol)


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or Inf."""
    if tensor.numel() and not bool(torch.isfinite(tensor.detach()).all()):
        bad = "NaN" if bool(torch.isnan(tensor.detach()).any()) else "Inf"
        raise ValueError(f"{name} contain {bad}")


def check_operand(tensor: Tensor, values: Tensor, name: str) -> None:
    """A dense operand must be a floating tensor of the matrix's dtype and device, without NaN/Inf.

    Raises
    ------
    TypeError
        Not a tensor, not dense, not floating point.
    ValueError
        Dtype or device differ from the matrix values', NaN or Inf entries.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != values.layout:
        raise TypeError(f"{name} must be a dense tensor, got layout {tensor.layout}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.dtype != values.dtype:
        raise ValueError(
            f"{name} has dtype {tensor.dtype} but the matrix has dtype {values.dtype}; convert one of them"
        )
    if tensor.device != values.device:
        raise ValueError(f"{name} is on {tensor.device} but the matrix is on {values.device}; move one of them")
    check_finite(tensor, name)
