r"""Covariances given by sparse precision matrices: ``K = ±W Q⁻¹ W'ᵀ`` and ``±(K + D)``.

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
([`SparseLinearOperator`][gpsparse.SparseLinearOperator], the difference
``logdet P − logdet Q`` by ``gpsparse.linalg.dispatch.logdet_difference``),
whose gradients reach the values of ``Q``, of ``W`` and the noise. The shared
parts (``W``, the weighted Gram ``WᵀD⁻¹W``, variances, prior samples) live in
``gpsparse.operators.gmrf`` and are re-exported here.

*Scaling.* ``c · K`` for ``c > 0`` folds into the precision, ``W (Q/c)⁻¹ Wᵀ``
(and ``c·D`` for the noisy form). A negative ``c`` folds ``|c|`` the same way
and records ``sign = −1``: products, ``to_dense``, the diagonal, indexing,
transposition and batch expansion carry the sign, ``solve(−K) = −solve(K)``,
``inv_quad(−K) = −inv_quad(K)``, and ``log det(−K) = log det K + m·log(−1)``
is what ``torch.logdet`` returns for the dense matrix: ``log det K`` for even
``m``, NaN for odd ``m`` (a negative determinant). ``c = 0`` gives linear_operator's
``ZeroLinearOperator``; a batch of constants of mixed signs gives
linear_operator's generic ``ConstantMulLinearOperator``.
"""

from __future__ import annotations

import math

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.errors import DenseSizeError, NotPositiveDefiniteError
from gpsparse.linalg import dispatch
from gpsparse.operators.block import block_diagonal, component_offsets, hstack_interpolations
from gpsparse.operators.gmrf import (
    apply,
    apply_t,
    covariance_diagonal,
    diag_inverse_quadratic,
    interpolation_operator,
    prior_samples,
    select_rows,
    weighted_gram,
)
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "SparsePrecisionLinearOperator",
    "NoisySparsePrecisionLinearOperator",
    "interpolation_operator",
    "covariance_diagonal",
    "weighted_gram",
    "diag_inverse_quadratic",
]


class DenseLimitedCovariance:
    """``to_dense`` and dense Cholesky of a covariance ``W Σ W'ᵀ`` over a precision ``self.Q``, within the dense limit.

    Shared by the precision-based covariances (``SparsePrecisionLinearOperator``,
    ``ConstrainedPrecisionLinearOperator``): the dense matrix is built by ``self._matmul``
    of identity columns, i.e. ``batch · N · m`` solve entries, so both ``K`` (``m × m``) and
    those solves must fit [`gpsparse.settings.max_dense_size`][].
    """

    def to_dense(self) -> Tensor:
        """Dense ``K`` within [`gpsparse.settings.max_dense_size`][] (solves with dense identity columns)."""
        self._check_dense(f"to_dense of a {type(self).__name__}")
        cols = self.shape[-1]
        eye = torch.eye(cols, dtype=self.dtype, device=self.device)
        return self._matmul(eye.expand(*self.batch_shape, cols, cols))

    def _check_dense(self, what: str) -> None:
        """Raise ``DenseSizeError`` when ``K`` or its m solves in ``Q`` exceed the dense limit."""
        if not self._dense_fits():
            raise DenseSizeError(
                f"{what} of shape {tuple(self.shape)} exceeds gpsparse.settings.max_dense_size = "
                f"{gs_settings.current().max_dense_size:,}"
            )

    def _dense_fits(self) -> bool:
        limit = gs_settings.current().max_dense_size
        return math.prod(self.shape) <= limit and self.batch_shape.numel() * self.Q.shape[-1] * self.shape[-1] <= limit

    def _cholesky(self, upper: bool = False):
        self.to_dense()  # raises above the dense limit
        return super()._cholesky(upper=upper)


