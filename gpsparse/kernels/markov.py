r"""Matérn kernels ν = 1/2, 3/2, 5/2 on 1-D inputs as exact block-tridiagonal precisions (the adapter).

A Matérn process with ν = p + ½ is the first component of a linear SDE whose
state is ``s = p + 1`` derivatives (Hartikainen & Särkkä, 2010). On sorted
nodes the states form a Markov chain, so their joint precision ``Q`` is block
tridiagonal and the covariance of the observations is ``W Q⁻¹ Wᵀ`` with ``W``
selecting the first state component — the exact Matérn covariance, never
formed. gpsparse's banded Cholesky (``gpsparse.core.banded``) then gives
exact log-determinants, solves and gradients in ``O(n)``.

The layers (DESIGN.md §1): the mathematics and the numerics (state space,
transitions and noise, the precision values and their adjoint, the pattern)
are ``gpsparse.core.markov``; the autograd Functions
``gpsparse.autograd.markov``. This module holds ``matern_precision``
(the precision as a [`SparseLinearOperator`][gpsparse.SparseLinearOperator]), the kernel
[`MarkovMaternKernel`][gpsparse.kernels.MarkovMaternKernel] with its input handling, and re-exports
``matern_state_space``, ``matern_transition_and_noise``,
``matern_covariance``, ``precision_pattern``, ``MaternStateSpace`` and
``SUPPORTED_NU``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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
from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.operators.precision import SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

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

#: Smallest scaled gap λ·Δ without a warning, per ν (estimated float64 error of the marginal
#: likelihood ≲ 1e-6 relative above it; measured in tests/test_markov.py::test_accuracy_versus_gap).
_WARN_GAP = {0.5: 0.0, 1.5: 1e-3, 2.5: 1e-1}


class CloseInputsWarning(RuntimeWarning):
    """Inputs so close (relative to the lengthscale) that the float64 precision path loses accuracy."""


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
class _Nodes:
    """Sorting/merging of one pair of inputs into latent nodes, with the patterns built for them.

    The payload of a ``CachedInputs`` entry keyed on ``(x1,)``
    (symmetric) or ``(x1, x2)``.
    """

    representative: Tensor  # (n,) position of each sorted node's first input in cat(x1, x2) (flattened member)
    precision: SparsityPattern  # precision_pattern(n, s)
    select1: SparsityPattern  # (m1, n·s) selection of the f component of each x1 row's node
    select2: SparsityPattern | None
    min_gap: float  # smallest distance between distinct nodes (inf for one node)
    warned_rate: float = math.inf  # smallest λ already warned about (warn once per entry and regime)


class MarkovMaternKernel(SparsePrecisionKernel):
    r"""Matérn ν ∈ {1/2, 3/2, 5/2} on 1-D inputs through its exact sparse (Markov) precision.

    $$
    k(t, t') = \phi_\nu(λ|t − t'|), \quad λ = \sqrt{2ν}/ℓ, \quad
    \phi_{1/2}(d) = e^{−d},\ \phi_{3/2}(d) = (1 + d)e^{−d},\
    \phi_{5/2}(d) = (1 + d + d²/3)e^{−d}
    $$

    — the same covariance as ``gpytorch.kernels.MaternKernel(nu)`` (unit
    variance; wrap in ``ScaleKernel``). ``forward`` sorts the inputs, merges
    equal ones into one latent node and returns
    ``SparsePrecisionLinearOperator(Q, interp=W₁, right_interp=W₂)`` with the
    block-tridiagonal state precision ``Q`` of ``matern_precision`` and
    selections ``W`` of the first state component (several rows of ``W`` hit
    the same node for duplicate inputs). For ``k(x1, x2)`` with different
    inputs the nodes are those of ``cat(x1, x2)``. The half-bandwidth of ``Q``
    (and of the posterior precision ``Q + WᵀD⁻¹W``) is ``2s − 1 ≤ 5``, within
    gpsparse's exact banded path (``max_banded_bandwidth = 6``): marginal
    likelihood, gradients and predictions are exact (no probes, no CG) in
    ``O(n)`` time and memory.

    Parameters
    ----------
    nu : float
        0.5, 1.5 or 2.5 (default 2.5, as GPyTorch).
    pattern_cache_size : int
        Node structures kept (default 3: training inputs, and the test–train
        and test–test pairs of a prediction).
    **kwargs
        As ``gpytorch.kernels.MaternKernel``: ``lengthscale_prior``,
        ``lengthscale_constraint`` (default ``Positive()``), ``batch_shape``,
        ``active_dims`` (to pick one column of multi-dimensional inputs),
        ``ard_num_dims`` (must be 1 or None).

    Notes
    -----
    *Cache.* Sorting, merging, the precision pattern and the selections
    depend only on the inputs; they are reused while the inputs are the same
    (identity and in-place version, else ``torch.equal`` against a stored
    copy), ``num_node_builds`` counts rebuilds. The values of ``Q`` are
    recomputed at every call, differentiably in ``ℓ`` and in the inputs
    (through the gaps between nodes; a duplicate input receives no gradient).

    *diag=True* returns ``φ_ν(λ|x1_i − x2_i|)``, exactly 1 for equal inputs.

    *Batches.* A batched lengthscale (``batch_shape``) gives batched values on
    one pattern. Batched inputs must be equal across the batch (e.g.
    expanded); members with different inputs raise ``NotImplementedError``
    (they would need one selection ``W`` per member).

    *Accuracy.* Exact to rounding for ν = 1/2 at any spacing. For ν ≥ 3/2 a
    float64 Cholesky of the precision loses about ``(2s − 1)·log10(1/(λΔ))``
    digits at the smallest gap ``Δ`` between distinct inputs (the Markov
    chain is nearly deterministic over short gaps; measured with entries
    computed to 40 digits, so it is the factorisation, not the entries).
    Relative error of ``yᵀK⁻¹y + log det K`` for one close pair (scaled gap
    ``λΔ``) among 120 well-separated points (float64,
    ``test_accuracy_versus_gap``):

    | λΔ | 0.3 | 0.1 | 0.03 | 0.01 | 1e-3 | 1e-4 |
    |---|---|---|---|---|---|---|
    | ν = 3/2 | <1e-15 | 5e-14 | 6e-14 | 1e-10 | 9e-8 | 1e-4 |
    | ν = 5/2 | 8e-12 | 3e-9 | 8e-7 | 6e-4 | ~1 | fails |

    Many close pairs add up; predictions at test points close to training
    points suffer alike (the joint nodes then have the small gap). A
    ``CloseInputsWarning`` is issued once per input set when ``λΔ_min``
    is below 1e-3 (ν = 3/2) or 0.1 (ν = 5/2); round or merge near-duplicate
    inputs, or use ν = 1/2 (or 3/2) there. GPyTorch's dense ``MaternKernel``
    computes distances as ``√(x² + x'² − 2xx')``, itself only accurate to
    ``~1e-8·|x|`` for close pairs.

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
    >>> x = torch.randperm(1000).double()[:, None] / 10   # any order; λ·Δ ≥ 0.17 here
    >>> K = kernel(x).evaluate_kernel()       # W Q⁻¹ Wᵀ with a banded Q (2000 × 2000 state precision)
    >>> K.Q.shape, type(K).__name__
    (torch.Size([2000, 2000]), 'SparsePrecisionLinearOperator')
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
        self._node_cache: list[CachedInputs[_Nodes]] = []
        self.num_node_builds = 0

    @property
    def rate(self) -> Tensor:
        """``λ = √(2ν)/ℓ``, shape ``(*batch_shape,)``."""
        return math.sqrt(2 * self.nu) / self.lengthscale[..., 0, 0]

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
        nodes = self._nodes(x1, x2, symmetric)
        self._warn_if_close(nodes, rate)
        flat = _member(x1)[:, 0] if symmetric else torch.cat([_member(x1)[:, 0], _member(x2)[:, 0]])
        times = flat[nodes.representative]
        Q = matern_precision(times, rate, self.nu, pattern=nodes.precision)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], Q.batch_shape)
        if batch != Q.batch_shape:
            Q = Q._expand_batch(batch)
        w1 = _selection(nodes.select1, Q)
        w2 = None if symmetric else _selection(nodes.select2, Q)
        return SparsePrecisionLinearOperator(Q, interp=w1, right_interp=w2)

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

    def _warn_if_close(self, nodes: _Nodes, rate: Tensor) -> None:
        """One ``CloseInputsWarning`` per input set, repeated only when ``λ`` has dropped 10× since."""
        limit = _WARN_GAP[self.nu]
        smallest = float(rate.detach().min()) if rate.numel() else math.inf
        scaled = nodes.min_gap * smallest
        if scaled < limit and smallest < nodes.warned_rate / 10:
            nodes.warned_rate = smallest
            warnings.warn(
                f"MarkovMaternKernel(nu={self.nu}): the closest distinct inputs are λ·Δ = {scaled:.2e} apart "
                f"(below {limit:g}); the float64 banded precision loses about "
                f"{(2 * matern_order(self.nu) - 1) * math.log10(1 / scaled):.0f} digits there. Round or merge "
                "near-duplicate inputs, or use nu=0.5 (see the class notes)",
                CloseInputsWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------ cache
    def _nodes(self, x1: Tensor, x2: Tensor, symmetric: bool) -> _Nodes:
        """The cached node structure of ``(x1,)`` (symmetric) or ``(x1, x2)``, built on a miss."""
        inputs = (x1,) if symmetric else (x1, x2)
        entry = cache_lookup(self._node_cache, inputs)
        if entry is None:
            entry = CachedInputs.of(inputs, self._build_nodes(*inputs))
            cache_insert(self._node_cache, entry, self.pattern_cache_size)
        return entry.payload

    def _build_nodes(self, x1: Tensor, x2: Tensor | None = None) -> _Nodes:
        self.num_node_builds += 1
        s = matern_order(self.nu)
        first = _member(x1.detach())[:, 0]
        flat = first if x2 is None else torch.cat([first, _member(x2.detach())[:, 0]])
        unique, node = torch.unique(flat, sorted=True, return_inverse=True)
        n = unique.numel()
        positions = torch.arange(flat.numel(), device=flat.device)
        representative = torch.full((n,), flat.numel(), dtype=torch.long, device=flat.device)
        representative = representative.scatter_reduce(0, node, positions, reduce="amin")
        m1 = first.numel()
        min_gap = float((unique[1:] - unique[:-1]).min()) if n > 1 else math.inf
        return _Nodes(
            representative=representative,
            precision=precision_pattern(n, s, device=flat.device),
            select1=_selection_pattern(node[:m1], s, n),
            select2=None if x2 is None else _selection_pattern(node[m1:], s, n),
            min_gap=min_gap,
        )

    def clear_node_cache(self) -> None:
        """Drop every cached node structure (the next call rebuilds)."""
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


def _selection_pattern(node: Tensor, order: int, num_nodes: int) -> SparsityPattern:
    """``(m, n·s)`` pattern with one entry per row, at the first state component of the row's node."""
    m = node.numel()
    crow = torch.arange(m + 1, device=node.device)
    return SparsityPattern(crow, node * order, (m, num_nodes * order))


def _selection(pattern: SparsityPattern, Q: SparseLinearOperator) -> SparseLinearOperator:
    return SparseLinearOperator(torch.ones(pattern.nnz, dtype=Q.dtype, device=Q.device), pattern=pattern)
