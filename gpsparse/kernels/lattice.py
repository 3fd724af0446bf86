r"""Matérn covariance on a regular lattice through the SPDE approach (Lindgren, Rue & Lindström 2011).

A Gaussian field ``u`` with precision ``Q = τ (κ² I + L)^α`` on the nodes of
a regular grid — ``L`` the finite-difference Laplacian, ``α`` a positive
integer — is a Gaussian Markov random field whose covariance approximates
the Matérn covariance of smoothness ``ν = α − d/2`` and inverse range ``κ``
(the SPDE ``(κ² − Δ)^{α/2} u = W``, white noise ``W``). Observations at
arbitrary points read the lattice through sparse multilinear interpolation
``W``, so the covariance of the observations is ``W Q⁻¹ Wᵀ``
([`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]).

An adapter (DESIGN.md §1): the numerics are those of
[`SparseLinearOperator`][gpsparse.SparseLinearOperator] and
``gpsparse.operators.precision``; this module builds the lattice, the
normalisation ``τ``, the interpolation and validates inputs. The precision
structure is [`MaternPrecision`][gpsparse.kernels.MaternPrecision] with the
closed-form Laplacian spectrum, so ``log det Q`` is exact
(``KnownLogdetSparseLinearOperator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor

from gpsparse.core.lattice import lattice_variance, neumann_eigenvalues, neumann_laplacian
from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup, check_batch_shapes
from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.kernels.fractional import FractionalMaternPrecision, parse_alpha
from gpsparse.kernels.spde import MaternPrecision
from gpsparse.operators.block import hstack_interpolations
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import SparsePrecisionLinearOperator, covariance_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["LatticeMaternKernel", "neumann_laplacian", "neumann_eigenvalues", "lattice_variance"]

_MAX_DIMS = 3
_INT32_MAX = 2**31 - 1


def _cell_and_fraction(x: Tensor, low: Tensor, spacing: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Lower cell corner ``i (n, d)`` (int64, ``0 … m−2``) and fractions ``f = (x − x_i)/h`` in ``[0, 1]``."""
    scaled = (x - low) / spacing
    corner = scaled.detach().floor().long().clamp(min=torch.zeros_like(sizes), max=sizes - 2)
    return corner, scaled - corner.to(scaled.dtype)


def _corner_offsets(d: int, device) -> Tensor:
    """``(2^d, d)`` corners of the unit cell in lexicographic order (increasing node index)."""
    grids = torch.meshgrid(*[torch.arange(2, device=device)] * d, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], -1)


def _interpolation_weights(fraction: Tensor, corners: Tensor) -> Tensor:
    """``(n, 2^d)`` multilinear weights ``Π_d (f_d if c_d else 1 − f_d)`` (differentiable in ``f``)."""
    f = fraction.unsqueeze(-2)  # (n, 1, d)
    return torch.where(corners.bool(), f, 1 - f).prod(-1)


@dataclass
class _Interp:
    """One cached interpolation matrix: its parts (the payload of a ``CachedInputs`` entry keyed on ``(x,)``)."""

    dtype: torch.dtype
    pattern: SparsityPattern
    corner: Tensor  # (n, d) lower cell corners
    values: Tensor  # (n · 2^d,) detached weights in the kernel's dtype


