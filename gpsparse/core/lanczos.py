r"""Lanczos tridiagonalisation of a symmetric matrix and its adjoint (reverse mode), on a ``matvec`` closure.

:func:`lanczos` runs ``K = num_lanczos`` steps of the symmetric Lanczos
iteration from each of ``p`` start vectors at once (the columns of one block,
so every step costs one SpMM for all of them) and returns the Krylov basis and
the tridiagonal coefficients as a :class:`LanczosDecomposition`.
:func:`lanczos_adjoint` is the exact reverse mode of that iteration: given the
cotangents of the outputs it returns the gradient with respect to the start
vectors and the gradient with respect to ``A`` as a low-rank product
``left @ rightᵀ`` that the caller samples at the nonzeros of a sparse ``A``.
It runs backwards over the K steps with one ``matvec`` per step, from the
stored basis and coefficients only (no autograd tape), following Krämer,
Moreno-Muñoz, Roy & Hauberg, "Gradients of functions of large matrices"
(NeurIPS 2024). Both are pure tensor functions (no gpytorch, no autograd
Function); they run inside ``torch.no_grad()``.

The forward recurrence (per column; ``q₀ = 0``, ``β₀ = 0``)
----------------------------------------------------------
::

    q₁ = v / ‖v‖
    for k = 1 … K:
        w_k = A q_k
        α_k = q_kᵀ w_k
        r_k = w_k − α_k q_k − β_{k−1} q_{k−1}       [optionally re-orthogonalised against q₁ … q_k]
        if k < K:  β_k = ‖r_k‖,   q_{k+1} = r_k / β_k

so that ``A Q = Q T + r_K e_Kᵀ`` with ``T = tridiag(β, α, β)``. The code
computes ``α_k = q_kᵀ(w_k − β_{k−1}q_{k−1})`` (Paige's ordering, equal in
exact arithmetic) and, with ``reorthogonalize=True``, runs classical
Gram–Schmidt twice against the stored basis after the three-term update.

The adjoint recurrence (derivation)
-----------------------------------
Reverse-mode differentiation of the loop above, step by step from ``k = K``
down to 1. Write ``x̄ = ∂L/∂x``. When step ``k`` is reversed, the adjoints of
its outputs are complete: ``q̄_{k+1}`` (``q_{k+1}`` is used only in steps
``k+1`` and ``k+2``, already reversed) and ``β̄_k`` (used only in step
``k+1``); ``ᾱ_k`` is the incoming cotangent. Reversing each assignment:

* ``q_{k+1} = r_k/β_k``, ``β_k = ‖r_k‖``: ``dq_{k+1} = (I − q_{k+1}q_{k+1}ᵀ) dr_k / β_k``
  and ``dβ_k = q_{k+1}ᵀ dr_k``, hence ::

      r̄_k = (q̄_{k+1} − (q_{k+1}ᵀ q̄_{k+1}) q_{k+1}) / β_k + β̄_k q_{k+1}      (r̄_K = 0)

* ``r_k = w_k − α_k q_k − β_{k−1} q_{k−1}``: ``w̄_k = r̄_k``,
  ``ᾱ_k −= q_kᵀ r̄_k``, ``q̄_k −= α_k r̄_k``, ``β̄_{k−1} −= q_{k−1}ᵀ r̄_k``,
  ``q̄_{k−1} −= β_{k−1} r̄_k``.
* ``α_k = q_kᵀ w_k``: ``q̄_k += ᾱ_k w_k``, ``w̄_k += ᾱ_k q_k``. So the
  multiplier of step ``k`` is ``λ_k := w̄_k = r̄_k + ᾱ_k q_k``.
* ``w_k = A q_k``: ``Ā += λ_k q_kᵀ`` and ``q̄_k += Aᵀ λ_k``.

``A`` is symmetric, and ``ᾱ_k w_k = A(ᾱ_k q_k)`` since ``w_k = A q_k``
exactly, so both matrix products fold into **one matvec per step** and
nothing of the forward pass but ``Q``, ``α`` and ``β`` is needed::

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
100, 120}``, ``n = 40`` (relative error against dense ``eigh``)::

    K                 20        30        40
    plain → plain     2e-14     1e-14     4e-14   (forward has lost orthogonality: ghost Ritz values)
    reorth → reorth   1e-14     4e-14     2e-14
    reorth → plain    1e-9      1e19      1e47
    plain → reorth    8e-9      3e10      1e34

So with re-orthogonalisation the adjoint also reverses
``r_k ← (I − Q_k Q_kᵀ) r_k`` (``Q_k = [q₁ … q_k]``). Then ``Q_kᵀ r_k ≈ 0``
and ``r_k = β_k q_{k+1}``, so its reverse is ::

    r̄_k ← (I − Q_k Q_kᵀ) r̄_k        (classical Gram–Schmidt twice, as in the forward pass)
    q̄_j −= (q_jᵀ r̄_k) β_k q_{k+1}   for j ≤ k        (coefficients summed over both passes)

applied to ``r̄_k`` before it is used above (then ``q_kᵀ r̄_k = q_{k−1}ᵀ r̄_k
= 0``). The ``q̄_j`` terms are kept as a ``K × (K − 1)`` matrix
``C[j, m] = β_m q_jᵀ r̄_m`` per column and added when step ``j`` is reversed
(``q̄_j −= Σ_{m≥j} C[j, m] q_{m+1}``), so no ``n × K`` buffer besides the
output is needed. :class:`LanczosDecomposition` records which forward pass
ran and :func:`lanczos_adjoint` follows it. Both pairs match autograd through
the same loop to ~1e-15 (``tests/test_lanczos.py``).

Breakdown
---------
A column stops at step ``k < K`` when ``β_k ≤ tol·‖T‖`` with ``‖T‖`` the
running estimate ``max_{j≤k} (α_j² + β_{j−1}² + β_j²)^{1/2}`` (≈ ``max ‖A
q_j‖``, a lower bound on ``‖A‖``) and ``tol = breakdown_tol`` (default
``√ε`` of the dtype), or at step ``n`` (the Krylov space cannot be larger).
The Krylov space of that column is then invariant (up to ``tol``): its later
basis vectors are 0, its later ``α`` are 1 and its ``β`` from step ``k`` on
are 0, so ``T = T_k ⊕ I`` and ``e₁ᵀ f(T) e₁ = e₁ᵀ f(T_k) e₁`` for any ``f``
with ``f(1)`` finite; ``steps`` records ``k``. The adjoint treats the
stop as a fixed decision: it differentiates the ``k``-step map (cotangents
of the padding are ignored; step ``k`` is reversed as a last step,
``r̄_k = 0``), which is smooth, and for Gauss quadrature ``e₁ᵀf(T_k)e₁`` it is
the gradient of ``vᵀf(A)v`` itself (the quadrature error is second order in
the perturbation that breaks invariance).

Memory and cost
---------------
Forward: the basis ``(*batch, n, p, K)`` is allocated once; K matvecs on
``(*batch, n, p)`` blocks, plus ``O(n·p·k)`` work per step with
re-orthogonalisation. Adjoint: K matvecs, the output ``left`` ``(*batch, n,
p, K)``, a few ``(*batch, n, p)`` work blocks and (re-orthogonalised) the
``(*batch, p, K, K − 1)`` coefficients ``C`` plus ``O(n·p·k)`` work per step;
``right`` is a view of the basis. Nothing ``n × n`` is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gpsparse.core.krylov import _checked
from gpsparse.errors import SolverBreakdownError

__all__ = ["LanczosDecomposition", "lanczos", "lanczos_adjoint"]

Matvec = Callable[[Tensor], Tensor]

_GEMM_DOT_MAX_COLUMNS = 32  # above this, aᵀb costs p× more flops than it saves in memory traffic


@dataclass(frozen=True, eq=False)
class LanczosDecomposition:
    """The output of :func:`lanczos`: ``A Q ≈ Q T`` per start vector.

    Attributes
    ----------
    basis : Tensor
        ``(*batch, n, p, K)``: ``basis[..., c, k]`` is ``q_{k+1}`` of column
        ``c`` (orthonormal Krylov vectors); 0 for ``k ≥ steps[..., c]``.
        From :func:`lanczos` it is a view of a contiguous ``(*batch, p, K,
        n)`` storage (each column's basis one contiguous ``K × n`` block:
        ``basis.movedim(-3, -1)`` is contiguous, and
        ``basis.reshape(*batch, n, p·K)`` is a view with column ``c·K + k``).
    alpha : Tensor
        ``(*batch, p, K)``: diagonal of ``T``; 1 for ``k ≥ steps``.
    beta : Tensor
        ``(*batch, p, K − 1)``: off-diagonal of ``T`` (``β_k > 0`` couples
        ``q_k`` and ``q_{k+1}``); 0 for ``k ≥ steps − 1``.
    norm : Tensor
        ``(*batch, p)``: ``‖v‖`` of the start vectors (``q₁ = v/‖v‖``).
    steps : Tensor
        ``(*batch, p)`` int64: valid steps per column, ``1 ≤ steps ≤
        min(K, n)``; below ``K`` after a breakdown.
    reorthogonalized : bool
        Whether the forward pass re-orthogonalised (default True).
        :func:`lanczos_adjoint` reverses the same computation: a mismatched
        adjoint is unstable (module docstring).
    """

    basis: Tensor
    alpha: Tensor
    beta: Tensor
    norm: Tensor
    steps: Tensor
    reorthogonalized: bool = True

    @property
    def num_lanczos(self) -> int:
        """``K``, the depth the decomposition was requested with."""
        return self.alpha.shape[-1]

    def tridiagonal(self) -> Tensor:
        """The dense ``(*batch, p, K, K)`` tridiagonal matrices ``T`` (padding included)."""
        T = torch.diag_embed(self.alpha)
        if self.beta.shape[-1]:
            T = T + torch.diag_embed(self.beta, offset=1) + torch.diag_embed(self.beta, offset=-1)
        return T


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


def lanczos(
    matvec: Matvec,
    v: Tensor,
    num_lanczos: int,
    /,
    *,
    reorthogonalize: bool = True,
    breakdown_tol: float | None = None,
) -> LanczosDecomposition:
    r"""Lanczos tridiagonalisation ``A Q = Q T + r e_Kᵀ`` from ``p`` start vectors at once.

    Each column of ``v`` runs its own Lanczos process (module docstring:
    recurrence, breakdown); one ``matvec`` on the ``(*batch, n, p)`` block
    serves all of them.

    Parameters
    ----------
    matvec : callable
        ``X ↦ A X`` on ``(*batch, n, p)`` tensors, ``A`` symmetric. Must
        return a tensor of its input's shape, dtype and device and must not
        modify its input; it may return a buffer it reuses (never written to
        here).
    v : Tensor
        ``(*batch, n, p)`` start vectors, real floating, finite, no zero
        column.
    num_lanczos : int
        ``K ≥ 1``, the number of steps and the size of ``T``. ``K > n`` is
        allowed: every column then stops at step ``n`` at the latest and the
        rest is padding (``steps ≤ n``), so shapes always follow ``K``.
    reorthogonalize : bool
        Full re-orthogonalisation (classical Gram–Schmidt, twice, against
        the stored basis) after every step. Costs ``O(n·p·k)`` per step;
        without it orthogonality is lost once Ritz values converge.
    breakdown_tol : float, optional
        Relative threshold of the breakdown test ``β_k ≤ tol·‖T‖``
        (default ``√ε``: ``1.5e-8`` in float64, ``3.5e-4`` in float32).

    Returns
    -------
    LanczosDecomposition
        ``basis (*batch, n, p, K)``, ``alpha (*batch, p, K)``,
        ``beta (*batch, p, K − 1)``, ``norm (*batch, p)``,
        ``steps (*batch, p)``.

    Raises
    ------
    TypeError
        ``matvec`` not callable, ``v`` not a real floating tensor, or
        ``matvec`` returning a non-tensor.
    ValueError
        ``v`` not ``(*batch, n, p)`` or empty, a zero or non-finite column of
        ``v``, ``num_lanczos`` not an integer ≥ 1, an invalid
        ``breakdown_tol``, or a ``matvec`` output of the wrong shape, dtype or
        device.
    SolverBreakdownError
        NaN or Inf in ``α`` or ``β`` (``matvec`` returned non-finite values or
        overflowed).

    Notes
    -----
    Per step: one ``matvec`` and about 8 passes over ``(n, p)`` blocks, plus
    4 passes over the ``k`` stored vectors with re-orthogonalisation. One host
    synchronisation per step (the non-finite check and the early exit when
    every column has stopped). Memory: the basis plus 3 blocks.

    Examples
    --------
    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> v = torch.ones(5, 1, dtype=torch.float64)
    >>> dec = lanczos(lambda x: A @ x, v, 5)
    >>> Q, T = dec.basis[:, 0, :], dec.tridiagonal()[0]
    >>> torch.allclose(Q.T @ A @ Q, T), torch.allclose(Q.T @ Q, torch.eye(5, dtype=torch.float64))
    (True, True)
    """
    tol = _validate_forward(matvec, v, num_lanczos, breakdown_tol)
    with torch.no_grad():
        return _lanczos(_checked(matvec, "matvec"), v, num_lanczos, bool(reorthogonalize), tol, differentiable=False)


def _validate_forward(matvec, v, num_lanczos, breakdown_tol) -> float:
    if not callable(matvec):
        raise TypeError(f"matvec must be callable X -> A X, got {type(matvec).__name__}")
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"v must have a real floating dtype, got {v.dtype}")
    if v.dim() < 2:
        raise ValueError(
            f"v must have shape (*batch, n, p) (start vectors as columns; use v[:, None] for one vector), "
            f"got shape {tuple(v.shape)}"
        )
    if v.numel() == 0:
        raise ValueError(f"v must be non-empty, got shape {tuple(v.shape)}")
    if isinstance(num_lanczos, bool) or not isinstance(num_lanczos, int) or num_lanczos < 1:
        raise ValueError(f"num_lanczos must be an integer ≥ 1, got {num_lanczos!r}")
    if breakdown_tol is None:
        tol = math.sqrt(torch.finfo(v.dtype).eps)
    else:
        try:
            tol = float(breakdown_tol)
        except (TypeError, ValueError):
            raise TypeError(
                f"breakdown_tol must be None or a real number, got {type(breakdown_tol).__name__}"
            ) from None
        if not 0.0 <= tol < 1.0:
            raise ValueError(f"breakdown_tol must be in [0, 1), got {breakdown_tol!r}")
    with torch.no_grad():
        norm = torch.linalg.vector_norm(v, dim=-2)
        bad = ~torch.isfinite(norm) | (norm == 0)
        if bool(bad.any()):
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            what = "zero" if float(norm[index]) == 0 else "non-finite"
            raise ValueError(
                f"start vector {_where(index)} of v is {what}: Lanczos needs nonzero, finite start vectors"
            )
    return tol


def _lanczos(
    matvec: Matvec, v: Tensor, K: int, reorthogonalize: bool, tol: float, *, differentiable: bool
) -> LanczosDecomposition:
    """The forward loop. ``differentiable=True`` uses no in-place writes (lists, then stack), so plain
    autograd can run through it: that is the test oracle of :func:`lanczos_adjoint`."""
    *batch, n, p = v.shape
    dtype, device = v.dtype, v.device
    columns = (*batch, p)
    norm = torch.linalg.vector_norm(v, dim=-2)
    q = v / norm.unsqueeze(-2)
    if not differentiable:
        q = q.contiguous()
        # Storage (*batch, p, K, n): each column's basis is one contiguous K × n block, so that the
        # re-orthogonalisation is a batched GEMV over it; `basis` is the (*batch, n, p, K) view of it.
        store = torch.empty(*batch, p, K, n, dtype=dtype, device=device)
        basis = store.movedim(-1, -3)
        r = torch.empty_like(q)  # own buffer for the residual (matvec may return a reused buffer)
    stored: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    active = torch.ones(columns, dtype=torch.bool, device=device)
    steps = torch.zeros(columns, dtype=torch.int64, device=device)
    anorm2 = torch.zeros(columns, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    q_prev: Tensor | None = None
    beta_prev = torch.zeros(columns, dtype=dtype, device=device)

    k = 0
    for k in range(K):
        if differentiable:
            stored.append(q)
        else:
            basis[..., k] = q
        w = matvec(q)
        # r = w − β_{k−1} q_{k−1};  α = q_kᵀ r;  r ← r − α q_k
        if differentiable:
            r = w if q_prev is None else torch.addcmul(w, q_prev, -beta_prev.unsqueeze(-2))
        elif q_prev is None:
            r.copy_(w)
        else:
            torch.addcmul(w, q_prev, -beta_prev.unsqueeze(-2), out=r)
        alpha = _dot(q, r)
        r = torch.addcmul(r, q, -alpha.unsqueeze(-2), out=None if differentiable else r)
        if reorthogonalize:  # classical Gram–Schmidt twice ("twice is enough")
            if differentiable:
                Q = torch.stack(stored, dim=-1)
                for _ in range(2):
                    r = r - torch.einsum("...npj,...pj->...np", Q, torch.einsum("...npj,...np->...pj", Q, r))
            else:
                for _ in range(2):
                    r.sub_(_project(store[..., : k + 1, :], r))
        alpha = torch.where(active, alpha, one)
        alphas.append(alpha)
        steps = steps + active
        if k == K - 1:
            _check_finite(alpha, None, k)
            break
        beta = torch.linalg.vector_norm(r, dim=-2)
        anorm2 = torch.maximum(anorm2, torch.where(active, alpha * alpha + beta_prev * beta_prev + beta * beta, zero))
        stop = active & ((beta <= tol * torch.sqrt(anorm2)) | (k + 1 >= n))
        active = active & ~stop
        beta = torch.where(active, beta, zero)
        betas.append(beta)
        scale = torch.where(active, one / torch.where(active, beta, one), zero).unsqueeze(-2)
        if differentiable:
            q_prev, q = q, r * scale
        else:
            # recycle the buffer of q_{k−1} for q_{k+1} (q_k stays as q_prev)
            new = torch.empty_like(q) if q_prev is None else q_prev
            q_prev, q = q, torch.mul(r, scale, out=new)
        beta_prev = beta
        if not _check_finite(alpha, beta, k):  # every column has stopped: the rest is padding
            break

    done = len(alphas)
    if done < K:
        pad = torch.ones(*columns, K - done, dtype=dtype, device=device)
        alphas.extend(pad.unbind(-1))
        betas.extend(torch.zeros_like(pad)[..., : K - 1 - len(betas)].unbind(-1))
        if differentiable:
            stored.extend([torch.zeros_like(v)] * (K - done))
        else:
            basis[..., done:] = 0
    alpha_t = torch.stack(alphas, dim=-1)
    beta_t = torch.stack(betas, dim=-1) if betas else torch.zeros(*columns, 0, dtype=dtype, device=device)
    if differentiable:
        basis = torch.stack(stored, dim=-1)
    return LanczosDecomposition(
        basis=basis, alpha=alpha_t, beta=beta_t, norm=norm, steps=steps, reorthogonalized=reorthogonalize
    )


# --------------------------------------------------------------------------------------------------
# adjoint
# --------------------------------------------------------------------------------------------------


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
    r"""Reverse mode of :func:`lanczos`: gradients w.r.t. the start vectors and ``A``.

    Runs the adjoint recurrence of the module docstring backwards over the
    steps, one ``matvec`` per step, from the stored ``basis``, ``alpha`` and
    ``beta`` only::

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
        The output of :func:`lanczos` (with or without re-orthogonalisation).
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
        :func:`lanczos`). Both are column-major (``stride(-2) == 1``: each of
        the ``m`` columns is contiguous, so a sampler can loop over column
        chunks). Sample the product at the nonzeros,
        ``g[e] = Σ_c left[i_e, c]·right[j_e, c]``; never form it.
        Only its symmetric part is meaningful (module docstring): for values
        that parameterise a symmetric ``A`` use ``(g[e] + g[eᵀ])/2``.

    Raises
    ------
    TypeError
        ``matvec`` not callable, ``decomposition`` not a
        :class:`LanczosDecomposition`, a cotangent not a tensor.
    ValueError
        A cotangent of the wrong shape, dtype or device, or a ``matvec``
        output of the wrong shape, dtype or device.

    Notes
    -----
    K ``matvec`` calls and about 10 passes over ``(n, p)`` blocks per step,
    plus about 6 passes over the ``k`` stored vectors with
    ``reorthogonalize=True`` (``O(n·p·K²)`` in all, as in the forward pass).
    Memory: ``left`` (``n·p·K``), 4 ``(n, p)`` blocks and ``p·K²`` numbers
    (plus one copy of the basis if it does not have :func:`lanczos`' layout).
    A column whose ``β_k`` are tiny but above the breakdown threshold gives
    large (correct) gradients: the map ``(A, v) ↦ Q`` is then
    ill-conditioned.

    Examples
    --------
    Gradient of ``α₁ = vᵀAv/‖v‖²`` is ``q₁q₁ᵀ`` (w.r.t. ``A``):

    >>> A = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64))
    >>> v = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
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
            coef = bbar - _dot(qn, qbar_next) * binv[..., k]
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
        abar = abar_in[..., k] - _dot(q, rbar)
        lam = torch.addcmul(rbar, q, abar.unsqueeze(-2))
        left[..., k] = lam
        z = matvec(lam.addcmul_(q, abar.unsqueeze(-2)))  # A(λ_k + ᾱ_k q_k); lam is not needed any more
        qbar.add_(z).addcmul_(rbar, -alpha[..., k].unsqueeze(-2))
        if k > 0:
            bbar = bbar_in[..., k - 1] - _dot(Q[..., k - 1], rbar)
            qbar_prev = qbar_in(k - 1).addcmul_(rbar, -beta[..., k - 1].unsqueeze(-2))
        else:
            qbar_prev = None
        qbar_next, qbar, qn = qbar, qbar_prev, q
    qbar1, q1 = qbar_next, qn
    grad_v = torch.addcmul(qbar1, q1, -_dot(q1, qbar1).unsqueeze(-2)).div_(norm.unsqueeze(-2))
    if grad_norm is not None:
        grad_v.addcmul_(q1, grad_norm.unsqueeze(-2))
    m = p * K
    return grad_v, left.reshape(*batch, n, m), Q.reshape(*batch, n, m)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Column inner products of ``(*batch, n, p)`` blocks: ``(*batch, p)``.

    The diagonal of the GEMM ``aᵀb`` for ``p ≤ 32`` (one read of each operand, no temporary; the
    p-fold extra flops are free in a bandwidth-bound loop), ``sum(a·b)`` for wider blocks."""
    if a.shape[-1] <= _GEMM_DOT_MAX_COLUMNS:
        return torch.matmul(a.mT, b).diagonal(dim1=-2, dim2=-1)
    return (a * b).sum(dim=-2)


def _coefficients(Qs: Tensor, x: Tensor) -> Tensor:
    """``Q_cᵀ x_c`` for every column ``c``: ``Qs`` ``(*batch, p, k, n)`` (stored basis), ``x`` ``(*batch, n, p)``
    → ``(*batch, p, k)``. A batched GEMV over the contiguous ``k × n`` blocks."""
    return torch.matmul(Qs, x.mT.contiguous().unsqueeze(-1)).squeeze(-1)


def _combine(Qs: Tensor, c: Tensor) -> Tensor:
    """``Q_c c_c`` for every column: ``(*batch, p, k, n)``, ``(*batch, p, k)`` → ``(*batch, n, p)`` (a view)."""
    return torch.matmul(c.unsqueeze(-2), Qs).squeeze(-2).mT


def _project(Qs: Tensor, x: Tensor) -> Tensor:
    """``Q_c Q_cᵀ x_c`` for every column (one Gram–Schmidt pass), ``(*batch, n, p)``."""
    return _combine(Qs, _coefficients(Qs, x))


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


def _check_finite(alpha: Tensor, beta: Tensor | None, k: int) -> bool:
    """Raise on NaN/Inf in the step-``k`` coefficients; return whether any column is still running.

    One host synchronisation."""
    bad = ~torch.isfinite(alpha)
    if beta is not None:
        bad = bad | ~torch.isfinite(beta)
        running = beta > 0
        bad_any, running_any = torch.stack([bad.any(), running.any()]).tolist()
    else:
        bad_any, running_any = bool(bad.any()), False
    if bad_any:
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise SolverBreakdownError(
            f"lanczos: NaN or Inf in the coefficients at step {k + 1} ({_where(index)}); "
            "check v and matvec for non-finite values or overflow"
        )
    return running_any


def _where(index: tuple[int, ...]) -> str:
    return f"column {index[-1]}" + (f" of batch {index[:-1]}" if len(index) > 1 else "")
