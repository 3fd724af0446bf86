r"""Separable space–time sparse-precision kernels: ``Q = Q_t ⊗ Q_s``, observed through ``W = W_t ⊙ W_s``.

A separable space–time field ``u(s, τ)`` on ``n_s`` space nodes × ``n_t`` time
knots with ``Cov(u(s, τ), u(s', τ')) = C_s(s, s') C_t(τ, τ')`` has the
precision ``Q = Q_t ⊗ Q_s`` (time-major node order ``a·n_s + i``), a GMRF
whenever both factors are (R-INLA's ``group`` models, sdmTMB's
spatio-temporal AR(1) fields). Read at space–time points through the time
and space interpolations, the field's covariance is

$$
K = W Q^{-1} W'^\top = (W_t Q_t^{-1} W_t'^\top) \circ (W_s Q_s^{-1} W_s'^\top), \qquad
W = W_t \odot W_s ,
$$

the product kernel ``k_t · k_s`` (``⊙``: the row-wise Kronecker product,
``gpsparse.operators.kronecker``). [`SpaceTimeKernel`][gpsparse.kernels.SpaceTimeKernel]
returns it as a [`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]
on a [`KroneckerPrecisionLinearOperator`][gpsparse.operators.kronecker.KroneckerPrecisionLinearOperator],
so GPyTorch's marginal likelihood runs through the sparse posterior precision
``P = Q + WᵀD⁻¹W`` with ``log det Q = n_s log det Q_t + n_t log det Q_s``
from the factors, and predictions through
[`SparsePrecisionPredictionStrategy`][gpsparse.kernels.prediction.SparsePrecisionPredictionStrategy].
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from gpsparse.kernels.base import SparsePrecisionKernel, is_sparse_precision_kernel
from gpsparse.operators.kronecker import (
    POSTERIOR_MODES,
    KroneckerPrecisionLinearOperator,
    SpaceTimeCovarianceLinearOperator,
    SpaceTimeFactors,
    face_split,
)
from gpsparse.operators.precision import SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["SpaceTimeKernel"]


class SpaceTimeKernel(SparsePrecisionKernel):
    r"""Separable space–time kernel ``k((s, τ), (s', τ')) = k_s(s, s') · k_t(τ, τ')`` with precision ``Q_t ⊗ Q_s``.

    Parameters
    ----------
    space_kernel : gpytorch.kernels.Kernel
        A gpsparse sparse-precision kernel on the space columns:
        [`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel],
        [`GraphMaternKernel`][gpsparse.kernels.GraphMaternKernel] (node ids), …,
        possibly inside ``ScaleKernel`` or a
        [`SparsePrecisionAdditiveKernel`][gpsparse.kernels.SparsePrecisionAdditiveKernel].
    time_kernel : gpytorch.kernels.Kernel
        A sparse-precision kernel on one time column:
        [`AR1Kernel`][gpsparse.kernels.AR1Kernel] (regular grid),
        [`OrnsteinUhlenbeckKernel`][gpsparse.kernels.OrnsteinUhlenbeckKernel]
        (Matérn ν = 1/2, any sorted grid), or a 1-D ``LatticeMaternKernel``
        (Matérn ν = 3/2, 5/2, … on a regular grid), possibly inside ``ScaleKernel``.
    space_dims : int, optional
        Number of space columns. Default: the lattice dimension of a
        ``LatticeMaternKernel``, 1 for a ``GraphMaternKernel``; required for
        other space kernels.
    posterior : {"auto", "kronecker", "sparse"}
        How the marginal likelihood handles ``P = Q + WᵀD⁻¹W``
        ([`SpaceTimeNoisyLinearOperator`][gpsparse.operators.kronecker.SpaceTimeNoisyLinearOperator]):
        ``"kronecker"`` matrix-free from the factors (stochastic, Hutchinson
        gradients, time-block preconditioner), ``"sparse"`` materialised on
        ``Q``'s pattern through gpsparse's roads, ``"auto"`` (default) the
        first where the second would estimate with Hutchinson gradients.
    **kwargs
        As ``gpytorch.kernels.Kernel`` (``active_dims`` of ``space_dims + 1`` columns, …).

    Notes
    -----
    *Inputs.* ``x`` of shape ``(…, n, space_dims + 1)``: the space columns
    first, the time last (``x[..., :space_dims]`` go to the space kernel,
    ``x[..., space_dims:]`` to the time kernel). Points anywhere inside the
    space kernel's domain and the time grid; each component validates its
    columns (a time outside the grid, an unsorted or duplicated time grid and
    inputs of the wrong width raise ``ValueError``).

    *Model.* ``Q = Q_t ⊗ Q_s`` on ``n_t · n_s`` latent nodes (time-major:
    node ``a·n_s + i`` is knot ``a`` at space node ``i``), ``W = W_t ⊙ W_s``
    (``W[r, (a, i)] = W_t[r, a] W_s[r, i]``: 2 × 4 entries per row for linear
    time and bilinear space interpolation; 1 × 4 when the times are knots). The
    covariance is the product of the two components' covariances (module
    docstring), so the output scale is the product of the components' scales:
    wrap the ``SpaceTimeKernel`` in one ``ScaleKernel`` (and leave the
    components unscaled) for one identifiable variance.

    *Cost.* ``log det Q`` from the factors (closed form for the lattice, graph
    and temporal kernels); ``Q`` is materialised once per call on its
    ``nnz(Q_t)·nnz(Q_s)`` pattern (cached: the pattern is built once per pair
    of factor patterns) because the posterior precision ``P = Q + WᵀD⁻¹W``
    is not a Kronecker product; the Gram's entries are placed into ``Q``'s
    pattern directly when they lie inside it (time interpolation within the
    tridiagonal, bilinear space interpolation within a 13-point stencil).
    Covariance products ``W Q⁻¹ Wᵀ v`` solve with the factors, and the
    prior variances (``diag=True``) are the products of the components'
    variances.

    *Prediction.* Through the sparse posterior precision, like every
    sparse-precision kernel; test points at any space–time point inside the
    grids.

    Raises
    ------
    TypeError
        A component that is not a sparse-precision kernel (e.g.
        ``MarkovMaternKernel``, which is a state-space kernel: use
        ``OrnsteinUhlenbeckKernel`` or a 1-D ``LatticeMaternKernel`` in time).
    ValueError
        Inputs whose width is not ``space_dims + 1``; ``space_dims`` missing or
        not a positive integer; a component returning a negated covariance.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels import AR1Kernel, LatticeMaternKernel, SpaceTimeKernel
    >>> space = LatticeMaternKernel(bounds=[[0.0, 0.0], [1.0, 1.0]], grid_size=20)
    >>> kernel = gpytorch.kernels.ScaleKernel(SpaceTimeKernel(space, AR1Kernel(torch.arange(10.0))))
    >>> x = torch.cat([torch.rand(50, 2), torch.randint(0, 10, (50, 1)).float()], -1)   # (s1, s2, t)
    >>> K = kernel(x).evaluate_kernel()
    >>> K.shape, kernel.base_kernel.num_nodes
    (torch.Size([50, 50]), 4000)
    """

    def __init__(self, space_kernel, time_kernel, *, space_dims: int | None = None, posterior: str = "auto", **kwargs):
        for name, kernel in (("space_kernel", space_kernel), ("time_kernel", time_kernel)):
            if not isinstance(kernel, gpytorch.kernels.Kernel):
                raise TypeError(f"{name} must be a gpytorch kernel, got {type(kernel).__name__}")
            if not is_sparse_precision_kernel(kernel):
                raise TypeError(
                    f"{name} must be a gpsparse sparse-precision kernel (possibly inside ScaleKernel), got "
                    f"{_describe(kernel)}; in time use AR1Kernel, OrnsteinUhlenbeckKernel or a 1-D "
                    "LatticeMaternKernel (MarkovMaternKernel is a state-space kernel, not a sparse precision)"
                )
        space_dims = _space_dims(space_kernel) if space_dims is None else space_dims
        if isinstance(space_dims, bool) or int(space_dims) != space_dims or int(space_dims) < 1:
            raise ValueError(f"space_dims must be a positive integer, got {space_dims!r}")
        if posterior not in POSTERIOR_MODES:
            raise ValueError(f"posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
        super().__init__(**kwargs)
        self.posterior = posterior
        self.space_kernel = space_kernel
        self.time_kernel = time_kernel
        self.space_dims = int(space_dims)

    # ------------------------------------------------------------ structure
    @property
    def num_times(self) -> int | None:
        """Time knots ``n_t`` (None when the time kernel does not say)."""
        return getattr(_base(self.time_kernel), "num_nodes", None)

    @property
    def num_space(self) -> int | None:
        """Space nodes ``n_s`` (None when the space kernel does not say)."""
        return getattr(_base(self.space_kernel), "num_nodes", None)

    @property
    def num_nodes(self) -> int | None:
        """Latent nodes ``n_t · n_s``."""
        n_t, n_s = self.num_times, self.num_space
        return None if n_t is None or n_s is None else n_t * n_s

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(space columns, time column)`` of inputs ``(…, n, space_dims + 1)``; ``ValueError`` for another width."""
        if x.dim() < 2 or x.shape[-1] != self.space_dims + 1:
            raise ValueError(
                f"SpaceTimeKernel expects inputs of shape (..., n, {self.space_dims + 1}): {self.space_dims} space "
                f"column{'s' if self.space_dims > 1 else ''} then the time column, got shape {tuple(x.shape)}"
            )
        return x[..., : self.space_dims], x[..., self.space_dims :]

    def components(self, x1: Tensor, x2: Tensor | None = None):
        """The space and time covariances ``(K_s, K_t)`` at ``x1`` (and ``x2``), as sparse-precision operators."""
        s1, t1 = self.split(x1)
        s2, t2 = (s1, t1) if x2 is None else self.split(x2)
        with gpytorch.settings.lazily_evaluate_kernels(False):
            space = _evaluate(self.space_kernel(s1, s2))
            time = _evaluate(self.time_kernel(t1, t2))
        for name, op in (("space", space), ("time", time)):
            if not isinstance(op, SparsePrecisionLinearOperator):
                raise TypeError(f"the {name} kernel returned {type(op).__name__}, not a sparse-precision covariance")
            if op.sign < 0:
                raise ValueError(f"the {name} kernel returned a negated covariance (a negative scale)")
        return space, time

    def precision(self) -> KroneckerPrecisionLinearOperator:
        """``Q = Q_t ⊗ Q_s`` from the components' ``precision()`` (divided by their ``ScaleKernel`` scales)."""
        return KroneckerPrecisionLinearOperator(
            _component_precision(self.time_kernel), _component_precision(self.space_kernel)
        )

    def interpolation(self, x: Tensor) -> SparseLinearOperator:
        """``W(x) = W_t(t) ⊙ W_s(s)`` ``(n, n_t·n_s)`` for inputs ``x (…, n, space_dims + 1)``."""
        space, time = self.components(x)
        return face_split(_interp(time), _interp(space))

    # -------------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError("SpaceTimeKernel does not support last_dim_is_batch")
        if diag:
            s1, t1 = self.split(x1)
            s2, t2 = self.split(x2)
            return self.space_kernel(s1, s2, diag=True) * self.time_kernel(t1, t2, diag=True)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        space, time = self.components(x1, None if symmetric else x2)
        Q = KroneckerPrecisionLinearOperator(time.Q, space.Q)
        w_t, w_s = _interp(time), _interp(space)
        factors = SpaceTimeFactors(w_t, w_s, self.posterior)
        W1 = face_split(w_t, w_s)
        if symmetric:
            return SpaceTimeCovarianceLinearOperator(Q, interp=W1, factors=factors)
        W2 = face_split(_interp(time, right=True), _interp(space, right=True))
        return SpaceTimeCovarianceLinearOperator(Q, interp=W1, right_interp=W2, factors=factors)


# ----------------------------------------------------------------- helpers
def _base(kernel):
    while isinstance(kernel, gpytorch.kernels.ScaleKernel):
        kernel = kernel.base_kernel
    return kernel


def _component_precision(kernel) -> SparseLinearOperator:
    """``Q / c`` of ``ScaleKernel(…(base))`` with ``c`` the product of the scales; needs ``base.precision()``."""
    scale = None
    while isinstance(kernel, gpytorch.kernels.ScaleKernel):
        scale = kernel.outputscale if scale is None else scale * kernel.outputscale
        kernel = kernel.base_kernel
    if not hasattr(kernel, "precision"):
        raise TypeError(f"{type(kernel).__name__} has no precision() method; evaluate the kernel instead")
    Q = kernel.precision()
    return Q if scale is None else Q._mul_constant(scale.reciprocal())


def _describe(kernel) -> str:
    base = _base(kernel)
    return type(base).__name__ if base is kernel else f"{type(kernel).__name__}({type(base).__name__})"


def _space_dims(kernel) -> int:
    from gpsparse.kernels.graph import GraphMaternKernel
    from gpsparse.kernels.lattice import LatticeMaternKernel

    base = _base(kernel)
    if isinstance(base, LatticeMaternKernel):
        return base.dim
    if isinstance(base, GraphMaternKernel):
        return 1
    raise ValueError(f"SpaceTimeKernel cannot tell how many space columns {_describe(kernel)} takes; pass space_dims=…")


def _interp(op: SparsePrecisionLinearOperator, right: bool = False) -> SparseLinearOperator:
    """``W`` (or ``W'``) of a component, the explicit identity when the operator has none."""
    W = op._right if right else op.interp
    if W is not None:
        return W
    n = op.Q.shape[-1]
    index = torch.arange(n, device=op.device)
    from gpsparse.core.pattern import SparsityPattern

    pattern, _ = SparsityPattern.from_indices(index, index, (n, n))
    return SparseLinearOperator(torch.ones(n, dtype=op.dtype, device=op.device), pattern=pattern)


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
