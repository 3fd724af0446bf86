r"""The adjoint (reverse mode) of the Lanczos iteration of ``gpsparse.core.lanczos``.

``lanczos_adjoint`` is the exact reverse mode of
``lanczos``: given the cotangents of the outputs
it returns the gradient with respect to the start vectors and the gradient
with respect to ``A`` as a low-rank product ``left @ rightᵀ`` that the caller
samples at the nonzeros of a sparse ``A``. It runs backwards over the K steps
with one ``matvec`` per step, from the stored basis and coefficients only (no
autograd tape), following Krämer, Moreno-Muñoz, Roy & Hauberg, "Gradients of
functions of large matrices" (NeurIPS 2024). A pure tensor function (no
gpytorch, no autograd Function); it runs inside ``torch.no_grad()``. The
forward recurrence, the breakdown rule and the padding are documented in
``gpsparse.core.lanczos``.

The adjoint recurrence (derivation)
-----------------------------------
Reverse-mode differentiation of the forward loop (``gpsparse.core.lanczos``), step by step from ``k = K``
down to 1. Write ``x̄ = ∂L/∂x``. When step ``k`` is reversed, the adjoints of
its outputs are complete: ``q̄_{k+1}`` (``q_{k+1}`` is used only in steps
``k+1`` and ``k+2``, already reversed) and ``β̄_k`` (used only in step
``k+1``); ``ᾱ_k`` is the incoming cotangent. Reversing each assignment:

* ``q_{k+1} = r_k/β_k``, ``β_k = ‖r_k‖``: ``dq_{k+1} = (I − q_{k+1}q_{k+1}ᵀ) dr_k / β_k``
    and ``dβ_k = q_{k+1}ᵀ dr_k``, hence

        r̄_k = (q̄_{k+1} − (q_{k+1}ᵀ q̄_{k+1}) q_{k+1}) / β_k + β̄_k q_{k+1}      (r̄_K = 0)

* ``r_k = w_k − α_k q_k − β_{k−1} q_{k−1}``: ``w̄_k = r̄_k``,
    ``ᾱ_k −= q_kᵀ r̄_k``, ``q̄_k −= α_k r̄_k``, ``β̄_{k−1} −= q_{k−1}ᵀ r̄_k``,
    ``q̄_{k−1} −= β_{k−1} r̄_k``.
* ``α_k = q_kᵀ w_k``: ``q̄_k += ᾱ_k w_k``, ``w̄_k += ᾱ_k q_k``. So the
    multiplier of step ``k`` is ``λ_k := w̄_k = r̄_k + ᾱ_k q_k``.
* ``w_k = A q_k``: ``Ā += λ_k q_kᵀ`` and ``q̄_k += Aᵀ λ_k``.

``A`` is symmetric, and ``ᾱ_k w_k = A(ᾱ_k q_k)`` since ``w_k = A q_k``
exactly, so both matrix products fold into **one matvec per step** and
nothing of the forward pass but ``Q``, ``α`` and ``β`` is needed:

    λ_k       = r̄_k + ᾱ_k q_k                   (ᾱ_k after subtracting q_kᵀ r̄_k)
    q̄_k      += A(λ_k + ᾱ_k q_k) − α_k r̄_k      (now complete)
    q̄_{k−1}  += −β_{k−1} r̄_k,    β̄_{k−1} += −q_{k−1}ᵀ r̄_k
    ∂L/∂A     = Σ_k λ_k q_kᵀ
    v̄         = (q̄₁ − (q₁ᵀ q̄₁) q₁) / ‖v‖ + (∂L/∂‖v‖) q₁

(The ``λ_k`` are the Lagrange multipliers of Krämer et al.'s constrained
formulation; they are obtained here by plain reverse mode of the loop.)

**Symmetry.** Only the symmetric part ``½(G + Gᵀ)`` of ``G = Σ_k λ_k q_kᵀ``
is meaningful: for a symmetric ``A`` every ordering of the recurrence (and
re-orthogonalisation) computes the same ``(Q, T)``, so their derivatives
agree along symmetric perturbations only. A caller whose values
parameterise a symmetric matrix must symmetrise (``½(left rightᵀ + right
leftᵀ)``, or ``(g[e] + g[eᵀ])/2`` on the pattern).

**Re-orthogonalisation and stability: reverse the loop that ran.** In
exact arithmetic re-orthogonalisation changes nothing, but in floating point
the adjoint must reverse the computation that actually ran. The adjoint
recursion is a three-term recurrence driven by ``A``, run backwards; reversing
a re-orthogonalised forward pass with the plain adjoint amplifies rounding
errors along converged Ritz vectors by about ``|θ − α_k|/β_k`` per step, and
so does the opposite mismatch, although the exact derivatives stay moderate.
Measured on ``∇ Σ vᵀlog(A)v`` by quadrature, spectrum ``[1, 2] ∪ {50, 80,
100, 120}``, ``n = 40`` (relative error against dense ``eigh``):

    K                 20        30        40
    plain → plain     2e-14     1e-14     4e-14   (forward has lost orthogonality: ghost Ritz values)
    reorth → reorth   1e-14     4e-14     2e-14
    reorth → plain    1e-9      1e19      1e47
    plain → reorth    8e-9      3e10      1e34

So with re-orthogonalisation the adjoint also reverses
``r_k ← (I − Q_k Q_kᵀ) r_k`` (``Q_k = [q₁ … q_k]``). Then ``Q_kᵀ r_k ≈ 0``
and ``r_k = β_k q_{k+1}``, so its reverse is

    r̄_k ← (I − Q_k Q_kᵀ) r̄_k        (classical Gram–Schmidt twice, as in the forward pass)
    q̄_j −= (q_jᵀ r̄_k) β_k q_{k+1}   for j ≤ k        (coefficients summed over both passes)

applied to ``r̄_k`` before it is used above (then ``q_kᵀ r̄_k = q_{k−1}ᵀ r̄_k
= 0``). The ``q̄_j`` terms are kept as a ``K × (K − 1)`` matrix
``C[j, m] = β_m q_jᵀ r̄_m`` per column and added when step ``j`` is reversed
(``q̄_j −= Σ_{m≥j} C[j, m] q_{m+1}``), so no ``n × K`` buffer besides the
output is needed. ``LanczosDecomposition`` records which forward pass
ran and ``lanczos_adjoint`` follows it. Both pairs match autograd through
the same loop to ~1e-15 (``tests/test_tridiag.py``).

Breakdown
---------
The adjoint treats a column's stop at step ``k < K``
(``gpsparse.core.lanczos``) as a fixed decision: it differentiates the
``k``-step map (cotangents of the padding are ignored; step ``k`` is reversed
as a last step, ``r̄_k = 0``), which is smooth, and for Gauss quadrature
``e₁ᵀf(T_k)e₁`` it is the gradient of ``vᵀf(A)v`` itself (the quadrature
error is second order in the perturbation that breaks invariance).

Memory and cost
---------------
K matvecs, the output ``left`` ``(*batch, n, p, K)``, a few ``(*batch, n, p)``
work blocks and (re-orthogonalised) the ``(*batch, p, K, K − 1)``
coefficients ``C`` plus ``O(n·p·k)`` work per step; ``right`` is a view of
the basis. Nothing ``n × n`` is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core.columns import column_dot
from gpsparse.core.krylov.problem import Matvec, _checked
from gpsparse.core.lanczos import LanczosDecomposition, _coefficients, _combine

__all__ = ["lanczos_adjoint"]


def lanczos_adjoint(
    matvec: Matvec,
    decomposition: LanczosDecomposition,
    grad_basis: Tensor | None,
    grad_alpha: Tensor | None,
    grad_beta: Tensor | None,
    *,
    grad_norm: Tensor | None = None,
    reorthogonalize: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Reverse mode of ``lanczos``: gradients w.r.t. the start vectors and ``A``.

    Runs the adjoint recurrence of the module docstring backwards over the
    steps, one ``matvec`` per step, from the stored ``basis``, ``alpha`` and
    ``beta`` only:

        r̄_k = (q̄_{k+1} − (q_{k+1}ᵀq̄_{k+1}) q_{k+1}) / β_k + β̄_k q_{k+1}   (r̄_K = 0)
        [re-orthogonalisation: r̄_k ← (I − Q_kQ_kᵀ) r̄_k,  q̄_j −= (q_jᵀr̄_k) β_k q_{k+1}, j ≤ k]
        ᾱ_k ← ᾱ_k − q_kᵀ r̄_k,    λ_k = r̄_k + ᾱ_k q_k
        q̄_k ← q̄_k + A(λ_k + ᾱ_k q_k) − α_k r̄_k
        q̄_{k−1} ← q̄_{k−1} − β_{k−1} r̄_k,    β̄_{k−1} ← β̄_{k−1} − q_{k−1}ᵀ r̄_k
        ∂L/∂v = (q̄₁ − (q₁ᵀq̄₁) q₁)/‖v‖ + (∂L/∂‖v‖) q₁,    ∂L/∂A = Σ_k λ_k q_kᵀ

    Parameters
    ----------
    matvec : callable
        The ``matvec`` of the forward pass (``A`` symmetric), on
        ``(*batch, n, p)`` blocks.
    decomposition : LanczosDecomposition
        The output of ``lanczos`` (with or without re-orthogonalisation).
    grad_basis, grad_alpha, grad_beta : Tensor or None
        Cotangents ``∂L/∂basis (*batch, n, p, K)``, ``∂L/∂alpha (*batch, p,
        K)``, ``∂L/∂beta (*batch, p, K − 1)``; None means zero. Entries at the
        padding after a breakdown are ignored (the padding is constant).
    grad_norm : Tensor, optional
        ``∂L/∂norm (*batch, p)``; None means zero.
    reorthogonalize : bool, optional
        Whether to reverse the re-orthogonalisation too (module docstring:
        projects every adjoint vector against the basis, ``O(n·p·k)`` per
        step). Default: ``decomposition.reorthogonalized``, i.e. reverse the
        computation that actually ran. Overriding it is for experiments only:
        a mismatched pair is unstable once Ritz values converge.

    Returns
    -------
    grad_v : Tensor
        ``(*batch, n, p)``, ``∂L/∂v``.
    left, right : Tensor
        ``(*batch, n, m)`` with ``m = p·K``: ``∂L/∂A = left @ rightᵀ``,
        ``left[..., c·K + k] = λ_{k+1}`` of column ``c`` and ``right`` the
        basis reshaped (a view of it, no copy, for a basis from
        ``lanczos``). Both are column-major (``stride(-2) == 1``: each of
        the ``m`` columns is contiguous, so a sampler can loop over column
        chunks). Sample the product at the nonzeros,
        ``g[e] = Σ_c left[i_e, c]·right[j_e, c]``; never form it.
        Only its symmetric part is meaningful (module docstring): for values
        that parameterise a symmetric ``A`` use ``(g[e] + g[eᵀ])/2``.

    Raises
    ------
    TypeError
        ``matvec`` not callable, ``decomposition`` not a
        ``LanczosDecomposition``, a cotangent not a tensor.
    ValueError
        A cotangent of the wrong shape, dtype or device, or a ``matvec``
        output of the wrong shape, dtype or device.

    Notes
    -----
    K ``matvec`` calls and about 10 passes over ``(n, p)`` blocks per step,
    plus about 6 passes over the ``k`` stored vectors with
    ``reorthogonalize=True`` (``O(n·p·K²)`` in all, as in the forward pass).
    Memory: ``left`` (``n·p·K``), 4 ``(n, p)`` blocks and ``p·K²`` numbers
    (plus one copy of the basis if it does not have ``lanczos``' layout).
    A column whose ``β_k`` are tiny but above the breakdown threshold gives
    large (correct) gradients: the map ``(A, v) ↦ Q`` is then
    ill-conditioned.

    Examples
    --------
    Gradient of ``α₁ = vᵀAv/‖v‖²`` is ``q₁q₁ᵀ`` (w.r.t. ``A``):

    >>> A = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64))
    >>> v = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    >>> from gpsparse.core.lanczos import lanczos
    >>> dec = lanczos(lambda x: A @ x, v, 2)
    >>> ga = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> gv, left, right = lanczos_adjoint(lambda x: A @ x, dec, None, ga, None)
    >>> G = left @ right.T
    >>> q = v / v.norm()
    >>> torch.allclose((G + G.T) / 2, q @ q.T)
    True
    """
    if not callable(matvec):
        raise TypeError(f"matvec must be callable X -> A X, got {type(matvec).__name__}")
    if not isinstance(decomposition, LanczosDecomposition):
        raise TypeError(f"decomposition must be a LanczosDecomposition, got {type(decomposition).__name__}")
    Q = decomposition.basis
    *batch, n, p, K = Q.shape
    ref = decomposition.alpha
    grad_basis = _cotangent(grad_basis, "grad_basis", Q.shape, ref)
    grad_alpha = _cotangent(grad_alpha, "grad_alpha", decomposition.alpha.shape, ref)
    grad_beta = _cotangent(grad_beta, "grad_beta", decomposition.beta.shape, ref)
    grad_norm = _cotangent(grad_norm, "grad_norm", decomposition.norm.shape, ref)
    with torch.no_grad():
        if reorthogonalize is None:
            reorthogonalize = decomposition.reorthogonalized
        return _adjoint(
            _checked(matvec, "matvec"),
            decomposition,
            grad_basis,
            grad_alpha,
            grad_beta,
            grad_norm,
            bool(reorthogonalize),
        )


