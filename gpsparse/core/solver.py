"""The single place where a Krylov core is run on a sparse matrix: ``run_solver`` / ``solve_with_info``.

The static part of a solve is a frozen ``SolverConfig``
(method, tolerances, iteration cap, preconditioner, strictness), kept separate
from the per-call inputs (values, right-hand sides, initial guess), as in
lineax; it travels into autograd Functions unchanged, so the backward pass
solves with the forward's settings. Named preconditioners are built by the one
registry (``gpsparse.core.preconditioners.build_preconditioner``).

The stopping rule is the cores' (``gpsparse.core.krylov``): per column
``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``; non-convergence is reported here as a
[`ConvergenceWarning`][gpsparse.errors.ConvergenceWarning] naming the residual reached, or a
[`NonConvergenceError`][gpsparse.errors.NonConvergenceError] with ``strict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from gpsparse.core import krylov
from gpsparse.core.config import PreconditionerSpec, SolverConfig
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import build_preconditioner
from gpsparse.core.sparse_ops import spmm
from gpsparse.errors import ConvergenceWarning, NonConvergenceError

__all__ = [
    "run_solver",
    "solve_with_info",
    "buffered_matvec",
    "report_convergence",
    "SolverConfig",
    "PreconditionerSpec",
]


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
    return solve_with_info(config, values, pattern, rhs, x0=x0, preconditioner=preconditioner, what=what)[0]


def solve_with_info(
    config: SolverConfig,
    values: Tensor,
    pattern: SparsityPattern,
    rhs: Tensor,
    *,
    x0: Tensor | None = None,
    preconditioner=None,
    what: str = "solve",
    return_tridiag: bool = False,
) -> tuple[Tensor, krylov.SolverInfo]:
    """``run_solver`` returning the core's [`SolverInfo`][gpsparse.SolverInfo] too.

    ``return_tridiag`` (CG only) records the Lanczos coefficients of every
    column in ``info.tridiag``, for quadrature.
    """
    if preconditioner is None:
        preconditioner = build_preconditioner(
            config.preconditioner, values, pattern, cholesky_refresh=config.cholesky_refresh
        )
    solver = getattr(krylov, config.method)
    kwargs = {"return_tridiag": True} if return_tridiag else {}
    solution, info = solver(
        buffered_matvec(values, pattern),
        rhs,
        x0=x0,
        preconditioner=preconditioner,
        rtol=config.rtol,
        atol=config.atol,
        max_iters=config.max_iters,
        **kwargs,
    )
    report_convergence(info, config, what)
    return solution, info


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