class LatticeMaternKernel(SparsePrecisionKernel):
    r"""Matérn covariance of a GMRF on a regular lattice (SPDE approach), as ``W Q⁻¹ Wᵀ``.

    The latent field lives on the nodes of a regular grid over ``bounds`` in
    ``d = 1, 2`` or ``3`` dimensions (``m_d`` nodes ``linspace(low_d, high_d,
    m_d)`` per dimension, spacing ``h_d = (high_d − low_d)/(m_d − 1)``; the
    cells may be anisotropic, the covariance is isotropic). Its precision is

    $$
    Q = τ (κ² I + L)^α, \qquad κ = \sqrt{8ν} / ℓ, \qquad ν = α − d/2 > 0,
    $$

    with ``L`` the finite-difference Laplacian with Neumann boundaries
    (``neumann_laplacian``) and ``ℓ`` the learnable ``lengthscale``
    (ν = 0, α = 1 in 2-D: see *Smoothness*). ``τ = v(κ)`` (``lattice_variance``) makes the marginal variance of
    the *discretised* field exactly 1 on the infinite lattice, hence ≈ 1 at
    nodes away from the boundary (within 1e-6 beyond about 4ℓ from it, see
    the notes; wrap the kernel in ``gpytorch.kernels.ScaleKernel`` for an
    output scale). Inputs ``x`` (``n × d``, anywhere inside the bounds,
    upper bounds included) read the field by multilinear interpolation ``W``
    (``2^d`` nonzeros per row, rows summing to 1), so ``forward`` returns
    ``SparsePrecisionLinearOperator(Q, interp=W(x1), right_interp=W(x2))``.

    *Lengthscale.* ``ℓ = √(8ν)/κ`` is the "practical range" of Lindgren et
    al. (2011): the Matérn correlation at distance ``ℓ`` is 0.135 for
    ν = 1/2 and 0.139–0.140 for ν = 1 … 5/2. It is **twice** the
    lengthscale of ``gpytorch.kernels.MaternKernel(nu=ν)`` (``√(2ν)/κ``).

    *Smoothness.* For an integer ``α``, ``ν = α − d/2`` is 1/2, 3/2, 5/2, … in
    1-D and 3-D and 0, 1, 2, … in 2-D; ``α < d/2`` is refused. A
    non-integer ``α > d/2`` (e.g. ``α = 1.5`` in 2-D: the exponential
    covariance, ν = 1/2) takes the rational approximation of *Fractional
    smoothness* below.
    ``α = 1`` in 2-D (``Q = τ(κ² I + L)``, 5 nonzeros per row) is a valid
    GMRF on the lattice, but its continuum limit is not a field with point
    values (ν = 0: the Matérn variance diverges like ``log(1/(κh))/(2π)``
    as ``h → 0``). Here ``τ`` still makes the *lattice* variance exactly 1,
    so the model depends on the grid: a finer grid gives a rougher field
    (nearest-neighbour correlation → 1 more slowly than for ν > 0). ``κ``
    then follows R-INLA's nominal smoothness ``ν_nominal = 1/2`` (for ν = 0),
    ``κ = √(8 ν_nominal)/ℓ`` (``nu_nominal``). The field is much rougher
    than the exponential (ν = 1/2) covariance with the same κ: measured at
    8 cells per ``ℓ`` in the interior, the correlation at distance ``h``,
    ``2h``, ``ℓ/2``, ``ℓ`` and ``1.5ℓ`` is 0.51, 0.30, 0.14, 0.037, 0.011
    (``exp(−κr)``: 0.78, 0.61, 0.37, 0.135, 0.050).
    ``Q`` has the
    pattern of ``(|L| + I)^α`` (13 nonzeros per row for d = 2, α = 2; 25 for
    d = 3, α = 2).

    *Fractional smoothness.* For ``α = n + β`` (``0 < β < 1``) the
    covariance ``(κ² I + L)^{−α}`` is replaced by a sum of ``m + 1``
    independent GMRFs (``rational_order = m``, default 4; Bolin & Kirchner
    2020): ``A^{−α} ≈ Q_0^{−1} + Σ_i Q_i^{−1}`` with ``Q_0 ∝ A^n``,
    ``Q_i ∝ A^n (A + p_i κ²)`` (``A = κ² I + L``) from a positive
    partial-fraction fit of ``y^β`` on ``[0, 1]``
    ([`FractionalMaternPrecision`][gpsparse.kernels.FractionalMaternPrecision],
    ``gpsparse.core.rational``). ``precision()`` is then
    ``blockdiag(Q_0, …, Q_m)`` on ``(m + 1) N`` latent values
    (``num_latent``) and ``W`` is ``[W ⋯ W]``; each block's
    log-determinant is exact, and the approximant's infinite-lattice
    variance is exactly 1. The fit's uniform error bounds the covariance
    error relative to the variance: 8.5e-3 / 1.4e-3 / 7.4e-4 / 3.4e-4 for
    ``β = 1/2`` and ``m = 3 / 4 / 5 / 6`` (2.6e-4 for ``β = 0.8``, m = 4; a
    small β needs more terms: 8.6e-3 for β = 0.3 and 0.13 for β = 0.1 at
    m = 4 — fits worse than 1e-2 warn).
    Measured on a 161² lattice, ``ℓ = 24 h``, α = 1.5: the largest interior
    deviation from the exact fractional lattice covariance is 1.1e-2 /
    8.9e-4 / 3.2e-4 for m = 3 / 4 / 6, and from the continuum exponential
    covariance 6.1e-3 at m = 4 (the exact lattice field itself: 6.7e-3, the
    discretisation error); α = 1.8 (ν = 0.8), m = 3: 1.3e-3 and 9.3e-3
    (``benchmarks/fractional_benchmark.py``). For ``α < 1`` (1-D, ``n = 0``)
    the error relative to the variance is larger than the fit's (α = 0.8,
    m = 4: 5.5e-3 against 2.7e-4). Cost: ``m + 1`` fields of degree
    ``n + 1`` coupled by ``[W ⋯ W]ᵀ D⁻¹ [W ⋯ W]`` in the posterior precision;
    measured, one MLL + backward step on a 200² lattice with 2·10⁴
    observations takes 63 s for α = 1.5 against 1.8 s for α = 2 (1 thread)
    — usable at moderate sizes, not yet fast.
    ``α`` is fixed at construction (not learnable: the fit and the sparsity
    pattern depend on it; compare values by their marginal likelihoods).

    *Log-determinant.* The Neumann Laplacian has closed-form eigenvalues
    (``neumann_eigenvalues``), so ``log det Q = N log τ + α Σ_k log(κ² + λ_k)``
    is exact and O(N) (``KnownLogdetSparseLinearOperator``);
    the marginal likelihood only estimates ``log det`` of the posterior
    precision ``P = Q + Wᵀ D⁻¹ W`` (``gpsparse.operators.precision``). In 1-D ``Q``
    and ``P`` are banded (half-bandwidth α ≤ 6, the default
    ``max_banded_bandwidth``), so every solve and log-determinant is exact
    (``gpsparse.core.banded``).

    Parameters
    ----------
    bounds : array-like
        ``(2, d)``: ``bounds[0]`` the lower, ``bounds[1]`` the upper corner of
        the box (BoTorch's convention); ``(2,)`` for ``d = 1``.
    grid_size : int or sequence of int
        Nodes per dimension (each ≥ 2); one int for all dimensions.
    alpha : float
        Power ``α`` of the SPDE operator (default 2), ``α ≥ d/2`` (``α = 1`` in 2-D: ν = 0, see *Smoothness*);
        a non-integer ``α > d/2`` takes the rational approximation (*Fractional smoothness*).
    rational_order : int
        Partial fractions ``m`` (1 … 8, default 4) for a non-integer ``α``; ignored otherwise.
    lengthscale_prior : gpytorch.priors.Prior, optional
        Prior on ``lengthscale``.
    lengthscale_constraint : gpytorch.constraints.Interval, optional
        Constraint on ``lengthscale`` (default ``Positive()``).
    batch_shape : torch.Size, optional
        Batch of independent lengthscales ``(*batch_shape, 1, 1)``; the
        precisions share one sparsity pattern, the values carry the batch.
    interp_cache_size : int
        Interpolation matrices kept (default 4: e.g. training inputs, test
        inputs and their concatenation during prediction).
    **kwargs
        ``active_dims`` (``d`` of them) etc., as for ``gpytorch.kernels.Kernel``.

    Notes
    -----
    *Boundary condition.* Neumann (reflecting): the grid is mirrored half a
    cell beyond its outermost nodes, so a node ``a`` cells from a face has an
    image at distance ``(2a + 1)h`` and its variance is ``1 + c((2a+1)h)``
    exactly (``c`` the lattice correlation; at a corner the images of all
    faces add up: ≈ 2 at a face, ≈ 2^d at a corner on a fine grid). Measured
    excess variance at distance ``ℓ/2`` from one face: 0.03–0.12; at ``ℓ``:
    0.001–0.016 (larger for smaller ν and finer grids). **Extend the bounds
    by about one lengthscale beyond the data** (more for ν = 1/2), and keep
    ``ℓ`` well below the box size: when ``ℓ`` approaches the box, the
    constant mode (eigenvalue 0) dominates and variances grow far above 1.
    Inputs outside the bounds are refused (extend the bounds instead).

    *Grid resolution.* Largest deviation ``max_r |c_lattice(r) − c_Matérn(r)|``
    of the interior lattice correlation from the continuum Matérn
    correlation over all node offsets ``r ≤ 3ℓ`` (infinite lattice, square
    cells), by cells per lengthscale ``ℓ/h``:

    | d | α | ν | 2 | 4 | 8 | 16 |
    |---|---|---|---|---|---|---|
    | 1 | 1 | 1/2 | 0.0141 | 0.00375 | 0.000953 | 0.000239 |
    | 1 | 2 | 3/2 | 0.0834 | 0.0576 | 0.0184 | 0.00495 |
    | 1 | 3 | 5/2 | 0.112 | 0.0525 | 0.0133 | 0.00313 |
    | 2 | 2 | 1 | 0.0626 | 0.0727 | 0.0363 | 0.0137 |
    | 2 | 3 | 2 | 0.104 | 0.0841 | 0.0227 | 0.00536 |
    | 3 | 2 | 1/2 | 0.0578 | 0.0285 | 0.0281 | 0.0197 |
    | 3 | 3 | 3/2 | 0.0870 | 0.0991 | 0.0373 | 0.0103 |

    The error falls like ``(h/ℓ)²`` from about 8 cells per lengthscale,
    except for the rough fields (d = 2, ν = 1 and d = 3, ν = 1/2), where the
    nearest diagonal offsets converge slowly. *Interpolation* adds a second
    effect: between nodes ``W Q⁻¹ Wᵀ`` averages correlated node values, so
    the variance dips below 1; at cell centres (the minimum) it is, for
    2 / 4 / 8 / 16 cells per lengthscale, 0.69 / 0.81 / 0.89 / 0.94 (d = 1,
    ν = 1/2), 0.70 / 0.86 / 0.96 / 0.99 (d = 1, ν = 3/2), 0.51 / 0.72 /
    0.88 / 0.96 (d = 2, ν = 1), 0.51 / 0.77 / 0.94 / 0.98 (d = 2, ν = 2),
    0.40 / 0.59 / 0.75 / 0.86 (d = 3, ν = 1/2), 0.37 / 0.66 / 0.88 / 0.97
    (d = 3, ν = 3/2). **Use at least 8 cells per lengthscale** (16 for
    smooth-variance needs or rough fields); ``cells_per_lengthscale`` reports
    the current value (the lengthscale moves during training). Cost grows
    like ``N = Π m_d`` nodes, whatever the number of observations.

    *Caches.* The precision structure (pattern and value basis,
    [`MaternPrecision`][gpsparse.kernels.MaternPrecision], ``(α+1)·nnz`` numbers)
    is built on the first call and kept; each call then costs one
    ``(α+1) × nnz`` product for ``Q`` and ~200 quadrature nodes for ``τ``.
    ``W`` is cached per input tensor (identity and in-place version, else
    ``torch.equal`` against a stored copy: O(n·d)) and rebuilt only when the
    inputs change (``num_interp_builds`` counts builds). Inputs that require
    grad get weights recomputed differentiably (piecewise linear in ``x``).

    ``diag=True`` returns ``diag(W Q⁻¹ Wᵀ)`` through
    ``gpsparse.operators.precision.covariance_diagonal`` (exact solves up to
    [`gpsparse.settings.variance_defaults`][]' ``exact_limit`` points, a
    stochastic estimator beyond); for ``x1 ≠ x2`` by polarisation
    ``(diag((W₁+W₂)Q⁻¹(W₁+W₂)ᵀ) − diag((W₁−W₂)Q⁻¹(W₁−W₂)ᵀ))/4``. Inputs with
    batch dimensions must have equal members (one ``W``); the output is
    broadcast to the batch. ``last_dim_is_batch`` and ARD are not supported.

    Raises
    ------
    ValueError
        Bad ``bounds`` (shape, non-finite, lower ≥ upper), bad ``grid_size``
        (not an integer ≥ 2 per dimension, wrong length, more than 2³¹ − 1
        nodes), ``α`` not a positive number, ``α < d/2`` (``≤ d/2`` when
        not an integer), ``rational_order`` outside 1 … 8, ``ard_num_dims`` > 1,
        inputs of the wrong dimension, with NaN/Inf or outside the bounds.
    NotImplementedError
        ``last_dim_is_batch=True``; batched inputs with different members.

    References
    ----------
    Lindgren, Rue & Lindström (2011), "An explicit link between Gaussian
    fields and Gaussian Markov random fields: the stochastic partial
    differential equation approach", JRSS B 73(4).
    Bolin & Kirchner (2020), "The rational SPDE approach for Gaussian random
    fields with general smoothness", JCGS 29(2).

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels.lattice import LatticeMaternKernel
    >>> kernel = LatticeMaternKernel(bounds=[[-0.2, -0.2], [1.2, 1.2]], grid_size=57)  # h = 0.025
    >>> kernel.lengthscale = 0.2                       # 8 cells per lengthscale
    >>> covar = gpytorch.kernels.ScaleKernel(kernel)
    >>> x = torch.rand(100, 2)
    >>> K = covar(x).evaluate_kernel()                 # W Q⁻¹ Wᵀ, never formed
    >>> K.shape, kernel.num_nodes
    (torch.Size([100, 100]), 3249)
    """

    has_lengthscale = True

    def __init__(
        self,
        bounds,
        grid_size,
        alpha: float = 2,
        *,
        rational_order: int = 4,
        lengthscale_prior: Prior | None = None,
        lengthscale_constraint: Interval | None = None,
        batch_shape: torch.Size | None = None,
        interp_cache_size: int = 4,
        **kwargs,
    ):
        low, high = _parse_bounds(bounds)
        d = len(low)
        sizes = _parse_grid_size(grid_size, d)
        alpha = parse_alpha(alpha, d)
        if isinstance(rational_order, bool) or int(rational_order) != rational_order or not 1 <= rational_order <= 8:
            raise ValueError(f"rational_order must be an integer in 1 … 8, got {rational_order!r}")
        ard = kwargs.pop("ard_num_dims", None)
        if ard not in (None, 1):
            raise ValueError(f"LatticeMaternKernel is isotropic (one κ); got ard_num_dims={ard}")
        active = kwargs.get("active_dims")
        if active is not None and len(active) != d:
            raise ValueError(f"active_dims selects {len(active)} dimensions but the bounds have {d}")
        if int(interp_cache_size) < 1:
            raise ValueError(f"interp_cache_size must be a positive integer, got {interp_cache_size}")
        super().__init__(
            lengthscale_prior=lengthscale_prior,
            lengthscale_constraint=lengthscale_constraint,
            batch_shape=batch_shape,
            **kwargs,
        )
        self.alpha = alpha
        self.rational_order = int(rational_order)
        self.grid_size = sizes
        self._low, self._high = low, high
        self.spacing = tuple((b - a) / (m - 1) for a, b, m in zip(low, high, sizes))
        self.interp_cache_size = int(interp_cache_size)
        self.num_interp_builds = 0
        self._interp_cache: list[CachedInputs[_Interp]] = []
        self._structure: MaternPrecision | FractionalMaternPrecision | None = None

    # --------------------------------------------------------------- lattice
    @property
    def dim(self) -> int:
        """Input dimension ``d``."""
        return len(self.grid_size)

    @property
    def nu(self) -> float:
        """Smoothness ``ν = α − d/2`` (non-integer for a fractional ``α``)."""
        return self.alpha - self.dim / 2

    @property
    def nu_nominal(self) -> float:
        """``ν``, or 1/2 when ``ν = 0`` (α = 1 in 2-D; R-INLA): the smoothness in ``κ = √(8 ν_nominal)/ℓ``."""
        return self.nu if self.nu > 0 else 0.5

    @property
    def num_nodes(self) -> int:
        """Lattice nodes ``N = Π m_d``."""
        return math.prod(self.grid_size)

    @property
    def bounds(self) -> Tensor:
        """``(2, d)`` float64: lower and upper corner of the lattice."""
        return torch.tensor([self._low, self._high], dtype=torch.float64)

    def grid_points(self) -> Tensor:
        """``(N, d)`` float64 node coordinates in the node order of ``Q`` (C order)."""
        axes = [torch.linspace(a, b, m, dtype=torch.float64) for a, b, m in zip(self._low, self._high, self.grid_size)]
        return torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")], -1)

    @property
    def cells_per_lengthscale(self) -> Tensor:
        """``ℓ / max_d h_d`` per batch member, ``(*batch_shape)`` (see the resolution notes)."""
        return self.lengthscale.detach()[..., 0, 0] / max(self.spacing)

    def kappa2(self) -> Tensor:
        """``κ² = 8 ν_nominal/ℓ²``, ``(*batch_shape)``, differentiable in the lengthscale."""
        return 8.0 * self.nu_nominal / self.lengthscale[..., 0, 0] ** 2

    @property
    def is_fractional(self) -> bool:
        """Whether ``α`` is not an integer (the rational approximation, *Fractional smoothness*)."""
        return not isinstance(self.alpha, int)

    @property
    def num_latent(self) -> int:
        """Latent values behind the covariance: ``N``, or ``(m + 1) N`` for a fractional ``α``."""
        return self.num_nodes * (self._precision_structure().num_blocks if self.is_fractional else 1)

    def precision(self) -> KnownLogdetSparseLinearOperator:
        """``Q = τ (κ² I + L)^α`` (``N × N``, batch ``(*batch_shape)``) with its exact log-determinant.

        For a fractional ``α``: ``blockdiag(Q_0, …, Q_m)`` (``(m+1)N`` square), see *Fractional smoothness*.
        """
        structure = self._precision_structure()
        kappa2 = self.kappa2()
        if self.is_fractional:
            return structure.operator(kappa2)
        return structure.operator(kappa2, lattice_variance(kappa2, self.spacing, self.alpha))

    def _precision_structure(self) -> MaternPrecision | FractionalMaternPrecision:
        if self._structure is None:
            laplacian = neumann_laplacian(self.grid_size, self.spacing)
            eigenvalues = neumann_eigenvalues(self.grid_size, self.spacing)
            if self.is_fractional:
                self._structure = FractionalMaternPrecision(
                    laplacian, self.alpha, eigenvalues=eigenvalues, spacing=self.spacing, order=self.rational_order
                )
            else:
                self._structure = MaternPrecision(laplacian, self.alpha, eigenvalues=eigenvalues)
        return self._structure

    def latent_interpolation(self, x: Tensor) -> SparseLinearOperator:
        """``W(x)`` for the latent values: ``interpolation(x)``, or ``[W ⋯ W]`` (one per block, fractional ``α``)."""
        W = self.interpolation(x)
        if not self.is_fractional:
            return W
        blocks = self._precision_structure().num_blocks
        return hstack_interpolations([W] * blocks, [self.num_nodes] * blocks, W.shape[-2], W.device, W.dtype)

    # --------------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(
                "LatticeMaternKernel does not support last_dim_is_batch (deprecated in GPyTorch): the lattice is "
                f"{self.dim}-dimensional"
            )
        self._check_shapes(x1, x2)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        Q = self.precision()
        if Q.batch_shape != batch:
            Q = Q._expand_batch(batch)
        W1 = self.latent_interpolation(x1)
        W2 = W1 if symmetric else self.latent_interpolation(x2)
        if diag:
            return self._diagonal(Q, W1, W2, symmetric)
        return SparsePrecisionLinearOperator(Q, interp=W1, right_interp=None if symmetric else W2)

    def _diagonal(self, Q, W1: SparseLinearOperator, W2: SparseLinearOperator, symmetric: bool) -> Tensor:
        if symmetric:
            return covariance_diagonal(Q, W1)
        if W1.shape != W2.shape:
            raise ValueError(f"diag=True needs x1 and x2 with as many points, got {W1.shape[0]} and {W2.shape[0]}")
        plus = covariance_diagonal(Q, W1 + W2)
        minus = covariance_diagonal(Q, W1 + W2._mul_constant(-1.0))
        return (plus - minus) / 4

    def _check_shapes(self, x1: Tensor, x2: Tensor) -> None:
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2:
                raise ValueError(
                    f"LatticeMaternKernel expects inputs of shape (..., n, d), got {name} of shape {tuple(x.shape)}"
                )
            if x.shape[-1] != self.dim:
                raise ValueError(
                    f"LatticeMaternKernel was built for {self.dim}-dimensional inputs (bounds of {self.dim} "
                    f"dimensions) but got {name} of dimension {x.shape[-1]}"
                )
        check_batch_shapes(x1, x2, self.batch_shape)

    # --------------------------------------------------------- interpolation
    def interpolation(self, x: Tensor) -> SparseLinearOperator:
        """``W(x)``: sparse multilinear interpolation ``(n, N)`` from the lattice to ``x (…, n, d)`` (cached).

        Row ``i`` holds the ``2^d`` weights ``Π_d (1 − |x_{id} − z_d|/h_d)``
        of the corners ``z`` of the cell containing ``x_i``; rows sum to 1.
        """
        x = _single_member(x)
        dtype = self.raw_lengthscale.dtype
        entry = self._interp_entry(x, dtype)
        values = entry.values
        if torch.is_grad_enabled() and x.requires_grad:
            low, spacing, sizes = self._lattice_tensors(x)
            fraction = (x - low) / spacing - entry.corner.to(x.dtype)
            values = _interpolation_weights(fraction, _corner_offsets(self.dim, x.device)).reshape(-1).to(dtype)
        return SparseLinearOperator(values, pattern=entry.pattern)

    def _lattice_tensors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        low = torch.tensor(self._low, dtype=x.dtype, device=x.device)
        spacing = torch.tensor(self.spacing, dtype=x.dtype, device=x.device)
        sizes = torch.tensor(self.grid_size, device=x.device)
        return low, spacing, sizes

    def _interp_entry(self, x: Tensor, dtype: torch.dtype) -> _Interp:
        entry = cache_lookup(self._interp_cache, (x,), accept=lambda cached: cached.dtype == dtype)
        if entry is None:
            entry = CachedInputs.of((x,), self._build_interp(x, dtype))
            cache_insert(self._interp_cache, entry, self.interp_cache_size)
        return entry.payload

    def _build_interp(self, x: Tensor, dtype: torch.dtype) -> _Interp:
        self.num_interp_builds += 1
        xd = self._checked_inside(x.detach())
        low, spacing, sizes = self._lattice_tensors(xd)
        corner, fraction = _cell_and_fraction(xd, low, spacing, sizes)
        corners = _corner_offsets(self.dim, xd.device)
        strides = torch.tensor(
            [math.prod(self.grid_size[k + 1 :]) for k in range(self.dim)], dtype=torch.long, device=xd.device
        )
        columns = ((corner.unsqueeze(-2) + corners) * strides).sum(-1)  # (n, 2^d), increasing along rows
        n, per_row = columns.shape
        crow = torch.arange(n + 1, device=xd.device) * per_row
        pattern = SparsityPattern(crow, columns.reshape(-1), (n, self.num_nodes))
        values = _interpolation_weights(fraction, corners).reshape(-1).to(dtype)
        return _Interp(
            dtype=dtype,
            pattern=pattern,
            corner=corner,
            values=values,
        )

    def _checked_inside(self, x: Tensor) -> Tensor:
        """``x`` with values within rounding of the bounds clamped into them; errors for the rest."""
        if x.numel() and not bool(torch.isfinite(x).all()):
            bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise ValueError(f"LatticeMaternKernel inputs contain {bad}")
        if x.numel() == 0:
            return x
        low = torch.tensor(self._low, dtype=x.dtype, device=x.device)
        high = torch.tensor(self._high, dtype=x.dtype, device=x.device)
        eps = torch.finfo(x.dtype).eps
        slack = 8 * eps * torch.maximum(torch.maximum(low.abs(), high.abs()), high - low)
        lo, hi = x.amin(-2), x.amax(-2)
        outside = (lo < low - slack) | (hi > high + slack)
        if bool(outside.any()):
            k = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"LatticeMaternKernel inputs lie outside the lattice bounds: dimension {k} spans "
                f"[{float(lo[k]):.6g}, {float(hi[k]):.6g}] but the bounds are [{self._low[k]:.6g}, "
                f"{self._high[k]:.6g}]; extend the bounds (by about one lengthscale beyond the data)"
            )
        return torch.minimum(torch.maximum(x, low), high)

    def clear_cache(self) -> None:
        """Drop the cached interpolation matrices and the precision structure (rebuilt on the next call)."""
        self._interp_cache.clear()
        self._structure = None

    def __getstate__(self):
        # Pickles and deep copies start with empty caches (weak references, large index arrays).
        state = dict(super().__getstate__())
        state["_interp_cache"] = []
        state["_structure"] = None
        return state


