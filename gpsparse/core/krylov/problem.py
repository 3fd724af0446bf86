"""The shared part of the Krylov cores: input validation, the normalised initial state, ``SolverInfo``.

``_Problem`` validates ``(matvec, rhs, x0, preconditioner, rtol, atol,
max_iters)`` once for every method, normalises each column to ``‖b‖ = 1`` and
holds the iterates; the ``_raise_*`` helpers build the breakdown messages
(quantity, value, iteration, column) that ``gpsparse.core.krylov``
documents. The conventions (shapes, ``matvec`` contract, stopping rule,
failures) are in the package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gpsparse.core.columns import GEMM_DOT_MAX_COLUMNS, column_dot
from gpsparse.errors import NotPositiveDefiniteError, SolverBreakdownError

__all__ = ["SolverInfo", "default_max_iters", "Matvec"]

Matvec = Callable[[Tensor], Tensor]

_MAX_ITERS_CAP = 10_000


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
        with ``r`` the residual the stopping rule used (``gpsparse.core.krylov``); 0
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
        # column dots write wide products into one preallocated buffer (gpsparse.core.columns)
        wide = b.shape[-1] > GEMM_DOT_MAX_COLUMNS
        self.dot = partial(column_dot, buffer=torch.empty(b.shape, dtype=b.dtype, device=b.device) if wide else None)
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
            r = torch.sub(b, self.matvec(self.x)).mul_(inv) if not self.empty else b.clone()
            self.r = r.contiguous()  # the fused column kernels (gpsparse.core.fused) stream contiguous blocks

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
