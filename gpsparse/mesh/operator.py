r"""``SPDEPrecisionLinearOperator``: a sparse precision whose log-determinant comes from a first-order factor.

The mesh SPDE precision ``Q_α = T D M^α D T`` (``gpsparse.mesh.spde``: ``T``
and ``D = C̃^{1/2}`` diagonal) has

$$
\log\det Q_α = α \log\det M + \text{offset}, \qquad \text{offset} = 2\sum_i \log τ_i + \sum_i \log \tilde c_i ,
$$

so its log-determinant needs the factor ``M = 𝒦² + L`` only: a matrix with
the mesh's 1-ring pattern (~7 entries per row in 2-D against ~19 for
``Q_2``) and the square root of ``Q``'s condition number. The operator is a
[`KnownLogdetSparseLinearOperator`][gpsparse.operators.known_logdet.KnownLogdetSparseLinearOperator]
whose ``known_logdet`` is computed **on first use** (a prediction or a
``diag`` call never pays for it) by the dispatcher's roads on ``M``:

* ``logdet_road="auto"`` (default): the exact roads first — banded
  Cholesky for 1-D meshes (``M`` is tridiagonal), CHOLMOD whenever
  scikit-sparse is installed (whatever ``logdet_defaults(method=...)``
  says; the gradient by selected inversion of ``M``), a dense Cholesky up to
  ``DIFFERENCE_DENSE_MAX_ROWS`` = 1024 rows — else stochastic Lanczos
  quadrature on ``M`` with [`gpsparse.settings.logdet_defaults`][];
* ``logdet_road="settings"``: the dispatcher's choice under the settings in
  force (SLQ on ``M`` unless ``logdet_defaults(method="cholesky")``).

On the stochastic road the "known" value is an SLQ estimate of
``log det M`` (times ``α``), the same estimator gpsparse uses elsewhere but
on the better-conditioned factor; the noisy covariance then treats it as
given (no common random numbers with ``log det P``).

The representation is ``(values, factor_values, offset)``, so gradients
reach ``κ``, ``τ`` (and ``H``) through both the values of ``Q`` and the
log-determinant. Scaling by ``c > 0`` (``ScaleKernel``), batch expansion
and batch indexing keep the type; other operations give plain sparse
operators, as for the parent class.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.pattern import SparsityPattern
from gpsparse.linalg import dispatch
from gpsparse.linalg.dispatch import DIFFERENCE_DENSE_MAX_ROWS
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator, operator_road_config

__all__ = ["SPDEPrecisionLinearOperator", "LOGDET_ROADS"]

LOGDET_ROADS = ("auto", "settings")


class SPDEPrecisionLinearOperator(KnownLogdetSparseLinearOperator):
    r"""``Q`` (symmetric positive definite, sparse) with ``log det Q = power · log det M + offset``.

    With several factors (``power`` a tuple): ``log det Q = Σ_f power_f · log det M_f + offset``,
    e.g. the block-diagonal precision of a fractional field (``gpsparse.mesh.fractional``).

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` values of ``Q`` on ``pattern`` (symmetric).
    factor_values : Tensor
        ``(*batch_f, nnz_M)`` values of the factor ``M`` on ``factor_pattern``
        (``batch_f`` broadcastable to ``batch``); ``(*batch_f, F, nnz_M)`` for
        ``F`` factors.
    offset : Tensor
        ``(*batch)`` the additive constant of the log-determinant.
    pattern, factor_pattern : SparsityPattern
        Symmetric patterns of equal size ``N`` (with several factors: the
        factors' size divides ``Q``'s).
    power : int or tuple of int
        ``α``; or one positive integer per factor (all ``F`` log-determinants
        are computed in one batched call).
    logdet_road : {"auto", "settings"}
        How ``log det M`` is computed (module notes).

    Notes
    -----
    The caller guarantees ``det Q = det(M)^α · exp(offset)`` (not checked:
    that would cost a factorisation); ``gpsparse.mesh.spde.MeshSPDEStructure``
    provides matching values. ``factor()`` returns ``M`` as a
    [`SparseLinearOperator`][gpsparse.SparseLinearOperator]; ``factor_road()`` the
    road its log-determinant takes.

    Examples
    --------
    >>> import torch
    >>> from gpsparse.mesh import Mesh
    >>> from gpsparse.mesh.spde import MeshSPDEStructure
    >>> structure = MeshSPDEStructure(Mesh.regular_grid([[0, 0], [1, 1]], 6), alpha=2)
    >>> kappa2, tau = torch.tensor(4.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    >>> Q = SPDEPrecisionLinearOperator(
    ...     structure.precision_values(kappa2, tau), structure.factor_values(kappa2), structure.logdet_offset(tau),
    ...     pattern=structure.pattern, factor_pattern=structure.factor_pattern, power=2)
    >>> bool(torch.allclose(Q.logdet(), torch.logdet(Q.to_dense())))
    True
    """

    def __init__(
        self,
        values: Tensor,
        factor_values: Tensor,
        offset: Tensor,
        *,
        pattern: SparsityPattern,
        factor_pattern: SparsityPattern,
        power: int | tuple[int, ...],
        logdet_road: str = "auto",
    ):
        SparseLinearOperator.__init__(self, values, pattern=pattern)
        stacked = isinstance(power, tuple)
        powers = power if stacked else (power,)
        if not powers or any(isinstance(q, bool) or int(q) != q or q < 1 for q in powers):
            raise ValueError(f"power must be a positive integer (or a tuple of them), got {power!r}")
        power = tuple(int(q) for q in powers) if stacked else int(power)
        if not (pattern.symmetric and factor_pattern.symmetric):
            raise ValueError("an SPDE precision and its factor need symmetric patterns")
        if factor_pattern.size != pattern.size and not (stacked and pattern.size[0] % factor_pattern.size[0] == 0):
            raise ValueError(f"the factor has size {factor_pattern.size} but Q has size {pattern.size}")
        tail = (len(powers), factor_pattern.nnz) if stacked else (factor_pattern.nnz,)
        if not isinstance(factor_values, Tensor) or factor_values.shape[-len(tail) :] != tail:
            raise ValueError(f"factor_values must have shape (*batch, {', '.join(map(str, tail))})")
        try:
            torch.broadcast_shapes(factor_values.shape[: -len(tail)], values.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"factor_values' batch {tuple(factor_values.shape[: -len(tail)])} does not broadcast to "
                f"{tuple(values.shape[:-1])}"
            ) from None
        if not isinstance(offset, Tensor) or offset.shape != values.shape[:-1]:
            raise ValueError(f"offset must have the batch shape {tuple(values.shape[:-1])} of the values")
        if logdet_road not in LOGDET_ROADS:
            raise ValueError(f"logdet_road must be one of {LOGDET_ROADS}, got {logdet_road!r}")
        LinearOperator.__init__(
            self,
            values,
            factor_values,
            offset,
            pattern=pattern,
            factor_pattern=factor_pattern,
            power=power,
            logdet_road=logdet_road,
        )
        self.factor_values, self.offset = factor_values, offset
        self.factor_pattern, self.power, self.logdet_road = factor_pattern, power, logdet_road
        self._factor_dims = len(tail)  # trailing dimensions of factor_values that are not batch
        self._logdet: Tensor | None = None

    # ------------------------------------------------------------ log det
    def factor(self) -> SparseLinearOperator:
        """``M`` as a SparseLinearOperator ``(*batch_f, N, N)`` (``(*batch_f, F, N, N)`` for ``F`` factors)."""
        return SparseLinearOperator(self.factor_values, pattern=self.factor_pattern)

    def _factor_config(self):
        config = operator_road_config(
            symmetric=True, num_rows=self.pattern.size[0], device_type=self.device.type, dense=True
        )
        if self.logdet_road == "auto":
            config = replace(
                config,
                cholesky=config.cholesky or cholmod_available(),
                dense_max_rows=max(config.dense_max_rows, DIFFERENCE_DENSE_MAX_ROWS),
            )
        return config

    def factor_road(self) -> str:
        """The road of ``log det M``: ``"banded"``, ``"cholesky"``, ``"dense"`` or ``"krylov"`` (SLQ)."""
        batch = self.factor_values.shape[:-1].numel()
        return dispatch.choose_road(self.factor_pattern, self._factor_config(), logdet=True, batch_numel=batch)

    @property
    def known_logdet(self) -> Tensor:
        """``power · log det M + offset`` (``Σ_f power_f log det M_f + offset``) ``(*batch)``, on first use."""
        if self._logdet is None:
            factor_logdet = dispatch.logdet(self.factor_values, self.factor_pattern, self._factor_config())
            if isinstance(self.power, tuple):
                weights = torch.tensor(self.power, dtype=factor_logdet.dtype, device=factor_logdet.device)
                factor_logdet = (factor_logdet * weights).sum(-1)
            else:
                factor_logdet = self.power * factor_logdet
            self._logdet = (factor_logdet + self.offset).expand(self.batch_shape)
        return self._logdet

    def _set_requires_grad(self, val: bool) -> None:
        super()._set_requires_grad(val)
        self._logdet = None

    def detach_(self) -> SPDEPrecisionLinearOperator:
        super().detach_()
        self._logdet = None
        return self

    # ---------------------------------------------------------- structure
    def _with(self, values: Tensor, factor_values: Tensor, offset: Tensor) -> SPDEPrecisionLinearOperator:
        return SPDEPrecisionLinearOperator(
            values,
            factor_values,
            offset,
            pattern=self.pattern,
            factor_pattern=self.factor_pattern,
            power=self.power,
            logdet_road=self.logdet_road,
        )

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return (*SparseLinearOperator._bilinear_derivative(self, left_vecs, right_vecs), None, None)

    def _factors_for(self, batch_shape) -> Tensor:
        """``factor_values`` expanded to the batch ``batch_shape``."""
        return self.factor_values.expand(*batch_shape, *self.factor_values.shape[-self._factor_dims :])

    def _expand_batch(self, batch_shape) -> SPDEPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        return self._with(
            self.values.expand(*batch_shape, self.pattern.nnz),
            self._factors_for(batch_shape),
            self.offset.expand(batch_shape),
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        result = SparseLinearOperator._getitem(self, row_index, col_index, *batch_indices)
        if not isinstance(result, SparseLinearOperator) or result.pattern is not self.pattern:
            return result  # rows or columns were selected: no factorised form
        factor = self._factors_for(self.batch_shape)
        factor = factor[(*batch_indices, *(slice(None),) * self._factor_dims)] if batch_indices else factor
        offset = self.offset[batch_indices] if batch_indices else self.offset
        if offset.shape != result.values.shape[:-1]:
            return result
        return self._with(result.values, factor, offset)

    def _mul_constant(self, other) -> SparseLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        scaled = SparseLinearOperator._mul_constant(self, other)
        if not bool((other > 0).all()):
            return scaled
        offset = self.offset + self.pattern.size[0] * other.log()
        if offset.shape != scaled.values.shape[:-1]:
            offset = offset.expand(scaled.values.shape[:-1])
        return self._with(scaled.values, self._factors_for(scaled.values.shape[:-1]), offset)
