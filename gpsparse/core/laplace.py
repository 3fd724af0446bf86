r"""The Laplace approximation on a sparse posterior precision: the numerics (issue 14).

Model: a GMRF ``x ~ N(0, Q⁻¹)`` on N latent nodes, the latent at the m
observations ``f = μ + W x`` (``W`` sparse, m × N; the identity when the
observations are the nodes), and a factorising likelihood with
``ℓ_i = log p(y_i | f_i)``. The Laplace approximation of the log marginal
likelihood is

$$
\log p(y \mid θ) \approx \sum_i ℓ_i(\hat f_i) − \tfrac12 \hat x^\top Q \hat x
+ \tfrac12 \log\det Q − \tfrac12 \log\det P, \qquad
P = Q + W^\top H W, \quad H = \operatorname{diag}(−ℓ''(\hat f)),
$$

at the mode ``x̂`` of ``Ψ(x) = Σ_i ℓ_i(μ_i + (Wx)_i) − ½ xᵀQx``. ``P`` is as
sparse as ``Q + WᵀW``: its pattern (the union of ``Q``'s and of the Gram
pattern of ``W``) is built once (``posterior_structure``) and its values
are an ``index_add`` per Newton iteration.

This module holds

* ``PosteriorStructure`` — the pattern of ``P`` and where ``Q``'s entries and
  every product ``W[i, a] W[i, b]`` land in it;
* the factorisations of ``P`` on each road (``factorize``): ``banded``
  (LAPACK ``pbtrf``), ``cholesky`` (CHOLMOD, analysis cached on the
  pattern), ``dense`` (torch), each with ``solve``, ``logdet`` and the
  **selected inverse** ``(P⁻¹)[i_e, j_e]`` on ``P``'s pattern (Takahashi
  recursions of ``gpsparse.core.banded`` / ``gpsparse.core.selinv``); and
  ``krylov`` (CG solves, a Hutchinson log-determinant from one batched CG
  run on Rademacher probes, ``gpsparse.core.slq``), where the entries of
  ``P⁻¹`` are *estimated* from the same probes;
* ``find_mode`` — damped Newton with an Armijo backtracking line search;
* ``gradient_parts`` — what the exact gradient needs at the mode
  (``gpsparse.autograd.laplace`` assembles it; ``docs/mathematics.md``,
  "Laplace approximation", derives it).

Every computation runs in float64 (on the device of the inputs; the banded
and CHOLMOD factorisations on the host). This module is a core: it imports
neither gpytorch, linear_operator, torch's autograd machinery nor
``gpsparse.settings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gpsparse.core.banded import _band_inverse, _factor_batch, _layout, _solve_factor
from gpsparse.core.config import LogdetConfig, SolverConfig
from gpsparse.core.laplace_constraints import EXACT_ROADS, ConstrainedFactor, ConstraintSpace
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.quadrature import rademacher
from gpsparse.core.slq import PreconditionedOperator, hutchinson_forward, resolve_preconditioner
from gpsparse.core.solver import solve_with_info
from gpsparse.core.sparse_ops import sampled_product, spmm, symmetrize_values_grad, to_dense
from gpsparse.errors import NonConvergenceError, NotPositiveDefiniteError

__all__ = [
    "ROADS",
    "PosteriorStructure",
    "posterior_structure",
    "identity_pattern",
    "NewtonOptions",
    "KrylovOptions",
    "ModeState",
    "LaplaceProblem",
    "ModeResult",
    "factorize",
    "find_mode",
    "gradient_parts",
]

#: The roads of the posterior precision ``P``.
ROADS = ("banded", "cholesky", "dense", "krylov")


# ---------------------------------------------------------------------------
# The structure of P = Q + Wᵀ H W
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class PosteriorStructure:
    """The pattern of ``P = Q + Wᵀ diag(h) W`` and the maps that fill it (one per ``Q``, ``W`` pattern pair).

    Attributes
    ----------
    pattern : SparsityPattern
        Symmetric pattern of ``P`` (the union of ``Q``'s and ``WᵀW``'s; ``Q``'s
        own pattern object when it holds every pair of nodes coupled by a row of
        ``W``, e.g. bilinear interpolation inside a 9- or 13-point stencil).
    q_pattern, w_pattern : SparsityPattern
        ``Q`` (N × N, symmetric) and ``W`` (m × N).
    q_positions : Tensor or None
        ``(nnz_Q,)`` position of each entry of ``Q`` in ``P`` (None: ``P``'s pattern is ``Q``'s).
    pair_left, pair_right, pair_row : Tensor
        Every pair of entries ``(e₁, e₂)`` of one row ``i`` of ``W``
        (``Σ_i nnz_i²`` pairs): positions in ``W``'s values and the row (int32
        where the sizes allow: at N = 10⁶ with bilinear weights, 1.6·10⁷ pairs).
    pair_positions : Tensor
        Where the pair's ``W[e₁] W[e₂] h_i`` lands in ``P``.
    """

    pattern: SparsityPattern
    q_pattern: SparsityPattern
    w_pattern: SparsityPattern
    q_positions: Tensor | None
    pair_left: Tensor
    pair_right: Tensor
    pair_row: Tensor
    pair_positions: Tensor

    @property
    def num_nodes(self) -> int:
        return self.q_pattern.size[0]

    @property
    def num_obs(self) -> int:
        return self.w_pattern.size[0]

    def pair_weights(self, w_values: Tensor) -> Tensor:
        """``W[e₁] W[e₂]`` of every pair ``(num_pairs,)``."""
        return w_values[self.pair_left] * w_values[self.pair_right]

    def precision_values(self, q_values: Tensor, pair_weights: Tensor, h: Tensor) -> Tensor:
        """Values of ``P = Q + Wᵀ diag(h) W`` on ``pattern`` ``(nnz_P,)``."""
        if self.q_positions is None:
            values = q_values.clone()
        else:
            values = q_values.new_zeros(self.pattern.nnz).index_add_(0, self.q_positions, q_values)
        return values.index_add_(0, self.pair_positions, pair_weights * h[self.pair_row])

    def q_entries(self, values: Tensor) -> Tensor:
        """The entries of a ``(nnz_P,)`` tensor on ``P``'s pattern at ``Q``'s entries ``(nnz_Q,)``."""
        return values if self.q_positions is None else values[self.q_positions]

    def apply_w(self, w_values: Tensor, x: Tensor) -> Tensor:
        """``W x`` for ``x`` ``(N,)`` or ``(N, k)``."""
        return _spmv(w_values, self.w_pattern, x)

    def apply_wt(self, w_values: Tensor, r: Tensor) -> Tensor:
        """``Wᵀ r`` for ``r`` ``(m,)`` or ``(m, k)``."""
        return _spmv(w_values[self.w_pattern.transpose_perm], self.w_pattern.transposed, r)

    def quadratic_diagonal(self, pair_weights: Tensor, inverse: Tensor) -> Tensor:
        """``diag(W P⁻¹ Wᵀ)`` ``(m,)`` from the selected inverse ``(P⁻¹)[i_e, j_e]`` on ``pattern``."""
        contrib = pair_weights * inverse[self.pair_positions]
        return contrib.new_zeros(self.num_obs).index_add_(0, self.pair_row, contrib)


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2**31 else torch.int64


def _row_pairs(w_pattern: SparsityPattern, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
    """``(left, right, row)``: every ordered pair of entries of the rows ``rows`` of ``W`` (int64)."""
    crow = w_pattern.crow.long()
    counts = crow[rows.start + 1 : rows.stop + 1] - crow[rows.start : rows.stop]
    per_row = counts * counts
    local = torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), per_row)
    offset = torch.arange(local.numel(), device=crow.device) - torch.repeat_interleave(
        torch.cumsum(per_row, 0) - per_row, per_row
    )
    c = counts[local]
    start = crow[rows.start : rows.stop][local]
    left = start + torch.div(offset, c, rounding_mode="floor")
    right = start + offset % c
    return left, right, local + rows.start


#: Rows of ``W`` per chunk when the pairs are enumerated (bounds the temporaries at N = 10⁶).
_PAIR_CHUNK_ROWS = 1 << 15


def _positions(pattern: SparsityPattern, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """``pattern.positions(row, col)`` with the queries sorted first (memory-friendly ``searchsorted``).

    At 1.6·10⁷ queries into 1.3·10⁷ keys: 4 s instead of 28 s (one thread, a loaded machine).
    """
    query = row.long() * pattern.size[1] + col.long()
    if pattern.nnz == 0 or query.numel() == 0:
        zeros = torch.zeros_like(query)
        return zeros, zeros.bool()
    sorted_query, order = torch.sort(query)
    del query
    found_sorted = torch.searchsorted(pattern.keys, sorted_query).clamp_max_(pattern.nnz - 1)
    hit = pattern.keys[found_sorted] == sorted_query
    del sorted_query
    positions = torch.empty_like(found_sorted).index_copy_(0, order, torch.where(hit, found_sorted, 0))
    found = torch.empty_like(hit).index_copy_(0, order, hit)
    return positions, found


def posterior_structure(q_pattern: SparsityPattern, w_pattern: SparsityPattern) -> PosteriorStructure:
    """The ``PosteriorStructure`` of ``Q`` and ``W`` (cached on ``q_pattern`` per ``W`` pattern object).

    The pairs of entries of every row of ``W`` are enumerated once; when ``Q``'s
    pattern holds all the node pairs they couple, ``P`` lives on ``Q``'s pattern
    (one ``searchsorted``), else on the union with the Gram pattern of ``W``.
    Index arrays are int32 where the sizes allow (memory: 16 bytes per pair).

    Raises
    ------
    ValueError
        ``Q`` is not square and symmetric, or ``W`` has another number of columns.
    """
    if not (q_pattern.symmetric and q_pattern.is_square):
        raise ValueError("the prior precision Q must be square and declared symmetric")
    if w_pattern.size[1] != q_pattern.size[0]:
        raise ValueError(f"W has {w_pattern.size[1]} columns but Q has {q_pattern.size[0]} nodes")
    cache = q_pattern.derived(("laplace", "structure"), dict)
    hit = cache.get(id(w_pattern))
    if hit is not None and hit[0] is w_pattern:
        return hit[1]
    m = w_pattern.size[0]
    index = _index_dtype(q_pattern.nnz, w_pattern.nnz, m)
    chunks = [slice(i, min(m, i + _PAIR_CHUNK_ROWS)) for i in range(0, m, _PAIR_CHUNK_ROWS)] or [slice(0, 0)]
    cols = w_pattern.col_long

    def pairs(rows):
        left, right, row = _row_pairs(w_pattern, rows)
        return left, right, row, cols[left], cols[right]

    pattern, q_positions = q_pattern, None
    parts = []
    for rows in chunks:
        left, right, row, a, b = pairs(rows)
        positions, found = _positions(q_pattern, a, b)
        if not bool(found.all()):
            pattern = None
            break
        parts.append((left.to(index), right.to(index), row.to(index), positions.to(index)))
    if pattern is None:  # the union with the Gram pattern of W (e.g. the side-by-side W of a sum of fields)
        n = q_pattern.size[0]
        keys = torch.unique(torch.cat([torch.unique(p[3] * n + p[4]) for p in map(pairs, chunks)]))
        gram, _ = SparsityPattern.from_indices(keys // n, keys % n, (n, n), symmetric=True)
        del keys
        pattern, position = q_pattern.union(gram)
        if not pattern.symmetric:
            pattern = pattern.with_symmetric(True)
        index = _index_dtype(pattern.nnz, w_pattern.nnz, m)
        q_positions = position[: q_pattern.nnz].to(index)
        parts = []
        for rows in chunks:
            left, right, row, a, b = pairs(rows)
            positions, _ = _positions(pattern, a, b)
            parts.append((left.to(index), right.to(index), row.to(index), positions.to(index)))
    left, right, row, positions = (torch.cat(p) for p in zip(*parts))
    del parts
    structure = PosteriorStructure(
        pattern=pattern,
        q_pattern=q_pattern,
        w_pattern=w_pattern,
        q_positions=q_positions,
        pair_left=left,
        pair_right=right,
        pair_row=row,
        pair_positions=positions,
    )
    if len(cache) >= 4:
        cache.pop(next(iter(cache)))
    cache[id(w_pattern)] = (w_pattern, structure)
    return structure


_IDENTITY: dict[tuple[int, str], SparsityPattern] = {}


def identity_pattern(n: int, device) -> SparsityPattern:
    """The pattern of the ``n × n`` identity (kept per size and device, so structures built on it cache)."""
    key = (int(n), str(device))
    if key not in _IDENTITY:
        if len(_IDENTITY) >= 8:
            _IDENTITY.pop(next(iter(_IDENTITY)))
        index = torch.arange(int(n), device=device)
        _IDENTITY[key] = SparsityPattern.from_indices(index, index, (int(n), int(n)))[0]
    return _IDENTITY[key]


def _spmv(values: Tensor, pattern: SparsityPattern, x: Tensor) -> Tensor:
    vector = x.dim() == 1
    out = spmm(values.reshape(1, -1), pattern, (x.unsqueeze(-1) if vector else x).unsqueeze(0))[0]
    return out.squeeze(-1) if vector else out


# ---------------------------------------------------------------------------
# Factorisations of P
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KrylovOptions:
    """Settings of the Krylov road: CG for Newton's solves, Hutchinson probes for ``log det P`` and ``P⁻¹``.

    ``probes`` (``(N, p)``, fixed across calls by the caller for a
    deterministic objective) are Rademacher vectors; ``solver`` and
    ``logdet`` are the configurations of the CG solves and of the probe run
    (its ``rtol`` and preconditioner: ``"jacobi"``, ``"ic0"`` or None).
    """

    solver: SolverConfig = field(default_factory=lambda: SolverConfig(rtol=1e-10))
    logdet: LogdetConfig = field(default_factory=lambda: LogdetConfig(rtol=1e-10))
    num_probes: int = 64
    #: Probes per CG run (the CG workspace is a few ``N × probe_block`` blocks).
    probe_block: int = 4


class _BandedFactor:
    road = "banded"

    def __init__(self, values: Tensor, pattern: SparsityPattern):
        self.pattern = pattern
        self.layout = _layout(pattern)
        self.factor = _factor_batch(values.reshape(1, -1), self.layout, "Laplace posterior precision")[0]
        self.device = values.device

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        host = (rhs.unsqueeze(-1) if vector else rhs).detach().cpu().numpy()
        out = torch.from_numpy(np.ascontiguousarray(_solve_factor(self.factor, host))).to(self.device)
        return out.squeeze(-1) if vector else out

    def logdet(self) -> Tensor:
        return (2.0 * torch.from_numpy(self.factor.band[:, 0]).log().sum()).to(self.device)

    def inverse_entries(self) -> Tensor:
        z = _band_inverse(self.factor).reshape(-1)
        return torch.from_numpy(np.take(z, self.layout.slot)).to(self.device)


class _CholmodFactor:
    road = "cholesky"

    def __init__(self, values: Tensor, pattern: SparsityPattern):
        from gpsparse.core.cholmod import _analysis, _factorize

        self.analysis, _ = _analysis(pattern, "Laplace posterior precision")
        self.factor = _factorize(self.analysis, values.detach().cpu(), "Laplace posterior precision")
        self.device = values.device

    def solve(self, rhs: Tensor) -> Tensor:
        from gpsparse.core.cholmod import _blas_threads

        host = rhs.detach().cpu().numpy()
        with _blas_threads():
            out = np.asarray(self.factor.solve_A(host), dtype=np.float64)
        return torch.from_numpy(out.reshape(rhs.shape)).to(self.device)

    def logdet(self) -> Tensor:
        return torch.tensor(float(self.factor.logdet()), dtype=torch.float64, device=self.device)

    def inverse_entries(self) -> Tensor:
        from gpsparse.core.cholmod import _selected_inverse

        return torch.from_numpy(_selected_inverse(self.factor, self.analysis)).to(self.device)


class _DenseFactor:
    road = "dense"

    def __init__(self, values: Tensor, pattern: SparsityPattern):
        self.pattern = pattern
        factor, info = torch.linalg.cholesky_ex(to_dense(values, pattern))
        if int(info) > 0:
            raise NotPositiveDefiniteError(
                f"Laplace posterior precision: the leading minor of order {int(info)} is not positive definite"
            )
        self.factor = factor

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        out = torch.cholesky_solve(rhs.unsqueeze(-1) if vector else rhs, self.factor)
        return out.squeeze(-1) if vector else out

    def logdet(self) -> Tensor:
        return 2.0 * self.factor.diagonal().log().sum()

    def inverse_entries(self) -> Tensor:
        inverse = torch.cholesky_inverse(self.factor)
        return inverse[self.pattern.row, self.pattern.col_long]


class _KrylovFactor:
    road = "krylov"

    def __init__(self, values: Tensor, pattern: SparsityPattern, options: KrylovOptions, probes: Tensor, prior=None):
        self.values2d = values.reshape(1, -1)
        self.pattern = pattern
        self.options = options
        self.probes = probes
        self.prior = prior  # (values, pattern) of Q: the same probes estimate log det Q (common random numbers)
        spec = options.solver.preconditioner
        self._solve_precond = resolve_preconditioner(spec, self.values2d, pattern, options.solver.cholesky_refresh)
        self._hutchinson = None
        self._hutchinson_prior = None

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        rhs3 = (rhs.unsqueeze(-1) if vector else rhs).unsqueeze(0)
        out, _ = solve_with_info(
            self.options.solver,
            self.values2d,
            self.pattern,
            rhs3,
            preconditioner=self._solve_precond,
            what="Laplace Newton solve",
        )
        out = out[0]
        return out.squeeze(-1) if vector else out

    def _hutchinson_run(self, values2d: Tensor, pattern: SparsityPattern):
        config = self.options.logdet
        precond = resolve_preconditioner(config.preconditioner, values2d, pattern, 1)
        split = PreconditionedOperator(values2d, pattern, precond)
        probes = self.probes.unsqueeze(0)
        p = probes.shape[-1]
        estimate, lefts, rights = 0.0, [], []
        for start in range(0, p, self.options.probe_block):  # CG workspace of a block of probes at a time
            block = probes[..., start : start + self.options.probe_block]
            part, left, right = hutchinson_forward(split, block, block.pow(2).sum(-2), config)
            weight = block.shape[-1] / p
            estimate = estimate + weight * part
            lefts.append(left * weight)
            rights.append(right)
        estimate = estimate + split.logdet(1, probes.dtype, probes.device)
        return estimate[0], torch.cat(lefts, -1)[0], torch.cat(rights, -1)[0]

    def _run(self):
        if self._hutchinson is None:
            self._hutchinson = self._hutchinson_run(self.values2d, self.pattern)
        return self._hutchinson

    def _run_prior(self):
        if self._hutchinson_prior is None:
            values, pattern = self.prior
            self._hutchinson_prior = self._hutchinson_run(values.reshape(1, -1), pattern)
        return self._hutchinson_prior

    def logdet(self) -> Tensor:
        return self._run()[0]

    def logdet_difference(self) -> Tensor:
        """``log det P − log det Q`` estimated with the same probes for both (common random numbers)."""
        return self._run()[0] - self._run_prior()[0]

    def inverse_entries(self) -> None:
        return None

    def probe_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` ``(N, p)`` with ``E[A Bᵀ] = P⁻¹`` (Hutchinson; ``A = P⁻¹C z/p``, ``B = C⁻ᵀ z``)."""
        _, left, right = self._run()
        return left, right

    def prior_probe_factors(self) -> tuple[Tensor, Tensor]:
        """The same for ``Q⁻¹`` (same probes)."""
        _, left, right = self._run_prior()
        return left, right


