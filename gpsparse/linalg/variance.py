r"""Variances ``diag(W Q⁻¹ Wᵀ)`` of Gaussian Markov random fields, never forming ``Q⁻¹``.

Three ways, chosen by the caller (``gpsparse.operators.precision.covariance_diagonal``
reads the settings and passes the choice down):

* ``exact_diagonal`` — one solve per row of ``W``, batched ``block`` at a time.
* ``stochastic_diagonal`` — Monte Carlo over samples of the field,
    ``diag(W Q⁻¹ Wᵀ) = E[(W x)²]`` for ``x = Q^{-1/2} ε`` (``ε ~ N(0, I)``,
    Lanczos ``f(Q)v`` with ``inv_sqrt``, all ``S`` samples in one block).
    Unbiased up to the Lanczos error; every entry has relative standard
    deviation ``√(2/S)`` (χ² with ``S`` degrees of freedom) whatever the
    correlations between rows — unlike the probe estimator
    ``Σ_s (B z_s) ∘ z_s / S`` (Bekas et al. 2007), whose error grows with the
    off-diagonal mass: measured on a 16 × 16 lattice posterior with 2000
    interpolated points, 47 % mean relative error with 64 probes against 18 %
    expected here.

``Q`` is a symmetric positive definite sparse operator (anything with
``values``/``pattern``, ``solve`` and ``batch_shape``) and ``W`` an ``m × N``
sparse operator or None (the identity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import gram_structure
from gpsparse.linalg.functional import funm

__all__ = ["diagonal_from_inverse", "exact_diagonal", "stochastic_diagonal"]


def _apply(W, x: Tensor) -> Tensor:
    return x if W is None else W._matmul(x)


def _apply_t(W, x: Tensor) -> Tensor:
    return x if W is None else W._transpose_nonbatch()._matmul(x)


def diagonal_from_inverse(inverse: Tensor, pattern: SparsityPattern, interp) -> Tensor | None:
    """Exact ``diag(W Q⁻¹ Wᵀ)`` ``(*batch, m)`` from ``inverse = (Q⁻¹)[i_e, j_e]`` on ``Q``'s ``pattern``.

    Returns None when a row of ``W`` couples two nodes whose entry of ``Q⁻¹`` is
    not on the pattern (then solve instead). Differentiable in ``W``'s values
    only (``inverse`` is a constant).
    """
    if interp is None:
        return inverse[..., pattern.diagonal_positions]
    _, left, right, row, _ = gram_structure(interp.pattern)
    cols = interp.pattern.col_long
    position, found = pattern.positions(cols[left], cols[right])
    if not bool(found.all()):
        return None
    w = interp.values
    contrib = w[..., left] * w[..., right] * inverse[..., position]
    return contrib.new_zeros(*contrib.shape[:-1], interp.shape[-2]).index_add(-1, row, contrib)


def exact_diagonal(Q, interp, block: int = 64) -> Tensor:
    """Exact ``diag(W Q⁻¹ Wᵀ)`` ``(*batch, m)`` by solves with blocks of ``Wᵀ`` columns (``m/block`` solves).

    Cost: ``m`` solves in total, batched ``block`` at a time; intended for
    ``m`` up to a few thousand.
    """
    n = Q.shape[-1]
    m = n if interp is None else interp.shape[-2]
    out = []
    for start in range(0, m, block):
        stop = min(m, start + block)
        unit = torch.zeros(m, stop - start, dtype=Q.dtype, device=Q.device)
        unit[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        cols = _apply_t(interp, unit)
        sol = Q.solve(cols.expand(*Q.batch_shape, *cols.shape))
        out.append((cols * sol).sum(-2))
    return torch.cat(out, -1)


def stochastic_diagonal(
    Q, interp, *, num_probes: int, num_lanczos: int, generator: torch.Generator | None = None
) -> Tensor:
    """Monte Carlo ``diag(W Q⁻¹ Wᵀ)`` ``(*batch, m)`` from ``num_probes`` Lanczos samples of the field."""
    n = Q.shape[-1]
    gen_device = generator.device if generator is not None else "cpu"
    eps = torch.randn(*Q.batch_shape, n, num_probes, generator=generator, dtype=Q.dtype, device=gen_device)
    latent = funm(Q, eps.to(Q.device), "inv_sqrt", num_lanczos=min(n, num_lanczos), reorthogonalize=False)
    return _apply(interp, latent).pow(2).mean(-1)
