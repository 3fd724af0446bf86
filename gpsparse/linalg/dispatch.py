r"""The one dispatcher: which road computes ``solve``, ``inv_quad``, ``logdet`` and ``inv_quad_logdet``.

Every entry point — the public functions ([`gpsparse.solve`][],
[`gpsparse.logdet`][], [`gpsparse.inv_quad_logdet`][]) and every operator
([`SparseLinearOperator`][gpsparse.SparseLinearOperator] and the sparse-precision covariances
built on it) — calls the functions below with ``(values, pattern)`` and a
frozen ``RoadConfig``. The roads, in the order
``road="auto"`` tries them:

``banded``
:   Symmetric matrices of half-bandwidth ``≤ max_banded_bandwidth`` (1-D
    Markov precisions): exact banded Cholesky (LAPACK ``pbtrf``), O(N·b²),
    gradients by selected inversion (``gpsparse.autograd.banded``).

``cholesky``
    Symmetric matrices when ``cholesky`` is set (``logdet_defaults(method="cholesky")``):
    exact sparse Cholesky by CHOLMOD, gradients by selected inversion
    (``gpsparse.autograd.cholmod``).
``dense``
    Log-determinants of at most ``dense_max_rows`` rows within
    ``max_dense_size`` elements (the operators use linear_operator's
    ``max_cholesky_size``, as linear_operator does): a dense Cholesky,
    differentiable by autograd through the stored entries.
``krylov``
    Everything else: CG / MINRES / BiCGSTAB solves with sparse adjoints
    (``gpsparse.autograd.sparse``) and stochastic Lanczos quadrature
    (``gpsparse.autograd.slq``) for log-determinants. Only here do the
    stochastic options (probes, Lanczos depth, gradient mode) apply.

Both exact Cholesky roads assume a positive definite matrix (they raise
[`NotPositiveDefiniteError`][gpsparse.errors.NotPositiveDefiniteError] otherwise), as CG and SLQ do.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from gpsparse.autograd.banded import banded_logdet, banded_solve
from gpsparse.autograd.slq import slq_apply
from gpsparse.autograd.sparse import SparseInvQuad, SparseSolve
from gpsparse.core.banded import banded_inverse_band, bandwidth
from gpsparse.core.batching import flatten_operands
from gpsparse.core.config import RoadConfig, SolverConfig
from gpsparse.core.convert import check_finite, check_operand, symmetrized
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.quadrature import rademacher, tridiagonal
from gpsparse.core.slq import check_probes, resolve_preconditioner
from gpsparse.core.solver import solve_with_info
from gpsparse.core.sparse_ops import to_dense
from gpsparse.errors import DenseSizeError, EstimatorAccuracyWarning, NotPositiveDefiniteError
from gpsparse.linalg import parallel

__all__ = [
    "choose_road",
    "solve",
    "inv_quad",
    "logdet",
    "inv_quad_logdet",
    "logdet_difference",
    "krylov_solve_detached",
    "selected_inverse",
    "broadcast_batch",
]


def choose_road(pattern: SparsityPattern, config: RoadConfig, *, logdet: bool = False, batch_numel: int = 1) -> str:
    """The road for a matrix on ``pattern`` (see the module docstring).

    ``logdet`` says whether a log-determinant is wanted (only then is the
    dense road considered); ``batch_numel`` is the number of matrices in the
    batch (for the dense limit).

    Raises
    ------
    ValueError
        A forced exact road (``banded``, ``cholesky``, ``dense``) for a
        matrix that is not declared symmetric, or ``banded`` for a matrix
        wider than ``max_banded_bandwidth``.
    """
    n = pattern.size[0]
    if config.road != "auto":
        if config.road != "krylov" and not pattern.symmetric:
            raise ValueError(f"road={config.road!r} needs a symmetric positive definite matrix")
        if config.road == "banded" and not _is_banded(pattern, max(config.max_banded_bandwidth, 1)):
            raise ValueError(
                f"road='banded' needs a half-bandwidth ≤ max_banded_bandwidth = {config.max_banded_bandwidth}, "
                f"got {bandwidth(pattern)}"
            )
        return config.road
    if pattern.symmetric and n > 1 and _is_banded(pattern, config.max_banded_bandwidth):
        return "banded"
    if pattern.symmetric and config.cholesky:
        return "cholesky"
    if logdet and pattern.symmetric and n <= config.dense_max_rows and batch_numel * n * n <= config.max_dense_size:
        return "dense"
    return "krylov"


def _is_banded(pattern: SparsityPattern, limit: int) -> bool:
    return limit > 0 and bandwidth(pattern) <= limit


def solve(values: Tensor, pattern: SparsityPattern, rhs: Tensor, config: RoadConfig, *, x0: Tensor | None = None):
    """``A⁻¹ rhs`` for values ``(*batch, nnz)`` and ``rhs`` ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``."""
    _check_square(pattern, "solve")
    _check_rhs(rhs, values, pattern, "right-hand side")
    if config.road == "dense":
        raise ValueError("road='dense' serves log-determinants only; solves take 'banded', 'cholesky' or 'krylov'")
    road = choose_road(pattern, config)
    if road == "banded":
        return banded_solve(values, pattern, rhs)
    if road == "cholesky":
        from gpsparse.autograd.cholmod import cholesky_solve

        return cholesky_solve(values, pattern, rhs)
    check_finite(values, "sparse matrix values")
    values2d, rhs3d, unflatten = flatten_operands(values, rhs, pattern.size[1])
    x03d = None
    if x0 is not None:
        if x0.shape != rhs.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but B has shape {tuple(rhs.shape)}")
        check_operand(x0, values, "x0")
        x03d = flatten_operands(values, x0.detach(), pattern.size[1])[1]
    partition = config.partition
    if partition is not None and partition.world_size > 1:

        def local(v, rhs_block):
            k0, k1 = partition.block(rhs3d.shape[-1])
            return SparseSolve.apply(v, rhs_block, pattern, config.solver, None if x03d is None else x03d[..., k0:k1])

        return unflatten(parallel.split_solve(partition, local, values2d, rhs3d, pattern))
    return unflatten(SparseSolve.apply(values2d, rhs3d, pattern, config.solver, x03d))


def inv_quad(values: Tensor, pattern: SparsityPattern, rhs: Tensor, config: RoadConfig) -> Tensor:
    """Per-column ``diag(Rᵀ A⁻¹ R)`` ``(*batch, k)`` for ``rhs`` ``(n,)`` (one column) or ``(*batch, n, k)``.

    Symmetric matrices on the Krylov road take one CG solve forward and none
    backward (``SparseInvQuad``).
    """
    _check_square(pattern, "inv_quad")
    _check_rhs(rhs, values, pattern, "inv_quad_rhs")
    rhs = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
    road = choose_road(pattern, config)
    if road == "krylov" and pattern.symmetric:
        check_finite(values, "sparse matrix values")
        values2d, rhs3d, _ = flatten_operands(values, rhs, pattern.size[1])
        term = SparseInvQuad.apply(values2d, rhs3d, pattern, config.solver)
        return term.reshape(*broadcast_batch(values, rhs), rhs.shape[-1])
    return (solve(values, pattern, rhs, config) * rhs).sum(-2)


def logdet(values: Tensor, pattern: SparsityPattern, config: RoadConfig, *, probes=None, generator=None) -> Tensor:
    """``log det A`` ``(*batch,)`` of a symmetric positive definite matrix."""
    return inv_quad_logdet(values, pattern, None, config, probes=probes, generator=generator)[1]


def inv_quad_logdet(
    values: Tensor,
    pattern: SparsityPattern,
    rhs: Tensor | None,
    config: RoadConfig,
    *,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Per-column inverse quadratic terms ``(*batch, k)`` (None without ``rhs``) and ``log det A`` ``(*batch,)``.

    On the Krylov road the probes are ``probes`` if given, else Rademacher
    vectors from ``generator`` (torch's global generator when None). With
    ``gradient="hutchinson"`` one batched CG run serves the probes and the
    quadratic term; with ``"adjoint"`` the quadratic term gets its own CG solve.
    """
    if not pattern.symmetric:
        raise ValueError(
            "the log-determinant needs a symmetric positive definite matrix (pattern and values declared symmetric)"
        )
    if rhs is not None:
        _check_rhs(rhs, values, pattern, "inv_quad_rhs")
        rhs = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
    batch = broadcast_batch(values, rhs) if rhs is not None else values.shape[:-1]
    road = choose_road(pattern, config, logdet=True, batch_numel=math.prod(batch))
    if road == "krylov":
        return _slq_inv_quad_logdet(values, pattern, rhs, batch, config, probes, generator)
    if road == "dense":
        return _dense_inv_quad_logdet(values, pattern, rhs, batch, config)
    quad = None if rhs is None else inv_quad(values, pattern, rhs, config)
    if road == "banded":
        return quad, banded_logdet(values, pattern)
    from gpsparse.autograd.cholmod import cholesky_logdet

    return quad, cholesky_logdet(values, pattern)