def factorize(
    values: Tensor, pattern: SparsityPattern, road: str, krylov=None, probes=None, prior=None, constraints=None
):
    """A factorisation of ``P`` on ``road`` (module notes), float64 values ``(nnz,)``.

    With ``constraints`` (a ``ConstraintSpace``) it is the constrained
    ``ConstrainedFactor`` (solves with ``Σ_P``, ``log det_S P``, ``Σ_P`` on the
    pattern) over the road's factorisation of the completion. On the Krylov
    road ``probes`` ``(N, p)`` are the Rademacher probes and
    ``prior = (values, pattern)`` of ``Q``, whose log-determinant and inverse
    the same probes estimate (``logdet_difference``, ``prior_probe_factors``).

    Raises
    ------
    NotPositiveDefiniteError
        ``P`` is not positive definite (exact roads).
    ValueError
        An unknown road.
    """
    if constraints is not None:
        return ConstrainedFactor(values, pattern, constraints, lambda v, p: factorize(v, p, road))
    if road == "banded":
        return _BandedFactor(values, pattern)
    if road == "cholesky":
        return _CholmodFactor(values, pattern)
    if road == "dense":
        return _DenseFactor(values, pattern)
    if road == "krylov":
        return _KrylovFactor(values, pattern, krylov if krylov is not None else KrylovOptions(), probes, prior)
    raise ValueError(f"unknown road {road!r}; choose one of {ROADS}")


