r"""Matérn kernels ν = 1/2, 3/2, 5/2 on 1-D inputs through their exact state space (the adapter).

A Matérn process with ν = p + ½ is the first component of a linear SDE whose
state is ``s = p + 1`` derivatives (Hartikainen & Särkkä, 2010). On sorted
inputs the states form a Markov chain: ``z_k = A(λΔ_k) z_{k−1} + ε_k``,
``ε_k ~ N(0, Σ(λΔ_k))``. Two exact representations follow:

* the covariance form (the kernel): the Kalman filter, its adjoint and the RTS
  smoother (``gpsparse.core.kalman``) give the marginal likelihood, its
  gradients and predictions in ``O(n s³)``, exact for any spacing (equal
  inputs are zero gaps);
* the precision form (``matern_precision``): the block-tridiagonal precision
  ``Q`` of the states on distinct sorted nodes, for sparse-precision models
  (``W Q⁻¹ Wᵀ``); its entries contain ``Σ⁻¹`` and a Cholesky of ``Q`` loses
  ``(2s − 1)·log10(1/λΔ)`` digits at the smallest gap ``Δ``.

The layers (DESIGN.md §1): the mathematics and the numerics (state space,
transitions and noise, the precision values and their adjoint, the pattern)
are ``gpsparse.core.markov``, the filter ``gpsparse.core.kalman``; the autograd
Functions ``gpsparse.autograd.markov`` and ``gpsparse.autograd.kalman``; the
operator ``gpsparse.operators.state_space``. This module holds
``matern_precision`` (the precision as a
[`SparseLinearOperator`][gpsparse.SparseLinearOperator]), the kernel
[`MarkovMaternKernel`][gpsparse.kernels.MarkovMaternKernel] with its input
handling, and re-exports ``matern_state_space``, ``matern_transition_and_noise``,
``matern_covariance``, ``precision_pattern``, ``MaternStateSpace`` and
``SUPPORTED_NU``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gpytorch
import torch
from torch import Tensor

from gpsparse.autograd.markov import matern_precision_values, matern_transition_and_noise
from gpsparse.core.markov import (
    SUPPORTED_NU,
    MaternStateSpace,
    matern_covariance,
    matern_order,
    matern_state_space,
    precision_pattern,
)
from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup, check_batch_shapes
from gpsparse.kernels.state_space_prediction import StateSpacePredictionStrategy
from gpsparse.operators.sparse import SparseLinearOperator
from gpsparse.operators.state_space import MaternCovarianceLinearOperator

__all__ = [
    "MarkovMaternKernel",
    "MaternStateSpace",
    "matern_state_space",
    "matern_transition_and_noise",
    "matern_precision",
    "matern_covariance",
    "precision_pattern",
    "CloseInputsWarning",
    "SUPPORTED_NU",
]


class CloseInputsWarning(RuntimeWarning):
    """Formerly: inputs too close for the float64 precision path.

    No longer issued: ``MarkovMaternKernel`` runs on the state-space (Kalman)
    form, exact at any spacing. Kept so that ``warnings.filterwarnings`` calls
    naming it keep working; ``matern_precision`` users still face the
    precision form's limit (module docstring).
    """


# ---------------------------------------------------------------------------
# The precision matrix as an operator
# ---------------------------------------------------------------------------


def matern_precision(
    times: Tensor, rate: Tensor, nu: float, *, pattern: SparsityPattern | None = None
) -> SparseLinearOperator:
    r"""Exact precision of the scaled Matérn state at sorted distinct ``times``.

    Parameters
    ----------
    times : Tensor
        ``(n,)`` strictly increasing node positions (differentiable).
    rate : Tensor
        ``(*batch,)`` positive ``λ = √(2ν)/ℓ`` (differentiable).
    nu : float
        0.5, 1.5 or 2.5.
    pattern : SparsityPattern, optional
        ``precision_pattern(n, s)`` to reuse (cached by the kernel).

    Returns
    -------
    SparseLinearOperator
        ``(*batch, n·s, n·s)`` symmetric block-tridiagonal ``Q`` (module
        docstring of ``gpsparse.core.markov``);
        ``(Q⁻¹)[i·s, j·s] = k_ν(|t_i − t_j|)``, the unit-variance Matérn
        covariance. Half-bandwidth ``2s − 1``. Values in the promoted dtype
        of ``times`` and ``rate``.

    Complexity
    ----------
    ``O(n·s³)`` time, vectorised over nodes and batch (elementwise
    operations on ``(*batch, n)`` tensors); the backward recomputes the
    blocks and keeps ``O(n)`` memory between the passes.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    >>> Q = matern_precision(t, torch.tensor(1.0, dtype=torch.float64), 0.5)
    >>> C = torch.linalg.inv(Q.to_dense())
    >>> bool(torch.allclose(C, torch.exp(-(t[:, None] - t).abs())))
    True
    """
    space = matern_state_space(nu)
    s = space.order
    n = times.shape[-1]
    if times.dim() != 1 or n == 0:
        raise ValueError(f"times must be a non-empty 1-D tensor, got shape {tuple(times.shape)}")
    if pattern is None:
        pattern = precision_pattern(n, s, device=times.device)
    if pattern.size != (n * s, n * s):
        raise ValueError(f"pattern of size {pattern.size} does not fit {n} nodes of order {s}")
    return SparseLinearOperator(matern_precision_values(times, rate, nu), pattern=pattern)


# ---------------------------------------------------------------------------
# The GPyTorch kernel
# ---------------------------------------------------------------------------


@dataclass
class _Steps:
    """Sorting of one pair of inputs into Kalman steps (one step per input row, equal inputs included).

    The payload of a ``CachedInputs`` entry keyed on ``(x1,)`` (symmetric) or
    ``(x1, x2)``.
    """

    order: Tensor  # (n,) stable sort permutation of the flattened inputs cat(x1, x2)
    rows1: Tensor  # (m1,) step of each x1 row
    rows2: Tensor | None  # (m2,) step of each x2 row (None: symmetric)


class MarkovMaternKernel(gpytorch.kernels.Kernel):
    r"""Matérn ν ∈ {1/2, 3/2, 5/2} on 1-D inputs through its exact state-space (Kalman) form.

    $$
    k(t, t') = \phi_\nu(λ|t − t'|), \quad λ = \sqrt{2ν}/ℓ, \quad
    \phi_{1/2}(d) = e^{−d},\ \phi_{3/2}(d) = (1 + d)e^{−d},\
    \phi_{5/2}(d) = (1 + d + d²/3)e^{−d}
    $$

    — the same covariance as ``gpytorch.kernels.MaternKernel(nu)`` (unit
    variance; wrap in ``ScaleKernel``). A Matérn process with ν = p + ½ is the
    first component of a linear SDE with a state of ``s = p + 1`` scaled
    derivatives (Hartikainen & Särkkä, 2010). ``forward`` sorts the inputs
    (those of ``cat(x1, x2)`` for a cross-covariance) into *steps*, one per
    input — equal inputs are steps with a zero gap, transition ``A = I`` and
    process noise ``Σ = 0`` — and returns a
    [`MaternCovarianceLinearOperator`][gpsparse.operators.state_space.MaternCovarianceLinearOperator]
    holding the gaps ``Δ_k`` and the rate ``λ`` (the transitions ``A(λΔ_k)``
    and noises ``Σ(λΔ_k)`` of ``gpsparse.core.markov`` follow) and the step of
    every row and column. With a
    Gaussian likelihood the marginal likelihood, its gradients and the
    predictions run through the covariance-form Kalman filter, its adjoint and
    the RTS smoother (``gpsparse.core.kalman``) in ``O(n s³)`` time and memory:
    exact for any inputs — repeated, one ulp apart, or far apart, at any
    lengthscale — because nothing inverts the process noise (the precision
    form, ``matern_precision``, has ``Σ⁻¹`` entries and loses
    ``(2s − 1)·log10(1/λΔ)`` digits at close inputs).

    Parameters
    ----------
    nu : float
        0.5, 1.5 or 2.5 (default 2.5, as GPyTorch).
    pattern_cache_size : int
        Input orderings kept (default 3: training inputs, and the test–train
        and test–test pairs of a prediction).
    **kwargs
        As ``gpytorch.kernels.MaternKernel``: ``lengthscale_prior``,
        ``lengthscale_constraint`` (default ``Positive()``), ``batch_shape``,
        ``active_dims`` (to pick one column of multi-dimensional inputs),
        ``ard_num_dims`` (must be 1 or None).

    Notes
    -----
    *Cache.* The sort of the inputs depends only on the inputs; it is reused
    while they are the same (identity and in-place version, else
    ``torch.equal`` against a stored copy); ``num_node_builds`` counts
    rebuilds. The transitions are recomputed at every call, differentiably in
    ``ℓ`` and in the inputs (every input is its own step, so every input gets
    its own gradient, repeated ones included).

    *Prediction.* ``model.eval(); model(x_test)`` goes through
    ``gpsparse.kernels.state_space_prediction.StateSpacePredictionStrategy``:
    means by one covariance product on the joint steps, variances by the RTS
    smoother (exact; under ``torch.no_grad()``, or differentiable Kalman solves
    when a graph is needed).

    *diag=True* returns ``φ_ν(λ|x1_i − x2_i|)``, exactly 1 for equal inputs.

    *Batches.* A batched lengthscale (``batch_shape``) gives batched
    transitions on one ordering. Batched inputs must be equal across the batch
    (e.g. expanded); members with different inputs raise
    ``NotImplementedError``.

    *Accuracy.* Every kernel computes in float64 whatever the input dtype, so
    float32 models get float64-accurate losses and predictions (rounded to
    float32). Against ``ScaleKernel(MaternKernel(nu))`` in float64 the loss,
    gradients and predictions agree to ~1e-10 relative for random inputs with
    duplicates and near-duplicates (``tests/test_markov_state_space.py``,
    property-based); GPyTorch's dense distance ``√(x² + x'² − 2xx')`` is itself
    only accurate to ``~1e-8·|x|`` for close pairs.

    Raises
    ------
    ValueError
        ``nu`` not supported; inputs not of shape ``(..., n, 1)``; NaN or Inf
        inputs; empty inputs; ``ard_num_dims`` other than 1.
    NotImplementedError
        Batched inputs that differ between batch members;
        ``last_dim_is_batch=True``.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels.markov import MarkovMaternKernel
    >>> kernel = gpytorch.kernels.ScaleKernel(MarkovMaternKernel(nu=1.5)).double()
    >>> x = torch.randperm(1000).double()[:, None] / 10   # any order, any spacing
    >>> K = kernel(x).evaluate_kernel()                  # 1000 steps of a 2-dimensional state
    >>> K.shape, type(K).__name__
    (torch.Size([1000, 1000]), 'MaternCovarianceLinearOperator')
    """

    has_lengthscale = True
    is_stationary = True

    def __init__(self, nu: float = 2.5, *, pattern_cache_size: int = 3, **kwargs):
        matern_order(nu)
        ard = kwargs.get("ard_num_dims")
        if ard is not None and int(ard) != 1:
            raise ValueError(
                f"MarkovMaternKernel works on 1-D inputs only; got ard_num_dims={ard} "
                "(use active_dims to select one input column)"
            )
        if int(pattern_cache_size) < 1:
            raise ValueError(f"pattern_cache_size must be a positive integer, got {pattern_cache_size}")
        super().__init__(**kwargs)
        self.nu = float(nu)
        self.pattern_cache_size = int(pattern_cache_size)
        self._node_cache: list[CachedInputs[_Steps]] = []
        self.num_node_builds = 0

    @property
    def rate(self) -> Tensor:
        """``λ = √(2ν)/ℓ``, shape ``(*batch_shape,)``."""
        return math.sqrt(2 * self.nu) / self.lengthscale[..., 0, 0]

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return StateSpacePredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)

    # ----------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(
                "MarkovMaternKernel does not support last_dim_is_batch (deprecated in GPyTorch); "
                "use one kernel per input dimension with active_dims instead"
            )
        self._check_inputs(x1, x2)
        rate = self.rate
        if diag:
            distance = (x1 - x2).abs()[..., 0]
            return matern_covariance(rate[..., None] * distance, self.nu)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        steps = self._steps(x1, x2, symmetric)
        flat = _member(x1)[:, 0] if symmetric else torch.cat([_member(x1)[:, 0], _member(x2)[:, 0]])
        dtype = torch.promote_types(flat.dtype, rate.dtype)
        times = flat[steps.order].to(dtype)
        gaps = times[1:] - times[:-1]  # (n − 1,), ≥ 0
        scale = torch.ones(rate.shape, dtype=dtype, device=flat.device)
        # λ = √(2ν)/ℓ in float64 even for float32 models: near-degenerate (very long) lengthscales make the
        # gradient sensitive to λ's rounding (measured: 1.4e-3 relative in float32 at ℓ = 300·range).
        rate64 = math.sqrt(2 * self.nu) / self.lengthscale[..., 0, 0].to(torch.float64)
        order = steps.order if symmetric else None  # argsort(rows1), known from the sort
        op = MaternCovarianceLinearOperator(gaps, rate64, scale, self.nu, steps.rows1, steps.rows2, step_order=order)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], op.batch_shape)
        return op._expand_batch(batch) if batch != op.batch_shape else op

    def _check_inputs(self, x1: Tensor, x2: Tensor) -> None:
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2 or x.shape[-1] != 1:
                raise ValueError(
                    f"MarkovMaternKernel needs 1-D inputs of shape (..., n, 1), got {name} of shape "
                    f"{tuple(x.shape)} (use active_dims to select one column)"
                )
            if x.shape[-2] == 0:
                raise ValueError(f"MarkovMaternKernel needs at least one input point, got an empty {name}")
            if not bool(torch.isfinite(x.detach()).all()):
                bad = "NaN" if bool(torch.isnan(x.detach()).any()) else "Inf"
                raise ValueError(f"MarkovMaternKernel inputs contain {bad} ({name})")
        check_batch_shapes(x1, x2, self.batch_shape)

    # ------------------------------------------------------------ cache
    def _steps(self, x1: Tensor, x2: Tensor, symmetric: bool) -> _Steps:
        """The cached ordering of ``(x1,)`` (symmetric) or ``(x1, x2)``, built on a miss."""
        inputs = (x1,) if symmetric else (x1, x2)
        entry = cache_lookup(self._node_cache, inputs)
        if entry is None:
            entry = CachedInputs.of(inputs, self._build_steps(*inputs))
            cache_insert(self._node_cache, entry, self.pattern_cache_size)
        return entry.payload

    def _build_steps(self, x1: Tensor, x2: Tensor | None = None) -> _Steps:
        self.num_node_builds += 1
        first = _member(x1.detach())[:, 0]
        flat = first if x2 is None else torch.cat([first, _member(x2.detach())[:, 0]])
        order = torch.sort(flat, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        m1 = first.numel()
        return _Steps(order=order, rows1=rank[:m1], rows2=None if x2 is None else rank[m1:])

    def clear_node_cache(self) -> None:
        """Drop every cached ordering (the next call rebuilds)."""
        self._node_cache.clear()

    def __getstate__(self):
        # Pickles and deep copies start with an empty cache (weak references, index tensors).
        state = dict(super().__getstate__())
        state["_node_cache"] = []
        return state


def _member(x: Tensor) -> Tensor:
    """The ``(n, 1)`` inputs shared by every batch member of ``(*batch, n, 1)``; raises if they differ."""
    if x.dim() == 2:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if flat.shape[0] > 1 and not torch.equal(flat, flat[:1].expand_as(flat)):
        raise NotImplementedError(
            "MarkovMaternKernel: batched inputs that differ between batch members are not supported (each "
            "member would need its own node ordering and selection W); use one model per member or equal inputs"
        )
    return flat[0]
