"""Right-preconditioned BiCGSTAB (van der Vorst, 1992) for general square matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core.defaults import DEFAULT_RTOL
from gpsparse.core.krylov.problem import (
    Matvec,
    SolverInfo,
    _flags,
    _nonfinite,
    _Problem,
    _raise_breakdown,
    _raise_nonfinite,
)

__all__ = ["bicgstab"]


def bicgstab(
    matvec: Matvec,
    rhs: Tensor,
    /,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    max_iters: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Right-preconditioned BiCGSTAB (van der Vorst, 1992) for general square ``A``.

    Runs BiCGSTAB on ``A M⁻¹ u = b``, ``x = M⁻¹u``, so the residual it
    carries and tests is the unpreconditioned ``b − A x``:

        r̂ = r₀,  ρ = r̂ᵀr,  β = (ρ/ρ_old)(α/ω),  p ← r + β(p − ω v)
        p̂ = M⁻¹p,  v = A p̂,  α = ρ / r̂ᵀv,  s = r − α v,  x ← x + α p̂
        ŝ = M⁻¹s,  t = A ŝ,  ω = tᵀs / tᵀt,  x ← x + ω ŝ,  r = s − ω t

    A column whose ``s`` already meets the stopping rule takes only the half
    step (``ω = 0``); this is masked, so it costs no extra synchronisation.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on ``(*batch, n, k)`` tensors; ``A`` square, invertible.
    rhs : Tensor
        ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``, real floating.
    x0 : Tensor, optional
        Initial guess, ``rhs``'s shape (default zeros). Not modified.
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r``, any invertible ``M``, applied on the right.
    rtol, atol : float
        Stopping rule ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)`` per column on the
        recursively updated residual.
    max_iters : int, optional
        Default ``min(10·n, 10_000)``. One iteration makes two matvecs.

    Returns
    -------
    x : Tensor
        ``rhs``'s shape.
    info : SolverInfo
        ``tridiag`` is None.

    Raises
    ------
    SolverBreakdownError
        ``ρ = r̂ᵀr`` vanishes (``|ρ| ≤ ε²‖r̂‖‖r‖``), ``r̂ᵀv = 0``, ``tᵀt = 0``
        for ``s ≠ 0``, or ``ω`` vanishes (``|tᵀs| ≤ ε²‖t‖‖s‖``) on an
        unconverged column; NaN/Inf in the iterates.
    TypeError, ValueError
        Invalid inputs or ``matvec``/``preconditioner`` output.

    Notes
    -----
    Per iteration two ``matvec`` and two ``preconditioner`` calls and about
    30 passes over ``(n, k)`` blocks. Memory: 6 blocks plus the callables'.

    Examples
    --------
    >>> A = torch.tensor([[3.0, 2.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> x, info = bicgstab(lambda v: A @ v, b)
    >>> torch.allclose(A @ x, b), bool(info.converged)
    (True, True)
    """
    with torch.no_grad():
        problem = _Problem(matvec, rhs, x0, preconditioner, rtol, atol, max_iters)
        return _bicgstab(problem)


def _bicgstab(pb: _Problem) -> tuple[Tensor, SolverInfo]:
    x, r, dot, thresh2, scale = pb.x, pb.r, pb.dot, pb.thresh2, pb.scale
    matvec, precond = pb.matvec, pb.preconditioner
    zero_ = pb.scalar(0.0)
    its = torch.zeros(thresh2.shape, dtype=torch.int64, device=pb.device)
    if pb.empty:
        return pb.finish(its, torch.zeros_like(pb.thresh2), torch.ones_like(pb.zero))

    rr = dot(r, r)
    converged = rr <= thresh2
    nonfinite = _nonfinite(rr)
    nonfinite_any, running = _flags(nonfinite, ~converged)
    if nonfinite_any:
        _raise_nonfinite("bicgstab", nonfinite, 0)
    rhat = r.clone()  # shadow residual r̂ = r₀
    rhat_norm = torch.sqrt(rr)
    rho = rr.clone()
    one = torch.ones_like(rr)
    rho_old, alpha, omega = one, one, one
    p, v = pb.zeros(), pb.zeros()
    tiny2 = pb.eps * pb.eps

    iteration = 0
    while running and iteration < pb.max_iters:
        iteration += 1
        active = ~converged
        beta = torch.where(active, (rho / rho_old) * (alpha / omega), zero_)
        p.addcmul_(v, (-omega).unsqueeze(-2))
        torch.addcmul(r, p, beta.unsqueeze(-2), out=p)
        phat = precond(p) if precond is not None else p
        v.copy_(matvec(phat))  # v is needed after the next matvec call: keep our own copy
        rv = dot(rhat, v)
        bad_rv = active & (rv == 0)
        alpha = torch.where(active & ~bad_rv, rho / rv, zero_)
        r.addcmul_(v, (-alpha).unsqueeze(-2))  # r now holds s
        x.addcmul_(phat, (alpha * scale).unsqueeze(-2))
        ss = dot(r, r)
        full = active & (ss > thresh2)
        shat = precond(r) if precond is not None else r
        t = matvec(shat)
        ts = dot(t, r)
        tt = dot(t, t)
        bad_tt = full & (tt == 0)
        omega = torch.where(full & ~bad_tt, ts / tt, zero_)
        x.addcmul_(shat, (omega * scale).unsqueeze(-2))  # before r changes: shat may be r itself
        r.addcmul_(t, (-omega).unsqueeze(-2))
        rr = dot(r, r)
        rho_old, rho = rho, dot(rhat, r)
        its.add_(active)
        converged = converged | (rr <= thresh2)

        going = ~converged
        bad_omega = going & full & ~bad_tt & (ts.abs() <= tiny2 * torch.sqrt(tt * ss))
        bad_rho = going & (rho.abs() <= tiny2 * rhat_norm * torch.sqrt(rr))
        nonfinite = _nonfinite(rr) | _nonfinite(rho) | _nonfinite(ss)
        flags = _flags(nonfinite, bad_rv, bad_tt, bad_omega, bad_rho, going)
        nonfinite_any, bad_rv_any, bad_tt_any, bad_omega_any, bad_rho_any, running = flags
        if nonfinite_any:
            _raise_nonfinite("bicgstab", nonfinite, iteration)
        if bad_rv_any:
            _raise_breakdown("bicgstab", "r̂ᵀv", bad_rv, rv, iteration)
        if bad_tt_any:
            _raise_breakdown("bicgstab", "tᵀt (A M⁻¹ s = 0 for s ≠ 0)", bad_tt, tt, iteration)
        if bad_omega_any:
            _raise_breakdown("bicgstab", "ω = tᵀs / tᵀt", bad_omega, ts / tt, iteration)
        if bad_rho_any:
            _raise_breakdown("bicgstab", "ρ = r̂ᵀr", bad_rho, rho, iteration)

    return pb.finish(its, rr, converged)
