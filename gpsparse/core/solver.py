"""Solver configuration and the single place where a Krylov core is run on a sparse matrix.

:class:`SolverConfig` is the static part of a solve (method, tolerances,
iteration cap, preconditioner, strictness), kept separate from the per-call
inputs (values, right-hand sides, initial guess), as in lineax. It is hashable
and travels into autograd Functions unchanged, so the backward pass solves
with the same settings as the forward.

The stopping rule is the cores' (``gpsparse.core.krylov``): per column
``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gpsparse.core import krylov
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import IncompleteCholeskyPreconditioner, JacobiPreconditioner, Preconditioner
from gpsparse.core.sparse_ops import spmm
from gpsparse.errors import ConvergenceWarning, NonConvergenceError, NotPositiveDefiniteError

__all__ = ["SolverConfig", "run_solver", "METHODS", "PRECONDITIONERS"]

METHODS = ("cg", "minres", "bicgstab")
PRECONDITIONERS = ("jacobi", "ic0", "cholesky")
PreconditionerSpec = None | str | Preconditioner | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SolverConfig:
    """Static settings of an iterative solve.

    Parameters
    ----------
    method : {"cg", "minres", "bicgstab"}
        ``cg`` for symmetric positive definite, ``minres`` for symmetric
        (possibly indefinite), ``bicgstab`` for general square matrices.
    rtol, atol : float
        Stopping rule per column: ``‖b − A x‖ ≤ max(rtol·‖b‖, atol)``.
    max_iters : int or None
        Iteration cap (``None``: the core's default, ``10·n``).
    preconditioner : None, "jacobi", "ic0", Preconditioner or callable
        A string builds the preconditioner from the (detached) matrix values
        at every call; an object or callable ``r ↦ M⁻¹ r`` is used as given.
        ``M`` must be symmetric: the backward pass applies it to ``Aᵀ`` too.
    strict : bool
        Raise :class:`~gpsparse.errors.NonConvergenceError` instead of
        warning with :class:`~gpsparse.errors.ConvergenceWarning` when the
        tolerance is not reached.
    """

    method: str = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: PreconditionerSpec = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol and atol must be non-negative, got rtol={self.rtol}, atol={self.atol}")
        if self.max_iters is not None and int(self.max_iters) < 1:
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters}")
        spec = self.preconditioner
        if isinstance(spec, str) and spec not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {spec!r}; choose one of {PRECONDITIONERS}, an object or None")
        if spec is not None and not isinstance(spec, str) and not callable(spec):
            raise TypeError(f"preconditioner must be None, a name, or callable r -> M⁻¹r, got {type(spec).__name__}")

    def with_method(self, method: str) -> SolverConfig:
        return replace(self, method=method)


def build_preconditioner(spec: PreconditionerSpec, values: Tensor, pattern: SparsityPattern):
    """Resolve a preconditioner spec for the ``(B, nnz)`` values into a callable (or None)."""
    if spec is None or not isinstance(spec, str):
        return spec
    values = values.detach()
    if spec == "cholesky":
        return stale_cholesky(values, pattern)
    if spec == "jacobi":
        pos = pattern.diagonal_positions
        diagonal = torch.where(pos >= 0, values[:, pos.clamp_min(0)], values.new_zeros(()))
        return JacobiPreconditioner(diagonal)
    if values.shape[0] != 1:
        raise NotImplementedError("the 'ic0' preconditioner needs a single (non-batched) matrix")
    return incomplete_cholesky_with_shift(pattern.to_sparse_csr(values[0]))


def stale_cholesky(values: Tensor, pattern: SparsityPattern):
    """A CHOLMOD factor of this pattern's matrix from an earlier call, as a fixed preconditioner.

    Cached on the pattern and refactorised from the current (detached) values
    every ``cholesky_refresh`` uses (:func:`gpsparse.settings.logdet_defaults`):
    during optimisation the matrix changes slowly, so an earlier factor keeps
    ``C⁻¹AC⁻ᵀ`` close to the identity and Krylov methods converge in a few
    steps, while the factorisation cost is paid only now and then.
    """
    from gpsparse import settings
    from gpsparse.core.cholmod import CholeskyPreconditioner

    entry = pattern.__dict__.get("_stale_cholesky")
    refresh = settings.current().cholesky_refresh
    if entry is None or entry[1] >= refresh or entry[0].batch_shape.numel() != values.shape[0]:
        entry = [CholeskyPreconditioner.from_matrix(values.detach(), pattern), 0]
        pattern.__dict__["_stale_cholesky"] = entry
    entry[1] += 1
    return entry[0]


IC_SHIFTS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def incomplete_cholesky_with_shift(matrix: Tensor) -> IncompleteCholeskyPreconditioner:
    """IC(0) of ``A + s·diag(A)`` for the first shift ``s`` in :data:`IC_SHIFTS` that has positive pivots.

    IC(0) can break down on SPD matrices that are not M-matrices (e.g. the
    13-point lattice precision ``τ(κ²I + L)² + σ⁻²I`` with small κ and
    σ⁻²); a diagonal shift (Manteuffel, 1980) restores it at the price of a
    slightly weaker preconditioner. The shift only changes ``M``, never the
    solution.
    """
    error = None
    for shift in IC_SHIFTS:
        try:
            return IncompleteCholeskyPreconditioner.from_matrix(matrix, shift=shift)
        except NotPositiveDefiniteError as err:
            error = err
    raise NotPositiveDefiniteError(f"IC(0) broke down even with a diagonal shift of {IC_SHIFTS[-1]}: {error}")


def run_solver(
    config: SolverConfig,
    values: Tensor,
    pattern: SparsityPattern,
    rhs: Tensor,
    *,
    x0: Tensor | None = None,
    preconditioner=None,
    what: str = "solve",
) -> Tensor:
    """Solve ``A[b] X[b] = rhs[b]`` for ``(B, nnz)`` values and ``(B, n, k)`` rhs; report non-convergence.

    ``preconditioner``, when given, is a resolved callable that overrides
    ``config.preconditioner`` (used to reuse one factorisation for the
    forward and the backward solve).

    Raises
    ------
    NotPositiveDefiniteError, SolverBreakdownError
        From the core, on a genuine breakdown.
    NonConvergenceError
        When ``config.strict`` and some column missed the tolerance.

    Warns
    -----
    ConvergenceWarning
        When not strict and some column missed the tolerance; the message
        names the largest relative residual reached.
    """
    if preconditioner is None:
        preconditioner = build_preconditioner(config.preconditioner, values, pattern)

    matvec = buffered_matvec(values, pattern)
    solver = getattr(krylov, config.method)
    solution, info = solver(
        matvec,
        rhs,
        x0=x0,
        preconditioner=preconditioner,
        rtol=config.rtol,
        atol=config.atol,
        max_iters=config.max_iters,
    )
    report_convergence(info, config, what)
    return solution


def buffered_matvec(values: Tensor, pattern: SparsityPattern) -> Callable[[Tensor], Tensor]:
    """``x ↦ A x`` writing into one reused output buffer (allowed by the Krylov cores' matvec contract)."""
    buffers: dict[tuple, Tensor] = {}

    def matvec(x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype)
        out = buffers.get(key)
        if out is None:
            out = buffers[key] = torch.empty(x.shape[0], pattern.size[0], x.shape[-1], dtype=x.dtype, device=x.device)
        return spmm(values, pattern, x, out=out)

    return matvec


def report_convergence(info: krylov.SolverInfo, config: SolverConfig, what: str) -> None:
    """Warn or raise (``config.strict``) when some column did not converge."""
    if info.all_converged:
        return
    worst = float(info.residual_norm.max())
    failed = int((~info.converged).sum())
    message = (
        f"{config.method} {what} did not converge: {failed} of {info.converged.numel()} column(s) stopped after "
        f"{info.iterations} iterations with relative residual up to {worst:.3e} "
        f"(rtol={config.rtol:g}, atol={config.atol:g}); raise max_iters, loosen rtol or add a preconditioner"
    )
    if config.strict:
        raise NonConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)
