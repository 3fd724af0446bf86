r"""Lanczos tridiagonalisation of a symmetric matrix on a ``matvec`` closure (the forward pass).

``lanczos`` runs ``K = num_lanczos`` steps of the symmetric Lanczos
iteration from each of ``p`` start vectors at once (the columns of one block,
so every step costs one SpMM for all of them) and returns the Krylov basis and
the tridiagonal coefficients as a ``LanczosDecomposition``. Its exact
reverse mode is ``gpsparse.core.lanczos_adjoint.lanczos_adjoint``
(Krämer, Moreno-Muñoz, Roy & Hauberg, NeurIPS 2024), whose module holds the
derivation and why the adjoint must reverse the re-orthogonalisation that
ran. Both are pure tensor functions (no gpytorch, no autograd Function); they
run inside ``torch.no_grad()``.

The forward recurrence (per column; ``q₀ = 0``, ``β₀ = 0``)
----------------------------------------------------------

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

Breakdown
---------
A column stops at step ``k < K`` when ``β_k ≤ tol·‖T‖`` with ``‖T‖`` the
running estimate ``max_{j≤k} (α_j² + β_{j−1}² + β_j²)^{1/2}`` (≈ ``max ‖A
q_j‖``, a lower bound on ``‖A‖``) and ``tol = breakdown_tol`` (default
``√ε`` of the dtype), or at step ``n`` (the Krylov space cannot be larger).
The Krylov space of that column is then invariant (up to ``tol``): its later
basis vectors are 0, its later ``α`` are 1 and its ``β`` from step ``k`` on
are 0, so ``T = T_k ⊕ I`` and ``e₁ᵀ f(T) e₁ = e₁ᵀ f(T_k) e₁`` for any ``f``
with ``f(1)`` finite; ``steps`` records ``k``
(``gpsparse.core.quadrature.tridiagonal`` builds ``T`` from ``alpha``,
``beta`` and, for unpadded coefficients, ``steps``). The adjoint treats the
stop as a fixed decision (``gpsparse.core.lanczos_adjoint``).

Memory and cost
---------------
The basis ``(*batch, n, p, K)`` is allocated once; K matvecs on
``(*batch, n, p)`` blocks, plus ``O(n·p·k)`` work per step with
re-orthogonalisation, and 3 ``(*batch, n, p)`` work blocks. Nothing ``n × n``
is formed. (The adjoint's costs: ``gpsparse.core.lanczos_adjoint``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gpsparse.core.columns import column_dot
from gpsparse.core.fused import column_ops
from gpsparse.core.krylov.problem import Matvec, _checked, _where
from gpsparse.core.quadrature import tridiagonal
from gpsparse.errors import SolverBreakdownError

__all__ = ["LanczosDecomposition", "lanczos"]


@dataclass(frozen=True, eq=False)
class LanczosDecomposition:
    """The output of ``lanczos``: ``A Q ≈ Q T`` per start vector.

    Attributes
    ----------
    basis : Tensor
        ``(*batch, n, p, K)``: ``basis[..., c, k]`` is ``q_{k+1}`` of column
        ``c`` (orthonormal Krylov vectors); 0 for ``k ≥ steps[..., c]``.
        From ``lanczos`` it is a view of a contiguous ``(*batch, p, K,
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
        ``lanczos_adjoint`` reverses the same computation: a mismatched
        adjoint is unstable (``gpsparse.core.lanczos_adjoint``).
    residual : Tensor or None
        ``(*batch, p)``: ``β_K = ‖r_K‖``, the norm of the residual of the
        last step (``A Q = Q T + r_K e_Kᵀ``); 0 for a column that stopped
        (``steps < K``: its Krylov space is invariant). None when not
        recorded. ``β_K`` times the last row of ``∂q/∂T`` is the part of a
        quadrature gradient that comes from the motion of the Krylov space
        (``gpsparse.core.slq``).
    """

    basis: Tensor
    alpha: Tensor
    beta: Tensor
    norm: Tensor
    steps: Tensor
    reorthogonalized: bool = True
    residual: Tensor | None = None

    @property
    def num_lanczos(self) -> int:
        """``K``, the depth the decomposition was requested with."""
        return self.alpha.shape[-1]

    def tridiagonal(self) -> Tensor:
        """The dense ``(*batch, p, K, K)`` tridiagonal matrices ``T`` (padding included)."""
        return tridiagonal(self.alpha, self.beta)


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
    check_every: int | None = None,
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
    check_every : int, optional
        Steps between host synchronisations (the non-finite check and the
        early exit once every column has stopped): default 1 on CPU, 8 on
        CUDA. Results and errors are the same for any value: a non-finite
        coefficient is reported at the step it occurred, and the up to
        ``check_every − 1`` steps run after the last column stopped only
        repeat the padding (``α = 1``, ``β = 0``, zero basis vectors).

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
    synchronisation every ``check_every`` steps (the non-finite check and the
    early exit when every column has stopped). Memory: the basis plus 3 blocks.

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
    if check_every is not None and not (isinstance(check_every, int) and not isinstance(check_every, bool)):
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if check_every is not None and check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    with torch.no_grad():
        return _lanczos(
            _checked(matvec, "matvec"),
            v,
            num_lanczos,
            bool(reorthogonalize),
            tol,
            differentiable=False,
            check_every=check_every,
        )


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
    matvec: Matvec,
    v: Tensor,
    K: int,
    reorthogonalize: bool,
    tol: float,
    *,
    differentiable: bool,
    fused: bool | None = None,
    check_every: int | None = None,
) -> LanczosDecomposition:
    """The forward loop. ``differentiable=True`` uses no in-place writes (lists, then stack), so plain
    autograd can run through it: that is the test oracle of
    ``lanczos_adjoint``. Otherwise the column work runs through ``gpsparse.core.fused.column_ops``
    (``fused``: the numba kernels; by default for CPU float32/float64 blocks of at least
    ``gpsparse.core.fused.FUSED_MIN_ROWS`` rows, whatever the number of columns: each column's coefficients
    are then the same bits however many columns run together — what probe-parallel runs rely on)."""
    *batch, n, p = v.shape
    dtype, device = v.dtype, v.device
    columns = (*batch, p)
    if differentiable:
        norm = torch.linalg.vector_norm(v, dim=-2)
        q = v / norm.unsqueeze(-2)
    else:
        ops = column_ops(v, column_dot, fused=fused, by_rows=True)  # a column's bits: whatever its neighbours
        v = v.detach().contiguous()
        norm = ops.dot(v, v).sqrt() if ops.fused else torch.linalg.vector_norm(v, dim=-2)
        q = (v / norm.unsqueeze(-2)).contiguous()
        # Storage (*batch, p, K, n): each column's basis is one contiguous K × n block, so that the
        # re-orthogonalisation is a batched GEMV over it; `basis` is the (*batch, n, p, K) view of it.
        store = torch.empty(*batch, p, K, n, dtype=dtype, device=device)
        basis = store.movedim(-1, -3)
        r = torch.empty_like(q)  # own buffer for the residual (matvec may return a reused buffer)
        spare = torch.empty_like(q)  # the third vector buffer (q_{k+1} overwrites q_{k−1})
        ops.own(q, r, spare)
        if K:
            basis[..., 0] = q
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
    if check_every is None:
        check_every = 8 if device.type == "cuda" else 1
    window: list[tuple] = []  # (step, α, β) since the last host synchronisation

    k = 0
    for k in range(K):
        w = matvec(q)
        # r = w − β_{k−1} q_{k−1};  α = q_kᵀ r;  r ← r − α q_k
        if differentiable:
            stored.append(q)
            r = w if q_prev is None else torch.addcmul(w, q_prev, -beta_prev.unsqueeze(-2))
            alpha = column_dot(q, r)
            r = torch.addcmul(r, q, -alpha.unsqueeze(-2))
        else:
            alpha = ops.lanczos_alpha(w, q_prev, beta_prev, q, r)
            if ops.fused:
                norm2 = ops.residual(r, q, alpha)  # ‖r‖² in the same pass (stale after re-orthogonalisation)
            else:
                r.addcmul_(q, alpha.unsqueeze(-2), value=-1.0)
        if reorthogonalize:  # classical Gram–Schmidt twice ("twice is enough")
            if differentiable:
                Q = torch.stack(stored, dim=-1)
                for _ in range(2):
                    r = r - torch.einsum("...npj,...pj->...np", Q, torch.einsum("...npj,...np->...pj", Q, r))
            else:
                for _ in range(2):
                    r.sub_(_project(store[..., : k + 1, :], r))
                if ops.fused:
                    norm2 = ops.dot(r, r)
        alpha = torch.where(active, alpha, one)
        alphas.append(alpha)
        steps = steps + active
        beta = norm2.clamp_min(0).sqrt() if not differentiable and ops.fused else torch.linalg.vector_norm(r, dim=-2)
        if k == K - 1:
            window.append((k, alpha, None))
            _look(window)
            residual = torch.where(active, beta, zero)
            break
        anorm2 = torch.maximum(anorm2, torch.where(active, alpha * alpha + beta_prev * beta_prev + beta * beta, zero))
        stop = active & ((beta <= tol * torch.sqrt(anorm2)) | (k + 1 >= n))
        active = active & ~stop
        beta = torch.where(active, beta, zero)
        betas.append(beta)
        scale = torch.where(active, one / torch.where(active, beta, one), zero).unsqueeze(-2)
        if differentiable:
            q_prev, q = q, r * scale
        else:
            # recycle the buffer of q_{k−1} for q_{k+1} (q_k stays as q_prev); q_{k+1} also goes to the basis
            new = spare if q_prev is None else q_prev
            q_prev, q = q, ops.lanczos_next(r, scale.squeeze(-2), new, store, k + 1)
        beta_prev = beta
        window.append((k, alpha, beta))
        if len(window) >= check_every:
            running = _look(window)
            window = []
            if not running:  # every column has stopped: the rest is padding
                break

    done = len(alphas)
    if done < K:
        residual = torch.zeros(columns, dtype=dtype, device=device)  # every column stopped early
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
        basis=basis,
        alpha=alpha_t,
        beta=beta_t,
        norm=norm,
        steps=steps,
        reorthogonalized=reorthogonalize,
        residual=residual,
    )


# --------------------------------------------------------------------------------------------------
# helpers (the basis products are shared with the adjoint)
# --------------------------------------------------------------------------------------------------


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


def _look(window: list[tuple]) -> bool:
    """One host synchronisation for the steps in ``window``: raise at the earliest non-finite step (as
    ``_check_finite``), else return whether any column still runs after the last one."""
    masks = []
    for _, alpha, beta in window:
        bad = ~torch.isfinite(alpha)
        if beta is not None:
            bad = bad | ~torch.isfinite(beta)
        masks.append(bad.any())
    last = window[-1][2]
    masks.append((last > 0).any() if last is not None else torch.zeros((), dtype=torch.bool, device=masks[0].device))
    flags = torch.stack(masks).tolist()
    for (k, alpha, beta), bad in zip(window, flags):
        if bad:
            _check_finite(alpha, beta, k)  # raises with the step's details
    return bool(flags[-1])


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
