"""``SparseLinearOperator``: a linear_operator ``LinearOperator`` backed by a sparse matrix.

An adapter (DESIGN.md §1): it validates, lays out operands and delegates to
the Functions in ``gpsparse.autograd.sparse``; it has no numerics of its own.

Every path linear_operator or GPyTorch reaches is overridden so that nothing
densifies: products are CSR SpMMs, gradients are sampled products at the
stored entries, solves are gpsparse's Krylov solvers (also below
linear_operator's ``max_cholesky_size``), sums with diagonals and scalings
keep the type. Dense materialisation (``to_dense``, dense Cholesky and
eigendecompositions) is allowed up to [`gpsparse.settings.max_dense_size`][]
elements and refused with [`DenseSizeError`][gpsparse.errors.DenseSizeError] above it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, LinearOperator
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.autograd.sparse import SparseMatmul
from gpsparse.core.batching import flatten_operands
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.config import RoadConfig
from gpsparse.core.convert import check_finite, declare_symmetry, sparse_parts, symmetrized
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import sampled_product, symmetrize_values_grad, to_dense
from gpsparse.errors import DenseSizeError
from gpsparse.linalg import dispatch
from gpsparse.linalg.config import road_config
from gpsparse.linalg.dispatch import broadcast_batch
from gpsparse.linalg.functional import funm, lanczos_roots

__all__ = ["SparseLinearOperator"]


class SparseLinearOperator(LinearOperator):
    r"""A (batch of) sparse ``m × n`` matrices sharing one sparsity pattern.

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` stored values in the pattern's CSR order — the
        operator's only tensor argument, and the one that receives gradients.
    pattern : SparsityPattern
        The shared pattern (keyword; passed by reference, so building an
        operator is O(1)).

    Notes
    -----
    *Symmetry.* A pattern declared symmetric (see
    [`SparsityPattern`][gpsparse.SparsityPattern]) makes the operator symmetric:
    transposition returns an equal operator, solves use CG, and every
    gradient with respect to ``values`` is symmetrised,
    ``g ← (g + g[transpose_perm]) / 2``, the gradient for a symmetric matrix
    parameterised by its stored entries (the convention of linear_operator's
    test-suite). General operators get the plain per-entry gradient.

    *Solves* use [`gpsparse.settings.solver_defaults`][] (``rtol = 1e-6``,
    CG for symmetric, BiCGSTAB otherwise), not linear_operator's loose
    training tolerance.

    Examples
    --------
    >>> import torch
    >>> from gpsparse import SparseLinearOperator
    >>> i = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    >>> A = torch.sparse_coo_tensor(i, torch.tensor([4.0, 1.0, 1.0, 3.0]), (2, 2))
    >>> op = SparseLinearOperator.from_tensor(A)
    >>> op.solve(torch.ones(2, 1)).shape
    torch.Size([2, 1])
    """

    def __init__(self, values: Tensor, *, pattern: SparsityPattern):
        if not isinstance(pattern, SparsityPattern):
            raise TypeError(f"pattern must be a SparsityPattern, got {type(pattern).__name__}")
        if not isinstance(values, Tensor) or values.dim() < 1 or values.shape[-1] != pattern.nnz:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"values must have shape (*batch, nnz={pattern.nnz}), got {shape}")
        if not values.dtype.is_floating_point:
            raise TypeError(f"values must be floating point, got {values.dtype}")
        if values.device != pattern.device:
            raise ValueError(f"values are on {values.device} but the pattern is on {pattern.device}")
        super().__init__(values, pattern=pattern)
        self.values = values
        self.pattern = pattern

    # ---------------------------------------------------------------- build
    @classmethod
    def from_tensor(cls, matrix: Tensor, *, symmetric: bool | None = None) -> SparseLinearOperator:
        """Wrap a 2-D torch sparse COO or CSR tensor; gradients flow back to ``matrix.values()``.

        ``symmetric=None`` detects symmetry (pattern and values, to rounding);
        see ``gpsparse.core.convert.sparse_parts`` for errors.
        """
        values, pattern = sparse_parts(matrix, symmetric=symmetric)
        return cls(values, pattern=pattern)

    @classmethod
    def from_csr(
        cls, crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int], *, symmetric: bool | None = None
    ) -> SparseLinearOperator:
        """Build from CSR parts; ``values (*batch, nnz)`` may be any differentiable tensor (batched too).

        Unlike ``torch.sparse_csr_tensor(crow, col, values)`` — whose backward
        forms a dense ``n × n`` gradient in torch — gradients reach ``values``
        as ``(*batch, nnz)`` tensors. Columns may be unsorted within rows.
        """
        crow = crow.long()
        row = torch.repeat_interleave(torch.arange(int(size[0]), device=crow.device), crow[1:] - crow[:-1])
        pattern, order = SparsityPattern.from_indices(row, col, size)
        check_finite(values, "sparse matrix values")
        values, pattern = declare_symmetry(values[..., order], pattern, symmetric)
        return cls(values, pattern=pattern)

    def _new(self, values: Tensor, pattern: SparsityPattern | None = None) -> SparseLinearOperator:
        return SparseLinearOperator(values, pattern=self.pattern if pattern is None else pattern)

    @property
    def is_symmetric(self) -> bool:
        """Whether the operator is declared symmetric (see class notes)."""
        return self.pattern.symmetric

    def to_sparse_csr(self) -> Tensor:
        """The (non-batched) matrix as a torch CSR tensor (differentiable in the values)."""
        if self.values.dim() != 1:
            raise ValueError(f"to_sparse_csr needs a non-batched operator, got batch shape {tuple(self.batch_shape)}")
        return self.pattern.to_sparse_csr(self.values)

    # ------------------------------------------------------- core protocol
    def _size(self) -> torch.Size:
        return torch.Size((*self.values.shape[:-1], *self.pattern.size))

    def _matmul(self, rhs: Tensor) -> Tensor:
        values2d, rhs3d, unflatten = flatten_operands(self.values, rhs, self.pattern.size[1])
        if rhs3d.dtype != values2d.dtype:
            rhs3d = rhs3d.to(values2d.dtype)
        return unflatten(SparseMatmul.apply(values2d, rhs3d, self.pattern))

    def _transpose_nonbatch(self) -> SparseLinearOperator:
        if self.pattern.symmetric:
            return self
        return self._new(self.values[..., self.pattern.transpose_perm], self.pattern.transposed)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        if not self.values.requires_grad:
            return (None,)
        m, n = self.pattern.size
        values2d, left3d, _ = flatten_operands(self.values.detach(), left_vecs, m)
        _, right3d, _ = flatten_operands(self.values.detach(), right_vecs, n)
        grad = sampled_product(self.pattern, left3d, right3d)
        if grad.shape[0] == 1:  # one matrix: batches were folded into columns and are already summed
            grad = grad.reshape(self.values.shape)
        else:
            grad = _sum_to_shape(grad.reshape(*broadcast_batch(self.values, left_vecs), -1), self.values.shape)
        return (symmetrize_values_grad(grad, self.pattern),)

    def _values_for_gather(self) -> Tensor:
        """Values whose gradient follows the symmetric convention when gathered or scattered."""
        return symmetrized(self.values, self.pattern) if self.pattern.symmetric else self.values

    # ------------------------------------------------------------- entries
    def _diagonal(self) -> Tensor:
        pos = self.pattern.diagonal_positions
        gathered = self.values[..., pos.clamp_min(0)]
        return torch.where(pos >= 0, gathered, torch.zeros((), dtype=self.dtype, device=self.device))

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(*(i.shape for i in batch_indices), row_index.shape, col_index.shape)
        pos, found = self.pattern.positions(row_index.expand(shape), col_index.expand(shape))
        values = self._values_for_gather()
        gathered = values[(*(i.expand(shape) for i in batch_indices), pos)] if batch_indices else values[pos]
        return torch.where(found, gathered, torch.zeros((), dtype=self.dtype, device=self.device))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if any(torch.is_tensor(i) for i in batch_indices) and (
            torch.is_tensor(row_index) or torch.is_tensor(col_index)
        ):
            return super()._getitem(row_index, col_index, *batch_indices)
        values = self.values[(*batch_indices, slice(None))] if batch_indices else self.values
        m, n = self.pattern.size
        if _is_full(row_index, m) and _is_full(col_index, n):
            return self._new(values)
        rows = _as_index(row_index, m, self.device)
        cols = _as_index(col_index, n, self.device)
        pattern, entries = self.pattern.select(rows, cols)
        return self._new(values[..., entries], pattern)

    def to_dense(self) -> Tensor:
        """The dense matrix ``(*batch, m, n)``; refused above [`gpsparse.settings.max_dense_size`][]."""
        self._check_dense("to_dense")
        return to_dense(self._values_for_gather(), self.pattern)

    def _check_dense(self, what: str) -> None:
        limit = gs_settings.current().max_dense_size
        elements = math.prod(self.shape)
        if elements > limit:
            raise DenseSizeError(
                f"{what} of a sparse operator of shape {tuple(self.shape)} would form {elements:,} dense elements, "
                f"above gpsparse.settings.max_dense_size = {limit:,}; stay sparse or raise the limit with "
                "`with gpsparse.settings.max_dense_size(N):`"
            )

    def _cholesky(self, upper: bool = False):
        self._check_dense("a dense Cholesky factorisation")
        return super()._cholesky(upper=upper)

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool = False):
        self._check_dense("a dense eigendecomposition")
        return super()._symeig(eigenvectors=eigenvectors, return_evals_as_lazy=return_evals_as_lazy)

    def _svd(self):
        self._check_dense("a dense SVD")
        return super()._svd()

    # --------------------------------------------------------------- batch
    def _expand_batch(self, batch_shape) -> SparseLinearOperator:
        return self._new(self.values.expand(*batch_shape, self.pattern.nnz))

    def _sum_batch(self, dim: int) -> SparseLinearOperator:
        return self._new(self.values.sum(dim))

    # ---------------------------------------------------------- arithmetic
    def _mul_constant(self, other) -> SparseLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        return self._new(self.values * (other.unsqueeze(-1) if other.dim() else other))

    def _mul_matrix(self, other) -> LinearOperator:
        if isinstance(other, SparseLinearOperator):
            if other.pattern is self.pattern:
                return self._new(self.values * other.values)
            pos, found = other.pattern.positions(self.pattern.row, self.pattern.col_long)
            gathered = torch.where(
                found, other.values[..., pos], torch.zeros((), dtype=other.dtype, device=other.device)
            )
            symmetric = self.pattern.symmetric and other.pattern.symmetric
            return self._new(self.values * gathered, self.pattern.with_symmetric(symmetric))
        # Any other operand only needs its entries at our pattern: the product stays sparse.
        m, n = self.pattern.size
        if isinstance(other, DenseLinearOperator):
            tensor = other.tensor
            symmetric = self.pattern.symmetric and tensor.shape[-2:] == (1, 1)  # a (batch of) constant(s)
            gathered = tensor.expand(*tensor.shape[:-2], m, n)[..., self.pattern.row, self.pattern.col_long]
        elif other.matrix_shape == (m, n):
            symmetric = False
            gathered = other[..., self.pattern.row, self.pattern.col_long]
        else:
            raise ValueError(f"cannot multiply a sparse operator of size {tuple(self.shape)} by {tuple(other.shape)}")
        return self._new(self.values * gathered, self.pattern.with_symmetric(symmetric))

    def add_diagonal(self, diag: Tensor) -> SparseLinearOperator:
        """``A + diag(d)`` as a SparseLinearOperator; gradients reach ``d`` (scalar, ``(n,)`` or batched)."""
        if not self.pattern.is_square:
            raise ValueError(f"add_diagonal needs a square operator, got size {tuple(self.shape)}")
        n = self.pattern.size[0]
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if diag.dim() == 0:
            diag = diag.reshape(1)
        if diag.shape[-1] not in (1, n):
            raise ValueError(
                f"add_diagonal for an operator of size {tuple(self.shape)} got a diagonal of size {tuple(diag.shape)}"
            )
        batch = torch.broadcast_shapes(self.values.shape[:-1], diag.shape[:-1])
        diag = diag.expand(*batch, n)
        pattern, old_positions = self.pattern.with_full_diagonal
        values = self.values.expand(*batch, self.pattern.nnz)
        if pattern is not self.pattern:
            values = values.new_zeros(*batch, pattern.nnz).index_add(-1, old_positions, values)
        return self._new(values.index_add(-1, pattern.diagonal_positions, diag), pattern)

    def __add__(self, other):
        if isinstance(other, SparseLinearOperator):
            return self._add_sparse(other)
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def _add_sparse(self, other: SparseLinearOperator) -> SparseLinearOperator:
        if other.pattern is self.pattern:
            return self._new(self.values + other.values)
        if other.pattern.size != self.pattern.size:
            raise ValueError(f"cannot add sparse operators of sizes {tuple(self.shape)} and {tuple(other.shape)}")
        pattern, position = self.pattern.union(other.pattern)
        batch = torch.broadcast_shapes(self.values.shape[:-1], other.values.shape[:-1])
        values = self.values.new_zeros(*batch, pattern.nnz)
        values = values.index_add(-1, position[: self.pattern.nnz], self.values.expand(*batch, -1))
        values = values.index_add(-1, position[self.pattern.nnz :], other.values.expand(*batch, -1))
        return self._new(values, pattern)

    # -------------------------------------------------------------- solves
    def _road_config(self, *, dense: bool = False) -> RoadConfig:
        """The settings in force as the dispatcher's frozen configuration (see ``operator_road_config``)."""
        return operator_road_config(
            symmetric=self.pattern.symmetric, num_rows=self.pattern.size[0], device_type=self.device.type, dense=dense
        )

    def road(self, *, logdet: bool = True) -> str:
        """The road the dispatcher takes now: ``"banded"``, ``"cholesky"``, ``"dense"`` or ``"krylov"``.

        ``logdet``: for a log-determinant (else for a solve, which never takes
        the dense road). See ``gpsparse.linalg.dispatch``.
        """
        road = dispatch.choose_road(
            self.pattern, self._road_config(dense=logdet), logdet=logdet, batch_numel=self.batch_shape.numel()
        )
        return "krylov" if road == "dense" and not logdet else road

    def selected_inverse(self) -> Tensor | None:
        """``(A⁻¹)[i_e, j_e]`` at every stored entry ``(*batch, nnz)``, or None without an exact road.

        The banded road (always) or CHOLMOD (when scikit-sparse is installed,
        whatever ``logdet_defaults(method=...)`` says: an exact inverse is
        asked for) by selected inversion; None on the Krylov road. No
        gradient. Cached on the operator (one factorisation per operator
        object, e.g. per posterior precision in prediction).
        """
        key = ("selected_inverse", self.values._version)
        cached = getattr(self, "_selected_inverse_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        config = replace(self._road_config(), cholesky=self.pattern.symmetric and cholmod_available())
        inverse = dispatch.selected_inverse(self.values.detach(), self.pattern, config)
        self._selected_inverse_cache = (key, inverse)
        return inverse

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r"""``A⁻¹ R`` (or ``L A⁻¹ R``) by the dispatcher's road (``gpsparse.linalg.dispatch``).

        Banded symmetric operators use the exact banded Cholesky, CHOLMOD under
        ``logdet_defaults(method="cholesky")``; otherwise CG for symmetric
        operators, BiCGSTAB for others, with the tolerances of
        [`gpsparse.settings.solver_defaults`][]. Gradients: see
        [`gpsparse.solve`][].
        """
        if not self.is_square:
            raise ValueError(f"solve needs a square operator, got size {tuple(self.shape)}")
        result = dispatch.solve(self.values, self.pattern, right_tensor, self._road_config())
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        r"""``diag(Rᵀ A⁻¹ R)`` (summed if ``reduce_inv_quad``), one solve forward and none backward for symmetric A."""
        if not self.is_square:
            raise ValueError(f"inv_quad needs a square operator, got size {tuple(self.shape)}")
        term = dispatch.inv_quad(self.values, self.pattern, inv_quad_rhs, self._road_config())
        return term.sum(-1) if reduce_inv_quad else term

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        r"""Inverse quadratic form ``diag(Rᵀ A⁻¹ R)`` and ``log det A`` with sparse gradients.

        The road is the dispatcher's (``gpsparse.linalg.dispatch``):

        * banded operators (half-bandwidth ≤ ``max_banded_bandwidth`` of
            [`gpsparse.settings.solver_defaults`][], e.g. 1-D Markov
            precisions): exact banded Cholesky, O(N·b²);
        * under ``logdet_defaults(method="cholesky")``: exact sparse Cholesky
            (CHOLMOD), gradients by selected inversion;
        * without ``logdet``: gpsparse's CG ([`inv_quad`][]), at every size;
        * with ``logdet``, for ``n ≤`` linear_operator's ``max_cholesky_size``
            (and within [`gpsparse.settings.max_dense_size`][]): an exact
            dense Cholesky, as linear_operator does;
        * otherwise stochastic Lanczos quadrature, configured by
            [`gpsparse.settings.logdet_defaults`][]: with
            ``gradient="hutchinson"`` one batched CG run serves the probes and
            the quadratic term; with ``"adjoint"`` (default) the log-determinant
            gets the exact gradient of its estimate through Lanczos adjoints and
            the quadratic term its own CG solve. Probes are Rademacher vectors
            from torch's global generator (seed it for reproducible estimates).
        """
        if not logdet:
            if inv_quad_rhs is None:
                raise ValueError("Either `inv_quad_rhs` or `logdet` must be specified.")
            zero = torch.zeros([], dtype=self.dtype, device=self.device)
            return self.inv_quad(inv_quad_rhs, reduce_inv_quad=reduce_inv_quad), zero
        if not self.pattern.symmetric:
            raise ValueError("inv_quad_logdet needs a symmetric positive definite operator")
        quad, logdet_term = dispatch.inv_quad_logdet(
            self.values, self.pattern, inv_quad_rhs, self._road_config(dense=True)
        )
        if quad is None:
            return torch.zeros([], dtype=self.dtype, device=self.device), logdet_term
        return (quad.sum(-1) if reduce_inv_quad else quad), logdet_term

    # ------------------------------------------------------------- Lanczos
    def _root_decomposition(self) -> Tensor:
        """Rank-K Lanczos root ``R = Q V Θ^{1/2}`` (``R Rᵀ ≈ A``) from gpsparse's differentiable Lanczos."""
        return self._lanczos_roots(None)[0][0]

    def _root_inv_decomposition(self, initial_vectors: Tensor | None = None, test_vectors: Tensor | None = None):
        """Rank-K Lanczos inverse root ``Q V Θ^{-1/2}``; one Lanczos run per initial vector (leading dim) if several."""
        roots, inv_roots = self._lanczos_roots(initial_vectors)
        several = initial_vectors is not None and initial_vectors.size(-1) > 1
        from linear_operator.operators import RootLinearOperator
        from linear_operator.utils.memoize import add_to_cache

        add_to_cache(self, "root_decomposition", RootLinearOperator(roots if several else roots[0]))
        return inv_roots if several else inv_roots[0]

    def _lanczos_roots(self, initial_vectors: Tensor | None) -> tuple[Tensor, Tensor]:
        """Roots and inverse roots ``(p, *batch, n, K)`` from ``K = max_root_decomposition_size`` Lanczos steps."""
        self._require_symmetric("a Lanczos root decomposition")
        n = self.pattern.size[0]
        if initial_vectors is None:
            initial_vectors = torch.randn(*self.batch_shape, n, 1, dtype=self.dtype, device=self.device)
        elif initial_vectors.dim() == 1:
            initial_vectors = initial_vectors.unsqueeze(-1)
        steps = min(self._root_decomposition_size(), n)
        start = initial_vectors.expand(*self.batch_shape, n, initial_vectors.shape[-1])
        return lanczos_roots(self, start, steps)

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        """Samples of ``N(0, A)``: ``A^{1/2} z`` by Lanczos ``f(A)v`` (full rank, accurate to the Lanczos depth).

        Below linear_operator's ``max_cholesky_size`` (within the dense limit)
        a dense Cholesky root is used, as linear_operator does. Lanczos depth:
        [`gpsparse.settings.logdet_defaults`][]' ``num_lanczos``.
        """
        n = self.pattern.size[0]
        if n <= lo_settings.max_cholesky_size.value() and math.prod(self.shape) <= gs_settings.current().max_dense_size:
            return super().zero_mean_mvn_samples(num_samples)
        self._require_symmetric("sampling")
        base = torch.randn(*self.batch_shape, n, num_samples, dtype=self.dtype, device=self.device)
        samples = funm(self, base, "sqrt", num_lanczos=gs_settings.current().num_lanczos, reorthogonalize=False)
        return samples.movedim(-1, 0)

    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        r"""``A^{-1/2} R`` (or ``(L A^{-1/2} R, diag(L A⁻¹ Lᵀ))``) by Lanczos ``f(A)v`` with adjoint gradients.

        Replaces linear_operator's contour-integral quadrature. Depth:
        ``min(n, num_lanczos)`` of [`gpsparse.settings.logdet_defaults`][]
        (exact when it reaches the Krylov dimension).
        """
        self._require_symmetric("sqrt_inv_matmul")
        steps = min(self.pattern.size[0], gs_settings.current().num_lanczos)
        result = funm(self, rhs, "inv_sqrt", num_lanczos=steps)
        if lhs is None:
            return result
        return lhs @ result, self.inv_quad(lhs.mT, reduce_inv_quad=False)

    def _require_symmetric(self, what: str) -> None:
        if not self.pattern.symmetric:
            raise ValueError(f"{what} needs a symmetric operator, but this SparseLinearOperator is not symmetric")

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):
        """linear_operator's internal solve hook, served by gpsparse's CG (with tridiagonals for SLQ)."""
        cap = lo_settings.max_lanczos_quadrature_iterations.value()
        return dispatch.krylov_solve_detached(
            self.values, self.pattern, rhs, self._road_config().solver, preconditioner, num_tridiag or 0, cap
        )


def operator_road_config(
    *, symmetric: bool, num_rows: int, device_type: str = "cpu", dense: bool = False
) -> RoadConfig:
    """The operators' configuration: ``gpsparse.linalg.config.road_config`` plus linear_operator's settings.

    ``dense`` allows the dense road for log-determinants below
    linear_operator's ``max_cholesky_size``, as linear_operator does.
    linear_operator's ``num_trace_samples`` / ``max_lanczos_quadrature_iterations``
    replace gpsparse's probe count and depth where a user has changed them.
    """
    probes = lo_settings.num_trace_samples.value()
    steps = lo_settings.max_lanczos_quadrature_iterations.value()
    return road_config(
        symmetric=symmetric,
        num_rows=num_rows,
        device_type=device_type,
        dense_max_rows=lo_settings.max_cholesky_size.value() if dense else 0,
        num_probes=None if probes == _LO_DEFAULT_PROBES else probes,
        num_lanczos=None if steps == _LO_DEFAULT_STEPS else steps,
    )


_LO_DEFAULT_PROBES = lo_settings.num_trace_samples._global_value
_LO_DEFAULT_STEPS = lo_settings.max_lanczos_quadrature_iterations._global_value


def _sum_to_shape(tensor: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    extra = tensor.dim() - len(shape)
    if extra:
        tensor = tensor.sum(tuple(range(extra)))
    dims = tuple(i for i, (a, b) in enumerate(zip(tensor.shape, shape)) if b == 1 and a != 1)
    return tensor.sum(dims, keepdim=True) if dims else tensor


def _is_full(index, size: int) -> bool:
    return (
        isinstance(index, slice)
        and index == slice(None, None, None)
        or (isinstance(index, slice) and range(*index.indices(size)) == range(size))
    )


def _as_index(index, size: int, device: torch.device) -> Tensor:
    if isinstance(index, slice):
        return torch.arange(*index.indices(size), device=device)
    if isinstance(index, int):
        return torch.tensor([index % size], device=device)
    index = torch.as_tensor(index, device=device).long().reshape(-1)
    return torch.where(index < 0, index + size, index)
