r"""Intrinsic GMRF kernels: random walks, Besag (ICAR) and BYM2, with their linear constraints.

Intrinsic Gaussian Markov random fields have a rank-deficient precision:
``xᵀQx`` does not see the constant (and, for RW2, the linear trend) on
each connected component. Constrained to sum to zero (and to have no
linear trend, RW2) they are proper, with covariance ``Q⁺``; the kernels
return that covariance as a
[`ConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.ConstrainedPrecisionLinearOperator]
(never a dense matrix), the marginal likelihood uses the generalised
determinant and conditioning by kriging exactly, and prediction goes
through the constrained posterior
([`ConstrainedPredictionStrategy`][gpsparse.kernels.constrained_prediction.ConstrainedPredictionStrategy]),
whose latent mean satisfies the constraints to rounding. Mathematics:
``docs/mathematics.md``, "Intrinsic GMRFs and linear constraints".

[`RandomWalkKernel`][gpsparse.kernels.RandomWalkKernel]
:   RW1 / RW2 on fixed, possibly irregular 1-D knots, read at any input in
    their range by linear interpolation.
[`BesagKernel`][gpsparse.kernels.BesagKernel]
:   The intrinsic CAR of Besag, York & Mollié (1991) on a graph: ``Q = D − A``.
[`BYM2Kernel`][gpsparse.kernels.BYM2Kernel]
:   Riebler et al. (2016): ``b = τ^{-1/2} (√(1−φ) v + √φ u*)`` with ``u*``
    the scaled Besag field and ``v`` i.i.d.; ``φ`` and ``τ`` learnable.

*Scaling* (Sørbye & Rue 2014; Riebler et al. 2016): with ``scale=True`` the
structure matrix of each connected component is multiplied by the
geometric mean of the marginal variances of its constrained field, so that
that geometric mean — the *generalised variance* — is 1 and a
``ScaleKernel``'s outputscale (or BYM2's ``1/τ``) is a typical variance,
comparable across graphs. Components are scaled separately (as R-INLA's
``scale.model`` with ``adjust.for.con.comp``, Freni-Sterrantino, Ventrucci
& Rue 2018). The variances ``diag(Q⁺)`` are computed once, at construction
(``generalized_variances``): exactly — a dense ``V_⊥(V_⊥ᵀQV_⊥)⁻¹V_⊥ᵀ``
up to ``max_dense_nodes`` nodes; beyond, the selected inverse of the
completion ``R = Q + EEᵀ`` (banded road: every random walk, any size; CHOLMOD
for graphs when scikit-sparse is installed) with the exact low-rank
correction ``diag(PR⁻¹P)``, ``P = I − VVᵀ``; and only for graphs above
``max_dense_nodes`` without CHOLMOD by a Monte Carlo estimate from exact
samples of the field (``num_scale_samples`` perturbation samples, each one
solve; the method used is in the kernel's ``scale_method`` attribute).
"""

from __future__ import annotations

import math
from dataclasses import replace

import gpytorch
import numpy as np
import scipy.sparse as sp
import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.priors import Prior
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.constraints import constrained_inverse_dense, random_walk_structure
from gpsparse.core.graph import adjacency as adjacency_matrix
from gpsparse.core.graph import laplacian_from_adjacency
from gpsparse.core.pattern import SparsityPattern
from gpsparse.errors import DenseSizeError
from gpsparse.kernels._inputs import CachedInputs, cache_insert, cache_lookup
from gpsparse.kernels.constrained_prediction import ConstrainedPredictionStrategy
from gpsparse.linalg import dispatch
from gpsparse.operators.constrained import ConstrainedPrecisionLinearOperator, LinearConstraints, add_covariances
from gpsparse.operators.precision import SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["RandomWalkKernel", "BesagKernel", "BYM2Kernel", "IntrinsicAdditiveKernel", "generalized_variances"]

SCALE_METHODS = ("auto", "dense", "selected", "stochastic")


