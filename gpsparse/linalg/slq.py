r"""Log-determinants of sparse SPD matrices by stochastic Lanczos quadrature (SLQ).

Estimate (probes ``z_l`` with ``E[z zᵀ] = I``, Rademacher by default,
``‖z‖² = n``; ``T_l`` the K-step Lanczos tridiagonal from ``z_l/‖z_l‖``):

    logdet A ≈ logdet M + (1/p) Σ_l ‖z_l‖² e₁ᵀ log(T_l) e₁

where the Lanczos runs on the preconditioned ``Ã = C⁻¹ A C⁻ᵀ`` for a fixed
(detached) preconditioner ``M = C Cᵀ`` of known ``logdet M`` (``M = I``
without one). Since ``M`` is constant, ``∂ logdet A/∂A = ∂ logdet Ã/∂A``
and only the second term carries gradients.

Two gradients with respect to the stored values:

* ``"adjoint"`` — the exact gradient of the estimate above: the quadrature
  gives cotangents on ``(α, β)`` (Daleckii–Krein, :mod:`gpsparse.core.quadrature`),
  the Lanczos adjoint (:func:`gpsparse.core.lanczos.lanczos_adjoint`, Krämer et al.
  2024) turns them into ``∂/∂Ã = Σ_k λ_k q_kᵀ``, and
  ``∂/∂a[e] = Σ_k (C⁻ᵀλ_k)[i_e] (C⁻ᵀq_k)[j_e]`` is a sampled product at the
  nonzeros. With fixed probes the estimate is a smooth deterministic
  function of the values and this is its gradient (finite differences agree).
* ``"hutchinson"`` — probe reuse: one batched CG run on ``Ã`` with the probes
  as right-hand sides gives ``x̃_l = Ã⁻¹ z_l`` and, from its coefficients, the
  tridiagonals of the estimate; the gradient is the unbiased estimate of
  ``A⁻¹`` at the nonzeros, ``(1/p) Σ_l (C⁻ᵀx̃_l)[i_e] (C⁻ᵀz_l)[j_e]``.
  Cheaper (no stored basis, no second pass) but not the gradient of the
  estimate.

Both symmetrise the value gradient (the operator is symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.core import krylov
from gpsparse.core.lanczos import lanczos, lanczos_adjoint
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import Preconditioner
from gpsparse.core.quadrature import FUNCTIONS, quadrature, quadrature_with_grad, rademacher
from gpsparse.core.solver import SolverConfig, buffered_matvec, build_preconditioner, report_convergence
from gpsparse.core.sparse_ops import sampled_product, symmetrize_values_grad
from gpsparse.errors import NotPositiveDefiniteError

__all__ = ["logdet", "LogdetConfig", "slq_logdet", "slq_apply", "diagonal_scaling", "SLQLogdet", "SLQInvQuadLogdet"]

GRADIENTS = ("adjoint", "hutchinson")
_LOG = FUNCTIONS["log"]


@dataclass(frozen=True)
class LogdetConfig:
    """Static settings of an SLQ log-determinant.

    Parameters
    ----------
    num_probes : int
        Number of probe vectors ``p`` (per batch entry).
    num_lanczos : int
        Lanczos steps ``K`` per probe (adjoint mode); ignored by the
        Hutchinson mode, whose CG runs to ``rtol``.
    gradient : {"adjoint", "hutchinson"}
        See the module docstring.
    preconditioner : None, "jacobi", "ic0" or Preconditioner
        ``"jacobi"`` is the exact symmetric diagonal scaling
        ``D^{-1/2} A D^{-1/2}``, applied as a differentiable transformation of
        the values (:func:`diagonal_scaling`), so the adjoint gradient stays
        the exact gradient of the estimate. ``"ic0"`` (rebuilt from the
        detached values at each call) and Preconditioner objects are fixed
        ``M = CCᵀ`` with exact ``logdet M``; gradients treat ``M`` as
        constant, which is exact for the true log-determinant (the estimate's
        own dependence on a rebuilt ``M`` is not differentiated: pass a fixed
        Preconditioner object to make the estimate a deterministic function).
    reorthogonalize : bool
        Full re-orthogonalisation of the Lanczos basis (O(n·p·K²) extra work).
    rtol : float
        CG tolerance of the Hutchinson mode.
    max_memory : int
        Bytes allowed for stored Krylov bases in adjoint mode; probes are
        processed in chunks (the backward re-runs the forward Lanczos of each
        chunk) when all bases do not fit.
    """

    num_probes: int = 16
    num_lanczos: int = 64
    gradient: str = "adjoint"
    preconditioner: Any = "jacobi"
    reorthogonalize: bool = False
    rtol: float = 1e-6
    max_memory: int = 2**29

    def __post_init__(self) -> None:
        if int(self.num_probes) < 1:
            raise ValueError(f"num_probes must be a positive integer, got {self.num_probes}")
        if int(self.num_lanczos) < 1:
            raise ValueError(f"num_lanczos must be a positive integer, got {self.num_lanczos}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        spec = self.preconditioner
        if isinstance(spec, str) and spec not in ("jacobi", "ic0", "cholesky"):
            raise ValueError(
                f"unknown preconditioner {spec!r}; choose 'jacobi', 'ic0', 'cholesky', a Preconditioner or None"
            )
        if spec is not None and not isinstance(spec, (str, Preconditioner)):
            raise TypeError("a log-determinant preconditioner needs split factors and logdet: pass a Preconditioner")


class _Split:
    """The preconditioned operator ``Ã = C⁻¹ A C⁻ᵀ`` and the maps its gradients need."""

    def __init__(self, values: Tensor, pattern: SparsityPattern, preconditioner: Preconditioner | None):
        self.matvec_a = buffered_matvec(values, pattern)
        self.precond = preconditioner

    def matvec(self, x: Tensor) -> Tensor:
        if self.precond is None:
            return self.matvec_a(x)
        return self.precond.apply_inv_factor(self.matvec_a(self.precond.apply_inv_factor_t(x)))

    def to_original(self, x: Tensor) -> Tensor:
        """``C⁻ᵀ x``: maps a vector of the preconditioned problem to a gradient factor of ``A``."""
        return x if self.precond is None else self.precond.apply_inv_factor_t(x)

    def logdet(self, num: int, dtype, device) -> Tensor:
        if self.precond is None:
            return torch.zeros(num, dtype=dtype, device=device)
        return self.precond.logdet().reshape(-1).expand(num).to(dtype)


class SLQLogdet(Function):
    """``(B,)`` SLQ estimates of ``logdet A[b]`` from fixed probes ``(B, n, p)``."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, pattern: SparsityPattern, probes: Tensor, config: LogdetConfig) -> Tensor:
        precond = _resolve_preconditioner(config.preconditioner, values, pattern)
        split = _Split(values, pattern, precond)
        num = values.shape[0]
        norms2 = probes.pow(2).sum(-2)  # (B, p)
        if config.gradient == "hutchinson":
            estimate, left, right = _hutchinson_forward(split, probes, norms2, config)
            ctx.save_for_backward(left, right)
        else:
            estimate, chunks = _adjoint_forward(split, probes, norms2, config)
            ctx.chunks = chunks
            ctx.save_for_backward(values, probes)
        ctx.pattern, ctx.config, ctx.precond = pattern, config, precond
        return estimate + split.logdet(num, values.dtype, values.device)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        pattern = ctx.pattern
        if ctx.config.gradient == "hutchinson":
            left, right = ctx.saved_tensors
            grad = sampled_product(pattern, left, right)
        else:
            values, probes = ctx.saved_tensors
            grad = _adjoint_backward(_Split(values, pattern, ctx.precond), probes, ctx.chunks, ctx.config, pattern)
        grad = grad * grad_out.unsqueeze(-1)
        return symmetrize_values_grad(grad, pattern), None, None, None