class SparsePrecisionLinearOperator(DenseLimitedCovariance, LinearOperator):
    r"""The covariance ``K = s · W Q⁻¹ W'ᵀ`` of a Gaussian Markov random field, never formed (``s = ±1``).

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
    sign : float
        ``+1`` (a covariance, the default) or ``−1`` (a negated covariance,
        what ``K * c`` for ``c < 0``, ``−K`` and ``c − K`` produce; module notes).
    components : tuple of int, optional
        Node offsets ``(0, N_1, N_1 + N_2, …, N)`` when ``K`` is a sum of
        independent fields (what ``K_1 + K_2`` records; ``gpsparse.operators.block``);
        None for one field.

    Notes
    -----
    * ``K v = s · W · solve(Q, W'ᵀ v)`` (gpsparse CG, sparse gradients).
    * With ``W = I``: ``solve = s · Q v`` and ``logdet = −logdet Q`` (sign: module notes).
    * With another ``W`` (m × N, full row rank, so ``K`` is SPD): there is no
        sparse form of ``K⁻¹`` or ``log det K``. Solves, inverse quadratic forms
        and log-determinants form ``K`` densely (m solves in ``Q``, differentiable)
        and factorise it (dense Cholesky) when ``N·m`` and ``m²`` (times the batch)
        are within [`gpsparse.settings.max_dense_size`][]; above the limit they
        raise ``NotImplementedError`` naming the way out — observation noise
        (``K + D``), which works through the sparse posterior precision.
    * ``K + D`` (``add_diagonal``, ``+ DiagLinearOperator``; what GPyTorch's
        Gaussian likelihood does) returns a
        [`NoisySparsePrecisionLinearOperator`][gpsparse.NoisySparsePrecisionLinearOperator] working through the
        posterior precision; ``D + K`` (diagonal on the left) goes through
        linear_operator's generic ``AddedDiagLinearOperator`` — write ``K + D``.
        So does ``D − K`` (``sign = −1``), which need not be definite.
    * Scaling ``c·K`` (``ScaleKernel``) returns ``W (Q/|c|)⁻¹ Wᵀ`` with the sign of ``c``.
    * ``K_1 + K_2 + …`` of sparse-precision covariances with ``sign = +1`` and
        equal shapes (what ``gpytorch.kernels.AdditiveKernel`` forms) is
        ``W Q⁻¹ W'ᵀ`` with ``W = [W_1 W_2 …]``, ``W' = [W'_1 W'_2 …]`` and
        ``Q = blockdiag(Q_1, Q_2, …)`` (known log-determinants summed), the
        node offsets of the terms in ``components``; sums of sums flatten.
        Negated terms, or other shapes, dtypes or devices, give linear_operator's
        generic ``SumLinearOperator``.

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
    >>> torch.allclose((-2.0 * K).to_dense(), -2.0 * torch.linalg.inv(Q.to_dense()))
    True
    """

    def __init__(self, Q: SparseLinearOperator, interp=None, right_interp=None, *, sign: float = 1.0, components=None):
        if not isinstance(Q, SparseLinearOperator):
            raise TypeError(f"Q must be a gpsparse.SparseLinearOperator, got {type(Q).__name__}")
        if not Q.is_symmetric:
            raise ValueError("Q must be symmetric (declared or detected) to be a precision matrix")
        sign = _check_sign(sign)
        num_nodes = Q.shape[-1]
        interp = interpolation_operator(interp, num_nodes, Q.device, Q.dtype)
        right_interp = interpolation_operator(right_interp, num_nodes, Q.device, Q.dtype)
        components = _check_components(components, num_nodes)
        super().__init__(Q, interp=interp, right_interp=right_interp, sign=sign, components=components)
        self.Q, self.interp, self.right_interp, self.sign = Q, interp, right_interp, sign
        self.components = components

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
        return _signed(self.sign, apply(self.interp, self.Q.solve(apply_t(self._right, rhs))))

    def _transpose_nonbatch(self) -> SparsePrecisionLinearOperator:
        if self.is_symmetric:
            return self
        return SparsePrecisionLinearOperator(
            self.Q, interp=self._right, right_interp=self.interp, sign=self.sign, components=self.components
        )

    def _expand_batch(self, batch_shape) -> SparsePrecisionLinearOperator:
        return self._with(Q=self.Q._expand_batch(batch_shape))

    def _with(self, *, Q: SparseLinearOperator | None = None, sign: float | None = None):
        return SparsePrecisionLinearOperator(
            self.Q if Q is None else Q,
            interp=self.interp,
            right_interp=self.right_interp,
            sign=self.sign if sign is None else sign,
            components=self.components,
        )

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        sign = _constant_sign(other)
        if sign is None:  # a batch of constants of mixed signs (or zeros among them)
            return super()._mul_constant(other)
        if sign == 0.0:
            return _zero(self, other)
        return self._with(Q=self.Q._mul_constant(other.abs().reciprocal()), sign=self.sign * sign)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        Q = self.Q._getitem(slice(None), slice(None), *batch_indices) if batch_indices else self.Q
        rows = select_rows(self.interp, row_index, self.shape[-2], Q)
        cols = select_rows(self._right, col_index, self.shape[-1], Q)
        if cols is None and rows is not None:  # None on the right would mean "the same as the rows"
            cols = select_rows(None, torch.arange(Q.shape[-1], device=Q.device), Q.shape[-1], Q)
        return SparsePrecisionLinearOperator(
            Q, interp=rows, right_interp=cols, sign=self.sign, components=self.components
        )

    def _diagonal(self) -> Tensor:
        """``s · diag(W Q⁻¹ Wᵀ)`` — see ``covariance_diagonal`` (exact or stochastic)."""
        if not self.is_symmetric:
            raise ValueError("the diagonal of a cross-covariance is not defined here")
        return _signed(self.sign, covariance_diagonal(self.Q, self.interp))

    # ---------------------------------------------------------------- noise
    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``K + D`` with D diagonal (scalar, ``(m,)`` or batched), kept in posterior-precision form.

        A negated covariance (``sign = −1``) gives linear_operator's generic
        ``AddedDiagLinearOperator`` (``D − W Q⁻¹ Wᵀ`` need not be definite).
        """
        if not self.is_symmetric:
            raise ValueError("add_diagonal needs a square, symmetric covariance")
        if self.sign < 0:
            return super().add_diagonal(diag)
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        m = self.shape[-1]
        if diag.dim() == 0:
            diag = diag.reshape(1)
        noise = diag.expand(*torch.broadcast_shapes(diag.shape[:-1], self.batch_shape), m)
        return NoisySparsePrecisionLinearOperator(self.Q, noise, interp=self.interp, components=self.components)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        if isinstance(other, SparsePrecisionLinearOperator) and self._sums_with(other):
            return self._add_precision(other)
        return super().__add__(other)

    def _sums_with(self, other: SparsePrecisionLinearOperator) -> bool:
        """Whether ``self + other`` stays a sparse-precision covariance (class notes)."""
        return (
            self.sign > 0
            and other.sign > 0
            and self.matrix_shape == other.matrix_shape
            and self.dtype == other.dtype
            and self.device == other.device
        )

    def _add_precision(self, other: SparsePrecisionLinearOperator) -> SparsePrecisionLinearOperator:
        """``W Q⁻¹ W'ᵀ`` with ``W = [W_1 W_2]``, ``Q = blockdiag(Q_1, Q_2)`` (``gpsparse.operators.block``)."""
        nodes = (self.Q.shape[-1], other.Q.shape[-1])
        rows, cols = self.matrix_shape
        Q = block_diagonal((self.Q, other.Q))
        interp = hstack_interpolations((self.interp, other.interp), nodes, rows, self.device, self.dtype)
        right = None
        if not (self.is_symmetric and other.is_symmetric):
            right = hstack_interpolations((self._right, other._right), nodes, cols, self.device, self.dtype)
        components = component_offsets(self.components, nodes[0], other.components, nodes[1])
        return SparsePrecisionLinearOperator(Q, interp=interp, right_interp=right, components=components)

    def __neg__(self):
        """``−K`` (the sign flips; linear_operator defines no unary minus)."""
        return self._with(sign=-self.sign)

    # --------------------------------------------------------------- solves
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K⁻¹ R``: ``s · Q R`` for ``W = I``; a dense Cholesky of ``K`` for other ``W`` (class notes)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        if self.interp is None and self.right_interp is None:
            result = _signed(self.sign, self.Q._matmul(rhs))
        else:
            factor = self._dense_factor("solve")
            batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-2])
            result = _signed(
                self.sign,
                torch.cholesky_solve(rhs.expand(*batch, *rhs.shape[-2:]), factor.expand(*batch, *factor.shape[-2:])),
            )
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``s · yᵀ K⁻¹ y`` and ``log det(s K)``.

        ``W = I``: ``s · yᵀ Q y`` and ``−logdet Q`` (gpsparse's log-determinant of
        ``Q``: banded, CHOLMOD, dense or SLQ). Other ``W``: a dense Cholesky of
        ``K`` (class notes). For ``s = −1`` the log-determinant is the dense
        ``torch.logdet``'s: the same for even ``m``, NaN for odd ``m``.
        """
        if inv_quad_rhs is None and not logdet:
            raise ValueError("Either `inv_quad_rhs` or `logdet` must be specified.")
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        quad = logdet_term = zero
        rhs = None
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        if self.interp is None and self.right_interp is None:
            if rhs is not None:
                quad = (rhs * self.Q._matmul(rhs)).sum(-2)
            if logdet:
                logdet_term = -self.Q.logdet()
        else:
            factor = self._dense_factor("inv_quad_logdet")
            if rhs is not None:
                batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-2])
                half = torch.linalg.solve_triangular(
                    factor.expand(*batch, *factor.shape[-2:]), rhs.expand(*batch, *rhs.shape[-2:]), upper=False
                )
                quad = half.pow(2).sum(-2)
            if logdet:
                logdet_term = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        if rhs is not None:
            quad = _signed(self.sign, quad)
            quad = quad.sum(-1) if reduce_inv_quad else quad
        if logdet:
            logdet_term = _signed_logdet(logdet_term, self.sign, self.shape[-1])
        return quad, logdet_term

    def _dense_factor(self, what: str) -> Tensor:
        """Cholesky factor ``L`` ``(*batch, m, m)`` of ``W Q⁻¹ Wᵀ`` (unsigned), formed densely (class notes)."""
        if not self.is_symmetric:
            raise ValueError(f"{what} needs a square, symmetric covariance")
        if not self._dense_fits():
            raise NotImplementedError(
                f"{what} of W Q⁻¹ Wᵀ with a non-identity W has no sparse form (the matrix is dense and may be "
                f"singular); it is formed densely only within gpsparse.settings.max_dense_size = "
                f"{gs_settings.current().max_dense_size:,}, which shape {tuple(self.shape)} exceeds. Add observation "
                "noise (K + D, as GPyTorch's GaussianLikelihood does), which works through the sparse posterior "
                "precision P = Q + WᵀD⁻¹W, or raise the limit"
            )
        dense = _signed(self.sign, self.to_dense())  # the unsigned matrix
        factor, info = torch.linalg.cholesky_ex(0.5 * (dense + dense.mT))
        if bool((info > 0).any()):
            raise NotPositiveDefiniteError(
                f"{what}: W Q⁻¹ Wᵀ is not positive definite to working precision (leading minor of order "
                f"{int(info[info > 0].reshape(-1)[0])}); W needs full row rank — or add observation noise (K + D)"
            )
        return factor

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        """Samples of ``N(0, W Q⁻¹ Wᵀ)`` as ``W Q^{-1/2} z`` (Lanczos ``f(Q)v``, full rank; never a dense root)."""
        if not self.is_symmetric or self.sign < 0:
            raise ValueError("samples need a square, symmetric, positive semi-definite covariance (sign +1)")
        return prior_samples(self.Q, self.interp, num_samples)


class NoisySparsePrecisionLinearOperator(LinearOperator):
    r"""``K_y = s · (W Q⁻¹ Wᵀ + D)`` through the sparse posterior precision ``P = Q + Wᵀ D⁻¹ W`` (``s = ±1``).

    Parameters
    ----------
    Q : SparseLinearOperator
        Symmetric positive definite precision ``(*batch, N, N)``.
    noise : Tensor
        Positive diagonal ``d`` of ``D``, ``(*batch, m)``.
    interp : SparseLinearOperator, optional
        ``W`` (m × N); identity if omitted.
    sign : float
        ``+1`` (default) or ``−1`` (``K_y * c`` for ``c < 0``; module notes).
    components : tuple of int, optional
        Node offsets of the summed fields (as in
        [`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]).

    Notes
    -----
    ``inv_quad_logdet`` uses ``logdet K_y = logdet P − logdet Q + Σ log d`` and
    ``yᵀK_y⁻¹y = yᵀD⁻¹y − bᵀP⁻¹b`` (``b = WᵀD⁻¹y``). The difference
    ``logdet P − logdet Q`` comes from
    ``gpsparse.linalg.dispatch.logdet_difference``: exact (banded, CHOLMOD,
    dense; dense for ``N ≤ 1024`` within the dense limit even where the
    dispatcher would estimate, as two estimates of values of order N differ by
    far more than their difference) or, for large N, stochastic Lanczos
    quadrature with the same probes for ``P`` and ``Q`` (common random numbers),
    whose standard error is estimated from groups of probes and reported by an
    [`EstimatorAccuracyWarning`][gpsparse.errors.EstimatorAccuracyWarning] when it
    exceeds ``0.1·|difference| + 0.05``. A closed-form ``logdet Q``
    ([`KnownLogdetSparseLinearOperator`][gpsparse.operators.known_logdet.KnownLogdetSparseLinearOperator])
    is used as is. Solves use Woodbury with one solve in ``P``. Gradients reach the values of ``Q`` and
    ``W`` and the noise.
    """

    def __init__(
        self,
        Q: SparseLinearOperator,
        noise: Tensor,
        interp: SparseLinearOperator | None = None,
        *,
        sign: float = 1.0,
        components=None,
    ):
        if not isinstance(Q, SparseLinearOperator) or not Q.is_symmetric:
            raise TypeError("Q must be a symmetric gpsparse.SparseLinearOperator")
        sign = _check_sign(sign)
        interp = interpolation_operator(interp, Q.shape[-1], Q.device, Q.dtype)
        m = Q.shape[-1] if interp is None else interp.shape[-2]
        if noise.shape[-1] != m:
            raise ValueError(f"noise has {noise.shape[-1]} entries but the covariance has {m} rows")
        if not bool(torch.isfinite(noise.detach()).all()) or bool((noise.detach() <= 0).any()):
            raise ValueError("the noise variances must be finite and positive")
        components = _check_components(components, Q.shape[-1])
        super().__init__(Q, noise, interp=interp, sign=sign, components=components)
        self.Q, self.noise, self.interp, self.sign = Q, noise, interp, sign
        self.components = components

    def _size(self) -> torch.Size:
        m = self.noise.shape[-1]
        return torch.Size((*torch.broadcast_shapes(self.Q.batch_shape, self.noise.shape[:-1]), m, m))

    @property
    def covariance(self) -> SparsePrecisionLinearOperator:
        """The noise-free part ``s · W Q⁻¹ Wᵀ``."""
        return SparsePrecisionLinearOperator(self.Q, interp=self.interp, sign=self.sign, components=self.components)

    def posterior_precision(self) -> SparseLinearOperator:
        """``P = Q + Wᵀ D⁻¹ W`` as a SparseLinearOperator (differentiable in Q, W and the noise)."""
        inv_noise = self.noise.reciprocal()
        if self.interp is None:
            return self.Q.add_diagonal(inv_noise)
        return self.Q + weighted_gram(self.interp, inv_noise)

    def _with(self, *, Q=None, noise=None, sign=None) -> NoisySparsePrecisionLinearOperator:
        return NoisySparsePrecisionLinearOperator(
            self.Q if Q is None else Q,
            self.noise if noise is None else noise,
            self.interp,
            sign=self.sign if sign is None else sign,
            components=self.components,
        )

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.covariance._matmul(rhs) + _signed(self.sign, self.noise.unsqueeze(-1) * rhs)

    def _transpose_nonbatch(self) -> NoisySparsePrecisionLinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> NoisySparsePrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        return self._with(Q=self.Q._expand_batch(batch_shape), noise=self.noise.expand(*batch_shape, self.shape[-1]))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        full = all(isinstance(i, slice) and i == slice(None) for i in (row_index, col_index))
        if not (full and batch_indices):  # rows or columns: linear_operator's interpolation
            return super()._getitem(row_index, col_index, *batch_indices)
        Q = self.Q if self.Q.batch_shape == self.batch_shape else self.Q._expand_batch(self.batch_shape)
        noise = self.noise.expand(*self.batch_shape, self.shape[-1])
        return self._with(
            Q=Q._getitem(slice(None), slice(None), *batch_indices), noise=noise[(*batch_indices, slice(None))]
        )

    def _diagonal(self) -> Tensor:
        return self.covariance._diagonal() + _signed(self.sign, self.noise)

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        sign = _constant_sign(other)
        if sign is None:  # a batch of constants of mixed signs (or zeros among them)
            return super()._mul_constant(other)
        if sign == 0.0:
            return _zero(self, other)
        scale = other.abs()
        noise = self.noise * (scale.unsqueeze(-1) if scale.dim() else scale)
        return self._with(Q=self.Q._mul_constant(scale.reciprocal()), noise=noise, sign=self.sign * sign)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``K_y + E``: the noise becomes ``d + e`` (``d − e`` for ``s = −1``; the generic sum if not positive)."""
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if self.sign > 0:
            return self._with(noise=self.noise + diag)
        noise = self.noise - diag
        if bool(torch.isfinite(noise.detach()).all()) and bool((noise.detach() > 0).all()):
            return self._with(noise=noise)
        return super().add_diagonal(diag)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def __neg__(self):
        """``−K`` (the sign flips; linear_operator defines no unary minus)."""
        return self._with(sign=-self.sign)

    def to_dense(self) -> Tensor:
        return self.covariance.to_dense() + _signed(self.sign, torch.diag_embed(self.noise))

    def _cholesky(self, upper: bool = False):
        self.covariance.to_dense()  # raises above the dense limit
        return super()._cholesky(upper=upper)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K_y⁻¹ R = s · (D⁻¹R − D⁻¹ W P⁻¹ Wᵀ D⁻¹ R)`` (Woodbury; one solve in ``P``)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        scaled = rhs / self.noise.unsqueeze(-1)
        correction = apply(self.interp, self.posterior_precision().solve(apply_t(self.interp, scaled)))
        result = _signed(self.sign, scaled - correction / self.noise.unsqueeze(-1))
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``s · yᵀK_y⁻¹y`` and ``logdet(s K_y)`` through ``P`` (module docstring; class notes for the roads)."""
        if inv_quad_rhs is None and not logdet:
            raise ValueError("Either `inv_quad_rhs` or `logdet` must be specified.")
        P = self.posterior_precision()
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        quad = logdet_term = zero
        b = rhs = None
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            scaled = rhs / self.noise.unsqueeze(-1)
            b = apply_t(self.interp, scaled)
        if logdet:
            known = self.Q.logdet() if isinstance(self.Q, KnownLogdetSparseLinearOperator) else None  # closed form
            quad_p, difference, _ = dispatch.logdet_difference(
                P.values,
                P.pattern,
                P._road_config(dense=True),
                self.Q.values,
                self.Q.pattern,
                self.Q._road_config(dense=True),
                rhs=b,
                known_b=known,
            )
            logdet_term = _signed_logdet(difference + self.noise.log().sum(-1), self.sign, self.shape[-1])
        elif b is not None:
            quad_p = P.inv_quad(b, reduce_inv_quad=False)
        if rhs is not None:
            quad = _signed(self.sign, (rhs * scaled).sum(-2) - quad_p)
            quad = quad.sum(-1) if reduce_inv_quad else quad
        return quad, logdet_term

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        """Samples ``W Q^{-1/2} z₁ + D^{1/2} z₂`` (Lanczos ``f(Q)v`` for the latent part)."""
        if self.sign < 0:
            raise ValueError("samples need a positive definite covariance (sign +1)")
        latent = self.covariance.zero_mean_mvn_samples(num_samples)
        return latent + self.noise.sqrt() * torch.randn_like(latent)


def _check_sign(sign) -> float:
    sign = float(sign)
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    return sign


def _check_components(components, num_nodes: int) -> tuple[int, ...] | None:
    if components is None:
        return None
    components = tuple(int(c) for c in components)
    if len(components) < 2 or components[0] != 0 or components[-1] != num_nodes:
        raise ValueError(f"components must be node offsets from 0 to {num_nodes}, got {components}")
    if any(b < a for a, b in zip(components, components[1:])):
        raise ValueError(f"components must be non-decreasing node offsets, got {components}")
    return components


def _signed(sign: float, tensor: Tensor) -> Tensor:
    return tensor if sign > 0 else -tensor


def _signed_logdet(logdet: Tensor, sign: float, size: int) -> Tensor:
    """``log det(s A)`` from ``log det A`` (A of ``size`` rows), as ``torch.logdet``: NaN for a negative determinant."""
    if sign > 0 or size % 2 == 0:
        return logdet
    return logdet + math.nan


def _constant_sign(other: Tensor) -> float | None:
    """``+1`` / ``−1`` / ``0`` when every constant is positive / negative / zero; None when they differ."""
    detached = other.detach()
    for sign, test in ((1.0, detached > 0), (-1.0, detached < 0), (0.0, detached == 0)):
        if bool(test.all()):
            return sign
    return None


def _zero(op: LinearOperator, other: Tensor) -> ZeroLinearOperator:
    batch = torch.broadcast_shapes(op.batch_shape, other.shape)
    return ZeroLinearOperator(*batch, *op.matrix_shape, dtype=op.dtype, device=op.device)
