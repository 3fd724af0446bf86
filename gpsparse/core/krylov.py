"""Krylov solver cores: preconditioned CG, MINRES and BiCGSTAB on a ``matvec`` closure.

These are pure tensor functions (no gpytorch, no autograd machinery). They run
inside ``torch.no_grad()`` and return detached tensors; gradients are the job of
the autograd Functions built on top of them.

Conventions shared by :func:`cg`, :func:`minres` and :func:`bicgstab`
-----------------------------------------------------------------------

Shapes
    ``rhs`` is ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``. Internally every
    solver works on blocks ``(*batch, n, k)``: a vector is viewed as ``(n, 1)``
    and the solution is squeezed back, so the solution always has ``rhs``'s
    shape. The per-column fields of :class:`SolverInfo` have shape
    ``(*batch, k)``; for a vector ``rhs`` that is ``(1,)``.

The ``matvec`` contract
    ``matvec(v)`` receives a tensor of shape ``(*batch, n, k)`` (always at
    least 2-D, even for a vector ``rhs``) and must return ``A v`` with exactly
    that shape, dtype and device. It must not modify ``v``. It may return a
    buffer that it reuses between calls: the solvers never write into a
    tensor returned by ``matvec`` or ``preconditioner``, and read it only
    until the next call of the same callable. ``preconditioner(r)`` follows
    the same contract and returns ``M⁻¹ r``.

Stopping rule (one rule, per column)
    ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``, evaluated with the residual the
    method carries: the recursively updated residual vector in CG and
    BiCGSTAB, the Paige–Saunders residual-norm estimate ``φ̄`` in
    unpreconditioned MINRES, and a recursively updated residual vector in
    preconditioned MINRES (whose ``φ̄`` would measure the ``M⁻¹``-norm
    instead). The recursive residual may drift from the true one by about
    ``ε·‖A‖·‖x‖`` at the end of a long run. Internally each column is
    normalised to ``‖b‖ = 1`` (as linear_operator's CG does), so tiny or huge
    right-hand sides do not under- or overflow the squared norms, and a column
    whose relative residual squared underflows (``‖r‖/‖b‖`` below about
    ``1e-154`` in float64, ``1e-19`` in float32) counts as converged even
    with ``rtol = atol = 0``. Columns converge independently:
    once a column meets the rule its step size is masked to zero, so its
    solution stops changing while other columns continue. The loop ends when
    every column has converged or after ``max_iters`` iterations; the
    convergence test is the only host synchronisation per iteration.
    Columns with ``b = 0`` return ``x = 0`` (whatever ``x0`` says), converged
    after 0 iterations, with residual 0.

Failures
    Slow convergence is never an error here: it is reported in
    :class:`SolverInfo` (``converged``, ``residual_norm``). A genuine
    breakdown raises: :class:`~gpsparse.errors.NotPositiveDefiniteError` when
    CG meets ``pᵀAp ≤ 0`` or a preconditioner gives ``rᵀM⁻¹r ≤ 0`` on an
    unconverged column, :class:`~gpsparse.errors.SolverBreakdownError` when
    MINRES or BiCGSTAB would divide by (numerically) zero or when a NaN/Inf
    appears in the iterates. Messages name the quantity, its value (of the
    system normalised to ``‖b‖ = 1``), the iteration and the column.

Default ``max_iters``
    ``min(10·n, 10_000)``. CG needs at most ``n`` steps in exact arithmetic;
    the factor 10 leaves room for rounding on small ill-conditioned systems,
    the cap keeps a solve on a large system from running for hours (raise
    it, or precondition, when a problem needs more).

Performance
    The methods are memory-bandwidth-bound: besides the ``matvec``, each
    iteration costs a few passes over ``(n, k)`` blocks. All vectors are
    preallocated and updated in place (``addcmul_``); column dot products use
    one GEMM ``aᵀb`` and keep its diagonal for ``k ≤ 32`` (one read of each
    operand, measured faster than ``sum(a*b)`` and ``einsum``) and
    ``torch.dot`` for a single vector. Per iteration CG makes 12 passes
    (without preconditioner), MINRES about 22, BiCGSTAB about 30 with two
    matvecs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gpsparse.errors import NotPositiveDefiniteError, SolverBreakdownError

__all__ = ["SolverInfo", "cg", "minres", "bicgstab", "default_max_iters"]

Matvec = Callable[[Tensor], Tensor]

_MAX_ITERS_CAP = 10_000
_GEMM_DOT_MAX_COLUMNS = 32  # above this, aᵀb costs k× more flops than it saves in memory traffic


def default_max_iters(n: int) -> int:
    """The iteration cap used when ``max_iters=None``: ``min(10·n, 10_000)`` (at least 1)."""
    return max(1, min(10 * n, _MAX_ITERS_CAP))


@dataclass(frozen=True, eq=False)
class SolverInfo:
    """What a Krylov core reports besides the solution.

    Attributes
    ----------
    iterations : int
        Iterations run, the maximum over columns (0 when every column met the
        stopping rule at the start). One BiCGSTAB iteration makes two matvecs.
    iterations_per_column : Tensor
        ``(*batch, k)`` int64: iterations in which each column was still
        active (the column converged at the end of its last one, or ran out of
        iterations).
    residual_norm : Tensor
        ``(*batch, k)``: final relative residual ``‖r‖₂ / ‖b‖₂`` per column,
        with ``r`` the residual the stopping rule used (module docstring); 0
        for zero columns of ``rhs``.
    converged : Tensor
        ``(*batch, k)`` bool: the column met the stopping rule.
    tridiag : tuple of Tensor or None
        Only from ``cg(..., return_tridiag=True)``, else ``None``.
        ``(diag, offdiag)`` of shapes ``(*batch, k, m)`` and
        ``(*batch, k, max(m − 1, 0))``, ``m = iterations``: the Lanczos
        tridiagonal matrix of every column, built from the CG coefficients
        as linear_operator's mBCG does,
        ``diag_j = 1/α_j + β_{j−1}/α_{j−1}`` (no second term for ``j = 0``),
        ``offdiag_j = √β_j / α_j``.
        For a column with ``j_c = iterations_per_column < m`` steps only the
        leading ``j_c × j_c`` block is Lanczos data; the rest is padding:
        ``diag[j] = 1`` for ``j ≥ j_c`` and ``offdiag[j] = 0`` for
        ``j ≥ j_c − 1``. The padded matrix is block diagonal
        ``T_c ⊕ I``, so ``e₁ᵀ f(T) e₁`` is unaffected by the padding
        (quadrature may use the full matrix) while the eigenvalues gain
        spurious 1s (use ``diag[..., :j_c]`` and ``offdiag[..., :j_c − 1]``
        for spectra). Zero columns have ``j_c = 0`` (pure padding). Without a
        preconditioner ``T`` is the Lanczos matrix of ``A`` started at
        ``r₀/‖r₀‖`` (``r₀ = b`` when ``x0`` is None), so
        ``‖r₀‖² e₁ᵀ f(T) e₁ ≈ r₀ᵀ f(A) r₀``; with ``M = LLᵀ`` it is that of
        ``L⁻¹AL⁻ᵀ`` started at ``L⁻¹r₀`` normalised, and the weight is
        ``r₀ᵀM⁻¹r₀``.
    """

    iterations: int
    iterations_per_column: Tensor
    residual_norm: Tensor
    converged: Tensor
    tridiag: tuple[Tensor, Tensor] | None = None

    @property
    def all_converged(self) -> bool:
        """Whether every column met the stopping rule (one host synchronisation)."""
        return bool(self.converged.all())


# --------------------------------------------------------------------------------------------------
# shared set-up
# --------------------------------------------------------------------------------------------------


class _ColumnDot:
    """Column-wise inner products ``Σ_i a[..., i, c] b[..., i, c]`` of ``(*batch, n, k)`` blocks.

    GEMM ``aᵀb`` and its diagonal for ``2 ≤ k ≤ 32`` (reads each operand once,
    no ``(n, k)`` temporary; the k-fold extra flops are free while the loop is
    bandwidth-bound), ``torch.dot`` for a single vector, ``mul`` into a
    preallocated buffer and ``sum`` for wide blocks.
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        *batch, _, k = shape
        self.vector = k == 1 and not batch
        self.buffer = torch.empty(shape, dtype=dtype, device=device) if k > _GEMM_DOT_MAX_COLUMNS else None

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self.vector:
            return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
        if self.buffer is None:
            return torch.matmul(a.mT, b).diagonal(dim1=-2, dim2=-1)
        return torch.mul(a, b, out=self.buffer).sum(dim=-2)