# ----------------------------------------------------------------------------- scaling
def generalized_variances(
    structure: sp.spmatrix,
    constraints: LinearConstraints,
    *,
    method: str = "auto",
    max_dense_nodes: int = 2048,
    root: sp.spmatrix | None = None,
    num_samples: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    r"""Marginal variances ``diag(Q⁺)`` of an intrinsic GMRF constrained by ``constraints``, and the method used.

    ``Q`` (``structure``) must have its null space spanned by the
    constraints (``Q V = 0``), so that ``R = Q + EEᵀ`` (the completion of
    ``gpsparse.operators.constrained``) is a generalised inverse's source:
    ``Q⁺ = P R⁻¹ P`` with ``P = I − VVᵀ``.

    Methods:

    * ``"dense"``: ``V_⊥(V_⊥ᵀQV_⊥)⁻¹V_⊥ᵀ`` in float64 (O(N³); needs
      ``N ≤ max_dense_nodes`` and the dense limit).
    * ``"selected"``: exact, ``diag(PR⁻¹P)_i = (R⁻¹)_ii − 2 V_iᵀ(R⁻¹V)_i +
      V_iᵀ(VᵀR⁻¹V)V_i`` from the selected inverse of ``R`` (banded road, or
      CHOLMOD) and ``k`` solves.
    * ``"stochastic"``: Monte Carlo from ``S = num_samples`` exact samples
      ``x = P R⁻¹ [Bᵀ E] ε`` (``root = B`` with ``Q = BᵀB``, ``ε ~ N(0, I)``:
      ``Cov x = P R⁻¹ P = Q⁺``), one CG solve per sample; each variance has
      relative standard error ``√(2/S)`` (8.8 % at ``S = 256``), and the
      geometric mean of ``n`` of them a relative error of about
      ``√(2/(S n))`` with a bias of about ``−1/S`` in its logarithm.
    * ``"auto"``: dense up to ``max_dense_nodes``, else selected when ``R``
      is banded or CHOLMOD is installed, else stochastic.

    Returns
    -------
    (numpy.ndarray, str)
        ``(N,)`` float64 variances and the method used.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {method!r}")
    Q = sp.csr_matrix(structure, dtype=np.float64)
    n = Q.shape[0]
    V = constraints.basis(torch.float64).numpy()
    if method == "auto":
        if n <= max_dense_nodes and n * n <= gs_settings.current().max_dense_size:
            method = "dense"
        else:
            method = "selected" if _exact_road(_completion_matrix(Q, constraints)) else "stochastic"
    if method == "dense":
        if n * n > gs_settings.current().max_dense_size:
            raise DenseSizeError(
                f"dense variances of {n:,} nodes exceed gpsparse.settings.max_dense_size; use another scale_method"
            )
        return np.clip(np.diag(constrained_inverse_dense(Q, V)), 0.0, None), "dense"
    R = _completion_matrix(Q, constraints)
    op = _operator(R)
    config = replace(op._road_config(), cholesky=cholmod_available())
    if method == "selected":
        inverse = op.selected_inverse()
        if inverse is None:
            raise ValueError(
                "scale_method='selected' needs an exact road for the selected inverse (a banded structure, or "
                "CHOLMOD: pip install scikit-sparse); use 'dense' or 'stochastic'"
            )
        diagonal = inverse[op.pattern.diagonal_positions].numpy()
        RinvV = dispatch.solve(op.values, op.pattern, torch.from_numpy(V), config).numpy()
        variances = diagonal - 2.0 * (V * RinvV).sum(1) + ((V @ (V.T @ RinvV)) * V).sum(1)
        return np.clip(variances, 0.0, None), "selected"
    if root is None:
        raise ValueError("scale_method='stochastic' needs a square root B of the structure (Q = BᵀB)")
    gen = np.random.default_rng(seed)
    k = V.shape[1]
    E = sp.csr_matrix((np.full(k, math.sqrt(_scale2(Q))), (constraints.pivots.numpy(), np.arange(k))), shape=(n, k))
    B = sp.csr_matrix(root, dtype=np.float64)
    total = np.zeros(n)
    block = 32
    for start in range(0, num_samples, block):
        count = min(block, num_samples - start)
        rhs = B.T @ gen.standard_normal((B.shape[0], count)) + E @ gen.standard_normal((k, count))
        z = dispatch.solve(op.values, op.pattern, torch.from_numpy(np.ascontiguousarray(rhs)), config).numpy()
        x = z - V @ (V.T @ z)
        total += (x**2).sum(1)
    return total / num_samples, "stochastic"


def _scale2(Q: sp.csr_matrix) -> float:
    diagonal = np.abs(Q.diagonal())
    scale = float(diagonal.mean()) if diagonal.size else 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _completion_matrix(Q: sp.csr_matrix, constraints: LinearConstraints) -> sp.csr_matrix:
    """``R = Q + s² Σ_j e_{p_j} e_{p_j}ᵀ`` (SciPy; the operators' completion with the pivots of ``constraints``)."""
    bump = np.zeros(Q.shape[0])
    bump[constraints.pivots.numpy()] = _scale2(Q)
    R = (Q + sp.diags(bump)).tocsr()
    R.sum_duplicates()
    R.sort_indices()
    return R


def _operator(matrix: sp.csr_matrix, dtype=torch.float64) -> SparseLinearOperator:
    """A symmetric SparseLinearOperator of a SciPy matrix (full diagonal stored)."""
    matrix = sp.csr_matrix(matrix + sp.diags(np.zeros(matrix.shape[0])), dtype=np.float64)
    matrix.sort_indices()
    crow = torch.from_numpy(matrix.indptr.astype(np.int64))
    col = torch.from_numpy(matrix.indices.astype(np.int64))
    pattern = SparsityPattern(crow, col, matrix.shape, symmetric=True)
    values = torch.from_numpy(matrix.data.copy()).to(dtype)
    return SparseLinearOperator(0.5 * (values + values[pattern.transpose_perm]), pattern=pattern)


def _exact_road(R: sp.csr_matrix) -> bool:
    op = _operator(R)
    return op.road(logdet=False) == "banded" or cholmod_available()


def _pseudo_logdet(structure: sp.csr_matrix, constraints: LinearConstraints, max_dense_nodes: int) -> tuple[float, str]:
    """``log det* Q`` (the nonzero eigenvalues) and how: dense eigenvalues, or ``log det R − 2 log|det T|``.

    ``R = Q + EEᵀ``, ``T = EᵀV`` (``det R = det* Q · det(T)²`` for ``Q V = 0``);
    ``log det R`` by the banded road or CHOLMOD (exact), else stochastic
    Lanczos quadrature (once; it shifts the marginal likelihood by a constant
    only: the gradients do not depend on it).
    """
    Q = sp.csr_matrix(structure, dtype=np.float64)
    n, k = Q.shape[0], constraints.num_constraints
    if n <= max_dense_nodes and n * n <= gs_settings.current().max_dense_size:
        eigenvalues = np.linalg.eigvalsh(Q.toarray())
        return float(np.log(eigenvalues[k:]).sum()), "dense"
    R = _completion_matrix(Q, constraints)
    op = _operator(R)
    V = constraints.basis(torch.float64).numpy()
    T = math.sqrt(_scale2(Q)) * V[constraints.pivots.numpy()]
    log_t = 2.0 * np.linalg.slogdet(T)[1]
    config = replace(op._road_config(dense=True), cholesky=cholmod_available())
    with torch.no_grad():
        logdet_r = float(dispatch.logdet(op.values, op.pattern, config))
    road = dispatch.choose_road(op.pattern, config, logdet=True)
    return logdet_r - log_t, ("exact" if road != "krylov" else "stochastic")


class _Structure:
    """A constant intrinsic precision (SciPy), its constraints, tensors per dtype/device and ``log det*``."""

    def __init__(self, matrix: sp.csr_matrix, constraints: LinearConstraints, pseudo_logdet: float):
        op = _operator(matrix)
        self.pattern, self.values = op.pattern, op.values
        self.constraints = constraints
        self.pseudo_logdet = float(pseudo_logdet)
        self.num_nodes = int(matrix.shape[0])
        self.rank = self.num_nodes - constraints.num_constraints
        self._cache: dict[tuple, tuple[SparsityPattern, Tensor]] = {}

    def tensors(self, dtype, device) -> tuple[SparsityPattern, Tensor]:
        key = (dtype, torch.device(device))
        if key not in self._cache:
            self._cache[key] = (self.pattern.to(device), self.values.to(dtype=dtype, device=device))
        return self._cache[key]


def _scaled_structure(
    matrix: sp.csr_matrix,
    constraints: LinearConstraints,
    labels: np.ndarray,
    num_components: int,
    *,
    scale: bool,
    method: str,
    max_dense_nodes: int,
    root=None,
    num_samples: int = 256,
    seed: int = 0,
):
    """The (per-component) scaled structure, its ``log det*``, the component scales and the methods used."""
    scales = np.ones(num_components)
    used = "none"
    if scale:
        variances, used = generalized_variances(
            matrix,
            constraints,
            method=method,
            max_dense_nodes=max_dense_nodes,
            root=root,
            num_samples=num_samples,
            seed=seed,
        )
        logs = np.log(np.maximum(variances, np.finfo(np.float64).tiny))
        counts = np.bincount(labels, minlength=num_components)
        scales = np.exp(np.bincount(labels, weights=logs, minlength=num_components) / counts)
        factor = sp.diags(np.sqrt(scales[labels]))
        matrix = (factor @ matrix @ factor).tocsr()  # blockwise c_j Q_j (the components are disjoint)
    pdet, pdet_method = _pseudo_logdet(matrix, constraints, max_dense_nodes)
    return _Structure(matrix, constraints, pdet), scales, used, pdet_method


# ----------------------------------------------------------------------------- base class
class _IntrinsicKernel(gpytorch.kernels.Kernel):
    """Shared parts: the selection/interpolation cache, ``forward``, the prediction hook."""

    def _init_cache(self, input_cache_size: int) -> None:
        if int(input_cache_size) != input_cache_size or input_cache_size < 1:
            raise ValueError(f"input_cache_size must be a positive integer, got {input_cache_size}")
        self.input_cache_size = int(input_cache_size)
        self._input_cache: list[CachedInputs[SparseLinearOperator]] = []
        self.num_interpolation_builds = 0

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return ConstrainedPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)

    def __add__(self, other: gpytorch.kernels.Kernel) -> gpytorch.kernels.Kernel:
        return IntrinsicAdditiveKernel(*_terms(self), *_terms(other))

    def _dtype_device(self, x: Tensor) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the operators: the inputs' (kernels without parameters)."""
        return (x.dtype if x.dtype.is_floating_point else torch.float64), x.device

    def covariance(self, x1: Tensor, x2: Tensor | None = None) -> ConstrainedPrecisionLinearOperator:
        """The operator ``W(x1) Σ W(x2)ᵀ`` (what ``forward`` returns), for ``x2`` None the symmetric one."""
        Q, pseudo, constraints, components = self._precision_parts(*self._dtype_device(x1))
        w1 = self.interpolation(x1, Q.dtype, Q.device)
        w2 = w1 if x2 is None or x2 is x1 else self.interpolation(x2, Q.dtype, Q.device)
        batch = torch.broadcast_shapes(x1.shape[:-2], (x1 if x2 is None else x2).shape[:-2], Q.batch_shape)
        if batch != Q.batch_shape:
            Q = Q._expand_batch(batch)
            pseudo = pseudo.expand(batch)
        return ConstrainedPrecisionLinearOperator(
            Q,
            constraints,
            interp=w1,
            right_interp=None if w2 is w1 else w2,
            pseudo_logdet=pseudo,
            components=components,
        )

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(f"{type(self).__name__} does not support last_dim_is_batch")
        op = self.covariance(x1, x2)
        if not diag:
            return op
        if op.shape[-1] != op.shape[-2]:
            raise ValueError(f"diag=True needs as many rows in x1 ({op.shape[-2]}) as in x2 ({op.shape[-1]})")
        if op.is_symmetric:
            return op._diagonal()
        return _cross_diagonal(op)

    def interpolation(self, x: Tensor, dtype=torch.float64, device=None) -> SparseLinearOperator:
        """``W(x)`` (m × latent nodes), cached per input tensor (identity and version, else value comparison)."""
        device = x.device if device is None else device
        entry = cache_lookup(
            self._input_cache, (x,), accept=lambda w: w.dtype == dtype and w.device == torch.device(device)
        )
        if entry is not None:
            return entry.payload
        self.num_interpolation_builds += 1
        W = self._build_interpolation(x, dtype, torch.device(device))
        cache_insert(self._input_cache, CachedInputs.of((x,), W), self.input_cache_size)
        return W

    def clear_input_cache(self) -> None:
        """Drop every cached interpolation (the next call rebuilds)."""
        self._input_cache.clear()

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_input_cache"] = []
        return state


class IntrinsicAdditiveKernel(gpytorch.kernels.AdditiveKernel):
    r"""``k_1 + k_2 + …`` with intrinsic terms: one constrained covariance on the stacked latent nodes.

    A drop-in ``gpytorch.kernels.AdditiveKernel`` for sums of independent
    fields of which at least one is an intrinsic kernel of this module (each
    possibly inside ``ScaleKernel``) and the others gpsparse sparse-precision
    kernels (lattice, graph Matérn, …): the covariances add up to
    ``W Σ Wᵀ`` with ``Q = blockdiag(Q_1, …)``, ``W = [W_1 ⋯]`` and the
    constraints of every intrinsic block
    ([`add_covariances`][gpsparse.operators.constrained.add_covariances]), so
    training goes through one constrained posterior and prediction through
    [`ConstrainedPredictionStrategy`][gpsparse.kernels.constrained_prediction.ConstrainedPredictionStrategy]
    (``component_predictions``: one ``(mean, variance)`` per block, BYM2
    counting two). ``intrinsic + k`` builds one; ``k + intrinsic`` with a
    gpsparse ``k`` first builds a ``SparsePrecisionAdditiveKernel`` (whose sum
    is linear_operator's generic one): write the intrinsic term first, or
    ``IntrinsicAdditiveKernel(k1, k2, …)``. Give each term its input columns
    with ``active_dims``.
    """

    def forward(self, x1, x2, diag: bool = False, **params):
        if diag:
            return super().forward(x1, x2, diag=True, **params)
        terms = [_evaluate(kernel(x1, x2, diag=False, **params)) for kernel in self.kernels]
        total = terms[0]
        for term in terms[1:]:
            combined = None
            if all(isinstance(t, _STACKABLE) for t in (total, term)):
                combined = add_covariances(total, term)
            total = combined if combined is not None else total + term
        return total

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return ConstrainedPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)

    def __add__(self, other: gpytorch.kernels.Kernel) -> gpytorch.kernels.Kernel:
        return IntrinsicAdditiveKernel(*_terms(self), *_terms(other))