# ------------------------------------------------------------------ helpers
def _parse_bounds(bounds) -> tuple[tuple[float, ...], tuple[float, ...]]:
    b = torch.as_tensor(bounds, dtype=torch.float64).detach().cpu()
    if b.dim() == 1:
        b = b.unsqueeze(-1)
    if b.dim() != 2 or b.shape[0] != 2 or not 1 <= b.shape[1] <= _MAX_DIMS:
        raise ValueError(
            f"bounds must have shape (2, d) with d = 1, 2 or 3 (lower corner, upper corner), got {tuple(b.shape)}"
        )
    if not bool(torch.isfinite(b).all()):
        raise ValueError("bounds must be finite")
    if not bool((b[1] > b[0]).all()):
        raise ValueError(
            f"bounds must have lower < upper in every dimension, got lower {b[0].tolist()} and upper {b[1].tolist()}"
        )
    return tuple(b[0].tolist()), tuple(b[1].tolist())


def _parse_grid_size(grid_size, d: int) -> tuple[int, ...]:
    if isinstance(grid_size, int | np.integer):
        sizes = [grid_size] * d
    else:
        try:
            sizes = list(grid_size)
        except TypeError:
            raise ValueError(f"grid_size must be one int or {d} ints (one per dimension), got {grid_size!r}") from None
    if len(sizes) != d:
        raise ValueError(f"grid_size must be one int or {d} ints (one per dimension), got {grid_size!r}")
    for m in sizes:
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 2:
            raise ValueError(f"grid_size must hold integers ≥ 2 (nodes per dimension), got {grid_size!r}")
    if math.prod(sizes) > _INT32_MAX:
        raise ValueError(f"the lattice would have {math.prod(sizes):,} nodes, more than 2³¹ − 1")
    return tuple(int(m) for m in sizes)


def _single_member(x: Tensor) -> Tensor:
    """The ``(n, d)`` inputs of ``(*batch, n, d)`` whose batch members are all equal."""
    if x.dim() == 2:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if flat.shape[0] > 1 and not torch.equal(flat.detach(), flat[:1].detach().expand_as(flat)):
        raise NotImplementedError(
            "LatticeMaternKernel needs one set of inputs (one interpolation matrix W) for all batch members; "
            f"got inputs of shape {tuple(x.shape)} whose batch members differ"
        )
    return flat[0]