# ---------------------------------------------------------------------------
# The mode: damped Newton
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NewtonOptions:
    """Newton's stopping rule and line search.

    Parameters
    ----------
    tol : float
        Converged when the Newton step satisfies ``‖Δ‖∞ ≤ tol·(1 + ‖x‖∞)``, or
        when ``‖Δ‖∞ ≤ √tol·(1 + ‖x‖∞)`` and the step shrank by less than a
        factor 4 in the last iteration (Newton's quadratic convergence has
        reached the rounding floor of the solve).
    max_iters : int
        Newton iterations before ``NonConvergenceError``.
    armijo : float
        Sufficient-decrease constant ``c`` of the backtracking line search:
        ``Ψ(x + tΔ) ≥ Ψ(x) + c·t·∇Ψᵀ Δ`` (``Ψ`` is maximised), halving ``t``.
    min_step : float
        Smallest line-search step ``t`` before ``NonConvergenceError``.
    """

    tol: float = 1e-10
    max_iters: int = 100
    armijo: float = 1e-4
    min_step: float = 1e-12

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if int(self.max_iters) < 1:
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters}")


@dataclass(eq=False)
class ModeState:
    """What persists between calls: the last mode (the next warm start) and the last call's record."""

    mode: Tensor | None = None
    road: str = ""
    iterations: int = 0
    grad_norm: float = math.nan
    step_norm: float = math.nan
    calls: int = 0
    history: list = field(default_factory=list)  # Newton iterations of every call
    steps: list = field(default_factory=list)  # ‖Δ‖∞ of every iteration of the last call

    def warm_start(self, num_nodes: int, device) -> Tensor | None:
        if self.mode is None or self.mode.shape != (num_nodes,):
            return None
        return self.mode.to(device)