class SLQInvQuadLogdet(Function):
    """Hutchinson mode of ``inv_quad_logdet``: ONE batched CG run on ``Ã`` serves the probes and the quadratic term.

    Columns ``[z_1 … z_p | C⁻¹ y_1 … C⁻¹ y_k]`` are solved together. With
    ``x_c = C⁻ᵀ x̃_c = A⁻¹ y_c``: ``q_c = y_cᵀ x_c``, ``∂q_c/∂y_c = 2 x_c``,
    ``∂q_c/∂a[e] = −x_c[i_e] x_c[j_e]``; the log-determinant gradient is the
    probe-reuse estimate of the module docstring. One sampled product gives both.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, rhs: Tensor, pattern: SparsityPattern, probes: Tensor, config: LogdetConfig):
        precond = _resolve_preconditioner(config.preconditioner, values, pattern)
        split = _Split(values, pattern, precond)
        p = probes.shape[-1]
        rhs_t = rhs if precond is None else precond.apply_inv_factor(rhs)
        solution, info = krylov.cg(split.matvec, torch.cat([probes, rhs_t], -1), rtol=config.rtol, return_tridiag=True)
        report_convergence(info, SolverConfig(rtol=config.rtol), "inv_quad_logdet solve")
        diag, off = info.tridiag
        value = quadrature(diag[..., :p, :], off[..., :p, :], _LOG)
        estimate = (probes.pow(2).sum(-2) / p * value).sum(-1) + split.logdet(
            values.shape[0], values.dtype, values.device
        )
        x = split.to_original(solution)
        x_probe, x_rhs = x[..., :p], x[..., p:]
        ctx.save_for_backward(x_probe, x_rhs, split.to_original(probes))
        ctx.pattern = pattern
        return (x_rhs * rhs).sum(-2), estimate

    @staticmethod
    def backward(ctx: Any, grad_quad: Tensor, grad_logdet: Tensor):
        x_probe, x_rhs, z = ctx.saved_tensors
        p = z.shape[-1]
        weighted = x_rhs * grad_quad.unsqueeze(-2)
        grad_values = grad_rhs = None
        if ctx.needs_input_grad[0]:
            left = torch.cat([-weighted, x_probe * (grad_logdet / p).reshape(-1, 1, 1)], -1)
            right = torch.cat([x_rhs, z], -1)
            grad_values = symmetrize_values_grad(sampled_product(ctx.pattern, left, right), ctx.pattern)
        if ctx.needs_input_grad[1]:
            grad_rhs = 2.0 * weighted
        return grad_values, grad_rhs, None, None, None


def diagonal_scaling(values: Tensor, pattern: SparsityPattern, rhs: Tensor | None = None):
    """Exact, differentiable diagonal scaling: ``Ã = D^{-1/2} A D^{-1/2}``, ``logdet A = Σ log a_ii + logdet Ã``.

    Returns the scaled ``(B, nnz)`` values ``a_e / √(a_{i_e i_e} a_{j_e j_e})``,
    ``Σ_i log a_ii`` per batch entry ``(B,)`` and, if given, the scaled
    right-hand side ``D^{-1/2} y`` (so ``yᵀA⁻¹y = (D^{-1/2}y)ᵀ Ã⁻¹ (D^{-1/2}y)``).
    All three are torch expressions of the values, so the gradient of the
    estimate includes the scaling's own dependence on the diagonal. Cost O(nnz).

    Raises
    ------
    NotPositiveDefiniteError
        A diagonal entry is missing or not positive.
    """
    pos = pattern.diagonal_positions
    if bool((pos < 0).any()):
        missing = int((pos < 0).nonzero()[0])
        raise NotPositiveDefiniteError(
            f"diagonal entry {missing} is not stored, so the matrix is not positive definite"
        )
    diag = values[..., pos]
    if bool((diag.detach() <= 0).any()):
        first = int((diag.detach() <= 0).nonzero()[0, -1])
        raise NotPositiveDefiniteError(
            f"diagonal entry {first} is not positive, so the matrix is not positive definite"
        )
    inv_sqrt = diag.rsqrt()
    scaled = values * inv_sqrt[..., pattern.row] * inv_sqrt[..., pattern.col_long]
    scaled_rhs = None if rhs is None else rhs * inv_sqrt.unsqueeze(-1)
    return scaled, diag.log().sum(-1), scaled_rhs


def _resolve_preconditioner(spec, values: Tensor, pattern: SparsityPattern) -> Preconditioner | None:
    if spec is None or isinstance(spec, Preconditioner):
        return spec
    return build_preconditioner(spec, values.detach(), pattern)


def _chunk_size(shape: torch.Size, num_lanczos: int, budget: int, element: int) -> int:
    num, n, p = shape
    per_probe = num * n * (num_lanczos + 2) * element
    return max(1, min(p, budget // max(per_probe, 1)))


def _adjoint_forward(split: _Split, probes: Tensor, norms2: Tensor, config: LogdetConfig):
    """Lanczos per chunk of probes; returns the estimate and, per chunk, (slice, cotangents, stored basis or None)."""
    num, n, p = probes.shape
    size = _chunk_size(probes.shape, config.num_lanczos, config.max_memory, probes.element_size())
    keep = size >= p  # a single chunk fits: keep its decomposition for the backward
    estimate = probes.new_zeros(num)
    chunks = []
    for start in range(0, p, size):
        block = slice(start, min(p, start + size))
        dec = lanczos(
            split.matvec, probes[..., block], min(config.num_lanczos, n), reorthogonalize=config.reorthogonalize
        )
        value, grad_alpha, grad_beta = quadrature_with_grad(dec.alpha, dec.beta, _LOG)
        weight = norms2[..., block] / p  # (B, c)
        estimate += (weight * value).sum(-1)
        cot = (grad_alpha * weight.unsqueeze(-1), grad_beta * weight.unsqueeze(-1))
        chunks.append((block, cot, dec if keep else None))
    return estimate, chunks


def _adjoint_backward(split: _Split, probes: Tensor, chunks, config: LogdetConfig, pattern: SparsityPattern) -> Tensor:
    grad = None
    n = probes.shape[-2]
    for block, (grad_alpha, grad_beta), dec in chunks:
        if dec is None:  # recompute this chunk's Lanczos (bounded memory)
            dec = lanczos(
                split.matvec, probes[..., block], min(config.num_lanczos, n), reorthogonalize=config.reorthogonalize
            )
        _, left, right = lanczos_adjoint(split.matvec, dec, None, grad_alpha, grad_beta)
        part = sampled_product(pattern, split.to_original(left), split.to_original(right))
        grad = part if grad is None else grad + part
    return grad


def _hutchinson_forward(split: _Split, probes: Tensor, norms2: Tensor, config: LogdetConfig):
    p = probes.shape[-1]
    solution, info = krylov.cg(split.matvec, probes, rtol=config.rtol, return_tridiag=True)
    report_convergence(info, SolverConfig(rtol=config.rtol), "log-determinant probe solve")
    diag, off = info.tridiag
    value = quadrature(diag, off, _LOG)
    estimate = (norms2 / p * value).sum(-1)
    left = split.to_original(solution) / p
    right = split.to_original(probes)
    return estimate, left, right


def slq_logdet(
    values: Tensor, pattern: SparsityPattern, config: LogdetConfig, *, generator=None, probes=None
) -> Tensor:
    """SLQ log-determinant of ``(values, pattern)`` (values ``(*batch, nnz)``) → ``(*batch,)``."""
    if not pattern.symmetric:
        raise ValueError("the log-determinant needs a symmetric positive definite matrix (pattern declared symmetric)")
    n = pattern.size[0]
    batch = values.shape[:-1]
    num = int(torch.Size(batch).numel())
    if probes is None:
        probes = rademacher((num, n, config.num_probes), generator=generator, dtype=values.dtype, device=values.device)
    else:
        probes = _check_probes(probes, n, num, values)
    values2d = values.reshape(num, pattern.nnz)
    return slq_apply(values2d, pattern, probes, config).reshape(batch)


def slq_apply(
    values2d: Tensor, pattern: SparsityPattern, probes: Tensor, config: LogdetConfig, rhs: Tensor | None = None
):
    """Run the estimator on ``(B, nnz)`` values; ``"jacobi"`` becomes the differentiable exact scaling.

    Returns ``logdet (B,)`` when ``rhs`` is None, else ``(inv_quad (B, k), logdet (B,))`` from one
    batched CG run (Hutchinson mode only).
    """
    offset = 0.0
    if isinstance(config.preconditioner, str) and config.preconditioner == "jacobi":
        values2d, offset, rhs = diagonal_scaling(values2d, pattern, rhs)
        config = replace(config, preconditioner=None)
    if rhs is None:
        return SLQLogdet.apply(values2d, pattern, probes, config) + offset
    quad, estimate = SLQInvQuadLogdet.apply(values2d, rhs, pattern, probes, config)
    return quad, estimate + offset


def _check_probes(probes: Tensor, n: int, num: int, values: Tensor) -> Tensor:
    if probes.dim() < 2 or probes.shape[-2] != n:
        raise ValueError(f"probes must have shape (*batch, n={n}, p), got {tuple(probes.shape)}")
    if probes.dtype != values.dtype or probes.device != values.device:
        raise ValueError(f"probes must match the matrix dtype {values.dtype} and device {values.device}")
    return (
        probes.detach().expand(num, n, probes.shape[-1]) if probes.dim() == 2 else probes.detach().reshape(num, n, -1)
    )


def logdet(
    A,
    *,
    num_probes: int = 16,
    num_lanczos: int = 64,
    gradient: str = "adjoint",
    preconditioner: Any = "jacobi",
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    reorthogonalize: bool = False,
    rtol: float = 1e-6,
    max_memory: int = 2**29,
) -> Tensor:
    r"""Stochastic Lanczos quadrature estimate of ``log det A`` with sparse gradients.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric positive definite ``(n, n)`` torch sparse COO/CSR tensor
        (values may require grad) or operator with values ``(*batch, nnz)``.
    num_probes : int
        Rademacher probes ``p``. The estimate's standard deviation falls like
        ``1/√p``.
    num_lanczos : int
        Lanczos steps ``K`` per probe (adjoint mode).
    gradient : {"adjoint", "hutchinson"}
        Exact gradient of the estimate, or the probe-reuse (Hutchinson)
        estimate of ``A⁻¹`` at the nonzeros; see the module docstring.
    preconditioner : "jacobi" (default), "ic0", None or Preconditioner
        Fixed preconditioner with exact ``logdet M``; ``"jacobi"`` is the
        free, exact diagonal scaling.
    generator : torch.Generator, optional
        Source of the probes: the same generator state gives the same
        estimate, bit for bit.
    probes : Tensor, optional
        Explicit probes ``(n, p)`` or ``(*batch, n, p)`` with
        ``E[z zᵀ] = I`` (e.g. ``√n · I`` with ``num_lanczos = n`` makes the
        estimate exact).
    reorthogonalize : bool
        Full re-orthogonalisation in the Lanczos runs (O(n·p·K²)).
    rtol : float
        CG tolerance of the Hutchinson mode.
    max_memory : int
        Byte budget for stored Krylov bases (adjoint mode).

    Returns
    -------
    Tensor
        ``(*batch,)`` estimates.

    Notes
    -----
    Cost (adjoint): ``2K`` SpMMs with ``p`` columns (forward + adjoint),
    memory ``n·p·K`` numbers (chunked to ``max_memory``, then ``3K`` SpMMs).
    Hutchinson: one CG run with ``p`` columns, memory O(n·p).

    Raises
    ------
    ValueError
        Non-symmetric ``A``, non-positive counts, bad probe shapes.
    NotPositiveDefiniteError
        A non-positive Ritz value or CG curvature (``A`` is not SPD).

    Examples
    --------
    >>> import torch, gpsparse
    >>> i = torch.tensor([[0, 1], [0, 1]])
    >>> A = torch.sparse_coo_tensor(i, torch.tensor([2.0, 3.0], dtype=torch.float64), (2, 2))
    >>> est = gpsparse.logdet(A, num_lanczos=2, probes=torch.eye(2, dtype=torch.float64) * 2**0.5)
    >>> torch.allclose(est, torch.tensor(6.0, dtype=torch.float64).log())
    True
    """
    from gpsparse.linalg.solve import matrix_parts

    config = LogdetConfig(
        num_probes=num_probes,
        num_lanczos=num_lanczos,
        gradient=gradient,
        preconditioner=preconditioner,
        reorthogonalize=reorthogonalize,
        rtol=rtol,
        max_memory=max_memory,
    )
    values, pattern = matrix_parts(A)
    return slq_logdet(values, pattern, config, generator=generator, probes=probes)
