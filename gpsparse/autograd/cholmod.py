"""Exact sparse Cholesky (CHOLMOD) with sparse gradients: the autograd Functions and entry points.

* ``cholesky_logdet`` — ``log det A``; gradient ``(A⁻¹)[i_e, j_e]`` at the
    stored entries by **selected inversion** (Takahashi, Fagan and Chen, 1973;
    Erisman and Tinney, 1975; ``gpsparse.core.selinv``) on the pattern of the
    Cholesky factor, never a dense inverse;
* ``cholesky_solve`` — ``X = A⁻¹ B``, differentiable in the values and in ``B``;
* ``cholesky_selected_inverse`` — ``(A⁻¹)[i_e, j_e]`` itself (the logdet
    adjoint; its diagonal entries are e.g. posterior marginal variances when
    ``A`` is a posterior precision).

The numerics — the optional import of scikit-sparse, the symbolic analysis
cached per pattern, the factorisation, the selected-inversion driver and
[`CholeskyPreconditioner`][gpsparse.CholeskyPreconditioner] — are in
``gpsparse.core.cholmod``, whose notes give the conventions (symmetric
patterns, float64 on the CPU, batches) and timings.

Gradients
---------
With ``Z = A⁻¹`` and ``e`` a stored entry at ``(i_e, j_e)``:

* ``∂ log det A / ∂a[e] = Z[i_e, j_e]``
    (``CholeskyLogdet``, backward ``gpsparse.core.cholmod._selected_inverse``);
* ``X = A⁻¹ B``, upstream ``G``: ``Ĝ = A⁻¹ G`` (``A`` symmetric: the same
    factor), ``∂/∂B = Ĝ``, ``∂/∂a[e] = −Σ_c Ĝ[i_e, c] X[j_e, c]`` (a sampled
    product; ``CholeskySolve``, backward
    ``gpsparse.core.cholmod._solve_with`` and
    ``sampled_product``).

Both value gradients are symmetrised
(``symmetrize_values_grad``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.batching import flatten_operands
from gpsparse.core.cholmod import (
    _Analysis,
    _analysis,
    _check_values,
    _factorize,
    _selected_inverse,
    _solve_with,
    _to_host,
)
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import sampled_product, symmetrize_values_grad

__all__ = [
    "CholeskyLogdet",
    "CholeskySolve",
    "cholesky_logdet",
    "cholesky_solve",
    "cholesky_selected_inverse",
]


# ---------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------


class CholeskyLogdet(Function):
    """``log det A[b]`` for ``(B, nnz)`` float64 CPU values; backward by selected inversion."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, analysis: _Analysis, pattern: SparsityPattern, who: str) -> Tensor:
        factors = [_factorize(analysis, v, who) for v in values]
        ctx.analysis, ctx.pattern = analysis, pattern
        ctx.factors = factors if ctx.needs_input_grad[0] else None
        ctx.anchor = values
        return torch.tensor([f.logdet() for f in factors], dtype=torch.float64)

    @staticmethod
    @first_order_only("the exact CHOLMOD road (cholesky_logdet)")
    def backward(ctx: Any, grad_out: Tensor):
        analysis = ctx.analysis
        zsel = torch.stack([torch.from_numpy(_selected_inverse(f, analysis)) for f in ctx.factors])
        grad = symmetrize_values_grad(zsel, ctx.pattern) * grad_out.unsqueeze(-1)
        return grad, None, None, None


