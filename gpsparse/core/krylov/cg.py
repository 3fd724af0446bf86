"""Preconditioned conjugate gradients, with the Lanczos tridiagonal of every column on request."""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core.defaults import DEFAULT_RTOL
from gpsparse.core.fused import column_ops
from gpsparse.core.krylov.problem import (
    Matvec,
    SolverInfo,
    _flags,
    _nonfinite,
    _Problem,
    _raise_nonfinite,
    _raise_not_pd,
)
from gpsparse.core.quadrature import pad_tridiagonal

__all__ = ["cg"]


def cg(
    matvec: Matvec,
    rhs: Tensor,
    /,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    max_iters: int | None = None,
    return_tridiag: bool = False,
    check_every: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Preconditioned conjugate gradients (Hestenes & Stiefel, 1952) for SPD ``A``.

    Solves ``A X = B`` column by column in one block iteration:

        r₀ = b − A x₀,  z₀ = M⁻¹r₀,  p₀ = z₀
        αⱼ = rⱼᵀzⱼ / pⱼᵀApⱼ,   x ← x + αⱼpⱼ,   r ← r − αⱼApⱼ
        z = M⁻¹r,   βⱼ = rⱼ₊₁ᵀzⱼ₊₁ / rⱼᵀzⱼ,   p ← z + βⱼp

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on ``(*batch, n, k)`` tensors (contract: ``gpsparse.core.krylov``).
        ``A`` symmetric positive definite.
    rhs : Tensor
        ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``, real floating.
    x0 : Tensor, optional
        Initial guess, ``rhs``'s shape (default zeros). Not modified.
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r`` on ``(*batch, n, k)`` tensors, ``M`` symmetric positive
        definite.
    rtol, atol : float
        Stopping rule per column ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)`` on the
        recursively updated residual.
    max_iters : int, optional
        Iteration cap, default ``min(10·n, 10_000)``.
    return_tridiag : bool
        Also return the Lanczos tridiagonal matrices of every column in
        ``info.tridiag`` (see [`SolverInfo`][gpsparse.SolverInfo] for layout and padding).
    check_every : int, optional
        Host synchronisations: convergence and breakdown are looked at every
        this many iterations (default 1 on the CPU, 8 on CUDA, where each
        look waits for the device). Converged columns are frozen on the
        device in between, so the solution, the iteration counts, the
        tridiagonals and the errors (with the iteration at which they
        occurred) are the same for every value; only up to
        ``check_every − 1`` no-op iterations may run after the last column
        converged.

    Returns
    -------
    x : Tensor
        ``rhs``'s shape.
    info : SolverInfo

    Raises
    ------
    NotPositiveDefiniteError
        ``pᵀAp ≤ 0`` on an unconverged column (``A`` not SPD), or
        ``rᵀM⁻¹r ≤ 0`` on an unconverged column (``M`` not SPD).
    SolverBreakdownError
        NaN or Inf in the iterates.
    TypeError, ValueError
        Invalid inputs, or a ``matvec``/``preconditioner`` output of the wrong
        shape, dtype or device.

    Notes
    -----
    Per iteration: one ``matvec``, one ``preconditioner`` call, and on CPU
    (float32/float64, numba kernels of ``gpsparse.core.fused``) three fused
    passes over ``(n, k)`` blocks, 10 block reads/writes without a
    preconditioner: ``pᵀAp`` (2), ``r ← r − αAp`` with ``‖r‖²`` (3),
    ``x ← x + αp`` with ``p ← z + βp`` (5); with one, ``rᵀz`` costs 2 more.
    Elsewhere (CUDA, other dtypes) the same steps run as torch operations
    (12 passes). Memory: 4 blocks (``x, r, p`` and the matvec output) plus
    the preconditioner's, nothing ``(n, k)``-sized allocated in the loop.

    Examples
    --------
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x, info = cg(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64)), info.iterations
    (True, 2)
    """
    with torch.no_grad():
        problem = _Problem(matvec, rhs, x0, preconditioner, rtol, atol, max_iters)
        return _cg(problem, return_tridiag, check_every=check_every)


def _cg(
    pb: _Problem, return_tridiag: bool, fused: bool | None = None, check_every: int | None = None
) -> tuple[Tensor, SolverInfo]:
    """The CG loop on a validated problem; ``fused`` chooses the column work (``gpsparse.core.fused.column_ops``).

    The solution update ``x ← x + αⱼ‖b‖pⱼ`` is applied in the same pass as
    ``p ← z + βⱼp`` (just before ``pⱼ`` is overwritten): the same arithmetic
    as updating ``x`` right after ``αⱼ`` is known, one pass over ``p`` fewer.
    """
    x, r, thresh2, scale = pb.x, pb.r, pb.thresh2, pb.scale
    matvec, precond = pb.matvec, pb.preconditioner
    zero_ = pb.scalar(0.0)
    its = torch.zeros(pb.thresh2.shape, dtype=torch.int64, device=pb.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    if pb.empty:
        converged = torch.ones_like(pb.zero)
        return pb.finish(
            its,
            torch.zeros_like(pb.thresh2),
            converged,
            _tridiag(alphas, betas, its, pb.dtype) if return_tridiag else None,
        )

    ops = column_ops(r, pb.dot, fused=fused)
    z = precond(r) if precond is not None else r
    rz = ops.dot(r, z)
    rr = ops.dot(r, r) if precond is not None else rz
    converged = rr <= thresh2
    bad_m = ~converged & (rz <= 0)
    nonfinite = _nonfinite(rr) | _nonfinite(rz)
    bad_m_any, nonfinite_any, running = _flags(bad_m, nonfinite, ~converged)
    if bad_m_any:
        _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, rz, 0)
    if nonfinite_any:
        _raise_nonfinite("cg", nonfinite, 0)
    p = z.clone(memory_format=torch.contiguous_format)
    if ops.fused:
        ops.own(x, r, p)

    if check_every is None:
        check_every = 8 if pb.device.type == "cuda" else 1
    if int(check_every) < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every}")
    window: list[tuple] = []  # per iteration since the last look: (iteration, bad_a, pAp, bad_m, rz, nonfinite)
    iteration = 0
    while running and iteration < pb.max_iters:
        iteration += 1
        active = ~converged
        q = matvec(p)
        pAp = ops.dot(p, q)
        alpha = torch.where(active, rz / pAp, zero_)
        rr = ops.residual(r, q, alpha)  # r ← r − αq, and ‖r‖²
        if precond is not None:
            z = precond(r)
            rz_new = ops.dot(r, z)
        else:
            z = r
            rz_new = rr
        its.add_(active)
        converged = converged | (rr <= thresh2)
        beta = torch.where(converged, zero_, rz_new / rz)
        ops.step(x, p, z, alpha * scale, beta)  # x ← x + α‖b‖p, then p ← z + βp
        rz = rz_new
        if return_tridiag:
            alphas.append(alpha)
            betas.append(beta)

        bad_a = active & (pAp <= 0)
        nonfinite = _nonfinite(rr)
        bad_m = torch.zeros_like(bad_a)
        if precond is not None:
            bad_m = ~converged & (rz <= 0)
            nonfinite = nonfinite | _nonfinite(rz)
        window.append((iteration, bad_a, pAp, bad_m, rz, nonfinite))
        if len(window) >= check_every or iteration >= pb.max_iters:
            running = _look(window, converged)
            window = []
    if window:
        _look(window, converged)

    if return_tridiag and len(alphas) > 1:
        steps = int(its.max())  # no-op iterations after the last convergence (check_every > 1) are dropped
        alphas, betas = alphas[: max(steps, 1)], betas[: max(steps, 1)]
    return pb.finish(its, rr, converged, _tridiag(alphas, betas, its, pb.dtype) if return_tridiag else None)


def _look(window: list[tuple], converged: Tensor) -> bool:
    """One host synchronisation for the iterations in ``window``: raise at the first bad one, else ``not converged``.

    Raises ``NotPositiveDefiniteError`` (``pᵀAp ≤ 0``, then ``rᵀM⁻¹r ≤ 0``) or
    ``SolverBreakdownError`` (NaN/Inf) naming the earliest iteration at which it occurred.
    """
    masks = [m for _, bad_a, _, bad_m, _, nonfinite in window for m in (bad_a, bad_m, nonfinite)]
    flags = _flags(*masks, ~converged)
    for position, (iteration, bad_a, pAp, bad_m, rz, nonfinite) in enumerate(window):
        bad_a_any, bad_m_any, nonfinite_any = flags[3 * position : 3 * position + 3]
        if bad_a_any:
            _raise_not_pd("pᵀAp", "matrix", bad_a, pAp, iteration)
        if bad_m_any:
            _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, rz, iteration)
        if nonfinite_any:
            _raise_nonfinite("cg", nonfinite, iteration)
    return flags[-1]


def _tridiag(alphas: list[Tensor], betas: list[Tensor], its: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Lanczos ``(diag, offdiag)`` from the CG coefficients, padded past each column's own steps.

    The CG → Lanczos conversion of linear_operator's mBCG,
    ``diag_j = 1/α_j + β_{j−1}/α_{j−1}``, ``offdiag_j = √β_j / α_j``; entries
    beyond a column's ``its`` steps are padding (``diag = 1``, ``offdiag = 0``,
    ``gpsparse.core.quadrature.pad_tridiagonal``).
    """
    m = len(alphas)
    if m == 0:
        empty = torch.empty(*its.shape, 0, dtype=dtype, device=its.device)
        return empty, empty
    alpha = torch.stack(alphas, dim=-1)  # (*batch, k, m)
    beta = torch.stack(betas, dim=-1)
    inside = torch.arange(m, device=its.device) < its.unsqueeze(-1)
    safe_alpha = torch.where(inside, alpha, 1.0)  # α = 0 once a column has converged
    diag = 1.0 / safe_alpha
    diag[..., 1:] += beta[..., :-1] / safe_alpha[..., :-1]
    off = torch.sqrt(beta[..., :-1].clamp(min=0)) / safe_alpha[..., :-1]
    return pad_tridiagonal(diag, off, its)
