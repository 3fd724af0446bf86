r"""Sparse operators whose log-determinant is known in closed form.

Some precisions come with their spectrum: ``Q = τ (κ² I + L)^α`` on a
regular lattice with Neumann boundaries has the Laplacian eigenvalues
``λ_k = Σ_d (2 − 2 cos(π k_d / m_d)) / h_d²`` (``gpsparse.kernels.lattice``),
so ``log det Q = N log τ + α Σ_k log(κ² + λ_k)`` costs O(N), is exact, and is
differentiable in ``κ`` and ``τ`` by plain autograd. The operator below carries
that value beside the values: its ``logdet`` / ``inv_quad_logdet`` return it
instead of estimating (stochastic Lanczos quadrature) or factorising.

Products, solves and the quadratic term are those of
[`SparseLinearOperator`][gpsparse.SparseLinearOperator]. Operations that keep the closed
form (scaling by positive constants, batch expansion, permutation and
selection of batch members, transposition) keep the type; every other
operation (``add_diagonal``, sums, row/column indexing) returns a plain
[`SparseLinearOperator`][gpsparse.SparseLinearOperator], whose log-determinant then goes
through the general paths.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["KnownLogdetSparseLinearOperator"]


class KnownLogdetSparseLinearOperator(SparseLinearOperator):
    r"""A symmetric positive definite sparse operator with a closed-form ``log det``.

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` stored values (the pattern must be declared symmetric).
    logdet : Tensor
        ``(*batch)`` — ``log det`` of each matrix of the batch, a differentiable
        function of the same parameters as ``values``. The caller guarantees
        it is the log-determinant of the matrix the values define; it is not
        checked (that would cost a factorisation).
    pattern : SparsityPattern
        Symmetric pattern.

    Notes
    -----
    ``c · A`` for a constant ``c > 0`` (scalar or per batch) has
    ``log det = log det A + n log c`` and keeps the type (GPyTorch's
    ``ScaleKernel`` scales a precision this way).

    Examples
    --------
    >>> import torch
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> pattern, _ = SparsityPattern.from_indices(torch.arange(3), torch.arange(3), (3, 3))
    >>> pattern = pattern.with_symmetric(True)
    >>> values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> A = KnownLogdetSparseLinearOperator(values, values.log().sum(), pattern=pattern)
    >>> round(float((A * 2.0).logdet().exp()), 10)  # det(2A) = 2³ · 8
    64.0
    """

    def __init__(self, values: Tensor, logdet: Tensor, *, pattern: SparsityPattern):
        SparseLinearOperator.__init__(self, values, pattern=pattern)
        if not pattern.symmetric:
            raise ValueError("a known log-determinant needs a symmetric pattern (a symmetric positive definite matrix)")
        if not isinstance(logdet, Tensor) or logdet.shape != values.shape[:-1]:
            shape = tuple(logdet.shape) if isinstance(logdet, Tensor) else type(logdet).__name__
            raise ValueError(f"logdet must have the batch shape {tuple(values.shape[:-1])} of the values, got {shape}")
        if logdet.dtype != values.dtype or logdet.device != values.device:
            raise ValueError("logdet must have the dtype and device of the values")
        LinearOperator.__init__(self, values, logdet, pattern=pattern)  # register both tensors
        self.known_logdet = logdet

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return (*super()._bilinear_derivative(left_vecs, right_vecs), None)

    def _expand_batch(self, batch_shape) -> KnownLogdetSparseLinearOperator:
        batch_shape = torch.Size(batch_shape)
        values = self.values.expand(*batch_shape, self.pattern.nnz)
        return KnownLogdetSparseLinearOperator(values, self.known_logdet.expand(batch_shape), pattern=self.pattern)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        result = super()._getitem(row_index, col_index, *batch_indices)
        if not isinstance(result, SparseLinearOperator) or result.pattern is not self.pattern:
            return result  # rows or columns were selected: no closed form
        logdet = self.known_logdet[batch_indices] if batch_indices else self.known_logdet
        if logdet.shape != result.values.shape[:-1]:
            return result
        return KnownLogdetSparseLinearOperator(result.values, logdet, pattern=self.pattern)

    def _mul_constant(self, other) -> SparseLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        scaled = super()._mul_constant(other)
        if not bool((other > 0).all()):
            return scaled
        logdet = self.known_logdet + self.pattern.size[0] * other.log()
        if logdet.shape != scaled.values.shape[:-1]:
            logdet = logdet.expand(scaled.values.shape[:-1])
        return KnownLogdetSparseLinearOperator(scaled.values, logdet, pattern=self.pattern)

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """The quadratic term as ``SparseLinearOperator`` computes it; the known ``log det``."""
        if not logdet:
            return super().inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)
        quad = self.values.new_zeros(())
        logdet_term = self.known_logdet
        if inv_quad_rhs is not None:
            quad = self.inv_quad(inv_quad_rhs, reduce_inv_quad=reduce_inv_quad)
            rhs_batch = inv_quad_rhs.shape[:-2] if inv_quad_rhs.dim() > 1 else torch.Size()
            batch = torch.broadcast_shapes(logdet_term.shape, rhs_batch)
            if batch != logdet_term.shape:
                logdet_term = logdet_term.expand(batch)
        return quad, logdet_term