def _checked(function: Matvec, name: str) -> Matvec:
    """Wrap ``function`` so that a wrong output shape/dtype/device raises a clear ValueError."""

    def call(v: Tensor) -> Tensor:
        out = function(v)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name} must return a Tensor, got {type(out).__name__}")
        if out.shape != v.shape:
            raise ValueError(
                f"{name} must return a tensor of its input's shape: got input shape {tuple(v.shape)} "
                f"and output shape {tuple(out.shape)} ({name} always receives (*batch, n, k) blocks)"
            )
        if out.dtype != v.dtype or out.device != v.device:
            raise ValueError(
                f"{name} must return a tensor of its input's dtype and device: got input {v.dtype} on {v.device} "
                f"and output {out.dtype} on {out.device}"
            )
        return out

    return call


def _as_block(t: Tensor) -> Tensor:
    return t.unsqueeze(-1) if t.dim() == 1 else t


class _Problem:
    """Validated inputs and the common initial state of a solve."""

    def __init__(
        self,
        matvec: Matvec,
        rhs: Tensor,
        x0: Tensor | None,
        preconditioner: Matvec | None,
        rtol: float,
        atol: float,
        max_iters: int | None,
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable v -> A v, got {type(matvec).__name__}")
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(f"preconditioner must be None or callable r -> M⁻¹ r, got {type(preconditioner).__name__}")
        if not isinstance(rhs, Tensor):
            raise TypeError(f"rhs must be a torch.Tensor, got {type(rhs).__name__}")
        if not rhs.is_floating_point():
            raise TypeError(f"rhs must have a real floating dtype, got {rhs.dtype}")
        if rhs.dim() == 0:
            raise ValueError("rhs must have shape (n,), (n, k) or (*batch, n, k), got a 0-d tensor")
        if x0 is not None:
            if not isinstance(x0, Tensor):
                raise TypeError(f"x0 must be None or a torch.Tensor, got {type(x0).__name__}")
            if x0.shape != rhs.shape:
                raise ValueError(f"x0 must have rhs's shape {tuple(rhs.shape)}, got {tuple(x0.shape)}")
            if x0.dtype != rhs.dtype or x0.device != rhs.device:
                raise ValueError(
                    f"x0 must have rhs's dtype and device ({rhs.dtype} on {rhs.device}), got {x0.dtype} on {x0.device}"
                )
        rtol, atol = _nonnegative(rtol, "rtol"), _nonnegative(atol, "atol")
        if max_iters is None:
            n = rhs.shape[-1] if rhs.dim() == 1 else rhs.shape[-2]
            max_iters = default_max_iters(n)
        elif isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer or None, got {max_iters!r}")

        self.squeeze = rhs.dim() == 1
        self.b = b = _as_block(rhs)
        self.max_iters = max_iters
        self.matvec = _checked(matvec, "matvec")
        self.preconditioner = None if preconditioner is None else _checked(preconditioner, "preconditioner")
        self.dtype, self.device = b.dtype, b.device
        finfo = torch.finfo(b.dtype)
        self.eps = finfo.eps
        self.dot = _ColumnDot(b.shape, b.dtype, b.device)
        self.empty = b.numel() == 0

        # The recurrences run on b / ‖b‖ per column (x stays in the caller's units): residuals are
        # then relative, and squared norms cannot under- or overflow for tiny or huge right-hand sides.
        columns = b.shape[:-2] + b.shape[-1:]
        if self.empty:
            scale = b.new_ones(columns)
            self.zero = torch.zeros(columns, dtype=torch.bool, device=b.device)
        else:
            bnorm2 = self.dot(b, b)
            if bool(((bnorm2 >= finfo.tiny) & (bnorm2 <= finfo.max)).all()):
                scale = torch.sqrt(bnorm2)
                self.zero = torch.zeros(columns, dtype=torch.bool, device=b.device)
            else:  # a zero column, or ‖b‖² under/overflows: rescale by max|b| first (rare, set-up only)
                big = b.abs().amax(dim=-2)
                self.zero = big == 0
                big = torch.where(self.zero, 1.0, big)
                scaled = b / big.unsqueeze(-2)
                scale = torch.where(self.zero, 1.0, big * torch.sqrt(self.dot(scaled, scaled)))
        self.scale = scale
        inv = (1.0 / scale).unsqueeze(-2)
        # stopping rule on the normalised system: ‖r̃‖² ≤ max(rtol, atol/‖b‖)², compared without
        # square roots; floored at the smallest normal number (an underflowing residual is zero)
        self.thresh2 = torch.clamp(torch.clamp((atol / scale) ** 2, min=rtol * rtol), min=finfo.tiny)

        # Own, contiguous iterates; zero columns of b get x = 0 whatever x0 says. x stays in the
        # caller's units (its step sizes are multiplied by ‖b‖), r and the search vectors are normalised.
        if x0 is None:
            self.x = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
            self.r = torch.mul(b, inv).contiguous()
        else:
            self.x = torch.where(self.zero.unsqueeze(-2), 0.0, _as_block(x0)).contiguous()
            self.r = torch.sub(b, self.matvec(self.x)).mul_(inv) if not self.empty else b.clone()

    def scalar(self, value: float) -> Tensor:
        """A 0-d tensor for ``torch.where`` (a Python scalar costs a tensor creation per call)."""
        return torch.tensor(value, dtype=self.dtype, device=self.device)

    def new(self) -> Tensor:
        return torch.empty(self.b.shape, dtype=self.dtype, device=self.device)

    def zeros(self) -> Tensor:
        return torch.zeros(self.b.shape, dtype=self.dtype, device=self.device)

    def finish(self, its: Tensor, rr: Tensor, converged: Tensor, tridiag=None) -> tuple[Tensor, SolverInfo]:
        x = self.x
        # one pass, no temporary: NaN/Inf propagate through the column sums
        if not self.empty and not bool(torch.isfinite(x.sum(dim=-2)).all()):
            raise SolverBreakdownError("the solution contains NaN or Inf (overflow in the iterates)")
        relative = torch.sqrt(rr.clamp(min=0))  # the system was normalised to ‖b‖ = 1
        iterations = int(its.max()) if its.numel() else 0
        info = SolverInfo(iterations, its, relative, converged, tridiag)
        return (x.squeeze(-1) if self.squeeze else x), info


def _nonnegative(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not value >= 0 or math.isinf(value):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return value


def _first(mask: Tensor, values: Tensor) -> tuple[tuple[int, ...], float]:
    """Index (batch…, column) and value of the first True entry of ``mask`` (error path only)."""
    index = tuple(int(i) for i in torch.nonzero(mask)[0])
    return index, float(values[index])


def _where(index: tuple[int, ...]) -> str:
    return f"column {index[-1]}" + (f" of batch {index[:-1]}" if len(index) > 1 else "")


def _raise_not_pd(quantity: str, what: str, mask: Tensor, values: Tensor, iteration: int) -> None:
    index, value = _first(mask, values)
    raise NotPositiveDefiniteError(
        f"{what} is not positive definite: {quantity} = {value:.6g} at iteration {iteration} ({_where(index)})"
    )


def _raise_breakdown(method: str, quantity: str, mask: Tensor, values: Tensor, iteration: int) -> None:
    index, value = _first(mask, values)
    raise SolverBreakdownError(
        f"{method} broke down: {quantity} = {value:.6g} at iteration {iteration} ({_where(index)})"
    )


def _raise_nonfinite(method: str, mask: Tensor, iteration: int) -> None:
    index = tuple(int(i) for i in torch.nonzero(mask)[0])
    raise SolverBreakdownError(
        f"{method}: NaN or Inf in the iterates at iteration {iteration} ({_where(index)}); "
        "check rhs, x0, matvec and preconditioner for non-finite values or overflow"
    )


def _nonfinite(t: Tensor) -> Tensor:
    """NaN or ±Inf entries (``t − t`` is NaN exactly there; two small ops instead of isfinite's four)."""
    return (t - t) != 0


def _flags(*masks: Tensor) -> list[bool]:
    """``[m.any() for m in masks]`` with one host synchronisation."""
    return torch.stack(masks).flatten(1).any(dim=1).tolist()


# --------------------------------------------------------------------------------------------------
# CG
# --------------------------------------------------------------------------------------------------


def cg(
    matvec: Matvec,
    rhs: Tensor,
    /,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iters: int | None = None,
    return_tridiag: bool = False,
) -> tuple[Tensor, SolverInfo]:
    r"""Preconditioned conjugate gradients (Hestenes & Stiefel, 1952) for SPD ``A``.

    Solves ``A X = B`` column by column in one block iteration::

        r₀ = b − A x₀,  z₀ = M⁻¹r₀,  p₀ = z₀
        αⱼ = rⱼᵀzⱼ / pⱼᵀApⱼ,   x ← x + αⱼpⱼ,   r ← r − αⱼApⱼ
        z = M⁻¹r,   βⱼ = rⱼ₊₁ᵀzⱼ₊₁ / rⱼᵀzⱼ,   p ← z + βⱼp

    Parameters
    ----------
    matvec : callable
        ``v ↦ A v`` on ``(*batch, n, k)`` tensors (module docstring: contract).
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
        ``info.tridiag`` (see :class:`SolverInfo` for layout and padding).

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
    Per iteration: one ``matvec``, one ``preconditioner`` call, and without a
    preconditioner 12 passes over ``(n, k)`` blocks (dot ``pᵀAp`` 2, ``x`` 3,
    ``r`` 3, ``rᵀr`` 1, ``p`` 3); with one, ``rᵀz`` costs 2 more. Memory: 4
    blocks (``x, r, p`` and the matvec output) plus the preconditioner's.

    Examples
    --------
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x, info = cg(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64)), info.iterations
    (True, 2)
    """
    with torch.no_grad():
        problem = _Problem(matvec, rhs, x0, preconditioner, rtol, atol, max_iters)
        return _cg(problem, return_tridiag)


def _cg(pb: _Problem, return_tridiag: bool) -> tuple[Tensor, SolverInfo]:
    x, r, dot, thresh2, scale = pb.x, pb.r, pb.dot, pb.thresh2, pb.scale
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

    z = precond(r) if precond is not None else r
    rz = dot(r, z)
    rr = dot(r, r) if precond is not None else rz
    converged = rr <= thresh2
    bad_m = ~converged & (rz <= 0)
    nonfinite = _nonfinite(rr) | _nonfinite(rz)
    bad_m_any, nonfinite_any, running = _flags(bad_m, nonfinite, ~converged)
    if bad_m_any:
        _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, rz, 0)
    if nonfinite_any:
        _raise_nonfinite("cg", nonfinite, 0)
    p = z.clone(memory_format=torch.contiguous_format)

    iteration = 0
    while running and iteration < pb.max_iters:
        iteration += 1
        active = ~converged
        q = matvec(p)
        pAp = dot(p, q)
        alpha = torch.where(active, rz / pAp, zero_)
        a = alpha.unsqueeze(-2)
        x.addcmul_(p, (alpha * scale).unsqueeze(-2))
        r.addcmul_(q, a, value=-1.0)
        if precond is not None:
            z = precond(r)
            rz_new = dot(r, z)
            rr = dot(r, r)
        else:
            z = r
            rz_new = rr = dot(r, r)
        its.add_(active)
        converged = converged | (rr <= thresh2)
        beta = torch.where(converged, zero_, rz_new / rz)
        torch.addcmul(z, p, beta.unsqueeze(-2), out=p)
        rz = rz_new
        if return_tridiag:
            alphas.append(alpha)
            betas.append(beta)

        bad_a = active & (pAp <= 0)
        nonfinite = _nonfinite(rr)
        if precond is None:
            bad_a_any, nonfinite_any, running = _flags(bad_a, nonfinite, ~converged)
            bad_m_any = False
        else:
            bad_m = ~converged & (rz <= 0)
            nonfinite = nonfinite | _nonfinite(rz)
            bad_a_any, bad_m_any, nonfinite_any, running = _flags(bad_a, bad_m, nonfinite, ~converged)
        if bad_a_any:
            _raise_not_pd("pᵀAp", "matrix", bad_a, pAp, iteration)
        if bad_m_any:
            _raise_not_pd("rᵀM⁻¹r", "preconditioner", bad_m, rz, iteration)
        if nonfinite_any:
            _raise_nonfinite("cg", nonfinite, iteration)

    return pb.finish(its, rr, converged, _tridiag(alphas, betas, its, pb.dtype) if return_tridiag else None)


def _tridiag(alphas: list[Tensor], betas: list[Tensor], its: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Lanczos ``(diag, offdiag)`` from CG coefficients, padded past each column's own steps."""
    m = len(alphas)
    shape = its.shape
    if m == 0:
        empty = torch.empty(*shape, 0, dtype=dtype, device=its.device)
        return empty, empty
    alpha = torch.stack(alphas, dim=-1)  # (*batch, k, m)
    beta = torch.stack(betas, dim=-1)
    step = torch.arange(m, device=its.device)
    steps = its.unsqueeze(-1)
    inside = step < steps
    safe_alpha = torch.where(inside, alpha, 1.0)
    diag = 1.0 / safe_alpha
    diag[..., 1:] += beta[..., :-1] / safe_alpha[..., :-1]
    diag = torch.where(inside, diag, 1.0)
    off = torch.sqrt(beta[..., :-1].clamp(min=0)) / safe_alpha[..., :-1]
    off = torch.where(step[:-1] < steps - 1, off, 0.0)
    return diag, off


# --------------------------------------------------------------------------------------------------
# MINRES
# --------------------------------------------------------------------------------------------------


def minres(
    matvec: Matvec,
    rhs: Tensor,
    /,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = 1e-6,
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


# --------------------------------------------------------------------------------------------------
# BiCGSTAB
# --------------------------------------------------------------------------------------------------


def bicgstab(
    matvec: Matvec,
    rhs: Tensor,
    /,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iters: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Right-preconditioned BiCGSTAB (van der Vorst, 1992) for general square ``A``.

    Runs BiCGSTAB on ``A M⁻¹ u = b``, ``x = M⁻¹u``, so the residual it
    carries and tests is the unpreconditioned ``b − A x``::

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