_STACKABLE = (ConstrainedPrecisionLinearOperator, SparsePrecisionLinearOperator)


def _terms(kernel) -> list:
    return list(kernel.kernels) if isinstance(kernel, gpytorch.kernels.AdditiveKernel) else [kernel]


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op


def _cross_diagonal(op: ConstrainedPrecisionLinearOperator, block: int = 64) -> Tensor:
    """``diag(W₁ Σ W₂ᵀ)`` by columns of ``Σ W₂ᵀ``, ``block`` at a time."""
    m = op.shape[-1]
    out = []
    for start in range(0, m, block):
        stop = min(m, start + block)
        unit = torch.zeros(m, stop - start, dtype=op.dtype, device=op.device)
        unit[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        columns = op._matmul(unit.expand(*op.batch_shape, m, stop - start))
        out.append(columns[..., torch.arange(start, stop), torch.arange(stop - start)])
    return torch.cat(out, -1)


def _selection(rows: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> SparseLinearOperator:
    pattern, order = SparsityPattern.from_indices(rows, cols, size)
    return SparseLinearOperator(values[order], pattern=pattern)


def _node_ids(x: Tensor, name: str, num_nodes: int, kernel: str) -> Tensor:
    """Validated integer node ids ``(n,)`` of inputs ``(..., n, 1)`` (equal across batch members)."""
    if x.dim() < 2 or x.shape[-1] != 1:
        raise ValueError(
            f"{kernel} expects inputs of shape (..., n, 1) holding node ids, got {name} of shape {tuple(x.shape)}"
        )
    values = x.detach().reshape(-1, x.shape[-2])
    if values.shape[0] > 1 and not torch.equal(values, values[:1].expand_as(values)):
        raise ValueError(f"the batch members of {name} hold different node ids; {kernel} needs one set per call")
    values = values[0] if values.shape[0] else values.new_empty(x.shape[-2])
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds non-finite node ids (NaN or Inf)")
    if not bool((values == values.round()).all()):
        raise ValueError(f"{name} must hold integer node ids, got {float(values[values != values.round()][0])}")
    ids = values.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_nodes):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{name} holds node id {bad}, out of range for a graph of {num_nodes} nodes")
    return ids


# ----------------------------------------------------------------------------- random walks
class RandomWalkKernel(_IntrinsicKernel):
    r"""First- or second-order random walk (RW1 / RW2) on fixed 1-D knots, constrained, as a GPyTorch kernel.

    The latent field ``x`` lives on the knots ``t_1 < … < t_N`` (irregular
    spacing allowed) with the intrinsic precision
    (``gpsparse.core.constraints.random_walk_structure``, gaps ``d_i``):

    * ``order=1``: ``xᵀQx = Σ_i (x_{i+1} − x_i)²/d_i`` (Brownian increments,
        weights ``1/d_i``); constraint ``Σ_i x_i = 0``;
    * ``order=2``: the irregular-grid RW2 of Lindgren & Rue (2008),
        ``xᵀQx = Σ_{i=2}^{N−1} (Lx)_i²/c_i`` with the weak second derivative
        ``(Lx)_i = (x_{i+1} − x_i)/d_i − (x_i − x_{i−1})/d_{i−1}`` and the
        lumped mass ``c_i = (d_{i−1} + d_i)/2`` (the standard
        ``Σ (Δ²x)²/h³`` on a regular grid); constraints ``Σ_i x_i = 0`` and
        ``Σ_i t_i x_i = 0`` (its null space is constant + linear).

    The covariance of the constrained field is ``Q⁺``; an input ``s`` in
    ``[t_1, t_N]`` reads ``f(s)`` by linear interpolation between its two
    knots (the piecewise-linear function through the knot values, exact at
    the knots). With ``scale=True`` (default) ``Q`` is scaled to unit
    generalised variance (module notes; exact by the banded road at any
    size, as is ``log det* Q``); wrap the kernel in ``gpytorch.kernels.ScaleKernel`` for the
    precision (``outputscale = 1/τ``).

    Parameters
    ----------
    locations : Tensor or array
        The knots (any order; **sorted and de-duplicated here**: repeated
        knots are merged). At least ``order + 1`` distinct finite values.
        Typical choice: ``torch.unique(x_train)`` or a regular grid.
    order : {1, 2}
        The order of the walk.
    scale : bool
        Scale to unit generalised variance (default True); False keeps the
        raw structure above (units: variance per unit of ``t`` for RW1).
    scale_method : {"auto", "dense", "selected"}
        How the variances are computed (module notes; exact either way).
    max_dense_nodes : int
        Knots up to which dense float64 algebra (a pseudo-inverse and an
        eigendecomposition) is used at construction instead of the banded
        road (default 0: the banded road is exact and O(N) at every size).
    input_cache_size : int
        Interpolation matrices kept (default 4).
    **kwargs
        ``active_dims``, ``batch_shape`` as for ``gpytorch.kernels.Kernel``.

    Notes
    -----
    *Size.* RW1 is well conditioned at any size (checked to 10⁶ knots). RW2's
    precision has a condition number growing like ``N⁴`` (``≈ 16N⁴/π⁴`` on a
    regular grid), a property of the model: in float64 its scale and
    ``log det* Q`` are accurate to about 1e-5 up to 4 000 knots, 3e-3 at
    12 000, and the factorisation fails near 3·10⁴ knots (an RW2 on 10³ knots,
    read by linear interpolation, is already smooth).

    *Inputs* ``(..., n, 1)``: any order, repeats allowed, each in
    ``[t_1, t_N]`` (``ValueError`` outside, or for non-finite inputs — an
    intrinsic walk has no natural extrapolation; put knots where you will
    predict). Inputs with batch dimensions must hold the same values in every
    member (one ``W``). The kernel has no hyperparameters of its own.

    Raises
    ------
    ValueError
        Fewer than ``order + 1`` distinct knots, non-finite knots, an unknown
        order or scale method, ``ard_num_dims`` other than 1; at call time
        inputs outside the knots' range or not of shape ``(..., n, 1)``.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels import RandomWalkKernel
    >>> kernel = RandomWalkKernel(torch.linspace(0, 1, 50), order=2)
    >>> x = torch.rand(20, 1, dtype=torch.float64)
    >>> K = kernel(x).evaluate_kernel()
    >>> (K.shape, type(K).__name__)
    (torch.Size([20, 20]), 'ConstrainedPrecisionLinearOperator')
    """

    def __init__(
        self,
        locations,
        order: int = 1,
        *,
        scale: bool = True,
        scale_method: str = "auto",
        max_dense_nodes: int = 0,
        input_cache_size: int = 4,
        **kwargs,
    ):
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if scale_method not in SCALE_METHODS or scale_method == "stochastic":
            raise ValueError(
                f"scale_method must be 'auto', 'dense' or 'selected' for a random walk, got {scale_method!r}"
            )
        if kwargs.get("ard_num_dims") not in (None, 1):
            raise ValueError(f"RandomWalkKernel takes one input dimension, got ard_num_dims={kwargs['ard_num_dims']}")
        super().__init__(**kwargs)
        knots = locations.detach().cpu().double().numpy() if isinstance(locations, Tensor) else locations
        knots = np.asarray(knots, dtype=np.float64).reshape(-1)
        if not np.isfinite(knots).all():
            raise ValueError("random-walk locations must be finite")
        knots = np.unique(knots)  # sorted, duplicates merged
        if knots.shape[0] < order + 1:
            raise ValueError(
                f"a random walk of order {order} needs at least {order + 1} distinct locations, got {knots.shape[0]}"
            )
        self.order = int(order)
        self.knots = torch.from_numpy(knots)
        self.num_nodes = int(knots.shape[0])
        labels = np.zeros(self.num_nodes, dtype=np.int64)
        constraints = LinearConstraints.from_components(labels, 1, order=self.order, positions=knots)
        structure = random_walk_structure(knots, self.order)
        self.structure, scales, self.scale_method, self.logdet_method = _scaled_structure(
            structure, constraints, labels, 1, scale=bool(scale), method=scale_method, max_dense_nodes=max_dense_nodes
        )
        self.scale = float(scales[0])
        self._init_cache(input_cache_size)

    @property
    def constraints(self) -> LinearConstraints:
        """Sum to zero (RW1); sum and linear trend zero (RW2)."""
        return self.structure.constraints

    def precision(self, dtype=torch.float64, device=None) -> SparseLinearOperator:
        """The (scaled) intrinsic precision ``Q`` on the knots (constant)."""
        pattern, values = self.structure.tensors(dtype, torch.device("cpu") if device is None else device)
        return SparseLinearOperator(values, pattern=pattern)

    def _precision_parts(self, dtype, device):
        Q = self.precision(dtype, device)
        pseudo = torch.tensor(self.structure.pseudo_logdet, dtype=dtype, device=device)
        if self.batch_shape:
            Q = Q._expand_batch(self.batch_shape)
            pseudo = pseudo.expand(self.batch_shape)
        return Q, pseudo, self.constraints, None

    def _build_interpolation(self, x: Tensor, dtype, device) -> SparseLinearOperator:
        if x.dim() < 2 or x.shape[-1] != 1:
            raise ValueError(f"RandomWalkKernel expects inputs of shape (..., n, 1), got {tuple(x.shape)}")
        values = x.detach().reshape(-1, x.shape[-2])
        if values.shape[0] > 1 and not torch.equal(values, values[:1].expand_as(values)):
            raise ValueError(
                "the batch members of the inputs differ; RandomWalkKernel needs one set of inputs per call"
            )
        s = (values[0] if values.shape[0] else values.new_empty(x.shape[-2])).double().cpu()
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise ValueError("RandomWalkKernel inputs must be finite")
        lo, hi = float(self.knots[0]), float(self.knots[-1])
        if s.numel() and (float(s.min()) < lo or float(s.max()) > hi):
            bad = float(s.min()) if float(s.min()) < lo else float(s.max())
            raise ValueError(
                f"input {bad} lies outside the random walk's knots [{lo}, {hi}]; an intrinsic walk has no "
                "extrapolation: add knots covering every input (training and test)"
            )
        m = s.numel()
        cell = (torch.searchsorted(self.knots, s, right=True) - 1).clamp(0, self.num_nodes - 2)
        left, right = self.knots[cell], self.knots[cell + 1]
        weight = ((s - left) / (right - left)).clamp(0.0, 1.0)
        rows = torch.arange(m).repeat_interleave(2)
        cols = torch.stack([cell, cell + 1], -1).reshape(-1)
        vals = torch.stack([1.0 - weight, weight], -1).reshape(-1)
        W = _selection(rows, cols, vals, (m, self.num_nodes))
        return SparseLinearOperator(W.values.to(dtype=dtype, device=device), pattern=W.pattern.to(device))


# ----------------------------------------------------------------------------- graphs
class _GraphStructure:
    """Besag structure of a graph: non-isolated nodes, their components, constraints, scaled ``Q``."""

    def __init__(self, graph, num_nodes, edge_weight, *, scale, scale_method, max_dense_nodes, num_samples, seed):
        adjacency = adjacency_matrix(graph, num_nodes, edge_weight)
        self.num_nodes = int(adjacency.shape[0])
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        connected = np.flatnonzero(degree > 0)
        if connected.size == 0:
            raise ValueError("the graph has no edges: a Besag field needs neighbours (every node is isolated)")
        self.isolated = np.flatnonzero(degree == 0)
        # latent index of every node (−1: isolated, no structured effect)
        self.latent_index = np.full(self.num_nodes, -1, dtype=np.int64)
        self.latent_index[connected] = np.arange(connected.size)
        sub = adjacency[connected][:, connected].tocsr()
        count, labels = connected_components(sub, directed=False)
        self.num_components, self.labels = int(count), labels
        laplacian = laplacian_from_adjacency(sub, False)
        constraints = LinearConstraints.from_components(labels, count)
        coo = sp.triu(sub, k=1).tocoo()
        incidence = sp.csr_matrix(
            (
                np.concatenate([np.sqrt(coo.data), -np.sqrt(coo.data)]),
                (np.tile(np.arange(coo.nnz), 2), np.concatenate([coo.row, coo.col])),
            ),
            shape=(coo.nnz, connected.size),
        )
        self.structure, self.scales, self.scale_method, self.logdet_method = _scaled_structure(
            laplacian,
            constraints,
            labels,
            count,
            scale=scale,
            method=scale_method,
            max_dense_nodes=max_dense_nodes,
            root=incidence,
            num_samples=num_samples,
            seed=seed,
        )

    @property
    def num_latent(self) -> int:
        return self.structure.num_nodes


class BesagKernel(_IntrinsicKernel):
    r"""The intrinsic CAR (Besag) field on the nodes of a graph, constrained to sum to zero per connected component.

    $$
    π(x) ∝ \exp\Bigl(−\tfrac12 \sum_{i∼j} w_{ij} (x_i − x_j)^2\Bigr),\qquad
    Q = c·(D − A),\qquad \textstyle\sum_{i ∈ C} x_i = 0 \text{ for every component } C,
    $$

    with covariance ``Q⁺`` (module notes) and, with ``scale=True``
    (default), ``c`` per component such that the geometric mean of the
    marginal variances of that component is 1. Wrap it in
    ``gpytorch.kernels.ScaleKernel`` for the precision (``outputscale = 1/τ``).
    Inputs are node ids ``(..., n, 1)`` stored as floats (repeats allowed),
    as for [`GraphMaternKernel`][gpsparse.kernels.GraphMaternKernel].

    Parameters
    ----------
    graph : Tensor, numpy.ndarray, torch sparse tensor or scipy.sparse matrix/array
        An edge index ``(2, E)`` or a sparse weighted adjacency ``(N, N)``,
        undirected (validated by ``gpsparse.core.graph``; self-loops dropped).
    num_nodes : int, optional
        ``N`` (default: from the graph).
    edge_weight : Tensor or array, optional
        ``(E,)`` non-negative weights of an edge index.
    scale : bool
        Scale each component to unit generalised variance (default True).
    scale_method : {"auto", "dense", "selected", "stochastic"}
        How the variances are computed (module notes; ``scale_method``
        attribute: the one used).
    max_dense_nodes : int
        Graph size up to which construction uses dense float64 algebra (the
        variances and ``log det* Q``; default 2048).
    num_scale_samples : int
        Samples of the ``"stochastic"`` scaling (default 256).
    scale_seed : int
        Their seed (default 0).
    input_cache_size : int
        Selection matrices kept (default 4).
    **kwargs
        ``active_dims``, ``batch_shape`` as for ``gpytorch.kernels.Kernel``.

    Notes
    -----
    *Several connected components* are supported: one sum-to-zero constraint
    each (``k`` = the number of components; ``2k`` extra solves per operator).
    *Isolated nodes* (no neighbours, e.g. islands) form one-node components
    whose sum-to-zero constraint fixes them at 0: they carry **no structured
    effect** (a zero row of ``W``; their covariance is 0) and are left out of
    the latent field, the constraints and the scaling (attribute
    ``isolated``). A graph without edges raises ``ValueError``.
    *log det* Q* is computed once (dense eigenvalues up to
    ``max_dense_nodes``; else ``log det(Q + EEᵀ) − 2 log|det EᵀV|`` by the
    banded road or CHOLMOD, or once by stochastic Lanczos quadrature, which
    only shifts the marginal likelihood by a constant).

    Examples
    --------
    >>> import torch
    >>> from gpsparse.kernels import BesagKernel
    >>> ring = torch.stack([torch.arange(30), (torch.arange(30) + 1) % 30])
    >>> kernel = BesagKernel(ring)
    >>> variances = kernel(torch.arange(30.0).unsqueeze(-1), diag=True)   # a ring: all equal, geometric mean 1
    >>> bool(torch.allclose(variances, torch.ones(30, dtype=variances.dtype)))
    True
    """

    def __init__(
        self,
        graph,
        num_nodes: int | None = None,
        *,
        edge_weight=None,
        scale: bool = True,
        scale_method: str = "auto",
        max_dense_nodes: int = 2048,
        num_scale_samples: int = 256,
        scale_seed: int = 0,
        input_cache_size: int = 4,
        **kwargs,
    ):
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {scale_method!r}")
        if kwargs.get("ard_num_dims") not in (None, 1):
            raise ValueError(
                f"BesagKernel takes one input dimension (node ids), got ard_num_dims={kwargs['ard_num_dims']}"
            )
        super().__init__(**kwargs)
        self.graph = _GraphStructure(
            graph,
            num_nodes,
            edge_weight,
            scale=bool(scale),
            scale_method=scale_method,
            max_dense_nodes=max_dense_nodes,
            num_samples=int(num_scale_samples),
            seed=int(scale_seed),
        )
        self.num_nodes = self.graph.num_nodes
        self.isolated = torch.from_numpy(self.graph.isolated)
        self.scale_method = self.graph.scale_method
        self._init_cache(input_cache_size)

    @property
    def constraints(self) -> LinearConstraints:
        """One sum-to-zero constraint per connected component (of at least two nodes)."""
        return self.graph.structure.constraints

    def precision(self, dtype=torch.float64, device=None) -> SparseLinearOperator:
        """The (scaled) intrinsic precision on the latent (non-isolated) nodes (constant)."""
        pattern, values = self.graph.structure.tensors(dtype, torch.device("cpu") if device is None else device)
        return SparseLinearOperator(values, pattern=pattern)

    def _precision_parts(self, dtype, device):
        Q = self.precision(dtype, device)
        pseudo = torch.tensor(self.graph.structure.pseudo_logdet, dtype=dtype, device=device)
        if self.batch_shape:
            Q = Q._expand_batch(self.batch_shape)
            pseudo = pseudo.expand(self.batch_shape)
        return Q, pseudo, self.constraints, None

    def _build_interpolation(self, x: Tensor, dtype, device) -> SparseLinearOperator:
        ids = _node_ids(x, "input", self.num_nodes, "BesagKernel").cpu()
        latent = torch.from_numpy(self.graph.latent_index)[ids]
        rows = torch.arange(ids.numel())[latent >= 0]
        cols = latent[latent >= 0]
        W = _selection(rows, cols, torch.ones(rows.numel(), dtype=torch.float64), (ids.numel(), self.graph.num_latent))
        return SparseLinearOperator(W.values.to(dtype=dtype, device=device), pattern=W.pattern.to(device))


class BYM2Kernel(_IntrinsicKernel):
    r"""The BYM2 area effect of Riebler, Sørbye, Simpson & Rue (2016) on the nodes of a graph.

    $$
    b = \frac{1}{\sqrt{τ}}\bigl(\sqrt{1 − φ}\, v + \sqrt{φ}\, u_*\bigr),\qquad
    v ∼ N(0, I),\quad u_* ∼ N(0, Q_*^{+}),\quad \textstyle\sum_{i∈C} u_{*i} = 0,
    $$

    ``u*`` the Besag field scaled to unit generalised variance per connected
    component ([`BesagKernel`][gpsparse.kernels.BesagKernel], ``scale=True``),
    ``τ`` the precision (``precision``, so ``1/τ`` is the typical marginal
    variance) and ``φ ∈ (0, 1)`` the share of the structured part (``phi``).
    Both are GPyTorch hyperparameters (``raw_phi`` under ``Interval(0, 1)``,
    ``raw_precision`` under ``Positive()`` by default; optional priors).

    *Latent representation.* The latent field stacks the two parts with the
    scales folded into the precision: ``z = (a, c)``,
    ``a = √((1−φ)/τ) v`` on all N nodes and ``c = √(φ/τ) u*`` on the
    non-isolated ones, so ``b = W z`` with ``W = [S S_u]`` (the node
    selections, constant) and

    $$
    Q = \operatorname{blockdiag}\Bigl(\frac{τ}{1 − φ} I_N,\; \frac{τ}{φ} Q_*\Bigr),\qquad
    \log\det{}^{*} Q = N \log\frac{τ}{1−φ} + (N_u − k)\log\frac{τ}{φ} + \log\det{}^{*}Q_* ,
    $$

    the ``c`` block intrinsic, with one sum-to-zero constraint per connected
    component (``k`` of them) — the equivalent of
    ``W = [√(1−φ)/√τ · S, √(φ/τ)·S]`` with ``Q = blockdiag(I, Q_*)``. The
    covariance is a
    [`ConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.ConstrainedPrecisionLinearOperator]
    with ``components = (0, N, N + N_u)``, so
    [`ConstrainedPredictionStrategy.component_predictions`][gpsparse.kernels.constrained_prediction.ConstrainedPredictionStrategy.component_predictions]
    gives the unstructured and the structured effect separately, and
    ``latent_mean`` their posterior means (the structured one sums to zero
    per component to rounding).

    Parameters
    ----------
    graph, num_nodes, edge_weight, scale_method, max_dense_nodes, num_scale_samples, scale_seed
        As for [`BesagKernel`][gpsparse.kernels.BesagKernel] (the scaling is always on).
    phi_prior, precision_prior : gpytorch.priors.Prior, optional
        Priors on ``φ`` and ``τ`` (e.g. the PC priors of Riebler et al. are
        not in GPyTorch; any ``Prior`` on the constrained values works).
    phi_constraint : gpytorch.constraints.Interval, optional
        Default ``Interval(0, 1)`` (must stay inside ``(0, 1)``).
    precision_constraint : gpytorch.constraints.Interval, optional
        Default ``Positive()``.
    input_cache_size : int
        Selection matrices kept (default 4).
    **kwargs
        ``active_dims``, and ``batch_shape`` (a batch of independent ``(φ, τ)``,
        parameters of shape ``batch_shape``), as for ``gpytorch.kernels.Kernel``.

    Notes
    -----
    *Isolated nodes* get the unstructured part only (no structured effect;
    ``b_i = √((1−φ)/τ) v_i``, variance ``(1−φ)/τ``), see ``BesagKernel``.
    Initial values: ``φ = 0.5``, ``τ = 1``.

    Examples
    --------
    >>> import torch
    >>> from gpsparse.kernels import BYM2Kernel
    >>> path = torch.stack([torch.arange(9), torch.arange(1, 10)])   # 10 nodes in a line
    >>> kernel = BYM2Kernel(path)
    >>> kernel.phi = 0.3
    >>> kernel.precision = 2.0
    >>> v = kernel(torch.arange(10.0).unsqueeze(-1), diag=True)
    >>> bool(torch.allclose(v.log().mean().exp(), torch.tensor(0.5, dtype=v.dtype), atol=0.05))  # ≈ 1/τ
    True
    """

    def __init__(
        self,
        graph,
        num_nodes: int | None = None,
        *,
        edge_weight=None,
        phi_prior: Prior | None = None,
        phi_constraint: Interval | None = None,
        precision_prior: Prior | None = None,
        precision_constraint: Interval | None = None,
        scale_method: str = "auto",
        max_dense_nodes: int = 2048,
        num_scale_samples: int = 256,
        scale_seed: int = 0,
        input_cache_size: int = 4,
        **kwargs,
    ):
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {scale_method!r}")
        if kwargs.get("ard_num_dims") not in (None, 1):
            raise ValueError(
                f"BYM2Kernel takes one input dimension (node ids), got ard_num_dims={kwargs['ard_num_dims']}"
            )
        super().__init__(**kwargs)
        self.graph = _GraphStructure(
            graph,
            num_nodes,
            edge_weight,
            scale=True,
            scale_method=scale_method,
            max_dense_nodes=max_dense_nodes,
            num_samples=int(num_scale_samples),
            seed=int(scale_seed),
        )
        self.num_nodes = self.graph.num_nodes
        self.isolated = torch.from_numpy(self.graph.isolated)
        self.scale_method = self.graph.scale_method
        phi_constraint = Interval(0.0, 1.0) if phi_constraint is None else phi_constraint
        precision_constraint = Positive() if precision_constraint is None else precision_constraint
        if not isinstance(phi_constraint, Interval) or phi_constraint.lower_bound < 0 or phi_constraint.upper_bound > 1:
            raise ValueError("phi_constraint must be a gpytorch Interval within [0, 1]")
        for name, prior in (("phi_prior", phi_prior), ("precision_prior", precision_prior)):
            if prior is not None and not isinstance(prior, Prior):
                raise TypeError(f"{name}: expected gpytorch.priors.Prior but got {type(prior).__name__}")
        self.register_parameter("raw_phi", torch.nn.Parameter(torch.zeros(self.batch_shape)))
        self.register_constraint("raw_phi", phi_constraint)
        self.register_parameter("raw_precision", torch.nn.Parameter(torch.zeros(self.batch_shape)))
        self.register_constraint("raw_precision", precision_constraint)
        if phi_prior is not None:
            self.register_prior("phi_prior", phi_prior, lambda m: m.phi, lambda m, v: m._set_phi(v))
        if precision_prior is not None:
            self.register_prior(
                "precision_prior", precision_prior, lambda m: m.precision, lambda m, v: m._set_precision(v)
            )
        self.phi = 0.5
        self.precision = 1.0
        n, nu = self.num_nodes, self.graph.num_latent
        self._constraints = self.graph.structure.constraints.embed(n, n + nu)
        self._block_cache: dict[tuple, tuple[SparsityPattern, Tensor]] = {}
        self._init_cache(input_cache_size)

    # ------------------------------------------------------------ parameters
    @property
    def phi(self) -> Tensor:
        return self.raw_phi_constraint.transform(self.raw_phi)

    @phi.setter
    def phi(self, value) -> None:
        self._set_phi(value)

    def _set_phi(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_phi.dtype, device=self.raw_phi.device)
        self.initialize(raw_phi=self.raw_phi_constraint.inverse_transform(value))

    @property
    def precision(self) -> Tensor:
        return self.raw_precision_constraint.transform(self.raw_precision)

    @precision.setter
    def precision(self, value) -> None:
        self._set_precision(value)

    def _set_precision(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_precision.dtype, device=self.raw_precision.device)
        self.initialize(raw_precision=self.raw_precision_constraint.inverse_transform(value))

    @property
    def constraints(self) -> LinearConstraints:
        """Sum to zero per component on the structured block (nodes ``N … N + N_u − 1`` of the latent field)."""
        return self._constraints

    @property
    def components(self) -> tuple[int, int, int]:
        """``(0, N, N + N_u)``: the unstructured and the structured block of the latent field."""
        n = self.num_nodes
        return (0, n, n + self.graph.num_latent)

    # ------------------------------------------------------------- precision
    def precision_matrix(self) -> SparseLinearOperator:
        """``Q = blockdiag(τ/(1−φ) I, τ/φ Q*)`` on the ``N + N_u`` latent nodes, values ``(*batch_shape, nnz)``."""
        return self._precision_parts()[0]

    def _block(self, dtype, device) -> tuple[SparsityPattern, Tensor]:
        key = (dtype, torch.device(device))
        if key not in self._block_cache:
            n = self.num_nodes
            pattern_u, values_u = self.graph.structure.tensors(dtype, device)
            nu = pattern_u.size[0]
            crow = torch.cat([torch.arange(n + 1, device=device), pattern_u.crow[1:].long().to(device) + n])
            col = torch.cat([torch.arange(n, device=device), pattern_u.col.long().to(device) + n])
            pattern = SparsityPattern(crow, col, (n + nu, n + nu), symmetric=True)
            self._block_cache[key] = (pattern, values_u)
        return self._block_cache[key]

    def _dtype_device(self, x: Tensor) -> tuple[torch.dtype, torch.device]:
        return self.raw_phi.dtype, self.raw_phi.device

    def _precision_parts(self, dtype=None, device=None):
        phi, tau = self.phi, self.precision
        dtype, device = phi.dtype, phi.device
        pattern, values_u = self._block(dtype, device)
        n, nu = self.num_nodes, self.graph.num_latent
        unstructured = (tau / (1.0 - phi)).unsqueeze(-1).expand(*phi.shape, n)
        structured = (tau / phi).unsqueeze(-1) * values_u
        values = torch.cat([unstructured, structured], -1)
        k = self._constraints.num_constraints
        pseudo = n * torch.log(tau / (1.0 - phi)) + (nu - k) * torch.log(tau / phi) + self.graph.structure.pseudo_logdet
        Q = SparseLinearOperator(values, pattern=pattern)
        return Q, pseudo, self._constraints, self.components

    def _build_interpolation(self, x: Tensor, dtype, device) -> SparseLinearOperator:
        ids = _node_ids(x, "input", self.num_nodes, "BYM2Kernel").cpu()
        m = ids.numel()
        latent = torch.from_numpy(self.graph.latent_index)[ids]
        keep = latent >= 0
        rows = torch.cat([torch.arange(m), torch.arange(m)[keep]])
        cols = torch.cat([ids, self.num_nodes + latent[keep]])
        size = (m, self.num_nodes + self.graph.num_latent)
        W = _selection(rows, cols, torch.ones(rows.numel(), dtype=torch.float64), size)
        return SparseLinearOperator(W.values.to(dtype=dtype, device=device), pattern=W.pattern.to(device))