@dataclass(eq=False)
class LaplaceProblem:
    """Everything fixed for one objective evaluation except ``Q``'s values, the mean and the likelihood parameters.

    Attributes
    ----------
    structure : PosteriorStructure
    w_values : Tensor
        ``(nnz_W,)`` float64 values of ``W`` (constants).
    terms : callable
        ``terms(f, params) -> (ℓ, ℓ', ℓ'', ℓ''')``, elementwise ``(m,)`` float64,
        a torch expression of the parameter tensors ``params`` (the gradient
        differentiates it with respect to them).
    road : str
        One of ``ROADS``.
    newton : NewtonOptions
    krylov : KrylovOptions
    probes : Tensor or None
        ``(N, p)`` Rademacher probes of the Krylov road.
    state : ModeState
        Warm start in, mode and record out.
    constraints : ConstraintSpace or None
        Linear constraints ``Vᵀx = 0`` of an intrinsic prior: the mode is
        sought on that subspace and ``P⁻¹``, ``log det P`` become ``Σ_P``,
        ``log det_S P`` (``gpsparse.core.laplace_constraints``; exact roads only).
    """

    structure: PosteriorStructure
    w_values: Tensor
    terms: Callable
    road: str
    newton: NewtonOptions = field(default_factory=NewtonOptions)
    krylov: KrylovOptions = field(default_factory=KrylovOptions)
    probes: Tensor | None = None
    state: ModeState = field(default_factory=ModeState)
    constraints: ConstraintSpace | None = None

    def __post_init__(self) -> None:
        if self.road not in ROADS:
            raise ValueError(f"unknown road {self.road!r}; choose one of {ROADS}")
        if self.constraints is not None and self.road not in EXACT_ROADS:
            raise NotImplementedError(
                f"the Laplace approximation with linear constraints (an intrinsic prior: random walk, Besag, BYM2) "
                f"runs on the exact roads {EXACT_ROADS}, not on {self.road!r}: install scikit-sparse (CHOLMOD), or "
                'use road="dense" within gpsparse.settings.max_dense_size'
            )
        if self.road == "krylov" and self.probes is None:
            n = self.structure.num_nodes
            self.probes = rademacher(
                (n, self.krylov.num_probes), generator=None, dtype=torch.float64, device=self.w_values.device
            )


