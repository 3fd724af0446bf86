r"""The parts of a Gaussian Markov random field covariance that both precision adapters share.

``W`` (the m × N interpolation or selection, or None for the identity):
validation, ``W x`` and ``Wᵀ x``, row selection; the weighted Gram
``Wᵀ diag(w) W`` that builds the posterior precision ``P = Q + Wᵀ D⁻¹ W``;
the variances ``diag(W Q⁻¹ Wᵀ)``; prior samples ``W Q^{-1/2} z``. The
operators themselves live in ``gpsparse.operators.precision`` (which
re-exports the public names below).
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import gram_structure
from gpsparse.linalg.functional import funm
from gpsparse.linalg.variance import diagonal_from_inverse, exact_diagonal, stochastic_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "interpolation_operator",
    "weighted_gram",
    "covariance_diagonal",
    "prior_samples",
    "apply",
    "apply_t",
    "select_rows",
]


def interpolation_operator(interp, num_nodes: int, device, dtype) -> SparseLinearOperator | None:
    """Validate ``W`` (torch sparse m × N, a SparseLinearOperator, or None for the identity)."""
    if interp is None:
        return None
    if isinstance(interp, Tensor):
        interp = SparseLinearOperator.from_tensor(interp, symmetric=False)
    if not isinstance(interp, SparseLinearOperator):
        raise TypeError(f"interp must be a torch sparse tensor or a SparseLinearOperator, got {type(interp).__name__}")
    if interp.dim() != 2:
        raise ValueError(f"interp must be a single m × N matrix, got shape {tuple(interp.shape)}")
    if interp.shape[-1] != num_nodes:
        raise ValueError(f"interp has {interp.shape[-1]} columns but Q has {num_nodes} nodes")
    if interp.device != device:
        raise ValueError(f"interp is on {interp.device} but Q is on {device}; move one of them")
    if interp.dtype != dtype:
        raise ValueError(f"interp has dtype {interp.dtype} but Q has dtype {dtype}")
    return interp


def apply(W: SparseLinearOperator | None, x: Tensor) -> Tensor:
    """``W x`` for ``x`` ``(*batch, N, k)`` → ``(*batch, m, k)``; ``x`` itself when ``W`` is the identity (None)."""
    return x if W is None else W._matmul(x)


def apply_t(W: SparseLinearOperator | None, x: Tensor) -> Tensor:
    """``Wᵀ x`` for ``x`` ``(*batch, m, k)`` → ``(*batch, N, k)``; ``x`` itself when ``W`` is the identity (None)."""
    return x if W is None else W._transpose_nonbatch()._matmul(x)


def prior_samples(Q: SparseLinearOperator, interp, num_samples: int) -> Tensor:
    """``W Q^{-1/2} z`` for ``z ~ N(0, I)``: samples of ``N(0, W Q⁻¹ Wᵀ)`` (Lanczos ``f(Q)v``)."""
    n = Q.shape[-1]
    base = torch.randn(*Q.batch_shape, n, num_samples, dtype=Q.dtype, device=Q.device)
    latent = funm(Q, base, "inv_sqrt", num_lanczos=gs_settings.current().num_lanczos, reorthogonalize=False)
    return apply(interp, latent).movedim(-1, 0)


def weighted_gram(W: SparseLinearOperator, weights: Tensor) -> SparseLinearOperator:
    """``Wᵀ diag(w) W`` (N × N, sparse, symmetric), differentiable in ``W``'s values and ``w``.

    Every pair of entries ``(e₁, e₂)`` in the same row ``i`` of ``W`` contributes
    ``W[i, a] W[i, b] w_i`` at ``(a, b)``; the pair list (Σ_i nnz_i² pairs) and
    the pattern are computed once per ``W`` pattern and cached on it.
    """
    pattern, pair_left, pair_right, pair_row, target = gram_structure(W.pattern)
    values = W.values
    contrib = values[..., pair_left] * values[..., pair_right] * weights[..., pair_row]
    batch = contrib.shape[:-1]
    gram = contrib.new_zeros(*batch, pattern.nnz).index_add(-1, target, contrib)
    return SparseLinearOperator(gram, pattern=pattern)


VARIANCE_METHODS = ("auto", "exact", "stochastic")


def covariance_diagonal(Q: SparseLinearOperator, interp, *, method: str | None = None, generator=None) -> Tensor:
    r"""``diag(W Q⁻¹ Wᵀ)`` (variances of a GMRF, prior or posterior), never forming ``Q⁻¹``.

    * ``"exact"``: from a selected inverse of ``Q`` (entries of ``Q⁻¹`` on its
      pattern, :meth:`SparseLinearOperator.selected_inverse`: the banded road, or
      CHOLMOD when installed; one factorisation for any number of rows,
      :func:`gpsparse.linalg.variance.diagonal_from_inverse`) when no gradient
      with respect to ``Q`` is needed, else one solve per row of ``W``, batched
      (:func:`gpsparse.linalg.variance.exact_diagonal`).
    * ``"stochastic"``: Monte Carlo over Lanczos samples of the field, relative
      standard deviation ``√(2/S)`` per entry
      (:func:`gpsparse.linalg.variance.stochastic_diagonal`).
    * ``"auto"``: exact when a selected inverse is available and ``Q`` is
      banded or has at most ``selected_inverse_limit`` nodes (CHOLMOD), or up
      to ``exact_variance_limit``
      rows by solves; stochastic otherwise or when
      ``gpytorch.settings.fast_pred_var()`` is on.

    Defaults from [`gpsparse.settings.variance_defaults`][], read here (the
    adapter boundary) and passed down.
    """
    s = gs_settings.current()
    method = s.variance_method if method is None else method
    if method not in VARIANCE_METHODS:
        raise ValueError(f"method must be one of {VARIANCE_METHODS}, got {method!r}")
    m = Q.shape[-1] if interp is None else interp.shape[-2]
    inverse = None
    if method == "exact" or (method == "auto" and not gpytorch.settings.fast_pred_var.on()):
        inverse = _variance_inverse(Q, s.selected_inverse_limit if method == "auto" else None)
    if method == "auto":
        exact = inverse is not None or (m <= s.exact_variance_limit and not gpytorch.settings.fast_pred_var.on())
        method = "exact" if exact else "stochastic"
    if method == "exact":
        if inverse is not None:
            diagonal = diagonal_from_inverse(inverse, Q.pattern, interp)
            if diagonal is not None:
                return diagonal
        return exact_diagonal(Q, interp)
    return stochastic_diagonal(Q, interp, num_probes=s.variance_probes, num_lanczos=s.num_lanczos, generator=generator)


def _variance_inverse(Q: SparseLinearOperator, limit: int | None) -> Tensor | None:
    """``Q``'s selected inverse for exact variances, if an exact road has one and no gradient in ``Q`` is needed."""
    if torch.is_grad_enabled() and Q.values.requires_grad:
        return None  # the selected inverse is a constant: solve instead, differentiably
    if limit is not None and Q.shape[-1] > limit and Q.road(logdet=False) != "banded":
        return None  # the banded road's selected inverse is O(N b²): never limited
    return Q.selected_inverse()


#: Exact ``diag(W Q⁻¹ Wᵀ)`` (kept under its former name).
diag_inverse_quadratic = exact_diagonal


def select_rows(W: SparseLinearOperator | None, index, size: int, Q: SparseLinearOperator):
    """Rows ``index`` of ``W`` (of the identity when ``W`` is None) as a SparseLinearOperator, or None."""
    if isinstance(index, slice) and range(*index.indices(size)) == range(size):
        return W
    if W is None:
        n = Q.shape[-1]
        rows = torch.arange(*index.indices(size)) if isinstance(index, slice) else torch.as_tensor(index).reshape(-1)
        rows = rows.to(Q.device)
        pattern, _ = SparsityPattern.from_indices(torch.arange(rows.numel(), device=Q.device), rows, (rows.numel(), n))
        return SparseLinearOperator(torch.ones(rows.numel(), dtype=Q.dtype, device=Q.device), pattern=pattern)
    return W._getitem(index, slice(None))