def _adjoint(
    matvec: Matvec,
    dec: LanczosDecomposition,
    grad_basis: Tensor | None,
    grad_alpha: Tensor | None,
    grad_beta: Tensor | None,
    grad_norm: Tensor | None,
    reorthogonalize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    alpha, beta, norm, steps = dec.alpha, dec.beta, dec.norm, dec.steps
    *batch, n, p, K = dec.basis.shape
    dtype, device = alpha.dtype, alpha.device
    Qs = dec.basis.movedim(-3, -1).contiguous()  # (*batch, p, K, n): no copy for lanczos' own
    Q = Qs.movedim(-1, -3)  # (*batch, n, p, K) view
    index = torch.arange(K, device=device)
    valid = index < steps.unsqueeze(-1)  # (*batch, p, K): step k is real data
    # cotangents of the constant padding are dropped
    abar_in = torch.where(valid, grad_alpha, 0.0) if grad_alpha is not None else torch.zeros_like(alpha)
    bbar_in = torch.where(valid[..., 1:], grad_beta, 0.0) if grad_beta is not None else torch.zeros_like(beta)
    binv = torch.where(beta > 0, 1.0 / torch.where(beta > 0, beta, 1.0), 0.0)  # 0 where stopped
    # C[..., j, m] = β_m·q_jᵀr̄_m: the re-orthogonalisation of step m adds −C[j, m] q_{m+1} to q̄_j (j ≤ m)
    C = torch.zeros(*batch, p, K, K - 1, dtype=dtype, device=device) if reorthogonalize and K > 1 else None

    def qbar_in(k: int) -> Tensor:
        if grad_basis is None:
            return torch.zeros(*batch, n, p, dtype=dtype, device=device)
        return torch.where(valid[..., k].unsqueeze(-2), grad_basis[..., k], 0.0)

    left = torch.empty(*batch, p, K, n, dtype=dtype, device=device).movedim(-1, -3)  # same layout as Q
    qbar_next: Tensor | None = None  # complete q̄_{k+1}
    qn: Tensor | None = None  # q_{k+1}, contiguous
    qbar = qbar_in(K - 1)  # partial q̄_k: cotangent plus the contribution of step k+1
    bbar = None  # complete β̄_k
    for k in range(K - 1, -1, -1):
        q = Q[..., k].contiguous()
        if qbar_next is None:  # k = K − 1: r̄_K = 0
            rbar = torch.zeros_like(qbar)
        else:
            coef = bbar - column_dot(qn, qbar_next) * binv[..., k]
            rbar = torch.mul(qbar_next, binv[..., k].unsqueeze(-2))
            rbar.addcmul_(qn, coef.unsqueeze(-2))
            if C is not None:
                # reverse of r ← (I − Q_k Q_kᵀ) r (twice): project r̄, and q̄_j −= (q_jᵀr̄) β_k q_{k+1}
                Qk = Qs[..., : k + 1, :]
                total = None
                for _ in range(2):
                    c = _coefficients(Qk, rbar)
                    rbar.sub_(_combine(Qk, c))
                    total = c if total is None else total.add_(c)
                C[..., : k + 1, k] = total * beta[..., k].unsqueeze(-1)
        if C is not None and k < K - 1:
            # every later step m ≥ k has added its re-orthogonalisation term to q̄_k now
            qbar.sub_(_combine(Qs[..., k + 1 :, :], C[..., k, k:]))
        abar = abar_in[..., k] - column_dot(q, rbar)
        lam = torch.addcmul(rbar, q, abar.unsqueeze(-2))
        left[..., k] = lam
        z = matvec(lam.addcmul_(q, abar.unsqueeze(-2)))  # A(λ_k + ᾱ_k q_k); lam is not needed any more
        qbar.add_(z).addcmul_(rbar, -alpha[..., k].unsqueeze(-2))
        if k > 0:
            bbar = bbar_in[..., k - 1] - column_dot(Q[..., k - 1], rbar)
            qbar_prev = qbar_in(k - 1).addcmul_(rbar, -beta[..., k - 1].unsqueeze(-2))
        else:
            qbar_prev = None
        qbar_next, qbar, qn = qbar, qbar_prev, q
    qbar1, q1 = qbar_next, qn
    grad_v = torch.addcmul(qbar1, q1, -column_dot(q1, qbar1).unsqueeze(-2)).div_(norm.unsqueeze(-2))
    if grad_norm is not None:
        grad_v.addcmul_(q1, grad_norm.unsqueeze(-2))
    m = p * K
    return grad_v, left.reshape(*batch, n, m), Q.reshape(*batch, n, m)


def _cotangent(grad: Tensor | None, name: str, shape: torch.Size, ref: Tensor) -> Tensor | None:
    if grad is None:
        return None
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(grad.shape)}")
    if grad.dtype != ref.dtype or grad.device != ref.device:
        raise ValueError(
            f"{name} must have the decomposition's dtype and device ({ref.dtype} on {ref.device}), "
            f"got {grad.dtype} on {grad.device}"
        )
    return grad
