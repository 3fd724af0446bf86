r"""Covariances given by sparse precision matrices: ``K = W Q⁻¹ W'ᵀ`` and ``K + D``.

A Gaussian Markov random field on N latent nodes (lattice, graph, mesh) has a
sparse precision ``Q``; observations at m locations read it through a sparse
interpolation ``W`` (m × N). The covariance ``K = W Q⁻¹ Wᵀ`` is dense but is
never formed. With Gaussian noise ``D`` (diagonal) everything needed by a GP
marginal likelihood goes through the sparse *posterior precision*

    P = Q + Wᵀ D⁻¹ W                                     (sparse, N × N)
    logdet(K + D) = logdet P − logdet Q + logdet D
    yᵀ (K + D)⁻¹ y = yᵀ D⁻¹ y − bᵀ P⁻¹ b,   b = Wᵀ D⁻¹ y
    (K + D)⁻¹ v = D⁻¹ v − D⁻¹ W P⁻¹ Wᵀ D⁻¹ v              (Woodbury)

(DESIGN.md §3). This module holds the two adapters; their numerics are
gpsparse's solves and log-determinants on ``Q`` and ``P``
([`SparseLinearOperator`][gpsparse.SparseLinearOperator]), whose gradients reach the values
of ``Q``, of ``W`` and the noise.
"""

from __future__ import annotations

import math

import gpytorch
import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import gram_structure
from gpsparse.errors import DenseSizeError
from gpsparse.linalg.functional import funm
from gpsparse.linalg.variance import diagonal_from_inverse, exact_diagonal, stochastic_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "SparsePrecisionLinearOperator",
    "NoisySparsePrecisionLinearOperator",
    "interpolation_operator",
    "covariance_diagonal",
    "weighted_gram",
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


def _apply(W: SparseLinearOperator | None, x: Tensor) -> Tensor:
    return x if W is None else W._matmul(x)


def _apply_t(W: SparseLinearOperator | None, x: Tensor) -> Tensor:
    return x if W is None else W._transpose_nonbatch()._matmul(x)


