"""Preconditioned MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite matrices."""

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
    _raise_not_pd,
)

__all__ = ["minres"]


def minres(
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
    r"""Preconditioned MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite ``A``.

    Minimises ``‖b − A x‖_{M⁻¹}`` over ``x₀ + K_j(M⁻¹A, M⁻¹r₀)`` with the
    symmetric Lanczos process on ``L⁻¹AL⁻ᵀ`` (``M = LLᵀ``) and Givens QR of
    its tridiagonal; the recurrences follow SciPy's ``minres`` (a port of
    Paige & Saunders' Fortran code), vectorised over columns.

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on ``(*batch, n, k)`` tensors, ``A`` symmetric (indefinite
        allowed; nonsingular on the Krylov space, or the system consistent).
    rhs : Tensor
        ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``, real floating.
    x0 : Tensor, optional
        Initial guess, ``rhs``'s shape (default zeros). Not modified.
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r``, ``M`` symmetric positive definite.
    rtol, atol : float
        Stopping rule ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)`` per column, on
        the residual-norm estimate ``φ̄ⱼ`` without a preconditioner; with one,
        on a recursively updated 2-norm residual
        ``rⱼ = sⱼ² rⱼ₋₁ − φ̄ⱼ cⱼ (M-Lanczos vector)`` (Choi, Paige &
        Saunders, 2011), because ``φ̄ⱼ`` is then the ``M⁻¹``-norm.
    max_iters : int, optional
        Default ``min(10·n, 10_000)``.

    Returns
    -------
    x : Tensor
        ``rhs``'s shape.
    info : SolverInfo
        ``tridiag`` is None.

    Raises
    ------
    NotPositiveDefiniteError
        ``rᵀM⁻¹r < 0`` on an unconverged column (``M`` not SPD).
    SolverBreakdownError
        The rotated diagonal ``γ`` of the QR factor vanishes
        (``γ ≤ ε·‖T‖_F``: ``A`` singular on the Krylov space of an
        inconsistent column), or NaN/Inf in the iterates.
    TypeError, ValueError
        Invalid inputs or ``matvec``/``preconditioner`` output.

    Notes
    -----
    Per iteration one ``matvec``, one ``preconditioner`` call and about 22
    passes over ``(n, k)`` blocks (+8 with a preconditioner). Memory: 8
    blocks (9 with a preconditioner).

    Examples
    --------
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    >>> x, info = minres(lambda v: A @ v, b)
    >>> torch.allclose(A @ x, b), bool(info.converged)
    (True, True)
    """
    with torch.no_grad():
        problem = _Problem(matvec, rhs, x0, preconditioner, rtol, atol, max_iters)
        return _minres(problem)


def _minres(pb: _Problem) -> tuple[Tensor, SolverInfo]:
    x, dot, thresh2, scale = pb.x, pb.dot, pb.thresh2, pb.scale
    matvec, precond = pb.matvec, pb.preconditioner
    zero_, one_ = pb.scalar(0.0), pb.scalar(1.0)
    its = torch.zeros(thresh2.shape, dtype=torch.int64, device=pb.device)
    if pb.empty:
        return pb.finish(its, torch.zeros_like(pb.thresh2), torch.ones_like(pb.zero))

    r1 = pb.r  # b − A x₀ (own)
    y = precond(r1) if precond is not None else r1
    beta2 = dot(r1, y)
    rr = dot(r1, r1) if precond is not None else beta2
    converged = rr <= thresh2
    bad_m = ~converged & (beta2 <= 0)
    nonfinite = _nonfinite(rr) | _nonfinite(beta2)
    bad_m_any, nonfinite_any, running = _flags(bad_m, nonfinite, ~converged)
    if bad_m_any:
        _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, beta2, 0)
    if nonfinite_any:
        _raise_nonfinite("minres", nonfinite, 0)

    beta = torch.sqrt(beta2.clamp(min=0))
    zero = torch.zeros_like(beta)
    oldb, dbar, epsln, tnorm2, sn = zero, zero, zero, zero, zero
    cs = torch.full_like(beta, -1.0)
    phibar = beta
    r2 = r1
    # true residual, carried only with a preconditioner (φ̄ is then the M⁻¹-norm)
    res = r1.clone() if precond is not None else None
    v = pb.new()
    w, w2 = pb.zeros(), pb.zeros()  # w_{j−1}, w_{j−2}
    spare: Tensor | None = None  # the free one of the three r1/r2/y buffers
    tiny = pb.eps

    iteration = 0
    while running and iteration < pb.max_iters:
        iteration += 1
        active = ~converged
        s = torch.where(active, 1.0 / beta, zero_)  # inactive columns: v = 0, so their vectors decay to 0
        torch.mul(y, s.unsqueeze(-2), out=v)
        av = matvec(v)
        if spare is None:
            spare = pb.new()
        if iteration == 1:
            alfa = dot(v, av)
            torch.addcmul(av, r2, (-alfa * s).unsqueeze(-2), out=spare)
        else:
            c1 = torch.where(active, beta / oldb, zero_)
            torch.addcmul(av, r1, (-c1).unsqueeze(-2), out=spare)
            alfa = dot(v, spare)
            spare.addcmul_(r2, (-alfa * s).unsqueeze(-2))
        if iteration == 1:
            r1, r2, spare = r2, spare, None
        else:
            r1, r2, spare = r2, spare, r1
        y = precond(r2) if precond is not None else r2
        oldb = beta
        beta2 = dot(r2, y)
        beta = torch.sqrt(beta2.clamp(min=0))
        tnorm2 = tnorm2 + alfa * alfa + oldb * oldb + beta2.clamp(min=0)

        # apply the previous rotation, then compute the next one
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma_raw = torch.hypot(gbar, beta)
        bad_gamma = active & (gamma_raw <= tiny * torch.sqrt(tnorm2))
        gamma = torch.where(active & ~bad_gamma, gamma_raw, one_)
        cs = gbar / gamma
        sn = beta / gamma
        phi = torch.where(active, cs * phibar, zero_)
        phibar = torch.where(active, sn * phibar, phibar)

        # w_j = (v − ε w_{j−2} − δ w_{j−1}) / γ, written over w_{j−2}
        denom = 1.0 / gamma
        w2.mul_((-oldeps * denom).unsqueeze(-2))
        w2.addcmul_(w, (-delta * denom).unsqueeze(-2))
        w2.addcmul_(v, denom.unsqueeze(-2))
        w, w2 = w2, w
        x.addcmul_(w, (phi * scale).unsqueeze(-2))

        if res is None:
            rr = phibar * phibar
        else:
            # r_j = s_j² r_{j−1} − φ̄_j c_j (r2 / β_{j+1})
            coef = torch.where(active & (beta > 0), phibar * cs / torch.where(beta > 0, beta, one_), zero_)
            res.mul_(torch.where(active, sn * sn, one_).unsqueeze(-2))
            res.addcmul_(r2, (-coef).unsqueeze(-2))
            rr = dot(res, res)
        its.add_(active)
        converged = converged | (rr <= thresh2)

        bad_m = active & (beta2 < 0)
        nonfinite = _nonfinite(rr) | _nonfinite(alfa) | _nonfinite(beta2)
        bad_gamma_any, bad_m_any, nonfinite_any, running = _flags(bad_gamma, bad_m, nonfinite, ~converged)
        if nonfinite_any:
            _raise_nonfinite("minres", nonfinite, iteration)
        if bad_m_any:
            _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, beta2, iteration)
        if bad_gamma_any:
            _raise_breakdown("minres", "γ (rotated diagonal of the QR factor)", bad_gamma, gamma_raw, iteration)

    return pb.finish(its, rr, converged)
