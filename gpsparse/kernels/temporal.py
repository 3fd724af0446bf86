r"""Gaussian Markov chains on a fixed sorted time grid: sparse (tridiagonal) temporal precisions.

A stationary Gaussian AR(1) chain ``u_0, …, u_{n−1}`` on knots
``τ_0 < τ_1 < … < τ_{n−1}`` with unit marginal variance and correlation
``ρ_k`` across the gap ``τ_{k−1} → τ_k``,

$$
u_0 \sim N(0, 1), \qquad u_k = ρ_k u_{k−1} + \sqrt{1 − ρ_k²}\, ε_k ,
$$

has the tridiagonal precision (``c_k = 1/(1 − ρ_k²)``, ``k = 1 … n−1``)

$$
Q_{00} = c_1, \quad Q_{kk} = c_k + c_{k+1} − 1, \quad Q_{n−1,n−1} = c_{n−1}, \quad
Q_{k−1,k} = −ρ_k c_k, \qquad \log\det Q = −\sum_k \log(1 − ρ_k²),
$$

(the joint density ``p(u_0) Π_k p(u_k | u_{k−1})``) and covariance
``Cov(u_a, u_b) = Π_{k=a+1}^{b} ρ_k``. Two kernels use it:

* [`AR1Kernel`][gpsparse.kernels.AR1Kernel] — a regular grid, one learnable
  correlation ``ρ ∈ (−1, 1)`` per step (``ρ_k = ρ``): ``Cov(u_a, u_b) = ρ^{|a−b|}``;
* [`OrnsteinUhlenbeckKernel`][gpsparse.kernels.OrnsteinUhlenbeckKernel] — the
  Matérn ν = 1/2 (exponential) covariance ``exp(−|τ_a − τ_b|/ℓ)`` at any knots,
  ``ρ_k = exp(−(τ_k − τ_{k−1})/ℓ)``.

Observations at times ``t`` inside the grid read the chain by linear
interpolation between the two neighbouring knots (one weight, exactly 1, at a
knot), so the covariance is ``W Q⁻¹ Wᵀ``
([`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]).
The precision is banded (half-bandwidth 1), so its solves, log-determinants
and selected inverse take the exact banded road; ``log det Q`` is given in
closed form (``KnownLogdetSparseLinearOperator``).

These kernels are the time components of
[`SpaceTimeKernel`][gpsparse.kernels.SpaceTimeKernel] (``Q = Q_t ⊗ Q_s``); they
are also sparse-precision kernels of their own on 1-D inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor

from gpsparse.core.markov import precision_pattern
from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup, check_batch_shapes
from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import SparsePrecisionLinearOperator, covariance_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "TemporalPrecisionKernel",
    "AR1Kernel",
    "OrnsteinUhlenbeckKernel",
    "check_time_grid",
    "chain_precision_values",
]

#: Relative spread of the steps accepted as an evenly spaced grid by ``AR1Kernel``.
REGULAR_GRID_RTOL = 1e-6


def check_time_grid(time_grid) -> Tensor:
    """The knots as a float64 CPU tensor ``(n,)``; ``ValueError`` unless finite, 1-D, ≥ 2, strictly increasing.

    Examples
    --------
    >>> check_time_grid([0.0, 1.0, 2.5])
    tensor([0.0000, 1.0000, 2.5000], dtype=torch.float64)
    """
    grid = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
    if grid.dim() != 1:
        raise ValueError(f"time_grid must be a 1-D sequence of knots, got shape {tuple(grid.shape)}")
    if grid.numel() < 2:
        raise ValueError(f"time_grid needs at least two knots, got {grid.numel()}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("time_grid must hold finite knots (no NaN or Inf)")
    steps = grid[1:] - grid[:-1]
    if bool((steps == 0).any()):
        k = int((steps == 0).nonzero()[0, 0])
        raise ValueError(
            f"time_grid holds duplicated knots: knots {k} and {k + 1} are both {float(grid[k]):.6g}; the knots "
            "must be strictly increasing (drop the duplicates, e.g. torch.unique)"
        )
    if bool((steps < 0).any()):
        k = int((steps < 0).nonzero()[0, 0])
        raise ValueError(
            f"time_grid is not sorted: knot {k} = {float(grid[k]):.6g} comes before knot {k + 1} = "
            f"{float(grid[k + 1]):.6g}; pass the knots in increasing order (e.g. torch.sort(time_grid).values): "
            "the chain links consecutive knots"
        )
    return grid


def chain_precision_values(rho: Tensor, one_minus_rho2: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    r"""Values and log-determinant of the AR(1)-chain precision (module docstring).

    Parameters
    ----------
    rho, one_minus_rho2 : Tensor
        ``(*batch, n − 1)``: the gap correlations ``ρ_k`` and ``1 − ρ_k²``
        (passed separately so that callers can compute it without cancellation).
    index : Tensor
        ``(nnz,)`` int64: for each entry of the tridiagonal pattern (CSR),
        its place in ``cat([diagonal (n), off-diagonal (n − 1)])``.

    Returns
    -------
    values : Tensor
        ``(*batch, 3n − 2)`` in the pattern's CSR order (exactly symmetric).
    logdet : Tensor
        ``(*batch,)``: ``−Σ_k log(1 − ρ_k²)``.
    """
    c = one_minus_rho2.reciprocal()
    zero = torch.zeros_like(c[..., :1])
    left = torch.cat([zero, c], -1)  # c_k of the gap before node k (0 before the first)
    right = torch.cat([c, zero], -1)  # c_{k+1} of the gap after node k
    inner = torch.ones_like(left)
    inner[..., 0] = 0.0
    inner[..., -1] = 0.0
    diagonal = left + right - inner  # c_1; c_k + c_{k+1} − 1; c_{n−1}
    off = -rho * c
    values = torch.cat([diagonal, off], -1)[..., index]
    return values, -torch.log(one_minus_rho2).sum(-1)


@dataclass
class _Interp:
    """One cached time interpolation (the payload of a ``CachedInputs`` entry keyed on ``(t,)``)."""

    dtype: torch.dtype
    operator: SparseLinearOperator


class TemporalPrecisionKernel(SparsePrecisionKernel):
    r"""Base class: an AR(1) chain on fixed sorted knots read by linear interpolation, ``W Q⁻¹ Wᵀ`` (module docstring).

    Subclasses implement ``gap_correlations()`` returning ``(ρ_k, 1 − ρ_k²)``,
    each ``(*batch_shape, n − 1)``.

    Parameters
    ----------
    time_grid : array-like
        ``(n,)`` knots, strictly increasing, ``n ≥ 2`` (kept in float64).
    interp_cache_size : int
        Interpolation matrices kept (default 4).
    **kwargs
        As ``gpytorch.kernels.Kernel`` (``batch_shape``, ``active_dims`` of one column).

    Notes
    -----
    Inputs are ``(…, n, 1)`` times within ``[τ_0, τ_{n−1}]`` (values within
    rounding of the ends are clamped; others refused). A time in the cell
    ``[τ_k, τ_{k+1}]`` gets the weights ``1 − f`` and ``f`` (``f`` its
    fraction of the cell); a time on a knot one weight 1 (``W`` then selects
    the knot). Between knots the variance ``(1 − f)² + f² + 2f(1 − f)ρ``
    dips below 1: place knots at the observation times, or densely enough.
    The weights are constants (no gradient with respect to the times).
    Batched inputs must have equal members (one ``W``). ``diag=True``
    returns exact variances (``covariance_diagonal``; the precision is banded).

    Raises
    ------
    ValueError
        A bad time grid (``check_time_grid``: not 1-D, fewer than two knots,
        non-finite, unsorted or duplicated knots); inputs not of shape
        ``(…, n, 1)``, with NaN/Inf or outside the grid.
    """

    def __init__(self, time_grid, *, interp_cache_size: int = 4, **kwargs):
        grid = check_time_grid(time_grid)
        if kwargs.get("ard_num_dims") not in (None, 1):
            raise ValueError(
                f"{type(self).__name__} takes one input column (time), got ard_num_dims={kwargs['ard_num_dims']}"
            )
        active = kwargs.get("active_dims")
        if active is not None and len(active) != 1:
            raise ValueError(f"{type(self).__name__} takes one input column (time), got active_dims={active}")
        if int(interp_cache_size) < 1:
            raise ValueError(f"interp_cache_size must be a positive integer, got {interp_cache_size}")
        super().__init__(**kwargs)
        self._grid = grid
        self.interp_cache_size = int(interp_cache_size)
        self.num_interp_builds = 0
        self._interp_cache: list[CachedInputs[_Interp]] = []
        self._patterns: dict[str, tuple[SparsityPattern, Tensor]] = {}

    # --------------------------------------------------------------- grid
    @property
    def time_grid(self) -> Tensor:
        """``(n,)`` float64 knots."""
        return self._grid

    @property
    def num_times(self) -> int:
        """Knots ``n``."""
        return self._grid.numel()

    @property
    def num_nodes(self) -> int:
        """Latent nodes (the knots), ``n``."""
        return self.num_times

    def gap_correlations(self) -> tuple[Tensor, Tensor]:
        """``(ρ_k, 1 − ρ_k²)``, each ``(*batch_shape, n − 1)``, differentiable in the hyperparameters."""
        raise NotImplementedError

    def _pattern(self, device) -> tuple[SparsityPattern, Tensor]:
        """The tridiagonal pattern and the entry map of ``chain_precision_values`` on ``device`` (kept)."""
        key = str(torch.device(device))
        if key not in self._patterns:
            n = self.num_times
            pattern = precision_pattern(n, 1, device=device)
            row, col = pattern.row, pattern.col_long
            index = torch.where(row == col, row, n + torch.minimum(row, col))
            self._patterns[key] = (pattern, index)
        return self._patterns[key]

    def precision(self) -> KnownLogdetSparseLinearOperator:
        """The tridiagonal ``Q`` ``(*batch_shape, n, n)`` with its closed-form log-determinant."""
        rho, one_minus = self.gap_correlations()
        pattern, index = self._pattern(rho.device)
        values, logdet = chain_precision_values(rho, one_minus, index)
        return KnownLogdetSparseLinearOperator(values, logdet, pattern=pattern)

    # ------------------------------------------------------------ forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(f"{type(self).__name__} does not support last_dim_is_batch (one time column)")
        self._check_shapes(x1, x2)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        Q = self.precision()
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], Q.batch_shape)
        if Q.batch_shape != batch:
            Q = Q._expand_batch(batch)
        W1 = self.interpolation(x1)
        W2 = W1 if symmetric else self.interpolation(x2)
        if diag:
            if symmetric:
                return covariance_diagonal(Q, W1)
            if W1.shape != W2.shape:
                raise ValueError(f"diag=True needs x1 and x2 with as many points, got {W1.shape[0]} and {W2.shape[0]}")
            plus = covariance_diagonal(Q, W1 + W2)
            minus = covariance_diagonal(Q, W1 + W2._mul_constant(-1.0))
            return (plus - minus) / 4
        return SparsePrecisionLinearOperator(Q, interp=W1, right_interp=None if symmetric else W2)

    def _check_shapes(self, x1: Tensor, x2: Tensor) -> None:
        name_ = type(self).__name__
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2 or x.shape[-1] != 1:
                raise ValueError(
                    f"{name_} expects times of shape (..., n, 1), got {name} of shape {tuple(x.shape)} "
                    "(use active_dims to select the time column)"
                )
        check_batch_shapes(x1, x2, self.batch_shape)

    # ------------------------------------------------------ interpolation
    def interpolation(self, t: Tensor) -> SparseLinearOperator:
        """``W(t)``: linear interpolation ``(n_pts, n)`` from the knots to the times ``t (…, n_pts, 1)`` (cached).

        Row ``r`` holds ``1 − f`` at knot ``k`` and ``f`` at knot ``k + 1`` for
        ``t_r = τ_k + f (τ_{k+1} − τ_k)``, ``0 < f < 1``; one weight 1 at a knot.
        """
        t = _single_member(t, type(self).__name__)
        dtype = self._dtype()
        entry = cache_lookup(self._interp_cache, (t,), accept=lambda cached: cached.dtype == dtype)
        if entry is None:
            entry = CachedInputs.of((t,), _Interp(dtype, self._build_interp(t, dtype)))
            cache_insert(self._interp_cache, entry, self.interp_cache_size)
        return entry.payload.operator

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _build_interp(self, t: Tensor, dtype: torch.dtype) -> SparseLinearOperator:
        self.num_interp_builds += 1
        times = self._checked_inside(t.detach()[:, 0])
        grid = self._grid.to(times.device)
        n = self.num_times
        cell = (torch.searchsorted(grid, times, right=True) - 1).clamp(0, n - 2)
        fraction = (times - grid[cell]) / (grid[cell + 1] - grid[cell])
        weights = torch.stack([1 - fraction, fraction], -1)  # (m, 2)
        columns = torch.stack([cell, cell + 1], -1)
        keep = weights != 0  # a time on a knot: one entry
        m = times.numel()
        rows = torch.arange(m, device=times.device).unsqueeze(-1).expand(m, 2)
        pattern, order = SparsityPattern.from_indices(rows[keep], columns[keep], (m, n))
        return SparseLinearOperator(weights[keep][order].to(dtype), pattern=pattern)

    def _checked_inside(self, times: Tensor) -> Tensor:
        name = type(self).__name__
        if times.numel() == 0:
            return times.to(torch.float64)
        if not bool(torch.isfinite(times).all()):
            bad = "NaN" if bool(torch.isnan(times).any()) else "Inf"
            raise ValueError(f"{name} time inputs contain {bad}")
        times = times.to(torch.float64)
        low, high = float(self._grid[0]), float(self._grid[-1])
        slack = 8 * torch.finfo(times.dtype).eps * max(abs(low), abs(high), high - low)
        lo, hi = float(times.min()), float(times.max())
        if lo < low - slack or hi > high + slack:
            raise ValueError(
                f"{name} time inputs lie outside the time grid: they span [{lo:.6g}, {hi:.6g}] but the knots "
                f"span [{low:.6g}, {high:.6g}]; extend the time grid to cover every time (training and test)"
            )
        return times.clamp(low, high)

    def clear_cache(self) -> None:
        """Drop the cached interpolation matrices."""
        self._interp_cache.clear()

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_interp_cache"] = []
        state["_patterns"] = {}
        return state


class AR1Kernel(TemporalPrecisionKernel):
    r"""Stationary Gaussian AR(1) on an evenly spaced time grid: ``Cov(u_a, u_b) = ρ^{|a − b|}``.

    $$
    u_0 \sim N(0, 1), \quad u_k = ρ u_{k−1} + \sqrt{1 − ρ²}\, ε_k, \qquad
    Q = \frac{1}{1 − ρ²}\begin{pmatrix} 1 & −ρ & & \\ −ρ & 1 + ρ² & ⋱ & \\ & ⋱ & ⋱ & −ρ \\ & & −ρ & 1 \end{pmatrix},
    \qquad \log\det Q = −(n − 1)\log(1 − ρ²),
    $$

    unit marginal variance (wrap in ``ScaleKernel`` for a scale), read at
    times inside the grid by linear interpolation
    ([`TemporalPrecisionKernel`][gpsparse.kernels.temporal.TemporalPrecisionKernel]).

    Parameters
    ----------
    time_grid : array-like
        ``(n,)`` evenly spaced, increasing knots (e.g. ``torch.arange(20)`` for
        20 years); steps may differ by ``REGULAR_GRID_RTOL`` relative (rounding).
    rho_prior : gpytorch.priors.Prior, optional
        Prior on ``rho``.
    rho_constraint : gpytorch.constraints.Interval, optional
        Default ``Interval(−1, 1)`` (open: ``|ρ| < 1``, a stationary chain).
    batch_shape : torch.Size, optional
        Batch of independent correlations, ``rho`` of shape ``batch_shape``.
    **kwargs
        As [`TemporalPrecisionKernel`][gpsparse.kernels.temporal.TemporalPrecisionKernel].

    Attributes
    ----------
    rho : Tensor
        The correlation per step ``(*batch_shape)``, initially 0.5.

    Raises
    ------
    ValueError
        Grids that are not evenly spaced (use
        [`OrnsteinUhlenbeckKernel`][gpsparse.kernels.OrnsteinUhlenbeckKernel]),
        and those of [`TemporalPrecisionKernel`][gpsparse.kernels.temporal.TemporalPrecisionKernel].

    Examples
    --------
    >>> import torch
    >>> kernel = AR1Kernel(torch.arange(5.0)).double()
    >>> kernel.rho = 0.8
    >>> K = kernel(torch.arange(5.0, dtype=torch.float64)[:, None]).to_dense()
    >>> bool(torch.allclose(K[0], 0.8 ** torch.arange(5.0, dtype=torch.float64)))
    True
    """

    def __init__(
        self,
        time_grid,
        *,
        rho_prior: Prior | None = None,
        rho_constraint: Interval | None = None,
        batch_shape: torch.Size | None = None,
        **kwargs,
    ):
        grid = check_time_grid(time_grid)
        steps = grid[1:] - grid[:-1]
        if float(steps.max() - steps.min()) > REGULAR_GRID_RTOL * float(steps.abs().max()):
            raise ValueError(
                f"AR1Kernel needs an evenly spaced time grid, got steps from {float(steps.min()):.6g} to "
                f"{float(steps.max()):.6g}; use OrnsteinUhlenbeckKernel for irregular knots"
            )
        batch_shape = torch.Size() if batch_shape is None else torch.Size(batch_shape)
        super().__init__(grid, batch_shape=batch_shape, **kwargs)
        self.register_parameter("raw_rho", torch.nn.Parameter(torch.zeros(batch_shape)))
        if rho_constraint is None:
            rho_constraint = Interval(-1.0, 1.0)
        self.register_constraint("raw_rho", rho_constraint)
        if rho_prior is not None:
            if not isinstance(rho_prior, Prior):
                raise TypeError(f"Expected gpytorch.priors.Prior but got {type(rho_prior).__name__}")
            self.register_prior("rho_prior", rho_prior, lambda m: m.rho, lambda m, v: m._set_rho(v))
        self.rho = 0.5

    @property
    def rho(self) -> Tensor:
        return self.raw_rho_constraint.transform(self.raw_rho)

    @rho.setter
    def rho(self, value) -> None:
        self._set_rho(value)

    def _set_rho(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_rho.dtype, device=self.raw_rho.device)
        self.initialize(raw_rho=self.raw_rho_constraint.inverse_transform(value))

    def gap_correlations(self) -> tuple[Tensor, Tensor]:
        rho = self.rho.unsqueeze(-1).expand(*self.rho.shape, self.num_times - 1)
        return rho, (1 - rho) * (1 + rho)


class OrnsteinUhlenbeckKernel(TemporalPrecisionKernel):
    r"""Matérn ν = 1/2 (exponential) covariance ``exp(−|τ_a − τ_b|/ℓ)`` at the knots of any sorted time grid.

    The Ornstein–Uhlenbeck process observed at the knots is the AR(1) chain of
    the module docstring with ``ρ_k = exp(−Δ_k/ℓ)``, ``Δ_k = τ_k − τ_{k−1}``
    (``1 − ρ_k² = −expm1(−2Δ_k/ℓ)``, accurate for small gaps): the same
    covariance as ``gpytorch.kernels.MaternKernel(nu=0.5)`` with lengthscale
    ``ℓ`` (unit variance), exactly, with a tridiagonal precision
    ([`TemporalPrecisionKernel`][gpsparse.kernels.temporal.TemporalPrecisionKernel]
    for inputs between knots). Very close knots (``Δ_k ≪ ℓ``) give large
    entries ``≈ ℓ/(2Δ_k)``: a badly conditioned ``Q`` (the banded Cholesky loses
    about ``log10(ℓ/Δ)`` digits).

    Parameters
    ----------
    time_grid : array-like
        ``(n,)`` strictly increasing knots.
    lengthscale_prior, lengthscale_constraint, batch_shape
        As ``gpytorch.kernels.MaternKernel`` (one lengthscale; default ``Positive()``).
    **kwargs
        As [`TemporalPrecisionKernel`][gpsparse.kernels.temporal.TemporalPrecisionKernel].

    Examples
    --------
    >>> import torch
    >>> grid = torch.tensor([0.0, 0.3, 1.0, 2.2], dtype=torch.float64)
    >>> kernel = OrnsteinUhlenbeckKernel(grid).double()
    >>> kernel.lengthscale = 0.7
    >>> K = kernel(grid[:, None]).to_dense()
    >>> bool(torch.allclose(K, torch.exp(-(grid[:, None] - grid).abs() / 0.7)))
    True
    """

    has_lengthscale = True
    is_stationary = True

    def __init__(
        self,
        time_grid,
        *,
        lengthscale_prior: Prior | None = None,
        lengthscale_constraint: Interval | None = None,
        batch_shape: torch.Size | None = None,
        **kwargs,
    ):
        super().__init__(
            time_grid,
            lengthscale_prior=lengthscale_prior,
            lengthscale_constraint=lengthscale_constraint,
            batch_shape=batch_shape,
            **kwargs,
        )

    def gap_correlations(self) -> tuple[Tensor, Tensor]:
        lengthscale = self.lengthscale[..., 0, 0]
        steps = (self._grid[1:] - self._grid[:-1]).to(device=lengthscale.device, dtype=lengthscale.dtype)
        scaled = steps / lengthscale.unsqueeze(-1)  # (*batch, n − 1)
        return torch.exp(-scaled), -torch.expm1(-2 * scaled)


def _single_member(x: Tensor, name: str) -> Tensor:
    """The ``(n, 1)`` inputs of ``(*batch, n, 1)`` whose batch members are all equal."""
    if x.dim() == 2:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if flat.shape[0] > 1 and not torch.equal(flat.detach(), flat[:1].detach().expand_as(flat)):
        raise NotImplementedError(
            f"{name} needs one set of times (one interpolation matrix W) for all batch members; "
            f"got inputs of shape {tuple(x.shape)} whose batch members differ"
        )
    return flat[0]
