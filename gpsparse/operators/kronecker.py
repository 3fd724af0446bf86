r"""Separable precisions ``Q = Q_t ⊗ Q_s`` and row-wise Kronecker interpolations ``W = W_t ⊙ W_s``.

A separable space–time Gaussian Markov random field on ``n_t`` time knots ×
``n_s`` space nodes (node ``(a, i)`` at index ``a·n_s + i``) has the precision
``Q = Q_t ⊗ Q_s`` and, observed at space–time points through the time and
space interpolations ``W_t`` (m × n_t) and ``W_s`` (m × n_s), the interpolation
``W = W_t ⊙ W_s`` (row-wise Kronecker, "face-splitting" product:
``W[r, (a, i)] = W_t[r, a] W_s[r, i]``). By the mixed-product property

$$
W Q^{-1} W'^\top = (W_t Q_t^{-1} W_t'^\top) \circ (W_s Q_s^{-1} W_s'^\top),
$$

the Hadamard product of the time and space covariances: a separable
(product) kernel. The operator below keeps the factors and uses them where
the structure pays:

* ``log det Q = n_s log det Q_t + n_t log det Q_s`` (each factor's closed form
  when it has one, else its own road on the small factor);
* ``Q v = vec(Q_s V Q_tᵀ)`` and ``Q⁻¹ v = vec(Q_s⁻¹ V Q_t⁻ᵀ)`` — two factor
  products or solves (the time factor is banded: exact), never a Krylov run
  on the product;
* the selected inverse of ``Q`` (exact prior variances) is the Kronecker
  product of the factors' selected inverses;
* value gradients are sampled products on the factor patterns.

The values of ``Q`` on its pattern (``nnz_t·nnz_s`` entries, e.g. 3 × 13 per
row for a tridiagonal time and 13-point space precision) are also formed,
once per construction in O(nnz) without index arrays of that size
(``gpsparse.core.kronecker``): the posterior precision
``P = Q + WᵀD⁻¹W`` is not a Kronecker product, and the marginal likelihood
runs through ``P`` (``gpsparse.operators.precision``). ``Q + WᵀD⁻¹W`` adds
the Gram's entries at their positions in ``Q``'s pattern (found from the
factor patterns) when they lie inside it, as they do for interpolation
within the stencils of both factors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.banded import bandwidth
from gpsparse.core.cholmod import CholeskyPreconditioner, cholmod_available
from gpsparse.core.kronecker import (
    KroneckerPattern,
    KroneckerPosterior,
    MatrixFreeSplit,
    TimeBlockPreconditioner,
    face_split_structure,
    kronecker_bilinear,
    kronecker_pattern,
    kronecker_values,
    time_block_structure,
    time_block_values,
)
from gpsparse.core.pattern import SparsityPattern, csr_tensor
from gpsparse.core.preconditioners import IncompleteCholeskyPreconditioner, JacobiPreconditioner
from gpsparse.core.preconditioners.registry import IC_SHIFTS, incomplete_cholesky_with_shift
from gpsparse.core.quadrature import rademacher
from gpsparse.core.slq import hutchinson_inv_quad_forward
from gpsparse.core.sparse_ops import sampled_product, spmm
from gpsparse.errors import NotPositiveDefiniteError
from gpsparse.linalg import dispatch
from gpsparse.linalg.dispatch import DIFFERENCE_DENSE_MAX_ROWS
from gpsparse.operators.gmrf import apply_t
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator, SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator, operator_road_config

__all__ = [
    "KroneckerPrecisionLinearOperator",
    "face_split",
    "SpaceTimeFactors",
    "SpaceTimeCovarianceLinearOperator",
    "SpaceTimeNoisyLinearOperator",
    "KroneckerPosteriorInvQuadLogdet",
]

_CACHE_SIZE = 8


class KroneckerPrecisionLinearOperator(KnownLogdetSparseLinearOperator):
    r"""The symmetric positive definite precision ``Q = Q_t ⊗ Q_s`` of a separable field, factors kept.

    Parameters
    ----------
    time_precision : SparseLinearOperator
        ``Q_t`` ``(*batch_t, n_t, n_t)``, symmetric (declared), positive definite.
    space_precision : SparseLinearOperator
        ``Q_s`` ``(*batch_s, n_s, n_s)``, the same.

    Notes
    -----
    A [`KnownLogdetSparseLinearOperator`][gpsparse.operators.known_logdet.KnownLogdetSparseLinearOperator]
    on the pattern of the Kronecker product (a ``KroneckerPattern``), with
    batch ``broadcast(batch_t, batch_s)`` (the factors are broadcast to it).
    Its representation is the factors' (values, and closed-form log-determinants
    where they have them), so gradients reach the factors' values.

    * ``known_logdet = n_s · log det Q_t + n_t · log det Q_s`` — the factors'
      closed forms
      ([`KnownLogdetSparseLinearOperator`][gpsparse.operators.known_logdet.KnownLogdetSparseLinearOperator]),
      else each factor's road (exact when banded, under CHOLMOD, or dense up
      to 1024 rows — as the posterior precision's log-determinant — else
      stochastic Lanczos quadrature on the factor, whose error is multiplied
      by the other factor's size).
    * ``Q X``, ``Q⁻¹ X`` and ``Rᵀ Q⁻¹ R`` by the factors (module notes);
      solves take the factors' roads and tolerances
      ([`gpsparse.settings.solver_defaults`][]).
    * ``selected_inverse()`` is the Kronecker product of the factors'
      (None when a factor has no exact road).
    * Scaling by ``c > 0`` scales the space factor (the type is kept); sums,
      ``add_diagonal`` and row or column selections return plain sparse
      operators on the materialised values.

    Examples
    --------
    >>> import torch
    >>> from gpsparse import SparseLinearOperator
    >>> t = torch.tensor([[2.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> s = torch.tensor([[3.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    >>> Qt = SparseLinearOperator.from_tensor(t.to_sparse(), symmetric=True)
    >>> Qs = SparseLinearOperator.from_tensor(s.to_sparse(), symmetric=True)
    >>> Q = KroneckerPrecisionLinearOperator(Qt, Qs)
    >>> bool(torch.allclose(Q.to_dense(), torch.kron(t, s)))
    True
    >>> bool(torch.allclose(Q.logdet(), torch.logdet(torch.kron(t, s))))
    True
    """

    def __init__(self, time_precision: SparseLinearOperator, space_precision: SparseLinearOperator):
        for name, factor in (("time_precision", time_precision), ("space_precision", space_precision)):
            if not isinstance(factor, SparseLinearOperator):
                raise TypeError(f"{name} must be a gpsparse.SparseLinearOperator, got {type(factor).__name__}")
            if not factor.pattern.symmetric:
                raise ValueError(f"{name} must be declared symmetric (a precision matrix)")
        if time_precision.dtype != space_precision.dtype or time_precision.device != space_precision.device:
            raise ValueError(
                "the Kronecker factors must share dtype and device, got "
                f"{time_precision.dtype}/{time_precision.device} and {space_precision.dtype}/{space_precision.device}"
            )
        batch = torch.broadcast_shapes(time_precision.batch_shape, space_precision.batch_shape)
        if time_precision.batch_shape != batch:
            time_precision = time_precision._expand_batch(batch)
        if space_precision.batch_shape != batch:
            space_precision = space_precision._expand_batch(batch)
        LinearOperator.__init__(self, time_precision, space_precision)
        self.time_precision, self.space_precision = time_precision, space_precision
        self._pattern: KroneckerPattern | None = None
        self._values: Tensor | None = None
        self._logdet: Tensor | None = None

    @property
    def pattern(self) -> KroneckerPattern:
        """The pattern of ``Q_t ⊗ Q_s`` (built on first use, cached by the factor patterns)."""
        if self._pattern is None:
            self._pattern = _kronecker_pattern(self.time_precision.pattern, self.space_precision.pattern)
        return self._pattern

    @property
    def values(self) -> Tensor:
        """``(*batch, nnz_t·nnz_s)`` values of ``Q_t ⊗ Q_s``, formed on first use (again when a graph is needed).

        Products, solves, scalings and the log-determinant use the factors; the
        values are formed for the posterior precision ``Q + WᵀD⁻¹W`` and entry-wise
        operations (``to_dense``, the diagonal, sums).
        """
        values = self._values
        tracking = torch.is_grad_enabled() and (
            self.time_precision.values.requires_grad or self.space_precision.values.requires_grad
        )
        if values is None or (tracking and not values.requires_grad):
            values = kronecker_values(self.time_precision.values, self.space_precision.values, self.pattern)
            self._values = values
        return values

    @property
    def is_symmetric(self) -> bool:
        return True

    def _size(self) -> torch.Size:
        n = self.time_precision.shape[-1] * self.space_precision.shape[-1]
        return torch.Size((*self.time_precision.batch_shape, n, n))

    def _road_config(self, *, dense: bool = False):
        return operator_road_config(symmetric=True, num_rows=self.shape[-1], device_type=self.device.type, dense=dense)

    # ------------------------------------------------------------ structure
    @property
    def num_times(self) -> int:
        """``n_t``."""
        return self.time_precision.shape[-1]

    @property
    def num_space(self) -> int:
        """``n_s``."""
        return self.space_precision.shape[-1]

    @property
    def known_logdet(self) -> Tensor:
        """``n_s log det Q_t + n_t log det Q_s`` ``(*batch)`` (class notes), differentiable in the factors.

        Kept when both factors have closed forms; recomputed at each use otherwise
        (the factors' roads read the settings in force).
        """
        if self._logdet is not None:
            return self._logdet
        logdet = self.num_space * _factor_logdet(self.time_precision)
        logdet = (logdet + self.num_times * _factor_logdet(self.space_precision)).expand(self.batch_shape)
        if all(isinstance(f, KnownLogdetSparseLinearOperator) for f in (self.time_precision, self.space_precision)):
            self._logdet = logdet
        return logdet

    def _refresh(self) -> None:
        """Forget the values and the log-determinant after the factors changed in place."""
        self._values = None
        self._logdet = None

    def _set_requires_grad(self, val: bool) -> None:
        super()._set_requires_grad(val)
        self._refresh()

    def detach_(self) -> KroneckerPrecisionLinearOperator:
        super().detach_()
        self._refresh()
        return self

    # ------------------------------------------------------------- products
    def _matmul(self, rhs: Tensor) -> Tensor:
        """``(Q_t ⊗ Q_s) X = vec(Q_s X Q_tᵀ)``: a space and a time product."""
        return self._apply(rhs, lambda op, x: op._matmul(x))

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``Q⁻¹ R = vec(Q_s⁻¹ R Q_t⁻ᵀ)``: a space and a time solve (the factors' roads)."""
        result = self._apply(right_tensor, lambda op, x: op.solve(x))
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """``diag(Rᵀ Q⁻¹ R)`` from the factor solves (summed if ``reduce_inv_quad``)."""
        rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        term = (rhs * self.solve(rhs)).sum(-2)
        return term.sum(-1) if reduce_inv_quad else term

    def _apply(self, rhs: Tensor, step) -> Tensor:
        """``(A_t ⊗ A_s) R`` for ``step(op, X) = A X`` on the factors (products or solves)."""
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        if x.shape[-2] != self.shape[-1]:
            raise ValueError(
                f"right-hand side of shape {tuple(rhs.shape)} does not match an operator of size {self.shape[-1]}"
            )
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        n_t, n_s, k = self.num_times, self.num_space, x.shape[-1]
        space_first = _space_major(x.reshape(*x.shape[:-2], n_t, n_s, k))  # (*b, n_s, n_t·k)
        y = step(self.space_precision, space_first)
        y = _time_major(y.reshape(*y.shape[:-2], n_s, n_t, k))  # (*b, n_t, n_s·k)
        y = step(self.time_precision, y)
        y = y.reshape(*y.shape[:-2], n_t * n_s, k)
        return y.squeeze(-1) if vector else y

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        r"""Gradients of ``Σ_c Lᵀ_c (Q_t ⊗ Q_s) R_c`` for the factors' representations.

        ``∂/∂Q_t[a, b] = Σ_{i,c} L[(a, i), c] (Q_s R_b)[i, c]`` and
        ``∂/∂Q_s[i, j] = Σ_{a,c} L[(a, i), c] ((Q_t ⊗ I) R)[(a, j), c]``:
        one sampled product on each factor's pattern (the factors' own
        ``_bilinear_derivative``, symmetrised as theirs are).
        """
        n_t, n_s = self.num_times, self.num_space
        batch = torch.broadcast_shapes(self.batch_shape, left_vecs.shape[:-2], right_vecs.shape[:-2])
        k = left_vecs.shape[-1]
        left = left_vecs.expand(*batch, *left_vecs.shape[-2:]).to(self.dtype)
        right = right_vecs.expand(*batch, *right_vecs.shape[-2:]).to(self.dtype)
        with torch.no_grad():
            Qt = SparseLinearOperator(self.time_precision.values.detach(), pattern=self.time_precision.pattern)
            Qs = SparseLinearOperator(self.space_precision.values.detach(), pattern=self.space_precision.pattern)
            right4 = right.reshape(*batch, n_t, n_s, k)
            space_applied = Qs._matmul(_space_major(right4))  # (*b, n_s, n_t·k): (I ⊗ Q_s) R
            space_applied = _time_major(space_applied.reshape(*batch, n_s, n_t, k))
            time_applied = Qt._matmul(right.reshape(*batch, n_t, n_s * k))  # (Q_t ⊗ I) R
            time_applied = _space_major(time_applied.reshape(*batch, n_t, n_s, k))
            left_time = left.reshape(*batch, n_t, n_s * k)
            left_space = _space_major(left.reshape(*batch, n_t, n_s, k))
        time_grads = self.time_precision._bilinear_derivative(left_time, space_applied)
        space_grads = self.space_precision._bilinear_derivative(left_space, time_applied)
        return (*time_grads, *space_grads)

    # -------------------------------------------------------------- batches
    def _expand_batch(self, batch_shape) -> KroneckerPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        return KroneckerPrecisionLinearOperator(
            self.time_precision._expand_batch(batch_shape), self.space_precision._expand_batch(batch_shape)
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        full = all(isinstance(i, slice) and i == slice(None) for i in (row_index, col_index))
        if full and batch_indices:
            return KroneckerPrecisionLinearOperator(
                self.time_precision._getitem(row_index, col_index, *batch_indices),
                self.space_precision._getitem(row_index, col_index, *batch_indices),
            )
        return super()._getitem(row_index, col_index, *batch_indices)

    def _mul_constant(self, other) -> SparseLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other > 0).all()):
            return super()._mul_constant(other)
        return KroneckerPrecisionLinearOperator(self.time_precision, self.space_precision._mul_constant(other))

    # --------------------------------------------------------------- sums
    def _add_sparse(self, other: SparseLinearOperator) -> SparseLinearOperator:
        """``Q + B`` (e.g. the Gram ``WᵀD⁻¹W``): scattered into ``Q``'s values when ``B`` lies in its pattern."""
        if other.pattern is not self.pattern and other.pattern.size == self.pattern.size:
            position = _subset_positions(self.pattern, other.pattern)
            if position is not None:
                batch = torch.broadcast_shapes(self.values.shape[:-1], other.values.shape[:-1])
                values = self.values.expand(*batch, self.pattern.nnz).index_add(
                    -1, position, other.values.expand(*batch, other.pattern.nnz)
                )
                symmetric = self.pattern.symmetric and other.pattern.symmetric
                return SparseLinearOperator(values, pattern=self.pattern.with_symmetric(symmetric))
        return super()._add_sparse(other)

    # ------------------------------------------------------------ inverses
    def selected_inverse(self) -> Tensor | None:
        """``(Q⁻¹)`` at the stored entries: ``(Q_t⁻¹)[a, b] (Q_s⁻¹)[i, j]`` from the factors' selected inverses.

        None when a factor has no exact road (see
        [`SparseLinearOperator.selected_inverse`][gpsparse.operators.sparse.SparseLinearOperator.selected_inverse]).
        Cached on the operator.
        """
        key = ("selected_inverse", self.values._version)
        cached = getattr(self, "_selected_inverse_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        inverse_t = self.time_precision.selected_inverse()
        inverse_s = None if inverse_t is None else self.space_precision.selected_inverse()
        inverse = None if inverse_s is None else kronecker_values(inverse_t, inverse_s, self.pattern)
        self._selected_inverse_cache = (key, inverse)
        return inverse


def face_split(time_interp: SparseLinearOperator, space_interp: SparseLinearOperator) -> SparseLinearOperator:
    r"""``W = W_t ⊙ W_s``: the row-wise Kronecker product ``W[r, (a, i)] = W_t[r, a] W_s[r, i]`` (m × n_t·n_s).

    Parameters
    ----------
    time_interp, space_interp : SparseLinearOperator
        ``W_t`` (m × n_t) and ``W_s`` (m × n_s), unbatched, one dtype and device.

    Returns
    -------
    SparseLinearOperator
        Values ``w_t[e_t] · w_s[e_s]`` (differentiable in both) on a pattern cached
        by the identity of the two factor patterns (kernels cache their
        interpolation patterns per input, so a training loop builds it once).

    Raises
    ------
    ValueError
        Factors with different numbers of rows, batched factors, or mixed dtypes or devices.
    """
    for name, W in (("time", time_interp), ("space", space_interp)):
        if not isinstance(W, SparseLinearOperator) or W.dim() != 2:
            raise ValueError(f"the {name} interpolation must be a single (unbatched) SparseLinearOperator")
    if time_interp.dtype != space_interp.dtype or time_interp.device != space_interp.device:
        raise ValueError("the time and space interpolations must share dtype and device")
    pattern, time_entry, space_entry = _cached(
        space_interp.pattern,
        time_interp.pattern,
        "face_split",
        lambda: face_split_structure(time_interp.pattern, space_interp.pattern),
    )
    return SparseLinearOperator(time_interp.values[time_entry] * space_interp.values[space_entry], pattern=pattern)


# ---------------------------------------------------------------- helpers
def _factor_logdet(factor: SparseLinearOperator) -> Tensor:
    """A factor's closed form, else its road — exact (dense) up to ``DIFFERENCE_DENSE_MAX_ROWS`` rows, as for ``P``."""
    if isinstance(factor, KnownLogdetSparseLinearOperator):
        return factor.known_logdet
    config = factor._road_config(dense=True)
    config = replace(config, dense_max_rows=max(config.dense_max_rows, DIFFERENCE_DENSE_MAX_ROWS))
    return dispatch.inv_quad_logdet(factor.values, factor.pattern, None, config)[1]


def _space_major(x: Tensor) -> Tensor:
    """``(*b, n_t, n_s, k) → (*b, n_s, n_t·k)``."""
    *batch, n_t, n_s, k = x.shape
    return x.transpose(-3, -2).reshape(*batch, n_s, n_t * k)


def _time_major(x: Tensor) -> Tensor:
    """``(*b, n_s, n_t, k) → (*b, n_t, n_s·k)``."""
    *batch, n_s, n_t, k = x.shape
    return x.transpose(-3, -2).reshape(*batch, n_t, n_s * k)


def _cached(anchor: SparsityPattern, partner, name: str, build):
    """``build()`` cached on ``anchor`` by the identity of ``partner`` (a pattern or a tuple; strong references)."""
    partners = partner if isinstance(partner, tuple) else (partner,)
    key = tuple(id(p) for p in partners)
    cache = anchor.derived(("kronecker", name), dict)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], partners)):
        return hit[1]
    value = build()
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = (partners, value)
    return value


def _kronecker_pattern(time_pattern: SparsityPattern, space_pattern: SparsityPattern) -> KroneckerPattern:
    return _cached(space_pattern, time_pattern, "pattern", lambda: kronecker_pattern(time_pattern, space_pattern))


def _subset_positions(big: KroneckerPattern, small: SparsityPattern) -> Tensor | None:
    """Positions in ``big`` of ``small``'s entries when all are stored there (cached), else None."""

    def build():
        position, found = big.positions(small.row, small.col_long)
        return position if bool(found.all()) else None

    return _cached(big, small, "subset", build)


# ------------------------------------------------------- space–time covariances
POSTERIOR_MODES = ("auto", "kronecker", "sparse")


@dataclass(frozen=True, eq=False)
class SpaceTimeFactors:
    """What the matrix-free marginal likelihood needs beside ``Q`` and ``W`` (a non-tensor keyword, by reference).

    Attributes
    ----------
    time_interp, space_interp : SparseLinearOperator
        ``W_t`` (m × n_t) and ``W_s`` (m × n_s) with ``W = W_t ⊙ W_s``.
    posterior : {"auto", "kronecker", "sparse"}
        How ``K + D`` computes its marginal likelihood
        ([`SpaceTimeNoisyLinearOperator`][gpsparse.operators.kronecker.SpaceTimeNoisyLinearOperator]).
    """

    time_interp: SparseLinearOperator
    space_interp: SparseLinearOperator
    posterior: str = "auto"

    def __post_init__(self):
        if self.posterior not in POSTERIOR_MODES:
            raise ValueError(f"posterior must be one of {POSTERIOR_MODES}, got {self.posterior!r}")


class SpaceTimeCovarianceLinearOperator(SparsePrecisionLinearOperator):
    r"""``K = W Q⁻¹ W'ᵀ`` with ``Q = Q_t ⊗ Q_s``, ``W = W_t ⊙ W_s``: a sparse-precision covariance keeping its factors.

    What [`SpaceTimeKernel`][gpsparse.kernels.SpaceTimeKernel] returns: a
    [`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]
    on a [`KroneckerPrecisionLinearOperator`][gpsparse.operators.kronecker.KroneckerPrecisionLinearOperator]
    whose scalings (``ScaleKernel``) keep the type and whose ``K + D``
    (``add_diagonal``, GPyTorch's Gaussian likelihood) is a
    [`SpaceTimeNoisyLinearOperator`][gpsparse.operators.kronecker.SpaceTimeNoisyLinearOperator].

    Parameters
    ----------
    Q : KroneckerPrecisionLinearOperator
    interp, right_interp : SparseLinearOperator
        ``W`` (and ``W'`` for cross-covariances), as for the parent class.
    factors : SpaceTimeFactors
        ``W_t``, ``W_s`` of ``interp`` and the posterior mode.
    sign, components
        As for the parent class.
    """

    def __init__(
        self, Q, interp=None, right_interp=None, *, factors: SpaceTimeFactors, sign: float = 1.0, components=None
    ):
        if not isinstance(Q, KroneckerPrecisionLinearOperator):
            raise TypeError(f"Q must be a KroneckerPrecisionLinearOperator, got {type(Q).__name__}")
        super().__init__(Q, interp=interp, right_interp=right_interp, sign=sign, components=components)
        LinearOperator.__init__(
            self,
            Q,
            interp=self.interp,
            right_interp=self.right_interp,
            sign=self.sign,
            components=self.components,
            factors=factors,
        )
        self.factors = factors

    def _with(self, *, Q=None, sign=None):
        Q = self.Q if Q is None else Q
        if not isinstance(Q, KroneckerPrecisionLinearOperator):
            return super()._with(Q=Q, sign=sign)
        return SpaceTimeCovarianceLinearOperator(
            Q,
            interp=self.interp,
            right_interp=self.right_interp,
            factors=self.factors,
            sign=self.sign if sign is None else sign,
            components=self.components,
        )

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``K + D`` as a
        [`SpaceTimeNoisyLinearOperator`][gpsparse.operators.kronecker.SpaceTimeNoisyLinearOperator]."""
        result = super().add_diagonal(diag)
        if type(result) is not NoisySparsePrecisionLinearOperator:
            return result
        return SpaceTimeNoisyLinearOperator(
            self.Q, result.noise, interp=self.interp, factors=self.factors, components=self.components
        )


class SpaceTimeNoisyLinearOperator(NoisySparsePrecisionLinearOperator):
    r"""``K_y = W Q⁻¹ Wᵀ + D`` for ``Q = Q_t ⊗ Q_s``, ``W = W_t ⊙ W_s``, with a matrix-free marginal likelihood.

    ``log det K_y = log det P − log det Q + Σ log d`` and ``yᵀK_y⁻¹y`` need
    ``P = Q + WᵀD⁻¹W``. Two ways (``factors.posterior``):

    * ``"sparse"`` — the parent class: ``P`` materialised on ``Q``'s pattern
      (``nnz(Q_t)·nnz(Q_s)`` entries) through gpsparse's roads (exact banded,
      CHOLMOD, dense; else SLQ with IC(0) etc.);
    * ``"kronecker"`` — ``P`` as a matvec from the factors and ``W``
      (``KroneckerPosterior``: nothing of the size of ``nnz(Q)``), stochastic
      Lanczos quadrature in the Hutchinson mode — one batched CG run for the
      probes and ``b = WᵀD⁻¹y`` (``hutchinson_inv_quad_forward``), the
      gradient ``∂ log det P ≈ (1/p) Σ_l (P⁻¹z_l)ᵀ ∂P z_l`` and
      ``∂(bᵀP⁻¹b) = −xᵀ∂P x + 2 ∂bᵀx`` as sampled products on the factor
      patterns and ``W``'s pattern. Preconditioner: the time-diagonal blocks
      ``M = blockdiag_a(Q_t[a,a] Q_s + (WᵀD⁻¹W)_{aa})`` (each an ``n_s × n_s``
      sparse matrix; the space coupling and the data exactly, the time
      coupling left to CG), factorised by IC(0) as one block-diagonal matrix
      (the diagonal shift of ``IC_SHIFTS`` that worked last is tried first) —
      for the log-determinant preconditioner settings ``"ic0"`` (the large-size
      default) and others; by CHOLMOD block by block for ``"cholesky"``
      (fewer iterations, much dearer triangular solves: measured 53 against
      92 iterations but 45 s against 20 s at 160² × 16 nodes); the diagonal of
      ``P`` for ``"jacobi"``; none for None. ``log det M`` is exact in each case.
      Probes: [`gpsparse.settings.logdet_defaults`][]' ``num_probes`` for ``N``
      rows (4 from 10⁵ rows), Rademacher from torch's global generator; CG to
      ``solver_defaults``' ``rtol``.
    * ``"auto"`` (default) — ``"kronecker"`` where the parent class would
      estimate with Hutchinson gradients: ``N > 1024`` nodes, no
      ``logdet_defaults(method="cholesky")``, ``P`` not banded, the
      Hutchinson gradient in force (the default from 10⁵ rows), and no batch;
      ``"sparse"`` otherwise (e.g. the exact roads of small problems).

    Solves, products and prediction are the parent class's.
    """

    def __init__(self, Q, noise, interp=None, *, factors: SpaceTimeFactors, sign: float = 1.0, components=None):
        super().__init__(Q, noise, interp, sign=sign, components=components)
        LinearOperator.__init__(
            self, Q, noise, interp=self.interp, sign=self.sign, components=self.components, factors=factors
        )
        self.factors = factors

    def _with(self, *, Q=None, noise=None, sign=None):
        Q = self.Q if Q is None else Q
        if not isinstance(Q, KroneckerPrecisionLinearOperator):
            return super()._with(Q=Q, noise=noise, sign=sign)
        return SpaceTimeNoisyLinearOperator(
            Q,
            self.noise if noise is None else noise,
            self.interp,
            factors=self.factors,
            sign=self.sign if sign is None else sign,
            components=self.components,
        )

    def uses_matrix_free_posterior(self) -> bool:
        """Whether ``inv_quad_logdet(…, logdet=True)`` takes the matrix-free road (class notes)."""
        mode = self.factors.posterior
        if mode == "sparse" or self.sign < 0 or self.interp is None:
            return False
        unbatched = self.Q.batch_shape == torch.Size() and self.noise.dim() == 1
        if mode == "kronecker":
            if not unbatched:
                raise NotImplementedError("the matrix-free space–time marginal likelihood needs an unbatched model")
            return True
        if not unbatched or self.Q.shape[-1] <= DIFFERENCE_DENSE_MAX_ROWS:
            return False
        config = self.Q._road_config(dense=True)
        if config.cholesky or config.logdet.gradient != "hutchinson":
            return False
        Qt, Qs = self.Q.time_precision.pattern, self.Q.space_precision.pattern
        return bandwidth(Qt) * Qs.size[0] + bandwidth(Qs) > config.max_banded_bandwidth

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """As the parent class; the matrix-free road of the class notes when ``uses_matrix_free_posterior()``."""
        if not logdet or not self.uses_matrix_free_posterior():
            return super().inv_quad_logdet(inv_quad_rhs, logdet=logdet, reduce_inv_quad=reduce_inv_quad)
        n = self.Q.shape[-1]
        if inv_quad_rhs is None:
            rhs = self.noise.new_zeros(self.shape[-1], 1)
        else:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            if rhs.dim() != 2:
                raise NotImplementedError(
                    "the matrix-free space–time marginal likelihood needs unbatched right-hand sides"
                )
        scaled = rhs / self.noise.unsqueeze(-1)
        b = apply_t(self.interp, scaled)
        config = self.Q._road_config(dense=True)
        preconditioner = _posterior_preconditioner(config.logdet.preconditioner)
        probes = rademacher((1, n, config.logdet.num_probes), generator=None, dtype=self.dtype, device=self.device)
        Qt, Qs = self.Q.time_precision, self.Q.space_precision
        quad_p, logdet_p = KroneckerPosteriorInvQuadLogdet.apply(
            b,
            Qt.values,
            Qs.values,
            self.interp.values,
            self.noise,
            (Qt.pattern, Qs.pattern, self.interp.pattern, self.factors, preconditioner),
            probes,
            replace(config.logdet, gradient="hutchinson"),
        )
        logdet_term = logdet_p - self.Q.known_logdet + self.noise.log().sum(-1)
        quad = torch.zeros([], dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            quad = (rhs * scaled).sum(-2) - quad_p
            quad = quad.sum(-1) if reduce_inv_quad else quad
        return quad, logdet_term


def _incomplete_cholesky(matrix: Tensor, anchor: SparsityPattern):
    """IC(0) with the smallest working diagonal shift of ``IC_SHIFTS``, starting from the last one that worked here."""
    hint = anchor.derived(("kronecker", "ic0_shift"), lambda: [0])
    for k in range(hint[0], len(IC_SHIFTS)):
        try:
            precond = IncompleteCholeskyPreconditioner.from_matrix(matrix, shift=IC_SHIFTS[k])
        except NotPositiveDefiniteError:
            continue
        hint[0] = k
        return precond
    return incomplete_cholesky_with_shift(matrix)  # raises with the last error


def _posterior_preconditioner(spec) -> str | None:
    """The matrix-free road's preconditioner for the log-determinant preconditioner setting in force.

    ``None`` → none; ``"jacobi"`` → the diagonal of ``P``; ``"cholesky"`` → the
    time-diagonal blocks factorised by CHOLMOD (when installed); anything else
    (``"ic0"``, the large-size default) → the time-diagonal blocks by IC(0).
    """
    if spec is None:
        return None
    if spec == "jacobi":
        return "jacobi"
    if spec == "cholesky" and cholmod_available():
        return "time_blocks_cholesky"
    return "time_blocks_ic0"


class KroneckerPosteriorInvQuadLogdet(Function):
    r"""``(bᵀP⁻¹b, log det P)`` for ``P = Q_t ⊗ Q_s + Wᵀ diag(1/d) W``, matrix-free (Hutchinson mode).

    Inputs: ``b (N, k)``, the factor values ``v_t``, ``v_s``, ``W``'s values and
    the noise ``d (m,)`` (all unbatched); the patterns, factors and the
    preconditioner name; probes ``(1, N, p)``; the ``LogdetConfig``.

    Gradients (``x = P⁻¹b``, ``x_l = P⁻¹z_l``, both from one batched CG run):
    ``∂q/∂b = 2x``; for the matrix, the bilinear form ``Σ_c U_cᵀ ∂P V_c`` with
    ``U = [−ḡ_q x, (ḡ_l/p) x_l]``, ``V = [x, z_l]``: on the factors
    ``kronecker_bilinear``, on ``W`` ``Σ_c [U (W V)ᵀ/d + (W U) Vᵀ/d]`` at its
    entries, on the noise ``−Σ_c (W U)(W V)/d²``. Memory ``O(N·(p + k))``
    for the vectors and ``O(nnz(W) + nnz(Q_t) + nnz(Q_s))`` for the rest.
    """

    @staticmethod
    def forward(ctx, rhs, time_values, space_values, interp_values, noise, structure, probes, config):
        time_pattern, space_pattern, interp_pattern, factors, preconditioner = structure
        weights = noise.detach().reciprocal()
        posterior = KroneckerPosterior(
            time_values, time_pattern, space_values, space_pattern, interp_values, interp_pattern, weights
        )
        precond = None
        if preconditioner == "jacobi":
            precond = JacobiPreconditioner(posterior.diagonal())
        elif preconditioner in ("time_blocks_cholesky", "time_blocks_ic0"):
            block = _cached(
                factors.space_interp.pattern,
                (factors.time_interp.pattern, space_pattern),
                "time_blocks",
                lambda: time_block_structure(factors.time_interp.pattern, factors.space_interp.pattern, space_pattern),
            )
            values = time_block_values(
                block,
                time_values,
                time_pattern,
                space_values,
                factors.time_interp.values,
                factors.space_interp.values,
                weights,
            )
            if preconditioner == "time_blocks_cholesky":
                blocks = CholeskyPreconditioner.from_matrix(values, block[0])
                precond = TimeBlockPreconditioner(blocks, time_pattern.size[0], space_pattern.size[0])
            else:
                crow, col = block[0].block_diagonal(time_pattern.size[0])
                n = posterior.size
                precond = _incomplete_cholesky(csr_tensor(crow, col, values.reshape(-1), (n, n)), block[0])
        split = MatrixFreeSplit(posterior.matvec, precond)
        quad, estimate, x_probe, x_rhs, z = hutchinson_inv_quad_forward(
            split, probes, rhs.detach().unsqueeze(0), config
        )
        ctx.save_for_backward(x_probe[0], x_rhs[0], z[0], time_values, space_values, interp_values, noise)
        ctx.patterns = (time_pattern, space_pattern, interp_pattern)
        return quad[0], estimate[0]

    @staticmethod
    @first_order_only("the matrix-free space–time log-determinant (Hutchinson mode)")
    def backward(ctx, grad_quad, grad_logdet):
        x_probe, x_rhs, z, time_values, space_values, interp_values, noise = ctx.saved_tensors
        time_pattern, space_pattern, interp_pattern = ctx.patterns
        p = z.shape[-1]
        weighted = x_rhs * grad_quad.unsqueeze(-2)
        left = torch.cat([-weighted, x_probe * (grad_logdet / p)], -1)
        right = torch.cat([x_rhs, z], -1)
        grads = [None] * 8
        needs = ctx.needs_input_grad
        if needs[0]:
            grads[0] = 2.0 * weighted
        if needs[1] or needs[2]:
            g_t, g_s = kronecker_bilinear(
                time_values.detach(), time_pattern, space_values.detach(), space_pattern, left, right
            )
            grads[1], grads[2] = (g_t if needs[1] else None), (g_s if needs[2] else None)
        if needs[3] or needs[4]:
            w = interp_values.detach().reshape(1, -1)
            wl = spmm(w, interp_pattern, left.unsqueeze(0))[0]  # (m, c)
            wr = spmm(w, interp_pattern, right.unsqueeze(0))[0]
            inv = noise.detach().reciprocal().unsqueeze(-1)
            if needs[3]:
                g = sampled_product(interp_pattern, (wr * inv).unsqueeze(0), left.unsqueeze(0))
                g = g + sampled_product(interp_pattern, (wl * inv).unsqueeze(0), right.unsqueeze(0))
                grads[3] = g.reshape(-1)
            if needs[4]:
                grads[4] = -(wl * wr).sum(-1) * inv.squeeze(-1).pow(2)
        return tuple(grads)