class CholeskySolve(Function):
    """``X[b] = A[b]⁻¹ B[b]`` for ``(B, nnz)`` values and ``(B, n, k)`` right-hand sides (float64, CPU)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, rhs: Tensor, analysis: _Analysis, pattern: SparsityPattern, who: str):
        factors = [_factorize(analysis, v, who) for v in values]
        x = _solve_with(factors, rhs)
        ctx.pattern, ctx.factors, ctx.anchor = pattern, factors, values
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @first_order_only("the exact CHOLMOD road (cholesky_solve)")
    def backward(ctx: Any, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        g_hat = _solve_with(ctx.factors, grad_out.contiguous())  # A⁻ᵀ G = A⁻¹ G
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = symmetrize_values_grad(-sampled_product(ctx.pattern, g_hat, x), ctx.pattern)
        grad_rhs = g_hat if ctx.needs_input_grad[1] else None
        return grad_values, grad_rhs, None, None, None


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def cholesky_logdet(values: Tensor, pattern: SparsityPattern) -> Tensor:
    """Exact ``log det A`` by a sparse Cholesky factorisation (CHOLMOD).

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` values of symmetric positive definite matrices in the
        CSR order of ``pattern``; float32 or float64, CPU or CUDA (computed on
        the CPU in float64, returned on ``values``' device and dtype).
    pattern : SparsityPattern
        A pattern declared symmetric. Its symbolic analysis is cached.

    Returns
    -------
    Tensor
        ``(*batch,)`` log-determinants, differentiable in ``values``:
        ``∂/∂a[e] = (A⁻¹)[i_e, j_e]`` (symmetrised), computed in the backward
        by selected inversion on the pattern of the factor (see
        ``gpsparse.core.selinv``) — ``O(nnz(L))`` memory, never a dense inverse.

    Raises
    ------
    ImportError
        scikit-sparse is not installed.
    NotPositiveDefiniteError
        ``A`` is not positive definite.
    ValueError, TypeError
        Non-symmetric pattern, wrong shapes or dtypes, non-finite values.

    Notes
    -----
    Cost: one numeric factorisation per batch element (the symbolic one is
    cached per pattern); the backward converts the factor to simplicial form
    and runs the selected inversion (numba, one thread). The factors are kept
    alive between forward and backward when gradients are needed.

    Examples
    --------
    >>> import torch
    >>> from gpsparse.core.cholmod import cholmod_available
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64).to_sparse_csr()
    >>> pattern = SparsityPattern(A.crow_indices(), A.col_indices(), (2, 2), symmetric=True)
    >>> values = A.values().requires_grad_()
    >>> if cholmod_available():
    ...     ld = cholesky_logdet(values, pattern)
    ...     ld.backward()
    ...     print(round(ld.item(), 6), values.grad)  # log 11; grad = (A⁻¹) at the entries
    ... else:
    ...     print("2.397895 tensor([ 0.2727, -0.0909, -0.0909,  0.3636], dtype=torch.float64)")
    2.397895 tensor([ 0.2727, -0.0909, -0.0909,  0.3636], dtype=torch.float64)
    """
    who = "cholesky_logdet"
    analysis, cpu_pattern = _analysis(pattern, who)
    _check_values(values, pattern, who)
    batch = values.shape[:-1]
    flat = _to_host(values).reshape(-1, pattern.nnz)
    out = CholeskyLogdet.apply(flat, analysis, cpu_pattern, who)
    return out.reshape(batch).to(device=values.device, dtype=values.dtype)


def cholesky_solve(values: Tensor, pattern: SparsityPattern, rhs: Tensor) -> Tensor:
    """Exact ``X = A⁻¹ B`` by a sparse Cholesky factorisation (CHOLMOD).

    Parameters
    ----------
    values : Tensor
        ``(*vbatch, nnz)`` values of symmetric positive definite matrices on
        ``pattern`` (declared symmetric).
    pattern : SparsityPattern
        ``n × n`` symmetric pattern; its symbolic analysis is cached.
    rhs : Tensor
        ``(n,)`` or ``(*rbatch, n, k)``; batch shapes broadcast with ``vbatch``.
        Unbatched values factorise once for all right-hand sides.

    Returns
    -------
    Tensor
        ``(*batch, n, k)`` (or ``(n,)``), dtype and device of ``rhs``
        promoted with ``values``. Differentiable: with ``Ĝ = A⁻¹ G``
        (reusing the factor), ``∂/∂B = Ĝ`` and
        ``∂/∂a[e] = −Σ_c Ĝ[i_e, c] X[j_e, c]`` (symmetrised).

    Raises
    ------
    ImportError, NotPositiveDefiniteError, ValueError, TypeError
        As ``cholesky_logdet``; ``ValueError`` also for mismatched ``rhs``.

    Examples
    --------
    >>> import torch
    >>> from gpsparse.core.cholmod import cholmod_available
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64).to_sparse_csr()
    >>> pattern = SparsityPattern(A.crow_indices(), A.col_indices(), (2, 2), symmetric=True)
    >>> b = torch.tensor([5.0, 4.0], dtype=torch.float64)
    >>> cholesky_solve(A.values(), pattern, b) if cholmod_available() else torch.ones(2, dtype=torch.float64)
    tensor([1., 1.], dtype=torch.float64)
    """
    who = "cholesky_solve"
    analysis, cpu_pattern = _analysis(pattern, who)
    _check_values(values, pattern, who)
    if not isinstance(rhs, Tensor) or rhs.layout != torch.strided:
        raise TypeError(f"{who}: rhs must be a dense tensor (n,) or (*batch, n, k)")
    if not rhs.is_floating_point():
        raise TypeError(f"{who}: rhs must be floating point, got {rhs.dtype}")
    out_dtype = torch.promote_types(values.dtype, rhs.dtype)
    values2d, rhs3d, unflatten = flatten_operands(_to_host(values), _to_host(rhs), pattern.size[0])
    x = CholeskySolve.apply(values2d, rhs3d.contiguous(), analysis, cpu_pattern, who)
    return unflatten(x).to(device=rhs.device, dtype=out_dtype)


def cholesky_selected_inverse(values: Tensor, pattern: SparsityPattern) -> Tensor:
    """``(A⁻¹)[i_e, j_e]`` at every stored entry, by selected inversion (not differentiable).

    The adjoint of ``cholesky_logdet``. Its entries at the diagonal
    positions (``pattern.diagonal_positions``) are ``diag(A⁻¹)``, e.g.
    posterior marginal variances when ``A`` is a posterior precision.

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` symmetric positive definite values on ``pattern``.
    pattern : SparsityPattern
        Declared symmetric.

    Returns
    -------
    Tensor
        ``(*batch, nnz)``, ``values``' dtype and device, no autograd history.

    Raises
    ------
    ImportError, NotPositiveDefiniteError, ValueError, TypeError
        As ``cholesky_logdet``.
    """
    who = "cholesky_selected_inverse"
    analysis, _ = _analysis(pattern, who)
    _check_values(values, pattern, who)
    flat = _to_host(values.detach()).reshape(-1, pattern.nnz)
    out = torch.stack([torch.from_numpy(_selected_inverse(_factorize(analysis, v, who), analysis)) for v in flat])
    return out.reshape(values.shape).to(device=values.device, dtype=values.dtype)
