r"""Matérn fields on triangulated meshes by the SPDE approach (Lindgren, Rue & Lindström 2011), as in R-INLA.

The Gaussian field ``u`` solving ``(κ² − ∇·H∇)^{α/2} (τ u) = W`` (white
noise ``W``) on a domain ``Ω`` — a polygon with holes, the sphere, an
interval — has, for ``H = I`` and ``Ω = ℝ^d``, the Matérn covariance with
smoothness ``ν = α − d/2``, range ``ρ = √(8ν)/κ`` (correlation ≈ 0.13 at
distance ``ρ``) and marginal variance

$$
σ^2 = \frac{Γ(ν)}{Γ(α) (4π)^{d/2} κ^{2ν} τ^2}.
$$

Its finite-element discretisation with piecewise-linear elements on a mesh
(``gpsparse.mesh``: mass lumped to ``C̃``, stiffness ``G``) is a Gaussian
Markov random field on the ``N`` vertices with sparse precision

$$
Q_1 = τ^2 (κ^2 \tilde C + G), \qquad Q_2 = τ^2 (κ^2 \tilde C + G)\, \tilde C^{-1} (κ^2 \tilde C + G)
$$

(and recursively for higher integer ``α``; ``α = 1`` in 2-D, where ``ν = 0``,
is the valid GMRF ``Q_1`` with R-INLA's nominal ``κ``, ``τ``: see the
kernel's notes), read at arbitrary points by the
barycentric interpolation ``W`` of the mesh: the covariance of the
observations is ``W Q⁻¹ Wᵀ``
([`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]).
The kernel's hyperparameters are R-INLA's (``inla.spde2.pcmatern``): the range
``ρ`` and the marginal standard deviation ``σ``, ``κ = √(8ν)/ρ`` and ``τ`` from
the formula above, so values are comparable with R-INLA fits.

*Log-determinant* (``gpsparse.mesh.operator``): ``log det Q_α = α log det(κ²I + L)
+ n log τ² + Σ log c̃_i`` with ``L = C̃^{-1/2} G C̃^{-1/2}`` — for ``α = 2``
``2 log det(κ²C̃ + G) − log det C̃ + n log τ²`` — exact by CHOLMOD (or the
banded Cholesky for 1-D meshes, a dense Cholesky for small meshes) and
otherwise stochastic Lanczos quadrature on the first-order factor only.

*Boundary.* The FEM has natural (Neumann) boundary conditions, which inflate
the variance within about one range of the mesh boundary (doubling it at a
straight edge for ``α = 2``); extend the mesh beyond the data
(``Mesh.from_points_and_boundary(..., extension=ρ)``), or use the boundary
on purpose (a coastline for a marine field: holes are not crossed).

*Non-stationary and anisotropic fields* (R-INLA's ``B.tau``, ``B.kappa``):
``log κ(s) = log κ_ρ + Σ_k B^κ_k(s) θ^κ_k`` and ``log τ(s) = log τ_{ρ,σ} +
Σ_k B^τ_k(s) θ^τ_k`` with basis matrices given per vertex and learnable
coefficients (initialised to 0, the stationary field); a learnable
anisotropy ``H = R(φ) diag(e^{a}, e^{−a}) R(φ)ᵀ`` (``det H = 1``, so ``σ`` keeps its
meaning): the correlation range is ``ρ e^{a/2}`` along the direction at
angle ``φ`` and ``ρ e^{−a/2}`` across it (planar meshes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.priors import Prior
from gpytorch.priors.utils import _bufferize_attributes
from torch import Tensor
from torch.distributions import Exponential, constraints
from torch.nn import Module as TModule

from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup, check_batch_shapes
from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.kernels.fractional import parse_alpha
from gpsparse.mesh.fractional import FractionalMeshPrecision
from gpsparse.mesh.mesh import Mesh
from gpsparse.mesh.operator import LOGDET_ROADS, SPDEPrecisionLinearOperator
from gpsparse.mesh.spde import MeshSPDEStructure, matern_tau, sphere_variance_factor
from gpsparse.operators.block import hstack_interpolations
from gpsparse.operators.precision import SparsePrecisionLinearOperator, covariance_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["MeshMaternKernel", "PCMaternRangePrior", "PCMaternSigmaPrior", "NORMALIZATIONS"]

#: ``"rinla"``: R-INLA's ``τ`` (the ``ℝ^d`` formula) on every mesh; ``"sphere"``: exact on the sphere.
NORMALIZATIONS = ("rinla", "sphere")


@dataclass
class _Interp:
    """One cached interpolation matrix (the payload of a ``CachedInputs`` entry keyed on ``(x,)``)."""

    dtype: torch.dtype
    pattern: SparsityPattern
    cells: np.ndarray  # (n,) located cells
    vertex_ids: np.ndarray  # (n, k) sorted vertex ids per row
    values: Tensor  # (n · k,) detached weights in the kernel's dtype


class MeshMaternKernel(SparsePrecisionKernel):
    r"""Matérn covariance of the SPDE field on a mesh (module docstring), as ``W Q⁻¹ Wᵀ``.

    Parameters
    ----------
    mesh : gpsparse.mesh.Mesh
        Interval, planar or spherical mesh; inputs are points of its space
        (``(n, 1)``, ``(n, 2)`` or ``(n, 3)`` on its sphere) inside it.
    alpha : int or float
        ``α ≥ 1``, smoothness ``ν = α − d/2`` (``α = 2``: ν = 1 in 2-D,
        R-INLA's default; ``α = 1`` in 2-D, ν = 0: see *α = 1 in 2-D* below).
        A non-integer ``α > max(1, d/2)`` (e.g. ``1.5``: the exponential
        covariance, ν = 1/2, in 2-D) takes a rational approximation (*Fractional
        smoothness* below). Non-stationary or anisotropic fields: integer ``α ≤ 2``.
    range_prior, sigma_prior : gpytorch Prior, optional
        E.g. [`PCMaternRangePrior`][gpsparse.kernels.mesh.PCMaternRangePrior] and
        [`PCMaternSigmaPrior`][gpsparse.kernels.mesh.PCMaternSigmaPrior] (the
        penalised-complexity prior of Fuglstad et al. 2019).
    range_constraint, sigma_constraint : gpytorch Interval, optional
        Default ``Positive()`` for both.
    kappa_basis, tau_basis : array_like, optional
        ``(N, p)`` basis functions at the vertices for ``log κ(s)`` and
        ``log τ(s)`` (non-stationary field); learnable coefficients
        ``kappa_coefficients``, ``tau_coefficients`` ``(*batch, p)``.
    anisotropy : bool
        Learn ``H`` (``anisotropy_angle`` φ and ``anisotropy_log_ratio`` a; planar meshes).
    normalization : {"rinla", "sphere"}
        ``τ`` from R-INLA's ``ℝ^d`` formula (default, on every mesh), or on a
        spherical mesh from the exact Legendre series of the sphere (marginal
        variance ``σ²`` also when the range is not small against the radius;
        ``gpsparse.mesh.spde.sphere_variance_factor``).
    logdet_road : {"auto", "settings"}
        ``log det Q``'s road (``gpsparse.mesh.operator``): exact whenever
        possible (default), or the dispatcher's choice under the settings.
    rational_order : int
        Partial fractions ``m`` (1 … 8, default 4) for a non-integer ``α``; ignored otherwise.
    batch_shape : torch.Size, optional
        Independent hyperparameters per batch member (one mesh).
    interp_cache_size : int
        Input sets whose ``W`` is cached.

    Attributes
    ----------
    range, sigma : Tensor
        ``(*batch_shape, 1)``: ``ρ`` and ``σ`` (settable).
    nu : float
        ``α − d/2``.
    nu_nominal : float
        ``ν``, or 1/2 for ``α = 1`` in 2-D (R-INLA's nominal smoothness).

    Notes
    -----
    Each call builds the values of ``Q`` as a differentiable function of
    ``(ρ, σ)`` (and the coefficients, ``H``) on the fixed pattern of
    ``gpsparse.mesh.spde.MeshSPDEStructure`` — built once: ``(α + 1) × nnz``
    numbers for a stationary field — and returns
    ``SparsePrecisionLinearOperator(Q, interp=W(x1), right_interp=W(x2))``
    with ``Q`` an
    [`SPDEPrecisionLinearOperator`][gpsparse.mesh.operator.SPDEPrecisionLinearOperator]
    (its log-determinant from ``κ²I + L``, computed on first use).
    ``W`` is cached per input tensor; inputs requiring grad get
    differentiable barycentric weights. ``diag=True`` as for
    [`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel] (exact or
    stochastic ``diag(W Q⁻¹ Wᵀ)``, polarisation for ``x1 ≠ x2``). Works in
    ``ScaleKernel`` (then fix ``σ``, e.g. ``raw_sigma.requires_grad_(False)``: the
    two scales are not identifiable), in sums
    ([`SparsePrecisionAdditiveKernel`][gpsparse.kernels.SparsePrecisionAdditiveKernel])
    and in the Laplace model, and predicts through the sparse posterior precision.

    Compared with [`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel] on
    a triangulated lattice with spacing ``h`` (``Mesh.regular_grid``, same
    nodes): in the interior ``C̃ = h²I`` and ``G = h²L`` (the 5-point
    Laplacian), so the rows of ``Q`` two or more nodes away from the boundary are
    ``τ²h²(κ²I + L)²``, those of the lattice's ``τ_lat(κ²I + L)²``. The
    kernels differ by (i) the constant: ``τ`` is the continuum formula here,
    the lattice normalises to unit variance on the infinite *lattice*
    (relative difference ``O(κ²h²)``), and (ii) the boundary rows: the FEM's
    natural boundary condition (boundary vertices carry half or a quarter of
    the mass) against the lattice's mirror half a cell beyond the last node.

    *α = 1 in 2-D* (ν = 0). ``Q = τ²(κ²C̃ + G)`` is a valid GMRF on the mesh,
    but its continuum limit is not a field with point values: the Matérn
    variance with ν = 0 diverges like ``log(1/(κh))/(2πτ²)`` as the mesh size
    ``h → 0``, so the model depends on the mesh (finer mesh, rougher field).
    As R-INLA's ``inla.spde2.matern(alpha = 1)`` does, ``κ`` and ``τ`` follow
    the nominal smoothness ``ν_nom = 1/2``, ``α_nom = 3/2``
    (``gpsparse.mesh.spde.nominal_smoothness``): ``κ = 2/ρ`` and
    ``τ² = Γ(1/2)/(Γ(3/2)·4πκσ²) = 1/(2πκσ²)``, so values are comparable with
    R-INLA fits; ``σ`` is then a *nominal* scale, not the marginal standard
    deviation. Measured at the centre of a regular mesh of ``[−4ρ, 4ρ]²``
    (alternating diagonals): the variance is 4.6σ², 6.2σ², 7.6σ², 9.0σ² for
    ``h = ρ/4, ρ/8, ρ/16, ρ/32`` (growing by ``log 2/(2πτ²)``, 1.39σ² per
    halving), the correlation at ``ρ/2``, ``ρ``, ``1.5ρ`` 0.18, 0.049, 0.015 at
    ``h = ρ/4`` and 0.11, 0.030, 0.009 at ``h = ρ/16`` (``exp(−κr)``: 0.37,
    0.135, 0.050). Scale the variance with ``ScaleKernel`` or a learnable
    ``σ`` accordingly; ``normalization="sphere"`` is refused (the series diverges).

    *Fractional smoothness* (``α = n + β``, ``0 < β < 1``, ``n ≥ 1``; Bolin &
    Kirchner 2020 in the positive partial-fraction form of ``gpsparse.core.rational``,
    as for [`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel]). The
    FEM covariance ``τ^{−2}(κ²I + C̃^{−1}G)^{−α}C̃^{−1}`` is replaced by a sum
    of ``m + 1`` independent GMRFs on the vertices,
    ``Q_0 ∝ C̃A^n`` and ``Q_i ∝ C̃A^n(A + p_iκ²)`` with ``A = κ²I + C̃^{−1}G``
    ([`FractionalMeshPrecision`][gpsparse.mesh.fractional.FractionalMeshPrecision]):
    ``W Q⁻¹ Wᵀ`` with ``Q = blockdiag(Q_0, …, Q_m)`` and ``W = [W ⋯ W]`` on
    ``(m + 1)N`` latent values (``num_latent``). Each block's log-determinant
    comes from ``n log det M(κ²) + log det M((1 + p_i)κ²)`` (first-order
    factors, exact by CHOLMOD when installed). ``κ = √(8ν)/ρ`` and ``τ`` are
    R-INLA's formulas at the fractional ``α`` (rSPDE's parameterisation). The
    covariance equals the FEM fractional covariance up to the fit's uniform
    error (order 4: 1.4e-3 for β = 1/2, 2.7e-4 for β = 0.8) relative to the
    variance; the ``c₀`` block is an ``α = n`` field, whose variance for
    ``n = 1`` in 2-D grows like ``log(1/(κh))`` (about 1 % of ``σ²`` at
    ``h = ρ/16`` for β = 1/2). Stationary isotropic fields only; ``α`` is fixed
    at construction (not learnable).

    Raises
    ------
    ValueError
        ``α < 1``, a non-integer ``α`` with ``ν ≤ 0`` or for a non-stationary,
        anisotropic or sphere-normalised field, bad bases (shape, non-finite), anisotropy
        off the plane, ``normalization="sphere"`` off the sphere or with
        ``α = 1``, inputs of the wrong dimension, non-finite, off the sphere
        or outside the mesh.

    References
    ----------
    Lindgren, Rue & Lindström (2011), JRSS B 73(4); Fuglstad, Simpson,
    Lindgren & Rue (2019), "Constructing priors that penalize the complexity
    of Gaussian random fields", JASA 114(525).

    Examples
    --------
    >>> import torch
    >>> from gpsparse.mesh import Mesh
    >>> from gpsparse.kernels import MeshMaternKernel
    >>> mesh = Mesh.regular_grid([[0, 0], [1, 1]], 21)
    >>> kernel = MeshMaternKernel(mesh).double()
    >>> kernel.range = 0.3
    >>> K = kernel(torch.rand(50, 2, dtype=torch.float64)).evaluate_kernel()  # W Q⁻¹ Wᵀ, never formed
    >>> K.shape, kernel.num_nodes
    (torch.Size([50, 50]), 441)
    """

    has_lengthscale = False

    def __init__(
        self,
        mesh: Mesh,
        alpha: float = 2,
        *,
        range_prior: Prior | None = None,
        range_constraint: Interval | None = None,
        sigma_prior: Prior | None = None,
        sigma_constraint: Interval | None = None,
        kappa_basis=None,
        tau_basis=None,
        anisotropy: bool = False,
        normalization: str = "rinla",
        logdet_road: str = "auto",
        rational_order: int = 4,
        batch_shape: torch.Size | None = None,
        interp_cache_size: int = 4,
        **kwargs,
    ):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a gpsparse.mesh.Mesh, got {type(mesh).__name__}")
        alpha = parse_alpha(alpha, mesh.dim, minimum=1)
        fractional = isinstance(alpha, float)
        if fractional and not 1 <= int(rational_order) <= 8:
            raise ValueError(f"rational_order must be an integer in 1 … 8, got {rational_order!r}")
        if fractional and normalization == "sphere":
            raise ValueError("normalization='sphere' needs an integer alpha; a fractional alpha takes 'rinla'")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "sphere" and mesh.kind != "sphere":
            raise ValueError(f"normalization='sphere' needs a spherical mesh, got a {mesh.kind} mesh")
        if normalization == "sphere" and alpha < 2:
            raise ValueError("normalization='sphere' needs alpha ≥ 2: the sphere's variance series diverges for ν = 0")
        if logdet_road not in LOGDET_ROADS:
            raise ValueError(f"logdet_road must be one of {LOGDET_ROADS}, got {logdet_road!r}")
        if anisotropy and mesh.kind != "plane":
            raise ValueError(f"anisotropy needs a planar mesh, got a {mesh.kind} mesh")
        kappa_basis = _basis(kappa_basis, mesh.num_vertices, "kappa_basis")
        tau_basis = _basis(tau_basis, mesh.num_vertices, "tau_basis")
        general = kappa_basis is not None or tau_basis is not None or anisotropy
        if general and (alpha > 2 or fractional):
            raise ValueError(f"non-stationary or anisotropic fields support alpha = 1 or 2, got {alpha}")
        if int(interp_cache_size) < 1:
            raise ValueError(f"interp_cache_size must be a positive integer, got {interp_cache_size}")
        super().__init__(batch_shape=batch_shape, **kwargs)
        self.mesh, self.alpha, self.normalization, self.logdet_road = mesh, alpha, normalization, logdet_road
        self.rational_order = int(rational_order)
        self.anisotropic = bool(anisotropy)
        self.kappa_basis, self.tau_basis = kappa_basis, tau_basis
        batch = self.batch_shape
        for name, prior, constraint in (
            ("range", range_prior, range_constraint),
            ("sigma", sigma_prior, sigma_constraint),
        ):
            self.register_parameter(f"raw_{name}", torch.nn.Parameter(torch.zeros(*batch, 1)))
            self.register_constraint(f"raw_{name}", Positive() if constraint is None else constraint)
            if prior is not None:
                if not isinstance(prior, Prior):
                    raise TypeError(f"expected a gpytorch Prior for {name}_prior, got {type(prior).__name__}")
                self.register_prior(
                    f"{name}_prior", prior, partial(_get_attribute, name), partial(_set_attribute, name)
                )
        for name, basis in (("kappa_coefficients", kappa_basis), ("tau_coefficients", tau_basis)):
            if basis is not None:
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(*batch, basis.shape[1])))
        if self.anisotropic:
            self.register_parameter("anisotropy_angle", torch.nn.Parameter(torch.zeros(*batch, 1)))
            self.register_parameter("anisotropy_log_ratio", torch.nn.Parameter(torch.zeros(*batch, 1)))
        span = float(np.linalg.norm(mesh.vertices.max(0) - mesh.vertices.min(0)))
        self.range = 0.2 * span  # a fifth of the mesh's extent
        self.sigma = 1.0
        self.interp_cache_size = int(interp_cache_size)
        self.num_interp_builds = 0
        self._interp_cache: list[CachedInputs[_Interp]] = []
        self._structure: MeshSPDEStructure | FractionalMeshPrecision | None = None

    # ------------------------------------------------------------ parameters
    @property
    def range(self) -> Tensor:
        """``ρ = √(8ν)/κ`` ``(*batch_shape, 1)``."""
        return self.raw_range_constraint.transform(self.raw_range)

    @range.setter
    def range(self, value) -> None:
        self._set_positive("raw_range", value)

    @property
    def sigma(self) -> Tensor:
        """Marginal standard deviation ``σ`` ``(*batch_shape, 1)``."""
        return self.raw_sigma_constraint.transform(self.raw_sigma)

    @sigma.setter
    def sigma(self, value) -> None:
        self._set_positive("raw_sigma", value)

    def _set_positive(self, name: str, value) -> None:
        raw = getattr(self, name)
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device).expand_as(raw)
        self.initialize(**{name: getattr(self, f"{name}_constraint").inverse_transform(value)})

    @property
    def nu(self) -> float:
        """Smoothness ``ν = α − d/2``."""
        return self.alpha - self.mesh.dim / 2

    @property
    def nu_nominal(self) -> float:
        """``ν``, or R-INLA's nominal 1/2 when ``ν = 0`` (α = 1 in 2-D): the smoothness in ``κ = √(8 ν_nominal)/ρ``."""
        return self.nu if self.nu > 0 else 0.5

    @property
    def num_nodes(self) -> int:
        """Mesh vertices ``N``."""
        return self.mesh.num_vertices

    @property
    def is_fractional(self) -> bool:
        """Whether ``α`` is not an integer (the rational approximation, *Fractional smoothness*)."""
        return isinstance(self.alpha, float)

    @property
    def num_latent(self) -> int:
        """Latent values behind the covariance: ``N``, or ``(m + 1) N`` for a fractional ``α``."""
        return self.num_nodes * (self.structure().num_blocks if self.is_fractional else 1)

    def kappa(self) -> Tensor:
        """``κ(s)``: ``(*batch_shape)`` for a stationary field, ``(*batch_shape, N)`` with ``kappa_basis``."""
        kappa = math.sqrt(8 * self.nu_nominal) / self.range[..., 0]
        if self.kappa_basis is None:
            return kappa
        basis = self._basis_tensor(self.kappa_basis)
        return kappa.unsqueeze(-1) * torch.exp(self.kappa_coefficients @ basis.mT)

    def tau(self) -> Tensor:
        """``τ(s)``, R-INLA's formula at the stationary ``κ_ρ``, ``σ``: ``(*batch_shape)`` or ``(*batch_shape, N)``."""
        kappa = math.sqrt(8 * self.nu_nominal) / self.range[..., 0]
        tau = matern_tau(kappa, self.sigma[..., 0], self.alpha, self.mesh.dim, nominal=True)
        if self.normalization == "sphere":
            tau = tau * sphere_variance_factor(kappa, self.mesh.radius, self.alpha).sqrt()
        if self.tau_basis is None:
            return tau
        basis = self._basis_tensor(self.tau_basis)
        return tau.unsqueeze(-1) * torch.exp(self.tau_coefficients @ basis.mT)

    def anisotropy_matrix(self) -> Tensor | None:
        """``H`` ``(*batch_shape, 2, 2)`` (``det H = 1``), or None for an isotropic field."""
        h = self._anisotropy_entries()
        if h is None:
            return None
        return torch.stack([torch.stack([h[..., 0], h[..., 2]], -1), torch.stack([h[..., 2], h[..., 1]], -1)], -2)

    def _anisotropy_entries(self) -> Tensor | None:
        """``(h_11, h_22, h_12)`` ``(*batch_shape, 3)`` of ``H = R(φ) diag(e^a, e^{−a}) R(φ)ᵀ``."""
        if not self.anisotropic:
            return None
        phi, a = self.anisotropy_angle[..., 0], self.anisotropy_log_ratio[..., 0]
        c, s = torch.cos(phi), torch.sin(phi)
        big, small = torch.exp(a), torch.exp(-a)
        return torch.stack([big * c * c + small * s * s, big * s * s + small * c * c, (big - small) * s * c], -1)

    def _basis_tensor(self, basis: np.ndarray) -> Tensor:
        return torch.as_tensor(basis, dtype=self.raw_range.dtype, device=self.raw_range.device)

    # ------------------------------------------------------------ precision
    def structure(self) -> MeshSPDEStructure | FractionalMeshPrecision:
        """The precision structure of this mesh and ``α`` (built on first use, cached)."""
        if self._structure is None and self.is_fractional:
            self._structure = FractionalMeshPrecision(
                self.mesh, self.alpha, order=self.rational_order, logdet_road=self.logdet_road
            )
        if self._structure is None:
            general = self.kappa_basis is not None or self.tau_basis is not None
            self._structure = MeshSPDEStructure(self.mesh, self.alpha, anisotropic=self.anisotropic, general=general)
        return self._structure

    def precision(self) -> SPDEPrecisionLinearOperator:
        """``Q`` (``N × N``, batch ``(*batch_shape)``), its log-determinant from the first-order factor.

        For a fractional ``α``: ``blockdiag(Q_0, …, Q_m)`` (``(m+1)N`` square), see *Fractional smoothness*.
        """
        structure = self.structure()
        kappa2, tau, h = self.kappa() ** 2, self.tau(), self._anisotropy_entries()
        if self.is_fractional:
            return structure.operator(kappa2, tau)
        return SPDEPrecisionLinearOperator(
            structure.precision_values(kappa2, tau, h),
            structure.factor_values(kappa2, h),
            structure.logdet_offset(tau),
            pattern=structure.tensors(kappa2.dtype, kappa2.device)["pattern"],
            factor_pattern=structure.tensors(kappa2.dtype, kappa2.device)["factor_pattern"],
            power=self.alpha,
            logdet_road=self.logdet_road,
        )

    # --------------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError("MeshMaternKernel does not support last_dim_is_batch (deprecated in GPyTorch)")
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2:
                raise ValueError(
                    f"MeshMaternKernel expects inputs of shape (..., n, D), got {name} of shape {tuple(x.shape)}"
                )
        check_batch_shapes(x1, x2, self.batch_shape)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        Q = self.precision()
        if Q.batch_shape != batch:
            Q = Q._expand_batch(batch)
        W1 = self.latent_interpolation(x1)
        W2 = W1 if symmetric else self.latent_interpolation(x2)
        if not diag:
            return SparsePrecisionLinearOperator(Q, interp=W1, right_interp=None if symmetric else W2)
        if symmetric:
            return covariance_diagonal(Q, W1)
        if W1.shape != W2.shape:
            raise ValueError(f"diag=True needs x1 and x2 with as many points, got {W1.shape[0]} and {W2.shape[0]}")
        plus = covariance_diagonal(Q, W1 + W2)
        minus = covariance_diagonal(Q, W1 + W2._mul_constant(-1.0))
        return (plus - minus) / 4

    # --------------------------------------------------------- interpolation
    def latent_interpolation(self, x: Tensor) -> SparseLinearOperator:
        """``W(x)`` for the latent values: ``interpolation(x)``, or ``[W ⋯ W]`` (one per block, fractional ``α``)."""
        W = self.interpolation(x)
        if not self.is_fractional:
            return W
        blocks = self.structure().num_blocks
        return hstack_interpolations([W] * blocks, [self.num_nodes] * blocks, W.shape[-2], W.device, W.dtype)

    def interpolation(self, x: Tensor) -> SparseLinearOperator:
        """``W(x)`` ``(n, N)``: barycentric weights of ``x (…, n, D)`` (cached; differentiable in ``x``)."""
        x = _single_member(x)
        dtype = self.raw_range.dtype
        entry = cache_lookup(self._interp_cache, (x,), accept=lambda cached: cached.dtype == dtype)
        if entry is None:
            entry = cache_insert(
                self._interp_cache, CachedInputs.of((x,), self._build_interp(x, dtype)), self.interp_cache_size
            )
        interp = entry.payload
        values = interp.values
        if torch.is_grad_enabled() and x.requires_grad:
            values = self.mesh.interpolation_weights(x, interp.cells, interp.vertex_ids).reshape(-1).to(dtype)
        return SparseLinearOperator(values, pattern=interp.pattern)

    def _build_interp(self, x: Tensor, dtype: torch.dtype) -> _Interp:
        self.num_interp_builds += 1
        cells, ids, bary = self.mesh.locate(x.detach())
        n, k = ids.shape
        crow = torch.arange(n + 1, device=x.device) * k
        pattern = SparsityPattern(crow, torch.from_numpy(ids.reshape(-1)).to(x.device), (n, self.num_nodes))
        values = torch.from_numpy(bary.reshape(-1)).to(dtype=dtype, device=x.device)
        return _Interp(dtype=dtype, pattern=pattern, cells=cells, vertex_ids=ids, values=values)

    def clear_cache(self) -> None:
        """Drop the cached interpolation matrices and the precision structure (rebuilt on the next call)."""
        self._interp_cache.clear()
        self._structure = None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_interp_cache"] = []
        state["_structure"] = None
        return state


def _get_attribute(name: str, module):
    """Prior parameter closure (module-level functions, so that kernels with priors pickle)."""
    return getattr(module, name)


def _set_attribute(name: str, module, value) -> None:
    """Prior setting closure (module-level, see ``_get_attribute``)."""
    setattr(module, name, value)


def _basis(basis, num_vertices: int, name: str) -> np.ndarray | None:
    if basis is None:
        return None
    b = np.asarray(basis.detach().cpu() if isinstance(basis, Tensor) else basis, dtype=np.float64)
    if b.ndim == 1:
        b = b[:, None]
    if b.ndim != 2 or b.shape[0] != num_vertices or b.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, p) with N = {num_vertices} vertices, got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} has non-finite entries")
    return b


def _single_member(x: Tensor) -> Tensor:
    """The ``(n, D)`` inputs of ``(*batch, n, D)`` whose batch members are all equal."""
    if x.dim() == 2:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if flat.shape[0] > 1 and not torch.equal(flat.detach(), flat[:1].detach().expand_as(flat)):
        raise NotImplementedError(
            "MeshMaternKernel needs one set of inputs (one interpolation matrix W) for all batch members; "
            f"got inputs of shape {tuple(x.shape)} whose batch members differ"
        )
    return flat[0]


# ------------------------------------------------------------------- priors
class PCMaternRangePrior(Prior):
    r"""Penalised-complexity prior on the Matérn range ``ρ`` (Fuglstad et al. 2019), ``P(ρ < ρ_0) = p``.

    $$
    π(ρ) = \tfrac{d}{2} λ ρ^{−1−d/2} \exp(−λ ρ^{−d/2}), \qquad λ = −\log(p)\, ρ_0^{d/2},
    $$

    i.e. ``ρ^{−d/2} ~ Exponential(λ)``: it shrinks towards an infinite range
    (the base model, a constant field). With
    [`PCMaternSigmaPrior`][gpsparse.kernels.mesh.PCMaternSigmaPrior] it forms
    R-INLA's ``inla.spde2.pcmatern(prior.range = c(ρ_0, p), prior.sigma = c(σ_0, p_σ))``.

    Parameters
    ----------
    range0 : float
        ``ρ_0 > 0``.
    probability : float
        ``p = P(ρ < ρ_0)`` in (0, 1).
    dim : int
        Dimension ``d`` of the domain (2 for planar and spherical meshes).
    """

    arg_constraints = {"rate": constraints.positive}
    support = constraints.positive
    has_rsample = True

    def __init__(self, range0, probability: float = 0.5, dim: int = 2, validate_args=False, transform=None):
        TModule.__init__(self)
        range0 = torch.as_tensor(range0, dtype=torch.get_default_dtype())
        if not bool((range0 > 0).all()) or not 0 < probability < 1:
            raise ValueError(f"need range0 > 0 and 0 < probability < 1, got {range0} and {probability}")
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        rate = -math.log(probability) * range0 ** (dim / 2)
        torch.distributions.Distribution.__init__(self, batch_shape=rate.shape, validate_args=validate_args)
        self.dim = int(dim)
        self.register_buffer("rate", rate)  # after the Distribution's __init__ (it re-initialises the Module)
        self._transform = transform

    def log_prob(self, x: Tensor) -> Tensor:
        x = self.transform(x)
        half = self.dim / 2
        return math.log(half) + torch.log(self.rate) - (1 + half) * torch.log(x) - self.rate * x ** (-half)

    def rsample(self, sample_shape=()) -> Tensor:
        exponential = Exponential(self.rate).rsample(torch.Size(sample_shape))
        return exponential ** (-2.0 / self.dim)

    def expand(self, batch_shape, _instance=None):
        prior = PCMaternRangePrior.__new__(PCMaternRangePrior)
        TModule.__init__(prior)
        torch.distributions.Distribution.__init__(prior, batch_shape=torch.Size(batch_shape), validate_args=False)
        prior.dim = self.dim
        prior.register_buffer("rate", self.rate.expand(batch_shape))
        prior._transform = self._transform
        return prior


class PCMaternSigmaPrior(Prior, Exponential):
    r"""Penalised-complexity prior on the marginal standard deviation ``σ``: ``σ ~ Exponential(λ)``, ``P(σ > σ_0) = p``.

    ``λ = −log(p)/σ_0`` (Fuglstad et al. 2019; shrinks towards ``σ = 0``, no field).
    """

    def __init__(self, sigma0, probability: float = 0.05, validate_args=False, transform=None):
        TModule.__init__(self)
        sigma0 = torch.as_tensor(sigma0, dtype=torch.get_default_dtype())
        if not bool((sigma0 > 0).all()) or not 0 < probability < 1:
            raise ValueError(f"need sigma0 > 0 and 0 < probability < 1, got {sigma0} and {probability}")
        Exponential.__init__(self, rate=-math.log(probability) / sigma0, validate_args=validate_args)
        _bufferize_attributes(self, ("rate",))
        self._transform = transform

    def expand(self, batch_shape, _instance=None):
        return PCMaternSigmaPrior.from_rate(self.rate.expand(batch_shape), self._transform)

    @classmethod
    def from_rate(cls, rate: Tensor, transform=None) -> PCMaternSigmaPrior:
        """The prior with rate ``λ`` (``P(σ > σ_0) = exp(−λσ_0)``)."""
        return cls(1.0 / rate, probability=math.exp(-1.0), transform=transform)