@dataclass(eq=False)
class ModeResult:
    """The mode and everything evaluated there (float64)."""

    x: Tensor  # (N,) the mode x̂
    f: Tensor  # (m,) μ + W x̂
    ell: Tensor  # (m,) ℓ_i(f̂_i)
    d1: Tensor
    d2: Tensor
    d3: Tensor
    quad: Tensor  # x̂ᵀ Q x̂
    p_values: Tensor  # (nnz_P,) values of P at the mode
    factor: object  # its factorisation
    pair_weights: Tensor
    iterations: int
    grad_norm: float
    step_norm: float

    @property
    def log_joint(self) -> Tensor:
        """``Ψ(x̂) = Σ ℓ_i − ½ x̂ᵀQx̂``."""
        return self.ell.sum() - 0.5 * self.quad


#: Relative rounding allowance of ``Ψ`` in the line search (``1000·ε`` of its terms' magnitude).
_PSI_NOISE = 1000 * torch.finfo(torch.float64).eps


def find_mode(problem: LaplaceProblem, q_values: Tensor, mean: Tensor, params: tuple) -> ModeResult:
    """Newton's method for the mode of ``Ψ(x) = Σ ℓ_i(μ + Wx) − ½ xᵀQx``, warm-started from ``problem.state``.

    Each iteration: ``f = μ + Wx``, ``g = Wᵀℓ' − Qx``, ``P = Q + Wᵀ diag(−ℓ'') W``
    factorised on ``problem.road``, ``Δ = P⁻¹ g``; stop at ``x`` by
    ``NewtonOptions`` (the factor of ``P`` at the returned mode is reused by the
    objective and the gradient); else a backtracking line search on ``Ψ``.
    Writes the mode and the record (iterations, gradient and step norms) to
    ``problem.state``.

    Raises
    ------
    NonConvergenceError
        No convergence in ``max_iters`` iterations, a line search without
        sufficient decrease, or a non-finite objective at the start, each
        naming the iteration and the gradient norm.
    NotPositiveDefiniteError
        ``P`` is not positive definite at some iterate (``−ℓ''`` negative
        somewhere: a likelihood that is not log-concave there), naming the iteration.
    """
    s = problem.structure
    opts = problem.newton
    q_values = q_values.detach().to(torch.float64)
    mean = mean.detach().to(torch.float64)
    params = tuple(p.detach().to(torch.float64) for p in params)
    w = problem.w_values
    weights = s.pair_weights(w)
    n = s.num_nodes
    x = problem.state.warm_start(n, q_values.device)
    if x is None:
        x = torch.zeros(n, dtype=torch.float64, device=q_values.device)
    space = problem.constraints
    if space is not None:
        space = space.to(q_values.device)
        x = space.project(x)  # Newton's steps stay in S = {Vᵀx = 0}; so must the start

    def evaluate(x: Tensor):
        f = mean + s.apply_w(w, x)
        ell, d1, d2, d3 = problem.terms(f, params)
        qx = _spmv(q_values, s.q_pattern, x)
        quad = torch.dot(x, qx)
        return f, ell, d1, d2, d3, qx, quad, ell.sum() - 0.5 * quad

    f, ell, d1, d2, d3, qx, quad, psi = evaluate(x)
    if not bool(torch.isfinite(psi)) and problem.state.mode is not None:  # a bad warm start: start cold
        x = torch.zeros_like(x)
        f, ell, d1, d2, d3, qx, quad, psi = evaluate(x)
    previous_step = math.inf
    steps = problem.state.steps = []
    for k in range(int(opts.max_iters) + 1):
        grad = s.apply_wt(w, d1) - qx
        if space is not None:  # the gradient within S (at the mode ∇Ψ ∈ span V)
            grad = space.project(grad)
        grad_norm = float(torch.linalg.vector_norm(grad))
        if not (math.isfinite(grad_norm) and bool(torch.isfinite(psi))):
            raise NonConvergenceError(
                f"Laplace mode: the log joint density or its gradient is not finite at Newton iteration {k} "
                f"(gradient norm {grad_norm:.3e}, log joint {float(psi):.6g}); check the data and the hyperparameters"
            )
        p_values = s.precision_values(q_values, weights, -d2)
        factor = None  # release the previous iterate's factor before the next one is built (peak memory)
        try:
            factor = factorize(
                p_values, s.pattern, problem.road, problem.krylov, problem.probes, (q_values, s.q_pattern), space
            )
        except NotPositiveDefiniteError as err:
            low = float((-d2).min())
            raise NotPositiveDefiniteError(
                f"Laplace mode: P = Q + Wᵀ(−ℓ'')W is not positive definite at Newton iteration {k} "
                f"(gradient norm {grad_norm:.3e}, smallest −ℓ'' = {low:.3e}): {err}"
            ) from err
        step = factor.solve(grad)
        step_norm = float(step.abs().max()) if step.numel() else 0.0
        steps.append(step_norm)
        scale = 1.0 + float(x.abs().max()) if x.numel() else 1.0
        stalled = step_norm <= math.sqrt(opts.tol) * scale and step_norm > 0.25 * previous_step
        if step_norm <= opts.tol * scale or stalled or grad_norm == 0.0:
            state = problem.state
            state.mode = x.detach().clone()
            state.iterations, state.grad_norm, state.step_norm = k, grad_norm, step_norm
            state.road = problem.road
            state.calls += 1
            state.history.append(k)
            return ModeResult(x, f, ell, d1, d2, d3, quad, p_values, factor, weights, k, grad_norm, step_norm)
        if k == int(opts.max_iters):
            break
        slope = float(torch.dot(grad, step))
        # Near the mode the increase ½·slope falls below the rounding of Ψ: allow that much noise.
        noise = _PSI_NOISE * (float(ell.abs().sum()) + 0.5 * abs(float(quad)) + 1.0)
        t = 1.0
        while True:
            x_new = x + t * step
            trial = evaluate(x_new)
            if bool(torch.isfinite(trial[-1])) and float(trial[-1]) >= float(psi) + opts.armijo * t * slope - noise:
                break
            t *= 0.5
            if t < opts.min_step:
                raise NonConvergenceError(
                    f"Laplace mode: the line search found no increase of the log joint density along the Newton "
                    f"direction at Newton iteration {k} (gradient norm {grad_norm:.3e}, Newton step {step_norm:.3e}, "
                    f"log joint {float(psi):.10g}); the likelihood may not be log-concave, or the problem is too "
                    "ill-conditioned for the road"
                )
        x = x_new
        f, ell, d1, d2, d3, qx, quad, psi = trial
        if space is not None and space.residual(x) > 1e-12 * (1.0 + float(x.abs().max())):
            x = space.project(x)  # rounding drift off S
            f, ell, d1, d2, d3, qx, quad, psi = evaluate(x)
        previous_step = step_norm
    raise NonConvergenceError(
        f"Laplace mode: Newton's method did not converge in {opts.max_iters} iterations: at iteration {k} the "
        f"gradient norm is {grad_norm:.3e} and the Newton step {step_norm:.3e} (tolerance {opts.tol:g}·"
        f"{scale:.3g}); raise max_newton_iters, loosen newton_tol, or check the data and hyperparameters"
    )


