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

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` values of ``Q`` on ``pattern`` (symmetric).
    factor_values : Tensor
        ``(*batch_f, nnz_M)`` values of the factor ``M`` on ``factor_pattern``
        (``batch_f`` broadcastable to ``batch``).
    offset : Tensor
        ``(*batch)`` the additive constant of the log-determinant.
    pattern, factor_pattern : SparsityPattern
        Symmetric patterns of equal size ``N``.
    power : int
        ``α``.
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
        power: int,
        logdet_road: str = "auto",
    ):
        SparseLinearOperator.__init__(self, values, pattern=pattern)
        if not (pattern.symmetric and factor_pattern.symmetric):
            raise ValueError("an SPDE precision and its factor need symmetric patterns")
        if factor_pattern.size != pattern.size:
            raise ValueError(f"the factor has size {factor_pattern.size} but Q has size {pattern.size}")
        if not isinstance(factor_values, Tensor) or factor_values.shape[-1:] != (factor_pattern.nnz,):
            raise ValueError(f"factor_values must have shape (*batch, {factor_pattern.nnz})")
        try:
            torch.broadcast_shapes(factor_values.shape[:-1], values.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"factor_values' batch {tuple(factor_values.shape[:-1])} does not broadcast to "
                f"{tuple(values.shape[:-1])}"
            ) from None
        if not isinstance(offset, Tensor) or offset.shape != values.shape[:-1]:
            raise ValueError(f"offset must have the batch shape {tuple(values.shape[:-1])} of the values")
        if int(power) != power or power < 1:
            raise ValueError(f"power must be a positive integer, got {power!r}")
        if logdet_road not in LOGDET_ROADS:
            raise ValueError(f"logdet_road must be one of {LOGDET_ROADS}, got {logdet_road!r}")
        LinearOperator.__init__(
            self,
            values,
            factor_values,
            offset,
            pattern=pattern,
            factor_pattern=factor_pattern,
            power=int(power),
            logdet_road=logdet_road,
        )
        self.factor_values, self.offset = factor_values, offset
        self.factor_pattern, self.power, self.logdet_road = factor_pattern, int(power), logdet_road
        self._logdet: Tensor | None = None

    # ------------------------------------------------------------ log det
    def factor(self) -> SparseLinearOperator:
        """``M`` as a SparseLinearOperator ``(*batch_f, N, N)``."""
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
        """``power · log det M + offset`` ``(*batch)``, computed on first use (module notes)."""
        if self._logdet is None:
            factor_logdet = dispatch.logdet(self.factor_values, self.factor_pattern, self._factor_config())
            self._logdet = (self.power * factor_logdet + self.offset).expand(self.batch_shape)
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

    def _expand_batch(self, batch_shape) -> SPDEPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        return self._with(
            self.values.expand(*batch_shape, self.pattern.nnz),
            self.factor_values.expand(*batch_shape, self.factor_pattern.nnz),
            self.offset.expand(batch_shape),
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        result = SparseLinearOperator._getitem(self, row_index, col_index, *batch_indices)
        if not isinstance(result, SparseLinearOperator) or result.pattern is not self.pattern:
            return result  # rows or columns were selected: no factorised form
        factor = self.factor_values.expand(*self.batch_shape, self.factor_pattern.nnz)
        factor = factor[(*batch_indices, slice(None))] if batch_indices else factor
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
        factor = self.factor_values
        if factor.shape[:-1] != scaled.values.shape[:-1]:
            factor = factor.expand(*scaled.values.shape[:-1], self.factor_pattern.nnz)
        return self._with(scaled.values, factor, offset)