class SparsePrecisionLinearOperator(LinearOperator):
    r"""The covariance ``K = W Q⁻¹ W'ᵀ`` of a Gaussian Markov random field, never formed.

    Parameters
    ----------
    Q : SparseLinearOperator
        Symmetric positive definite precision, ``(*batch, N, N)``.
    interp : torch sparse tensor or SparseLinearOperator, optional
        ``W`` (m × N): selection or interpolation weights; identity if omitted.
        Gradients reach its values when they require grad.
    right_interp : optional
        ``W'`` for cross-covariances (rectangular ``m × m'`` operators); ``W``
        if omitted.

    Notes
    -----
    * ``K v = W · solve(Q, W'ᵀ v)`` (gpsparse CG, sparse gradients).
    * With ``W = I``: ``solve = Q v`` and ``logdet = −logdet Q``.
    * ``K + D`` (``add_diagonal``, ``+ DiagLinearOperator``; what GPyTorch's
        Gaussian likelihood does) returns a
        [`NoisySparsePrecisionLinearOperator`][gpsparse.NoisySparsePrecisionLinearOperator] working through the
        posterior precision; ``D + K`` (diagonal on the left) goes through
        linear_operator's generic ``AddedDiagLinearOperator`` — write ``K + D``.
    * Scaling ``c·K`` (``ScaleKernel``) returns ``W (Q/c)⁻¹ Wᵀ``.

    Examples
    --------
    >>> import torch
    >>> from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
    >>> i = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 1, 2]])
    >>> v = torch.tensor([2.0, -1.0, -1.0, 2.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    >>> Q = SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(i, v, (3, 3), check_invariants=False))
    >>> K = SparsePrecisionLinearOperator(Q)
    >>> torch.allclose(K.to_dense(), torch.linalg.inv(Q.to_dense()))
    True
    """

    def __init__(self, Q: SparseLinearOperator, interp=None, right_interp=None):
        if not isinstance(Q, SparseLinearOperator):
            raise TypeError(f"Q must be a gpsparse.SparseLinearOperator, got {type(Q).__name__}")
        if not Q.is_symmetric:
            raise ValueError("Q must be symmetric (declared or detected) to be a precision matrix")
        num_nodes = Q.shape[-1]
        interp = interpolation_operator(interp, num_nodes, Q.device, Q.dtype)
        right_interp = interpolation_operator(right_interp, num_nodes, Q.device, Q.dtype)
        super().__init__(Q, interp=interp, right_interp=right_interp)
        self.Q, self.interp, self.right_interp = Q, interp, right_interp

    @property
    def _right(self) -> SparseLinearOperator | None:
        return self.interp if self.right_interp is None else self.right_interp

    @property
    def is_symmetric(self) -> bool:
        return self.right_interp is None or self.right_interp is self.interp

    def _size(self) -> torch.Size:
        n = self.Q.shape[-1]
        rows = n if self.interp is None else self.interp.shape[-2]
        cols = n if self._right is None else self._right.shape[-2]
        return torch.Size((*self.Q.batch_shape, rows, cols))

    def _matmul(self, rhs: Tensor) -> Tensor:
        return _apply(self.interp, self.Q.solve(_apply_t(self._right, rhs)))

    def _transpose_nonbatch(self) -> SparsePrecisionLinearOperator:
        if self.is_symmetric:
            return self
        return SparsePrecisionLinearOperator(self.Q, interp=self._right, right_interp=self.interp)

    def _expand_batch(self, batch_shape) -> SparsePrecisionLinearOperator:
        return self._with_q(self.Q._expand_batch(batch_shape))

    def _with_q(self, Q: SparseLinearOperator) -> SparsePrecisionLinearOperator:
        return SparsePrecisionLinearOperator(Q, interp=self.interp, right_interp=self.right_interp)

    def _mul_constant(self, other) -> SparsePrecisionLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        return self._with_q(self.Q._mul_constant(other.reciprocal()))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        Q = self.Q._getitem(slice(None), slice(None), *batch_indices) if batch_indices else self.Q
        rows = _select_rows(self.interp, row_index, self.shape[-2], Q)
        cols = _select_rows(self._right, col_index, self.shape[-1], Q)
        if cols is None and rows is not None:  # None on the right would mean "the same as the rows"
            cols = _select_rows(None, torch.arange(Q.shape[-1], device=Q.device), Q.shape[-1], Q)
        return SparsePrecisionLinearOperator(Q, interp=rows, right_interp=cols)

    def _diagonal(self) -> Tensor:
        """``diag(W Q⁻¹ Wᵀ)`` — see ``covariance_diagonal`` (exact or stochastic)."""
        if not self.is_symmetric:
            raise ValueError("the diagonal of a cross-covariance is not defined here")
        return covariance_diagonal(self.Q, self.interp)

    def to_dense(self) -> Tensor:
        """Dense ``W Q⁻¹ W'ᵀ`` within [`gpsparse.settings.max_dense_size`][] (solves with dense columns)."""
        rows, cols = self.shape[-2:]
        limit = gs_settings.current().max_dense_size
        if math.prod(self.shape) > limit or self.Q.shape[-1] * cols > limit:
            raise DenseSizeError(
                f"to_dense of a precision-based covariance of shape {tuple(self.shape)} exceeds "
                f"gpsparse.settings.max_dense_size = {limit:,}"
            )
        eye = torch.eye(cols, dtype=self.dtype, device=self.device)
        return self._matmul(eye.expand(*self.batch_shape, cols, cols))

    def _cholesky(self, upper: bool = False):
        self.to_dense()  # raises above the dense limit
        return super()._cholesky(upper=upper)

    # ---------------------------------------------------------------- noise
    def add_diagonal(self, diag: Tensor) -> NoisySparsePrecisionLinearOperator:
        """``K + D`` with D diagonal (scalar, ``(m,)`` or batched), kept in posterior-precision form."""
        if not self.is_symmetric:
            raise ValueError("add_diagonal needs a square, symmetric covariance")
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        m = self.shape[-1]
        if diag.dim() == 0:
            diag = diag.reshape(1)
        noise = diag.expand(*torch.broadcast_shapes(diag.shape[:-1], self.batch_shape), m)
        return NoisySparsePrecisionLinearOperator(self.Q, noise, interp=self.interp)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    # --------------------------------------------------------------- solves
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K⁻¹ R = Q R`` for ``W = I``; other ``W`` need noise (``K + D``) to be invertible in sparse form."""
        self._require_identity("solve")
        result = self.Q._matmul(right_tensor if right_tensor.dim() > 1 else right_tensor.unsqueeze(-1))
        result = result if right_tensor.dim() > 1 else result.squeeze(-1)
        return result if left_tensor is None else left_tensor @ result

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """With ``W = I``: ``yᵀ Q y`` and ``−logdet Q`` (gpsparse's log-determinant of ``Q``)."""
        self._require_identity("inv_quad_logdet")
        quad = torch.zeros([], dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            quad = (rhs * self.Q._matmul(rhs)).sum(-2)
            quad = quad.sum(-1) if reduce_inv_quad else quad
        logdet_term = -self.Q.logdet() if logdet else torch.zeros([], dtype=self.dtype, device=self.device)
        return quad, logdet_term

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        """Samples of ``N(0, W Q⁻¹ Wᵀ)`` as ``W Q^{-1/2} z`` (Lanczos ``f(Q)v``, full rank; never a dense root)."""
        if not self.is_symmetric:
            raise ValueError("samples need a square, symmetric covariance")
        return _prior_samples(self.Q, self.interp, num_samples)

    def _require_identity(self, what: str) -> None:
        if self.interp is not None or self.right_interp is not None:
            raise NotImplementedError(
                f"{what} of W Q⁻¹ Wᵀ with a non-identity W has no sparse form (the matrix is dense and may be "
                "singular); add observation noise (K + D, as GPyTorch's GaussianLikelihood does), which works "
                "through the sparse posterior precision P = Q + WᵀD⁻¹W"
            )


class NoisySparsePrecisionLinearOperator(LinearOperator):
    r"""``K_y = W Q⁻¹ Wᵀ + D`` through the sparse posterior precision ``P = Q + Wᵀ D⁻¹ W``.

    Parameters
    ----------
    Q : SparseLinearOperator
        Symmetric positive definite precision ``(*batch, N, N)``.
    noise : Tensor
        Positive diagonal ``d`` of ``D``, ``(*batch, m)``.
    interp : SparseLinearOperator, optional
        ``W`` (m × N); identity if omitted.

    Notes
    -----
    ``inv_quad_logdet`` uses ``logdet K_y = logdet P − logdet Q + Σ log d`` and
    ``yᵀK_y⁻¹y = yᵀD⁻¹y − bᵀP⁻¹b`` (``b = WᵀD⁻¹y``): one inverse-quadratic-
    log-determinant of ``P`` (one batched Krylov run in Hutchinson mode) and
    one log-determinant of ``Q``; solves use Woodbury with one solve in ``P``.
    Gradients reach the values of ``Q`` and ``W`` and the noise.
    """

    def __init__(self, Q: SparseLinearOperator, noise: Tensor, interp: SparseLinearOperator | None = None):
        if not isinstance(Q, SparseLinearOperator) or not Q.is_symmetric:
            raise TypeError("Q must be a symmetric gpsparse.SparseLinearOperator")
        interp = interpolation_operator(interp, Q.shape[-1], Q.device, Q.dtype)
        m = Q.shape[-1] if interp is None else interp.shape[-2]
        if noise.shape[-1] != m:
            raise ValueError(f"noise has {noise.shape[-1]} entries but the covariance has {m} rows")
        if not bool(torch.isfinite(noise.detach()).all()) or bool((noise.detach() <= 0).any()):
            raise ValueError("the noise variances must be finite and positive")
        super().__init__(Q, noise, interp=interp)
        self.Q, self.noise, self.interp = Q, noise, interp

    def _size(self) -> torch.Size:
        m = self.noise.shape[-1]
        return torch.Size((*torch.broadcast_shapes(self.Q.batch_shape, self.noise.shape[:-1]), m, m))

    @property
    def covariance(self) -> SparsePrecisionLinearOperator:
        """The noise-free part ``W Q⁻¹ Wᵀ``."""
        return SparsePrecisionLinearOperator(self.Q, interp=self.interp)

    def posterior_precision(self) -> SparseLinearOperator:
        """``P = Q + Wᵀ D⁻¹ W`` as a SparseLinearOperator (differentiable in Q, W and the noise)."""
        inv_noise = self.noise.reciprocal()
        if self.interp is None:
            return self.Q.add_diagonal(inv_noise)
        return self.Q + weighted_gram(self.interp, inv_noise)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.covariance._matmul(rhs) + self.noise.unsqueeze(-1) * rhs

    def _transpose_nonbatch(self) -> NoisySparsePrecisionLinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return self.covariance._diagonal() + self.noise

    def _mul_constant(self, other) -> NoisySparsePrecisionLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        c = other.unsqueeze(-1) if other.dim() else other
        return NoisySparsePrecisionLinearOperator(self.Q._mul_constant(other.reciprocal()), self.noise * c, self.interp)

    def add_diagonal(self, diag: Tensor) -> NoisySparsePrecisionLinearOperator:
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        return NoisySparsePrecisionLinearOperator(self.Q, self.noise + diag, self.interp)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def to_dense(self) -> Tensor:
        return self.covariance.to_dense() + torch.diag_embed(self.noise)

    def _cholesky(self, upper: bool = False):
        self.covariance.to_dense()  # raises above the dense limit
        return super()._cholesky(upper=upper)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K_y⁻¹ R = D⁻¹R − D⁻¹ W P⁻¹ Wᵀ D⁻¹ R`` (Woodbury; one solve in ``P``)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        scaled = rhs / self.noise.unsqueeze(-1)
        correction = _apply(self.interp, self.posterior_precision().solve(_apply_t(self.interp, scaled)))
        result = scaled - correction / self.noise.unsqueeze(-1)
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``yᵀK_y⁻¹y`` and ``logdet K_y`` through ``P`` (module docstring); exact paths per Q/P structure."""
        P = self.posterior_precision()
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        quad = zero
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            scaled = rhs / self.noise.unsqueeze(-1)
            b = _apply_t(self.interp, scaled)
            quad_p, logdet_p = P.inv_quad_logdet(b, logdet=logdet, reduce_inv_quad=False)
            quad = (rhs * scaled).sum(-2) - quad_p
            quad = quad.sum(-1) if reduce_inv_quad else quad
        elif logdet:
            logdet_p = P.logdet()
        if not logdet:
            return quad, zero
        logdet_term = logdet_p - self.Q.logdet() + self.noise.log().sum(-1)
        return quad, logdet_term

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        """Samples ``W Q^{-1/2} z₁ + D^{1/2} z₂`` (Lanczos ``f(Q)v`` for the latent part)."""
        latent = self.covariance.zero_mean_mvn_samples(num_samples)
        return latent + self.noise.sqrt() * torch.randn_like(latent)


def _prior_samples(Q: SparseLinearOperator, interp, num_samples: int) -> Tensor:
    """``W Q^{-1/2} z`` for ``z ~ N(0, I)``: samples of ``N(0, W Q⁻¹ Wᵀ)`` (Lanczos ``f(Q)v``)."""
    n = Q.shape[-1]
    base = torch.randn(*Q.batch_shape, n, num_samples, dtype=Q.dtype, device=Q.device)
    latent = funm(Q, base, "inv_sqrt", num_lanczos=gs_settings.current().num_lanczos, reorthogonalize=False)
    return _apply(interp, latent).movedim(-1, 0)


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
    * ``"auto"``: exact when a selected inverse is available and ``Q`` has at
      most ``selected_inverse_limit`` nodes, or up to ``exact_variance_limit``
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
    if limit is not None and Q.shape[-1] > limit:
        return None
    return Q.selected_inverse()


#: Exact ``diag(W Q⁻¹ Wᵀ)`` (kept under its former name).
diag_inverse_quadratic = exact_diagonal


def _select_rows(W: SparseLinearOperator | None, index, size: int, Q: SparseLinearOperator):
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