# ---------------------------------------------------------------------------
# What the gradient needs at the mode
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class GradientParts:
    """At the mode: ``s = diag(W P⁻¹ Wᵀ)``, ``(P⁻¹)`` at ``Q``'s entries, ``v = P⁻¹ Wᵀ g`` and ``W v``.

    ``g = ½ s ∘ ℓ'''`` is the derivative of ``−½ log det P`` with respect to
    ``f̂`` (through ``H = −ℓ''(f̂)``). On the Krylov road ``s`` and the entries
    of ``P⁻¹`` are Hutchinson estimates from the probes (unbiased; relative
    standard error about ``√(2/p)`` per entry for ``p`` probes, more where
    ``P⁻¹`` has large off-diagonal mass).
    """

    s: Tensor  # (m,)
    inverse_q: Tensor  # (nnz_Q,) (P⁻¹)[i_e, j_e] at Q's entries (Krylov road: minus the estimate of Q⁻¹)
    g: Tensor  # (m,)
    v: Tensor  # (N,)
    wv: Tensor  # (m,)
    exact: bool


def gradient_parts(problem: LaplaceProblem, result: ModeResult) -> GradientParts:
    """The pieces of the exact (or, on the Krylov road, estimated) gradient at ``result`` (module notes)."""
    s_struct = problem.structure
    factor = result.factor
    inverse = factor.inverse_entries()
    if inverse is not None:
        s = s_struct.quadratic_diagonal(result.pair_weights, inverse)
        inverse_q = s_struct.q_entries(inverse)
        exact = True
    else:
        left, right = factor.probe_factors()
        w = problem.w_values
        s = (s_struct.apply_w(w, left) * s_struct.apply_w(w, right)).sum(-1)
        full = sampled_product(s_struct.pattern, left.unsqueeze(0), right.unsqueeze(0))
        inverse_q = s_struct.q_entries(symmetrize_values_grad(full, s_struct.pattern)[0])
        # The objective on this road is Ψ − ½(log det P − log det Q) with both estimated from the same probes:
        # its Q-gradient carries −½(P⁻¹ − Q⁻¹), both Hutchinson estimates.
        left_q, right_q = factor.prior_probe_factors()
        prior = sampled_product(s_struct.q_pattern, left_q.unsqueeze(0), right_q.unsqueeze(0))
        inverse_q = inverse_q - symmetrize_values_grad(prior, s_struct.q_pattern)[0]
        exact = False
    g = 0.5 * s * result.d3
    v = factor.solve(s_struct.apply_wt(problem.w_values, g))
    wv = s_struct.apply_w(problem.w_values, v)
    return GradientParts(s=s, inverse_q=inverse_q, g=g, v=v, wv=wv, exact=exact)
