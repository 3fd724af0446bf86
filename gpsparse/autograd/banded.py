r"""Exact banded log-determinants and solves with gradients: the autograd Functions and entry points.

banded_logdet
:   ``log det Q``, differentiable in the values (``BandedLogdet``).

banded_solve
    ``Q⁻¹ B``, differentiable in the values and in ``B`` (``BandedSolve``).

``Q = (A + Aᵀ)/2`` is a banded symmetric positive definite matrix stored by
``(values, pattern)`` on a symmetric pattern of half-bandwidth ``b``. The
numerics — band layout (cached on the pattern), LAPACK banded Cholesky and
solves, and the Takahashi band inverse — are in ``gpsparse.core.banded``,
together with the non-differentiable
``banded_inverse_band`` and
``bandwidth``; its notes derive the gradients.

Gradients
---------
* ``∂ log det Q / ∂q[e] = (Q⁻¹)[i_e, j_e]``: the backward of
    ``BandedLogdet`` gathers the band of ``Q⁻¹``
    (``gpsparse.core.banded._band_inverse``, on the factor saved by the
    forward) at the slots of the stored entries.
* ``X = Q⁻¹B``, upstream ``G``: ``∂/∂B = Q⁻¹G``
    (``gpsparse.core.banded._solve_factor`` with the saved factor) and
    ``∂/∂q[e] = −½ Σ_c ((Q⁻¹G)[i_e,c] X[j_e,c] + (Q⁻¹G)[j_e,c] X[i_e,c])``.

Both are symmetric, ``g == g[..., transpose_perm]`` (already symmetrised),
and exact for any values: ``gradcheck`` holds. ``O(N·b²)`` time and
``O(N·b)`` memory per batch element, forward and backward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.banded import _LAPACK, _band_inverse, _factor_batch, _flatten_values, _layout, _solve_factor
from gpsparse.core.pattern import SparsityPattern

__all__ = ["BandedLogdet", "BandedSolve", "banded_logdet", "banded_solve"]


# ---------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------


class BandedLogdet(Function):
    """``log det Q`` of ``(B, nnz)`` values; backward ``(Q⁻¹)[i_e, j_e]`` by selected inversion."""

    @staticmethod
    def forward(ctx, values: Tensor, pattern: SparsityPattern) -> Tensor:
        layout = _layout(pattern)
        factors = _factor_batch(values, layout, "banded_logdet")
        logdets = [2.0 * torch.from_numpy(f.band[:, 0]).log().sum() for f in factors]
        out = torch.stack(logdets) if logdets else torch.zeros(0)
        if ctx.needs_input_grad[0]:
            ctx.factors = factors
            ctx.layout = layout
            ctx.anchor = values
        return out.to(device=values.device, dtype=values.dtype)

    @staticmethod
    @first_order_only("the exact banded road (banded_logdet)")
    def backward(ctx, grad_out: Tensor):
        layout, factors = ctx.layout, ctx.factors
        grads = []
        for f, g in zip(factors, grad_out.to("cpu", torch.float64).tolist()):
            z = _band_inverse(f)
            z *= g  # scale the band (N·(b+1)) rather than the gradient (nnz)
            # Z is symmetric, so the gathered gradient is already symmetrised.
            grads.append(torch.from_numpy(np.take(z.reshape(-1), layout.slot)))
        grad = torch.stack(grads).to(device=grad_out.device, dtype=grad_out.dtype)
        return grad, None


class BandedSolve(Function):
    """``X = Q⁻¹ B`` for ``(B, nnz)`` values and ``(B, N, k)`` right-hand sides, reusing the factor backward."""

    @staticmethod
    def forward(ctx, values: Tensor, rhs: Tensor, pattern: SparsityPattern) -> Tensor:
        layout = _layout(pattern)
        factors = _factor_batch(values, layout, "banded_solve")
        np_dtype = factors[0].band.dtype if factors else np.float64
        rhs_cpu = rhs.detach().to("cpu")
        x = torch.stack(
            [
                torch.from_numpy(_solve_factor(f, r.numpy().astype(np_dtype, copy=False)))
                for f, r in zip(factors, rhs_cpu)
            ]
        )
        x = x.to(device=rhs.device, dtype=values.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.factors = factors
            ctx.layout = layout
            ctx.anchor = values
            ctx.save_for_backward(x)
        return x

    @staticmethod
    @first_order_only("the exact banded road (banded_solve)")
    def backward(ctx, grad_x: Tensor):
        (x,) = ctx.saved_tensors
        layout, factors = ctx.layout, ctx.factors
        device = grad_x.device
        grad_cpu = grad_x.detach().to("cpu", x.dtype)
        # ∂/∂B = Q⁻ᵀG = Q⁻¹G (Q symmetric), with the factor saved by the forward.
        solved = [np.ascontiguousarray(_solve_factor(f, g.numpy())) for f, g in zip(factors, grad_cpu)]
        grad_values = None
        if ctx.needs_input_grad[0]:
            # ∂/∂q[e] = −½ Σ_c (Q⁻¹G)[i,c] X[j,c] + (Q⁻¹G)[j,c] X[i,c], computed per band
            # offset d on (N, k) blocks (no nnz × k temporary), then gathered at the slots.
            # numpy, single-threaded: these passes are short and torch's threading only
            # adds overhead on shared cores.
            n, b = layout.size, layout.bandwidth
            grads = []
            for gb, xb in zip(solved, x.detach().to("cpu").numpy()):
                band = np.zeros((n, b + 1), dtype=gb.dtype)
                band[:, 0] = -np.einsum("ic,ic->i", gb, xb)
                for d in range(1, b + 1):
                    band[: n - d, d] = -0.5 * (
                        np.einsum("ic,ic->i", gb[d:], xb[:-d]) + np.einsum("ic,ic->i", gb[:-d], xb[d:])
                    )
                grads.append(torch.from_numpy(np.take(band.reshape(-1), layout.slot)))
            grad_values = torch.stack(grads).to(device)
        grad_rhs = torch.stack([torch.from_numpy(g) for g in solved]).to(device) if ctx.needs_input_grad[1] else None
        return grad_values, grad_rhs, None


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def banded_logdet(values: Tensor, pattern: SparsityPattern) -> Tensor:
    r"""Exact ``log det Q`` of a banded symmetric positive definite matrix.

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` float32 or float64 values on ``pattern`` (any
        device; CUDA values are factorised on the CPU and the result moved
        back). The matrix is ``Q = (A + Aᵀ)/2``, i.e. ``A`` itself for
        symmetric values.
    pattern : SparsityPattern
        A symmetric pattern (``pattern.symmetric``) of half-bandwidth
        ``b = bandwidth(pattern)``.

    Returns
    -------
    Tensor
        ``(*batch,)`` ``log det Q = 2 Σ_i log L_ii`` with ``Q = L Lᵀ``.

    Gradient
    --------
    ``∂ log det Q / ∂q[e] = (Q⁻¹)[i_e, j_e]`` — symmetric, so equal to its
    ``symmetrize_values_grad``. Only the band of ``Q⁻¹`` is computed, by the
    Takahashi / Erisman–Tinney selected inversion on the saved factor.

    Complexity
    ----------
    ``O(N·b²)`` time, ``O(N·b)`` memory per batch element, forward and
    backward; batch elements are factorised one after another.

    Raises
    ------
    ValueError
        Pattern not symmetric, wrong ``values`` shape, NaN or infinite values.
    TypeError
        ``values`` not float32/float64.
    NotPositiveDefiniteError
        ``Q`` is not positive definite (LAPACK ``info > 0``); the message
        names the leading minor (and the index into the flattened batch).

    Examples
    --------
    >>> import torch
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> n = 5
    >>> i = torch.arange(n)
    >>> row = torch.cat([i, i[1:], i[:-1]]); col = torch.cat([i, i[:-1], i[1:]])
    >>> pattern, order = SparsityPattern.from_indices(row, col, (n, n), symmetric=True)
    >>> values = torch.cat([torch.full((n,), 2.0), -torch.ones(2 * (n - 1))])[order].double()
    >>> banded_logdet(values, pattern)  # det of the 1-D Dirichlet Laplacian is n + 1
    tensor(1.7918, dtype=torch.float64)
    """
    flat, batch = _flatten_values(values, pattern, "banded_logdet")
    return BandedLogdet.apply(flat, pattern).reshape(batch)


def banded_solve(values: Tensor, pattern: SparsityPattern, rhs: Tensor) -> Tensor:
    r"""Exact solve ``X = Q⁻¹ B`` with a banded symmetric positive definite ``Q``.

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` float32 or float64 values on ``pattern``
        (``Q = (A + Aᵀ)/2`` as in ``banded_logdet``).
    pattern : SparsityPattern
        A symmetric pattern of size ``N × N``.
    rhs : Tensor
        ``(*batch, N, k)`` right-hand sides (batch dims broadcast against
        those of ``values``), or ``(N,)``. Cast to the promoted dtype of
        ``values`` and ``rhs``. NaN in ``rhs`` propagates (not checked).

    Returns
    -------
    Tensor
        ``X`` with the broadcast shape ``(*batch, N, k)`` (``(N,)`` for a
        vector), on ``rhs``'s device.

    Gradient
    --------
    With upstream ``G``: ``∂/∂B = Q⁻¹G`` (one more banded solve with the
    factor saved by the forward) and
    ``∂/∂q[e] = −½ Σ_c ((Q⁻¹G)[i_e,c] X[j_e,c] + (Q⁻¹G)[j_e,c] X[i_e,c])``,
    i.e. ``symmetrize_values_grad`` of ``−Σ_c (Q⁻¹G)[i_e,c] X[j_e,c]``,
    computed per band offset without ``nnz × k`` temporaries.

    Complexity
    ----------
    ``O(N·b² + N·b·k)`` time and ``O(N·(b + k))`` memory per batch element.
    Unbatched ``values`` with batched ``rhs`` factorise once (the batch is
    folded into columns).

    Raises
    ------
    ValueError, TypeError, NotPositiveDefiniteError
        As ``banded_logdet``; ``ValueError`` also for a ``rhs`` whose
        row count is not ``N``.

    Examples
    --------
    >>> import torch
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> n = 4
    >>> i = torch.arange(n)
    >>> row = torch.cat([i, i[1:], i[:-1]]); col = torch.cat([i, i[:-1], i[1:]])
    >>> pattern, order = SparsityPattern.from_indices(row, col, (n, n), symmetric=True)
    >>> values = torch.cat([torch.full((n,), 2.0), -torch.ones(2 * (n - 1))])[order].double()
    >>> banded_solve(values, pattern, torch.ones(n, dtype=torch.float64)).round(decimals=10)
    tensor([2., 3., 3., 2.], dtype=torch.float64)
    """
    who = "banded_solve"
    flat, vbatch = _flatten_values(values, pattern, who)
    n = pattern.size[0]
    if not rhs.is_floating_point():
        raise TypeError(f"{who}: rhs must be a floating-point tensor, got {rhs.dtype}")
    dtype = torch.promote_types(values.dtype, rhs.dtype)
    if dtype not in _LAPACK:
        raise TypeError(f"{who}: values and rhs must be float32 or float64, got {values.dtype} and {rhs.dtype}")
    vector = rhs.dim() == 1
    if vector:
        rhs = rhs.unsqueeze(-1)
    if rhs.dim() < 2 or rhs.shape[-2] != n:
        raise ValueError(f"{who}: rhs must have shape (*batch, {n}, k) or ({n},), got {tuple(rhs.shape)}")
    flat, rhs = flat.to(dtype), rhs.to(dtype)
    rbatch, k = rhs.shape[:-2], rhs.shape[-1]
    if len(vbatch) == 0:
        # One matrix: fold the rhs batch into columns and factorise once.
        cols = rhs.movedim(-2, 0).reshape(n, -1)
        x = BandedSolve.apply(flat, cols.unsqueeze(0), pattern)[0]
        x = x.reshape(n, *rbatch, k).movedim(0, -2)
    else:
        batch = torch.broadcast_shapes(vbatch, rbatch)
        v = flat.reshape(*vbatch, -1).expand(*batch, -1).reshape(-1, pattern.nnz)
        r = rhs.expand(*batch, n, k).reshape(-1, n, k)
        x = BandedSolve.apply(v, r, pattern).reshape(*batch, n, k)
    return x.squeeze(-1) if vector else x
