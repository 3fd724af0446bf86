r"""The compactly supported Wendland covariance φ₃,₁ as a sparse GPyTorch kernel.

An adapter (DESIGN.md §1): the neighbour search is ``gpsparse.core.neighbors``,
the function φ₃,₁ and its derivative are ``gpsparse.core.wendland`` (applied
through the autograd Function of ``gpsparse.autograd.wendland``), the matrix
is a [`SparseLinearOperator`][gpsparse.SparseLinearOperator]; this module only validates
inputs, caches the sparsity pattern and assembles the scaled squared distances
at the stored entries. ``wendland_phi31`` is re-exported here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from gpytorch.priors import Prior
from torch import Tensor

from gpsparse.autograd.wendland import wendland_of_square, wendland_phi31
from gpsparse.core.neighbors import radius_pairs
from gpsparse.core.pattern import SparsityPattern
from gpsparse.errors import DenseKernelWarning
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup, check_batch_shapes
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["WendlandKernel", "wendland_phi31"]

#: φ₃,₁ is positive definite on ℝ^d for d ≤ 3 only (Wendland 1995).
_MAX_DIMS = 3
#: Points per support ball that the data-based default radius aims at (``WendlandKernel.default_radius``).
DEFAULT_NEIGHBOURS = 30.0
#: A pattern storing more than this share of a matrix with at least ``DENSE_WARNING_MIN_SIZE`` entries warns.
DENSE_WARNING_FRACTION = 0.2
DENSE_WARNING_MIN_SIZE = 10**6


@dataclass
class _Pattern:
    """One cached pattern: its search radius and the squared distances at its entries.

    The payload of a ``CachedInputs`` entry keyed on ``(x1,)``
    (symmetric) or ``(x1, x2)``.
    """

    search_radius: Tensor  # (q,) per-dimension (q = 1: isotropic)
    pattern: SparsityPattern
    squared: Tensor  # (*xbatch, nnz) squared distances, or (*xbatch, nnz, d) squared differences (ARD)


class WendlandKernel(Kernel):
    r"""Compactly supported Wendland covariance φ₃,₁ returning a sparse operator.

    $$
    k(x, x') = (1 - r)_+^4 (4 r + 1), \qquad r = \lVert x - x' \rVert / \rho,
    $$

    positive definite for inputs of dimension ``d ≤ 3`` (Wendland, 1995) and
    exactly zero beyond the support radius ``ρ``. With ``ard_num_dims = d``
    every dimension has its own radius, ``r² = Σ_k (x_k − x'_k)² / ρ_k²``
    (an axis-aligned ellipsoidal support; still positive definite).

    ``forward`` returns a [`SparseLinearOperator`][gpsparse.SparseLinearOperator] whose
    pattern holds every pair within the current radius, found by a grid
    neighbour search (``gpsparse.core.neighbors.radius_pairs``, O(n · neighbours),
    never an ``n × m`` distance matrix), and whose values are a differentiable
    function of ``ρ`` (and of the inputs when they require grad). For
    ``x1 is x2`` (or equal tensors) the pattern is declared symmetric and
    stores the whole diagonal; otherwise it is rectangular.

    Parameters
    ----------
    radius_prior : gpytorch.priors.Prior, optional
        Prior on ``radius``.
    radius_constraint : gpytorch.constraints.Interval, optional
        Constraint on ``radius`` (default ``Positive()``).
    ard_num_dims : int, optional
        One radius per input dimension (1 to 3).
    batch_shape : torch.Size, optional
        Batch of independent radii ``(*batch_shape, 1, 1 or ard_num_dims)``;
        the values carry the batch, all members share one pattern (built for
        the largest radius).
    search_margin : float
        The pattern is searched with radius ``search_margin · ρ`` (default
        1.1); entries with ``r ≥ 1`` are stored as explicit zeros (value and
        gradient exactly 0), so the pattern stays valid while ``ρ`` moves.
    max_search_ratio : float
        Rebuild the pattern when ``ρ`` has shrunk so far that the search
        radius exceeds ``max_search_ratio · ρ`` (default 1.5; bounds the
        stored zeros).
    max_nnz : int, optional
        Raise ``RuntimeError`` instead of building a pattern with more stored
        entries (a radius grown large makes the matrix nearly dense).
    pattern_cache_size : int
        Number of patterns kept (default 2: training inputs and one more,
        e.g. the train+test inputs of a prediction).
    **kwargs
        ``active_dims`` etc., as for ``gpytorch.kernels.Kernel``.

    Notes
    -----
    *Default radius.* Until a radius is set (``kernel.radius = …``,
    ``initialize(radius=…)``, a prior's sample, a loaded state dict), the first
    call on training inputs (``x1 is x2``) sets ``ρ`` from their spread, to
    about 30 points per support ball ([`default_radius`][]); a matrix with
    ``≥ 10⁶`` entries of which more than 20 % are stored raises a
    [`DenseKernelWarning`][gpsparse.errors.DenseKernelWarning].

    *Pattern cache.* A pattern is reused when the inputs are the same
    (identity and in-place version, else ``torch.equal`` against a stored
    copy: O(n·d)) and the current radius ``ρ`` (the largest over the batch,
    per dimension) satisfies ``R / max_search_ratio ≤ ρ ≤ R`` for the cached
    search radius ``R``; otherwise it is rebuilt with ``R = search_margin · ρ``.
    The squared distances at the stored entries are cached with it, so a
    cache hit costs O(nnz) elementwise work; ``num_pattern_builds`` counts
    rebuilds. Inputs that require grad get their distances recomputed
    differentiably at every call.

    *Batches of inputs.* Inputs with batch dimensions that differ between
    batch members get the union of the members' patterns.

    ``diag=True`` returns the dense ``(*batch, n)`` tensor ``k(x1_i, x2_i)``.
    ``last_dim_is_batch`` is not supported.

    Raises
    ------
    ValueError
        Inputs of dimension > 3, inputs with NaN or Inf, ``x1`` and ``x2``
        with different dimensions, a dimension different from
        ``ard_num_dims``.
    NotImplementedError
        ``last_dim_is_batch=True``.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels import WendlandKernel
    >>> kernel = WendlandKernel()
    >>> kernel.radius = 0.1
    >>> x = torch.rand(1000, 2)
    >>> K = kernel(x).evaluate_kernel()           # a SparseLinearOperator, ~30 entries per row
    >>> K.shape
    torch.Size([1000, 1000])
    >>> covar = gpytorch.kernels.ScaleKernel(kernel)  # scaling keeps the sparse type
    """

    is_stationary = True

    def __init__(
        self,
        radius_prior: Prior | None = None,
        radius_constraint: Interval | None = None,
        *,
        ard_num_dims: int | None = None,
        batch_shape: torch.Size | None = None,
        search_margin: float = 1.1,
        max_search_ratio: float = 1.5,
        max_nnz: int | None = None,
        pattern_cache_size: int = 2,
        **kwargs,
    ):
        if ard_num_dims is not None and not 1 <= int(ard_num_dims) <= _MAX_DIMS:
            raise ValueError(
                f"WendlandKernel (φ₃,₁) is positive definite only for inputs of dimension ≤ {_MAX_DIMS}; "
                f"got ard_num_dims={ard_num_dims}"
            )
        if not search_margin >= 1:
            raise ValueError(f"search_margin must be ≥ 1, got {search_margin}")
        if not max_search_ratio >= search_margin:
            raise ValueError(f"max_search_ratio must be ≥ search_margin = {search_margin}, got {max_search_ratio}")
        if int(pattern_cache_size) < 1:
            raise ValueError(f"pattern_cache_size must be a positive integer, got {pattern_cache_size}")
        super().__init__(ard_num_dims=ard_num_dims, batch_shape=batch_shape, **kwargs)
        self.search_margin = float(search_margin)
        self.max_search_ratio = float(max_search_ratio)
        self.max_nnz = max_nnz
        self.pattern_cache_size = int(pattern_cache_size)
        num_radii = 1 if ard_num_dims is None else int(ard_num_dims)
        self.register_parameter("raw_radius", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1, num_radii)))
        if radius_constraint is None:
            radius_constraint = Positive()
        self.register_constraint("raw_radius", radius_constraint)
        if radius_prior is not None:
            if not isinstance(radius_prior, Prior):
                raise TypeError(f"Expected gpytorch.priors.Prior but got {type(radius_prior).__name__}")
            self.register_prior("radius_prior", radius_prior, self._radius_param, self._radius_closure)
        self._pattern_cache: list[CachedInputs[_Pattern]] = []
        self.num_pattern_builds = 0
        #: Until a radius is set (``kernel.radius = …``, ``initialize``, a loaded state dict), the
        #: first call on training inputs sets it from the data (``default_radius``).
        self.radius_from_data = True
        self.register_load_state_dict_post_hook(_radius_loaded)

    # ------------------------------------------------------------ radius
    @property
    def radius(self) -> Tensor:
        """Support radius ``ρ``, shape ``(*batch_shape, 1, 1 or ard_num_dims)``."""
        return self.raw_radius_constraint.transform(self.raw_radius)

    @radius.setter
    def radius(self, value) -> None:
        self._set_radius(value)

    def _set_radius(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_radius.dtype, device=self.raw_radius.device)
        self.initialize(raw_radius=self.raw_radius_constraint.inverse_transform(value))

    def initialize(self, **kwargs):
        if any(name in kwargs for name in ("raw_radius", "radius")):
            self.radius_from_data = False
        return super().initialize(**kwargs)

    @staticmethod
    def default_radius(x: Tensor, neighbours: float = DEFAULT_NEIGHBOURS) -> float:
        r"""The radius giving about ``neighbours`` points per support ball for inputs ``x`` ``(..., n, d)``.

        For ``n`` points spread over their bounding box of volume ``V`` (side
        lengths ``s_k``, a degenerate side counting as the largest), a ball of
        radius ``ρ`` holds ``n c_d ρ^d / V`` points on average (``c_d`` the
        volume of the unit ball: 2, π, 4π/3), so

        $$ ρ = \left(\frac{\text{neighbours} \cdot V}{n \, c_d}\right)^{1/d}. $$

        Default 30 neighbours: a sparse matrix with ~30 entries per row at any
        ``n`` (n = 20 000 uniform points in the unit square: ``ρ ≈ 0.022``;
        the fixed default of ``softplus(0) = 0.69`` made that matrix 80 %
        dense). Training then moves ``ρ`` by the marginal likelihood.
        """
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        n, d = flat.shape
        if n < 2:
            return 1.0
        sides = (flat.amax(0) - flat.amin(0)).clamp_min(0.0)
        largest = float(sides.max())
        if largest <= 0.0:
            return 1.0
        sides = torch.where(sides > 0, sides, torch.full_like(sides, largest))
        ball = (2.0, math.pi, 4.0 * math.pi / 3.0)[d - 1]
        return float((neighbours * float(sides.prod()) / (n * ball)) ** (1.0 / d))

    def _radius_param(self, m: WendlandKernel) -> Tensor:
        return m.radius

    def _radius_closure(self, m: WendlandKernel, v: Tensor) -> None:
        m._set_radius(v)

    # ----------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(
                "WendlandKernel does not support last_dim_is_batch (deprecated in GPyTorch): it would need one "
                "sparsity pattern per input dimension; add one WendlandKernel(active_dims=[k]) per dimension instead"
            )
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        self._check_inputs(x1, x2)
        if self.radius_from_data and symmetric and not diag and x1.shape[-2] > 1:
            with torch.no_grad():
                self._set_radius(self.default_radius(x1))
        radius = self.radius
        if diag:
            q = (((x1 - x2) / radius) ** 2).sum(-1)
            return wendland_of_square(q)
        found = self._pattern(x1, x2, symmetric, radius.detach())
        values = wendland_of_square(self._scaled_squares(x1, x2, found, radius))
        return SparseLinearOperator(values, pattern=found.pattern)

    def _check_inputs(self, x1: Tensor, x2: Tensor) -> None:
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2:
                raise ValueError(
                    f"WendlandKernel expects inputs of shape (..., n, d), got {name} of shape {tuple(x.shape)}"
                )
        d = x1.shape[-1]
        if x2.shape[-1] != d:
            raise ValueError(f"x1 and x2 must have the same number of dimensions, got {d} and {x2.shape[-1]}")
        if d > _MAX_DIMS:
            raise ValueError(
                f"WendlandKernel (φ₃,₁) is positive definite only for inputs of dimension ≤ {_MAX_DIMS}; got d={d}"
            )
        if self.ard_num_dims is not None and self.ard_num_dims != d:
            raise ValueError(
                f"WendlandKernel was built with ard_num_dims={self.ard_num_dims} but got inputs of dimension {d}"
            )
        check_batch_shapes(x1, x2, self.batch_shape)
        for name, x in (("x1", x1), ("x2", x2)):
            if x.numel() and not bool(torch.isfinite(x.detach()).all()):
                bad = "NaN" if bool(torch.isnan(x.detach()).any()) else "Inf"
                raise ValueError(f"WendlandKernel inputs contain {bad} ({name})")

    def _scaled_squares(self, x1: Tensor, x2: Tensor, entry: _Pattern, radius: Tensor) -> Tensor:
        """``q = r²/ρ²`` at the stored entries, ``(*batch, nnz)``; differentiable in ``ρ`` (and in x if needed)."""
        if torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
            row, col = entry.pattern.row, entry.pattern.col_long
            diff = x1[..., row, :] - x2[..., col, :]
            return ((diff / radius) ** 2).sum(-1)
        dtype = torch.promote_types(entry.squared.dtype, radius.dtype)
        squared, radius = entry.squared.to(dtype), radius.to(dtype)
        if radius.shape[-1] == 1:
            return squared / (radius[..., 0] ** 2)
        return (squared @ radius.pow(-2).transpose(-1, -2)).squeeze(-1)

    # ------------------------------------------------------ pattern cache
    def _pattern(self, x1: Tensor, x2: Tensor, symmetric: bool, radius: Tensor) -> _Pattern:
        """The cached pattern for these inputs and radius, rebuilt when needed (see class notes)."""
        needed = radius.reshape(-1, radius.shape[-1]).amax(0)  # (q,) largest radius over the batch

        def fits(cached: _Pattern) -> bool:
            reach = cached.search_radius.to(needed)
            return bool((needed <= reach).all()) and bool((reach <= self.max_search_ratio * needed).all())

        inputs = (x1,) if symmetric else (x1, x2)
        entry = cache_lookup(self._pattern_cache, inputs, accept=fits, evict_rejected=True)
        if entry is None:
            entry = CachedInputs.of(inputs, self._build_pattern(x1, x2, symmetric, self.search_margin * needed))
            cache_insert(self._pattern_cache, entry, self.pattern_cache_size)
        return entry.payload

    def _build_pattern(self, x1: Tensor, x2: Tensor, symmetric: bool, search_radius: Tensor) -> _Pattern:
        self.num_pattern_builds += 1
        x1d = x1.detach()
        x2d = x1d if symmetric else x2.detach()
        n1, n2 = x1d.shape[-2], x2d.shape[-2]
        batch = torch.broadcast_shapes(x1d.shape[:-2], x2d.shape[:-2])
        members1 = _distinct_members(x1d.expand(*batch, *x1d.shape[-2:]))
        members2 = members1 if symmetric else _distinct_members(x2d.expand(*batch, *x2d.shape[-2:]))
        if len(members1) > 1 and len(members2) == 1:
            members2 = members2 * len(members1)
        elif len(members2) > 1 and len(members1) == 1:
            members1 = members1 * len(members2)
        pairs = [
            radius_pairs(a, None if symmetric else b, radius=search_radius, max_pairs=self.max_nnz)
            for a, b in zip(members1, members2)
        ]
        if len(pairs) == 1:
            row, col = pairs[0]
        else:  # batch members differ: the union of their patterns
            keys = torch.unique(torch.cat([r * n2 + c for r, c in pairs]))
            row, col = keys // n2, keys % n2
        if self.max_nnz is not None and row.numel() > self.max_nnz:
            raise RuntimeError(
                f"the Wendland pattern would store {row.numel():,} entries, above max_nnz = {self.max_nnz:,}"
            )
        pattern, _ = SparsityPattern.from_indices(row, col, (n1, n2), symmetric=symmetric)
        _warn_if_dense(pattern.nnz, n1, n2, search_radius)
        row, col = pattern.row, pattern.col_long
        if search_radius.numel() == 1:
            squared = sum((x1d[..., row, k] - x2d[..., col, k]) ** 2 for k in range(x1d.shape[-1]))
        else:
            squared = (x1d[..., row, :] - x2d[..., col, :]) ** 2
        return _Pattern(
            search_radius=search_radius.detach().clone(),
            pattern=pattern,
            squared=squared,
        )

    def clear_pattern_cache(self) -> None:
        """Drop every cached pattern (the next call rebuilds)."""
        self._pattern_cache.clear()

    def __getstate__(self):
        # Pickles and deep copies start with an empty cache (it holds weak references and large index tensors).
        state = dict(super().__getstate__())
        state["_pattern_cache"] = []
        return state


def _radius_loaded(module: WendlandKernel, incompatible_keys) -> None:
    """A loaded state dict sets the radius: the data no longer do."""
    module.radius_from_data = False


def _warn_if_dense(nnz: int, n1: int, n2: int, search_radius: Tensor) -> None:
    """Warn when the pattern stores more than ``DENSE_WARNING_FRACTION`` of a large matrix."""
    total = n1 * n2
    if total >= DENSE_WARNING_MIN_SIZE and nnz > DENSE_WARNING_FRACTION * total:
        radius = ", ".join(f"{float(r):.3g}" for r in search_radius.reshape(-1))
        warnings.warn(
            f"the WendlandKernel matrix ({n1:,} × {n2:,}) stores {nnz / total:.0%} of its entries at search radius "
            f"{radius}: sparse algebra costs more than dense here; lower the radius (kernel.radius = …, or leave it "
            "unset to start from WendlandKernel.default_radius) or use a dense kernel",
            DenseKernelWarning,
            stacklevel=4,
        )


def _distinct_members(x: Tensor) -> list[Tensor]:
    """The ``(n, d)`` batch members of ``(*batch, n, d)``; one if they are all equal."""
    flat = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])
    if flat.shape[0] == 0:  # an empty batch: no pairs
        return [flat.new_empty(0, flat.shape[-1])]
    if flat.shape[0] == 1 or torch.equal(flat, flat[:1].expand_as(flat)):
        return [flat[0]]
    return list(flat.unbind(0))
