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
    gives cotangents on ``(α, β)`` (Daleckii–Krein, ``gpsparse.core.quadrature``),
    the Lanczos adjoint (``gpsparse.core.lanczos.lanczos_adjoint``, Krämer et al.
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

This module holds the numerics (pure functions on tensors and matvec
closures); the autograd Functions pairing them are in
``gpsparse.autograd.slq``, and the public entry point is [`gpsparse.logdet`][].
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.core import krylov
from gpsparse.core.config import LogdetConfig, SolverConfig
from gpsparse.core.lanczos import LanczosDecomposition, lanczos
from gpsparse.core.lanczos_adjoint import lanczos_adjoint
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import Preconditioner, build_preconditioner
from gpsparse.core.quadrature import FUNCTIONS, quadrature, quadrature_grad_matrix
from gpsparse.core.solver import buffered_matvec, report_convergence
from gpsparse.core.sparse_ops import sampled_product
from gpsparse.errors import NotPositiveDefiniteError

__all__ = [
    "PreconditionedOperator",
    "diagonal_scaling",
    "resolve_preconditioner",
    "adjoint_forward",
    "adjoint_backward",
    "stationary_probes",
    "hutchinson_forward",
    "hutchinson_inv_quad_forward",
    "check_probes",
]

_LOG = FUNCTIONS["log"]


class PreconditionedOperator:
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


def resolve_preconditioner(
    spec, values: Tensor, pattern: SparsityPattern, cholesky_refresh: int
) -> Preconditioner | None:
    """A fixed ``M = CCᵀ`` for the (detached) values: objects as given, names built by the registry."""
    if spec is None or isinstance(spec, Preconditioner):
        return spec
    return build_preconditioner(spec, values.detach(), pattern, cholesky_refresh=cholesky_refresh)


def chunk_size(shape: torch.Size, num_lanczos: int, budget: int, element: int) -> int:
    num, n, p = shape
    per_probe = num * n * (num_lanczos + 2) * element
    return max(1, min(p, budget // max(per_probe, 1)))


def adjoint_forward(split: PreconditionedOperator, probes: Tensor, norms2: Tensor, config: LogdetConfig):
    """Lanczos per chunk of probes; returns the estimate and, per chunk, (slice, ∂estimate/∂T, stored basis or None).

    ``∂estimate/∂T`` is the weighted full Daleckii–Krein matrix ``(B, c, K, K)``
    of every probe (``quadrature_grad_matrix``); ``adjoint_backward`` turns it
    into the value gradient.
    """
    num, n, p = probes.shape
    size = chunk_size(probes.shape, config.num_lanczos, config.max_memory, probes.element_size())
    keep = size >= p  # a single chunk fits: keep its decomposition for the backward
    estimate = probes.new_zeros(num)
    chunks = []
    for start in range(0, p, size):
        block = slice(start, min(p, start + size))
        dec = lanczos(
            split.matvec, probes[..., block], min(config.num_lanczos, n), reorthogonalize=config.reorthogonalize
        )
        value, grad_t = quadrature_grad_matrix(dec.alpha, dec.beta, _LOG)
        weight = norms2[..., block] / p  # (B, c)
        estimate += (weight * value).sum(-1)
        chunks.append((block, grad_t * weight[..., None, None], dec if keep else None))
    return estimate, chunks


def stationary_probes(dec: LanczosDecomposition, grad_t: Tensor, tol: float | None = None) -> Tensor:
    r"""``(*batch, p)`` bool: the probes whose Krylov space has (numerically) stopped moving.

    For ``q = e₁ᵀ f(T) e₁`` with ``T = QᵀAQ`` and ``A Q = Q T + β_K q_{K+1} e_Kᵀ``
    (``q₁`` fixed), a perturbation ``dA`` moves ``T`` by ``Qᵀ dA Q`` (the fixed
    space) plus the motion of the space, which enters only through the
    coupling ``β_K q_{K+1} e_Kᵀ``:

        dq = ⟨∂q/∂T, Qᵀ dA Q⟩ + 2 β_K q_{K+1}ᵀ dQ (∂q/∂T) e_K.

    The second term vanishes at an invariant subspace (``β_K = 0``: breakdown,
    or ``K`` at least the Krylov dimension) and is negligible once the
    quadrature has converged (``(∂q/∂T) e_K`` is the sensitivity to the last
    Lanczos vector). A probe is stationary when
    ``β_K ‖(∂q/∂T) e_K‖ ≤ tol·‖∂q/∂T‖_F``, ``tol = √ε`` of the dtype by default.
    """
    if tol is None:
        tol = torch.finfo(grad_t.dtype).eps ** 0.5
    if dec.residual is None:
        return torch.zeros(grad_t.shape[:-2], dtype=torch.bool, device=grad_t.device)
    coupling = dec.residual * torch.linalg.vector_norm(grad_t[..., -1], dim=-1)
    return coupling <= tol * torch.linalg.matrix_norm(grad_t)


def _fixed_space_left(dec: LanczosDecomposition, grad_t: Tensor) -> Tensor:
    """``left[..., c, k] = Q_c (∂q_c/∂T) e_k`` ``(B, n, c, K)``: ``Q (∂q/∂T) Qᵀ = left · basisᵀ``."""
    return torch.matmul(dec.basis.movedim(-3, -2), grad_t).movedim(-3, -2)


def adjoint_backward(
    split: PreconditionedOperator, probes: Tensor, chunks, config: LogdetConfig, pattern: SparsityPattern
) -> Tensor:
    r"""Value gradient of the SLQ estimate: fixed-space gradient where stationary, Lanczos adjoint elsewhere.

    * A stationary probe (``stationary_probes``: invariant or converged Krylov
      space) gets ``∂q/∂Ã = Q (∂q/∂T) Qᵀ`` (no matvec). It is the gradient of
      ``zᵀ f(Ã) z`` itself once Lanczos has converged, and it is stable,
      whereas the Lanczos adjoint recursion, run backwards, amplifies rounding
      errors along converged Ritz directions: measured ``10⁵``–``10⁶`` times
      the true gradient, and 1e-2 relative error even at ``K = n``, on a
      12 × 12 lattice ``(0.1 I + L)²`` with 4 probes (issue 11, item 7).
    * The other probes get the exact reverse mode of the K-step map
      (``lanczos_adjoint``, Krämer et al. 2024), run only if there is one.
      It satisfies the two exact identities of the estimate's derivative,
      ``⟨∂q/∂Ã, Ã⟩ = ‖z‖²`` (``q(sÃ) = q(Ã) + ‖z‖² log s``) and
      ``tr ∂q/∂Ã = ‖z‖² e₁ᵀT⁻¹e₁`` (the shift ``Ã + sI``), also when Ritz
      pairs have converged to working precision before the Krylov space has
      (measured: 10⁻¹¹–10⁻⁹ at K = 40 and 64 with Ritz residuals 10⁻¹⁷–10⁻²³),
      and matches dense references in training (tests/test_gpytorch_end_to_end.py,
      61 of 64 probes in that state). One known exception (issue 11, item 7,
      open): on the 12 × 12 lattice ``(0.1 I + L)²`` (exactly degenerate
      eigenvalues) at K = 40 it returns ``3.8·10⁷`` along a direction where the
      exact derivative of the estimate is ``66.24``. That exact derivative is
      ill-posed in float64 (docs/mathematics.md, "Gradient of the K-step
      estimate after Ritz convergence"): by Gauss-quadrature exactness
      ``q_K = ‖z‖² e₁ᵀ f(T_K) e₁ = zᵀ h(A) z`` with ``h`` the degree-``2K−1``
      Hermite interpolant of ``f`` at the Ritz values, and ``∂q_K/∂A =
      Dh(A)[z zᵀ] = ‖z‖² Q₂ Dh(T₂)[e₁e₁ᵀ] Q₂ᵀ`` (``T₂``, ``Q₂``: the same run
      continued to ``2K − 1`` steps; verified against 60-digit finite
      differences to 25 digits). A Ritz value converged onto a degenerate
      eigenvalue sits where ``h''`` is about ``10²³``, so a split ``δ`` of that
      eigenvalue adds ``~h''·w·δ`` to the derivative: a ``1e-17`` relative
      (sub-ulp) perturbation of the values moves it to ``−1.1·10⁶``
      (tests/test_lanczos_converged_reference.py).

    Both give ``∂/∂a[e] = Σ_k (C⁻ᵀ left_k)[i_e] (C⁻ᵀ q_k)[j_e]``, a sampled product.
    """
    grad = None
    n = probes.shape[-2]
    for block, grad_t, dec in chunks:
        if dec is None:  # recompute this chunk's Lanczos (bounded memory)
            dec = lanczos(
                split.matvec, probes[..., block], min(config.num_lanczos, n), reorthogonalize=config.reorthogonalize
            )
        stationary = stationary_probes(dec, grad_t)  # (B, c)
        # Only the factors that are needed are formed (each is (B, n, c, K), as large as the basis):
        # the fixed-space one for stationary probes, the adjoint's for the others.
        if bool(stationary.all()):
            left = _fixed_space_left(dec, grad_t)
        else:
            grad_alpha = torch.diagonal(grad_t, dim1=-2, dim2=-1)
            grad_beta = 2.0 * torch.diagonal(grad_t, offset=1, dim1=-2, dim2=-1)
            _, adjoint, _ = lanczos_adjoint(split.matvec, dec, None, grad_alpha, grad_beta)
            left = adjoint.reshape(dec.basis.shape)
            if bool(stationary.any()):
                left = torch.where(stationary[..., None, :, None], _fixed_space_left(dec, grad_t), left)
        num, n_, c, K = left.shape
        right = dec.basis.reshape(num, n_, c * K)
        part = sampled_product(pattern, split.to_original(left.reshape(num, n_, c * K)), split.to_original(right))
        grad = part if grad is None else grad + part
    return grad


def hutchinson_forward(split: PreconditionedOperator, probes: Tensor, norms2: Tensor, config: LogdetConfig):
    p = probes.shape[-1]
    solution, info = krylov.cg(split.matvec, probes, rtol=config.rtol, return_tridiag=True)
    report_convergence(info, SolverConfig(rtol=config.rtol), "log-determinant probe solve")
    diag, off = info.tridiag
    value = quadrature(diag, off, _LOG)
    estimate = (norms2 / p * value).sum(-1)
    left = split.to_original(solution) / p
    right = split.to_original(probes)
    return estimate, left, right


def hutchinson_inv_quad_forward(split: PreconditionedOperator, probes: Tensor, rhs: Tensor, config: LogdetConfig):
    """ONE batched CG run on ``Ã`` for ``[z_1 … z_p | C⁻¹ y_1 … C⁻¹ y_k]``.

    Returns ``(quad (B, k), estimate (B,), x_probe, x_rhs, z)`` with
    ``x = C⁻ᵀ x̃`` mapped back to the original problem (``x_rhs = A⁻¹ y``) and
    ``z = C⁻ᵀ z_l`` — the factors of the backward's sampled product.
    """
    precond = split.precond
    p = probes.shape[-1]
    rhs_t = rhs if precond is None else precond.apply_inv_factor(rhs)
    solution, info = krylov.cg(split.matvec, torch.cat([probes, rhs_t], -1), rtol=config.rtol, return_tridiag=True)
    report_convergence(info, SolverConfig(rtol=config.rtol), "inv_quad_logdet solve")
    diag, off = info.tridiag
    value = quadrature(diag[..., :p, :], off[..., :p, :], _LOG)
    num = probes.shape[0]
    estimate = (probes.pow(2).sum(-2) / p * value).sum(-1) + split.logdet(num, probes.dtype, probes.device)
    x = split.to_original(solution)
    x_probe, x_rhs = x[..., :p], x[..., p:]
    return (x_rhs * rhs).sum(-2), estimate, x_probe, x_rhs, split.to_original(probes)


def check_probes(probes: Tensor, n: int, num: int, values: Tensor) -> Tensor:
    if probes.dim() < 2 or probes.shape[-2] != n:
        raise ValueError(f"probes must have shape (*batch, n={n}, p), got {tuple(probes.shape)}")
    if probes.dtype != values.dtype or probes.device != values.device:
        raise ValueError(f"probes must match the matrix dtype {values.dtype} and device {values.device}")
    return (
        probes.detach().expand(num, n, probes.shape[-1]) if probes.dim() == 2 else probes.detach().reshape(num, n, -1)
    )