#: A difference of log-determinants of matrices with at most this many rows takes the dense road
#: (within ``max_dense_size``) when the dispatcher would otherwise estimate it: two SLQ estimates of
#: values of order N have errors far above their difference, and a dense Cholesky of this size costs
#: less than the Lanczos runs.
DIFFERENCE_DENSE_MAX_ROWS = 1024
#: ``logdet_difference`` warns when the standard error of its estimate exceeds
#: ``DIFFERENCE_RTOL · |difference| + DIFFERENCE_ATOL``.
DIFFERENCE_RTOL = 0.1
DIFFERENCE_ATOL = 0.05


def logdet_difference(
    values_a: Tensor,
    pattern_a: SparsityPattern,
    config_a: RoadConfig,
    values_b: Tensor,
    pattern_b: SparsityPattern,
    config_b: RoadConfig,
    *,
    rhs: Tensor | None = None,
    known_b: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    r"""``diag(Rᵀ A⁻¹ R)`` and ``log det A − log det B`` for two symmetric positive definite N × N matrices.

    The noisy sparse-precision covariance needs ``log det P − log det Q``
    (``P = Q + WᵀD⁻¹W``), a small difference of two values of order N.

    Roads, per matrix: the dispatcher's exact roads (banded, CHOLMOD, dense)
    where ``choose_road`` takes them; else the dense road when
    ``N ≤ DIFFERENCE_DENSE_MAX_ROWS`` within ``max_dense_size``; else
    stochastic Lanczos quadrature with **common random numbers**: the same
    Rademacher probes ``z_1 … z_p`` serve ``A`` and ``B``, so the errors of
    the two estimates are correlated and largely cancel in the difference.
    ``known_b`` (``(*batch,)``, e.g. a closed-form ``log det Q``) replaces
    ``B``'s road.

    Error of the estimate: the probes are split into ``G = min(p, clamp(p // 4,
    2, 16))`` groups of sizes ``p_g``; with the per-group differences ``d_g``
    and their probe-weighted mean ``d̄ = Σ_g (p_g/p) d_g`` (the estimate, equal
    to the all-probe estimate), the per-probe variance is estimated by
    ``σ̂² = Σ_g p_g (d_g − d̄)² / (G − 1)`` and the standard error of ``d̄`` by
    ``σ̂ / √p`` (an estimate of the SLQ sampling error only, not of the
    Lanczos quadrature's bias, which is small at the default depth). An
    [`EstimatorAccuracyWarning`][gpsparse.errors.EstimatorAccuracyWarning] is
    emitted when ``stderr > DIFFERENCE_RTOL · |d̄| + DIFFERENCE_ATOL`` for a
    batch member (0.1 and 0.05: more probes, ``logdet_defaults(method="cholesky")``
    or a closed-form ``log det Q`` help).

    Parameters
    ----------
    values_a, values_b : Tensor
        ``(*batch_a, nnz_a)``, ``(*batch_b, nnz_b)`` on symmetric patterns of equal size N.
    config_a, config_b : RoadConfig
        Their configurations (the probe count is the larger of the two).
    rhs : Tensor, optional
        ``(*batch, N, k)``: also return the inverse quadratic terms of ``A``.
    known_b : Tensor, optional
        ``log det B`` ``(*batch_b,)`` when known.
    generator : torch.Generator, optional
        For the probes (torch's global generator when None).

    Returns
    -------
    quad : Tensor or None
        ``(*batch, k)`` inverse quadratic terms of ``A`` (None without ``rhs``).
    difference : Tensor
        ``(*batch,)`` ``log det A − log det B``, differentiable in both values.
    stderr : Tensor or None
        ``(*batch,)`` estimated standard error of the difference (detached);
        None when no estimator ran or with a single probe, zeros on exact roads.
    """
    if not (pattern_a.symmetric and pattern_b.symmetric):
        raise ValueError("a log-determinant difference needs two symmetric positive definite matrices")
    n = pattern_a.size[0]
    if pattern_b.size != pattern_a.size:
        raise ValueError(f"the matrices have sizes {pattern_a.size} and {pattern_b.size}")
    if rhs is not None:
        _check_rhs(rhs, values_a, pattern_a, "inv_quad_rhs")
        rhs = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
    batch = torch.broadcast_shapes(broadcast_batch(values_a, rhs), values_b.shape[:-1])
    if known_b is not None:
        batch = torch.broadcast_shapes(batch, known_b.shape)
    num = math.prod(batch)

    def exact_config(pattern, config):
        road = choose_road(pattern, config, logdet=True, batch_numel=num)
        if road != "krylov" or config.road != "auto":
            return config, road != "krylov"
        dense = replace(config, dense_max_rows=max(config.dense_max_rows, DIFFERENCE_DENSE_MAX_ROWS))
        return dense, choose_road(pattern, dense, logdet=True, batch_numel=num) == "dense"

    config_a, exact_a = exact_config(pattern_a, config_a)
    exact_b = known_b is not None
    if not exact_b:
        config_b, exact_b = exact_config(pattern_b, config_b)
    quad = None
    if exact_a:
        quad, logdet_a = inv_quad_logdet(values_a, pattern_a, rhs, config_a)
    elif rhs is not None:
        quad = inv_quad(values_a, pattern_a, rhs, config_a)
    if exact_b:
        logdet_b = known_b if known_b is not None else inv_quad_logdet(values_b, pattern_b, None, config_b)[1]
    if exact_a and exact_b:
        difference = (logdet_a - logdet_b).expand(batch)
        return quad, difference, torch.zeros_like(difference.detach())

    # The estimator: the same probes for A and B, in groups (their spread gives the standard error).
    num_probes = max(config_a.logdet.num_probes, config_b.logdet.num_probes)
    probes = rademacher((num, n, num_probes), generator=generator, dtype=values_a.dtype, device=values_a.device)
    groups = torch.tensor_split(torch.arange(num_probes), min(num_probes, max(2, min(16, num_probes // 4))))
    estimated = []  # (values2d, pattern, logdet config, sign) of each matrix on the estimator
    for values, pattern, config, exact, sign in (
        (values_a, pattern_a, config_a, exact_a, 1.0),
        (values_b, pattern_b, config_b, exact_b, -1.0),
    ):
        if not exact:
            check_finite(values, "sparse matrix values")
            values2d = values.expand(*batch, pattern.nnz).reshape(num, pattern.nnz)
            estimated.append((values2d, pattern, _built_logdet_config(values2d, pattern, config.logdet), sign))

    def group_differences(*values2d, first=0, stop=None):
        """``(num, stop − first)``: Σ ± estimate of each estimated matrix, on the groups ``first:stop``."""
        stop = len(groups) if stop is None else stop
        total = values_a.new_zeros(num, stop - first)
        for v, (_, pattern, logdet_config, sign) in zip(values2d, estimated):
            parts = [slq_apply(v, pattern, probes[..., g], logdet_config) for g in groups[first:stop]]
            total = total + sign * torch.stack(parts, -1) if parts else total
        return total

    partition = config_a.partition
    inputs = [e[0] for e in estimated]
    if partition is not None and partition.world_size > 1:
        per_group = parallel.split_groups(
            partition,
            lambda *args: group_differences(*args[:-2], first=args[-2], stop=args[-1]),
            inputs,
            estimated[0][1],
            probes,
            len(groups),
        )
    else:
        per_group = group_differences(*inputs)  # (num, G)
    weights = torch.tensor([len(g) / num_probes for g in groups], dtype=values_a.dtype, device=values_a.device)
    difference = (per_group * weights).sum(-1)
    if exact_a:
        difference = difference + logdet_a.expand(batch).reshape(num)
    if exact_b:
        difference = difference - logdet_b.expand(batch).reshape(num)
    stderr = None
    if len(groups) > 1:
        spread = per_group.detach() - (per_group.detach() * weights).sum(-1, keepdim=True)
        variance = (weights * num_probes * spread.pow(2)).sum(-1) / (len(groups) - 1)
        stderr = (variance / num_probes).sqrt().reshape(batch)
        bound = DIFFERENCE_RTOL * difference.detach().abs().reshape(batch) + DIFFERENCE_ATOL
        if bool((stderr > bound).any()):
            worst = int((stderr / bound).reshape(-1).argmax())
            estimate = float(difference.detach().reshape(-1)[worst])
            warnings.warn(
                f"the log-determinant difference is estimated as {estimate:.4g} with an "
                f"estimated standard error of {float(stderr.reshape(-1)[worst]):.3g} "
                f"(from {num_probes} shared probes), "
                f"above {DIFFERENCE_RTOL:g}·|difference| + {DIFFERENCE_ATOL:g}; use more probes "
                "(gpsparse.settings.logdet_defaults(num_probes=...)), an exact road "
                "(logdet_defaults(method='cholesky')) or a closed-form log det Q",
                EstimatorAccuracyWarning,
                stacklevel=3,
            )
    return quad, difference.reshape(batch), stderr


def _built_logdet_config(values2d, pattern, logdet_config):
    """Build a named preconditioner once, not once per probe group (Jacobi scaling is done per call, exactly)."""
    if isinstance(logdet_config.preconditioner, str) and logdet_config.preconditioner != "jacobi":
        built = resolve_preconditioner(logdet_config.preconditioner, values2d, pattern, logdet_config.cholesky_refresh)
        return replace(logdet_config, preconditioner=built)
    return logdet_config


def _slq_inv_quad_logdet(values, pattern, rhs, batch, config: RoadConfig, probes, generator):
    check_finite(values, "sparse matrix values")
    n, nnz = pattern.size[0], pattern.nnz
    num = int(torch.Size(batch).numel())
    values2d = values.expand(*batch, nnz).reshape(num, nnz)
    if probes is None:
        shape = (num, n, config.logdet.num_probes)
        probes = rademacher(shape, generator=generator, dtype=values.dtype, device=values.device)
    else:
        probes = check_probes(probes, n, num, values)
    rhs3d = None if rhs is None else rhs.expand(*batch, n, rhs.shape[-1]).reshape(num, n, rhs.shape[-1])

    def terms(v, rhs_block, probe_block):
        return _slq_terms(v, pattern, rhs_block, probe_block, config)

    if config.partition is not None and config.partition.world_size > 1:
        quad, estimate = parallel.split_inv_quad_logdet(config.partition, terms, values2d, rhs3d, probes, pattern)
    else:
        quad, estimate = terms(values2d, rhs3d, probes)
    return (None if rhs is None else quad.reshape(*batch, rhs.shape[-1])), estimate.reshape(batch)


def _slq_terms(values2d, pattern, rhs3d, probes, config: RoadConfig):
    """``(inv_quad (B, k) or None, estimate (B,))`` of the SLQ estimator on these probes and columns."""
    if rhs3d is None:
        return None, slq_apply(values2d, pattern, probes, config.logdet)
    if config.logdet.gradient == "hutchinson":
        return slq_apply(values2d, pattern, probes, config.logdet, rhs=rhs3d)
    return SparseInvQuad.apply(values2d, rhs3d, pattern, config.solver), slq_apply(
        values2d, pattern, probes, config.logdet
    )


def _dense_inv_quad_logdet(values, pattern, rhs, batch, config: RoadConfig):
    """Dense Cholesky of ``A`` (``n ≤ dense_max_rows``): exact values; gradients by autograd through the entries."""
    elements = math.prod(batch) * pattern.size[0] ** 2
    if elements > config.max_dense_size:  # choose_road checked it; a forced road lands here
        raise DenseSizeError(
            f"the dense road would form {elements:,} elements, above max_dense_size = {config.max_dense_size:,}"
        )
    dense = to_dense(symmetrized(values, pattern), pattern)
    factor, info = torch.linalg.cholesky_ex(dense)
    if bool((info > 0).any()):
        order = int(info[info > 0].reshape(-1)[0])
        raise NotPositiveDefiniteError(f"dense Cholesky: the leading minor of order {order} is not positive definite")
    logdet_term = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet_term = logdet_term.expand(batch) if logdet_term.shape != batch else logdet_term
    if rhs is None:
        return None, logdet_term
    factor = factor.expand(*batch, *factor.shape[-2:])
    quad = (torch.cholesky_solve(rhs.expand(*batch, *rhs.shape[-2:]), factor) * rhs).sum(-2)
    return quad, logdet_term


def selected_inverse(values: Tensor, pattern: SparsityPattern, config: RoadConfig) -> Tensor | None:
    """``(A⁻¹)[i_e, j_e]`` at every stored entry ``(*batch, nnz)`` on an exact road, else None (no gradient).

    The banded road inverts within the band (O(N·b²)), the CHOLMOD road by
    Takahashi's selected inversion (O(nnz(L)) after one factorisation); on the
    Krylov road the entries of ``A⁻¹`` have no cheap exact form and the caller
    solves instead.
    """
    if not pattern.symmetric:
        raise ValueError("a selected inverse needs a symmetric positive definite matrix")
    road = choose_road(pattern, config)
    if road == "banded":
        return banded_inverse_band(values, pattern)
    if road == "cholesky":
        from gpsparse.autograd.cholmod import cholesky_selected_inverse

        return cholesky_selected_inverse(values, pattern)
    return None


def krylov_solve_detached(
    values: Tensor,
    pattern: SparsityPattern,
    rhs: Tensor,
    solver: SolverConfig,
    preconditioner=None,
    num_tridiag: int = 0,
    max_tridiag: int | None = None,
):
    """A solve without gradients (linear_operator's internal ``_solve`` hook), optionally with Lanczos matrices.

    Returns ``X`` ``(*batch, n, k)``, and with ``num_tridiag > 0`` also the
    dense ``(num_tridiag, *batch, m, m)`` tridiagonal matrices of the first
    ``num_tridiag`` columns from the CG coefficients (``m ≤ max_tridiag``),
    linear_operator's format: a column that converged after ``j < m`` steps is
    padded with an identity block, which carries zero quadrature weight.
    """
    batch = broadcast_batch(values, rhs)
    values2d = values.detach().expand(*batch, pattern.nnz).reshape(-1, pattern.nnz)
    rhs3d = rhs.expand(*batch, *rhs.shape[-2:]).reshape(-1, *rhs.shape[-2:])
    if num_tridiag:
        solver = solver.with_method("cg")
    solution, info = solve_with_info(
        solver, values2d, pattern, rhs3d, preconditioner=preconditioner, return_tridiag=bool(num_tridiag)
    )
    solution = solution.reshape(*batch, *rhs.shape[-2:])
    if not num_tridiag:
        return solution
    diag, off = info.tridiag
    cap = diag.shape[-1] if max_tridiag is None else max_tridiag
    diag, off = diag[:, :num_tridiag, :cap], off[:, :num_tridiag, : cap - 1]
    steps = info.iterations_per_column[:, :num_tridiag].clamp(1, diag.shape[-1])
    t_mat = tridiagonal(diag, off, steps)
    return solution, t_mat.reshape(*batch, num_tridiag, *t_mat.shape[-2:]).movedim(-3, 0)


def _check_rhs(rhs: Tensor, values: Tensor, pattern: SparsityPattern, name: str) -> None:
    """A dense operand ``(n,)`` or ``(*batch, n, k)`` of the matrix's dtype and device, finite (every road)."""
    check_operand(rhs, values, name)
    n = pattern.size[1]
    rows = rhs.shape[-1] if rhs.dim() == 1 else rhs.shape[-2] if rhs.dim() >= 2 else None
    if rows != n:
        raise ValueError(f"{name} of shape {tuple(rhs.shape)} does not match an operator with {n} columns")


def _check_square(pattern: SparsityPattern, what: str) -> None:
    if not pattern.is_square:
        raise ValueError(f"{what} needs a square matrix, got size {pattern.size}")


def broadcast_batch(values: Tensor, rhs: Tensor | None) -> torch.Size:
    """Broadcast batch shape of ``values (*b1, nnz)`` and a dense operand ``(*b2, n, k)``."""
    if rhs is None:
        return values.shape[:-1]
    rbatch = rhs.shape[:-2] if rhs.dim() >= 2 else torch.Size()
    return torch.broadcast_shapes(values.shape[:-1], rbatch)
