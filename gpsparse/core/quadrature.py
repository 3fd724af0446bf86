"""Gauss quadrature on Lanczos tridiagonals: ``e₁ᵀ f(T) e₁`` and its gradient (core layer).

For a symmetric tridiagonal ``T = V diag(θ) Vᵀ`` (diagonal ``alpha``,
off-diagonal ``beta``) and ``u = Vᵀe₁``,

    q(T) = e₁ᵀ f(T) e₁ = Σ_j u_j² f(θ_j)

is the Gauss quadrature rule behind stochastic Lanczos quadrature
(``vᵀ f(A) v ≈ ‖v‖² q(T)``). Its derivative with respect to ``T`` is the
Daleckii–Krein formula

    ∂q/∂T = V (F ∘ u uᵀ) Vᵀ,   F_ij = (f(θ_i) − f(θ_j)) / (θ_i − θ_j)  (i ≠ j),  F_ii = f'(θ_i),

where ``F`` (the Loewner matrix) uses ``f'`` wherever two eigenvalues
coincide. Unlike autograd through ``torch.linalg.eigh`` it stays finite for
repeated eigenvalues — which the padding of broken-down Lanczos runs creates
on purpose (identity blocks that carry zero weight). The gradient with
respect to the tridiagonal entries is ``∂q/∂α_k = G_kk`` and
``∂q/∂β_k = 2 G_k,k+1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MatrixFunction",
    "FUNCTIONS",
    "tridiagonal",
    "pad_tridiagonal",
    "quadrature",
    "quadrature_with_grad",
    "quadrature_grad_matrix",
    "apply_with_grad",
    "rademacher",
]


@dataclass(frozen=True)
class MatrixFunction:
    """A scalar function with its derivative, applied to eigenvalues."""

    name: str
    value: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    positive: bool = False  # defined only for positive eigenvalues


FUNCTIONS = {
    "log": MatrixFunction("log", torch.log, torch.reciprocal, positive=True),
    "sqrt": MatrixFunction("sqrt", torch.sqrt, lambda x: 0.5 * torch.rsqrt(x), positive=True),
    "inv_sqrt": MatrixFunction("inv_sqrt", torch.rsqrt, lambda x: -0.5 * x.pow(-1.5), positive=True),
    "exp": MatrixFunction("exp", torch.exp, torch.exp),
    "inv": MatrixFunction("inv", torch.reciprocal, lambda x: -x.pow(-2), positive=True),
}


def tridiagonal(alpha: Tensor, beta: Tensor, steps: Tensor | int | None = None) -> Tensor:
    """Dense symmetric tridiagonal matrices ``(..., K, K)`` from their diagonals.

    The one builder of dense tridiagonals (Lanczos decompositions, CG
    coefficients, linear_operator's ``(num, *batch, m, m)`` format).

    Parameters
    ----------
    alpha : Tensor
        ``(..., K)`` diagonals.
    beta : Tensor
        ``(..., K − 1)`` off-diagonals (``T[k, k+1] = T[k+1, k] = beta[k]``).
    steps : Tensor or int, optional
        Valid steps per matrix, broadcastable to ``alpha.shape[:-1]``: entries
        beyond them are replaced by padding (``pad_tridiagonal``), so each
        matrix is ``T_j ⊕ I`` with ``T_j`` its leading ``j × j`` block. None
        (default) uses ``alpha`` and ``beta`` as given.

    Returns
    -------
    Tensor
        ``(..., K, K)``, the broadcast batch shape of the inputs.

    Examples
    --------
    >>> tridiagonal(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.5, 0.25]), steps=2)
    tensor([[2.0000, 0.5000, 0.0000],
            [0.5000, 3.0000, 0.0000],
            [0.0000, 0.0000, 1.0000]])
    """
    if steps is not None:
        alpha, beta = pad_tridiagonal(alpha, beta, steps)
    T = torch.diag_embed(alpha)
    if beta.shape[-1]:
        T = T + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)
    return T


def pad_tridiagonal(alpha: Tensor, beta: Tensor, steps: Tensor | int) -> tuple[Tensor, Tensor]:
    """Replace the entries of ``(alpha, beta)`` beyond each matrix's ``steps`` by identity padding.

    ``alpha[..., k] = 1`` for ``k ≥ steps`` and ``beta[..., k] = 0`` for
    ``k ≥ steps − 1`` (``steps`` broadcastable to ``alpha.shape[:-1]``). The
    padded matrix is block diagonal ``T_j ⊕ I``, so ``e₁ᵀ f(T) e₁`` is that of
    ``T_j`` for any ``f`` with ``f(1)`` finite (the identity block carries
    zero weight), while its spectrum gains spurious 1s. Returns new tensors.
    """
    steps = torch.as_tensor(steps, device=alpha.device).unsqueeze(-1)
    index = torch.arange(alpha.shape[-1], device=alpha.device)
    return torch.where(index < steps, alpha, 1.0), torch.where(index[: beta.shape[-1]] < steps - 1, beta, 0.0)


def _eig(alpha: Tensor, beta: Tensor, f: MatrixFunction) -> tuple[Tensor, Tensor]:
    theta, vectors = torch.linalg.eigh(tridiagonal(alpha, beta))
    if f.positive and bool((theta <= 0).any()):
        from gpsparse.errors import NotPositiveDefiniteError

        raise NotPositiveDefiniteError(
            f"Lanczos found a Ritz value {float(theta.min()):.3e} ≤ 0: the matrix is not positive definite, "
            f"so f = {f.name} is undefined"
        )
    return theta, vectors


def quadrature(alpha: Tensor, beta: Tensor, f: MatrixFunction) -> Tensor:
    """``e₁ᵀ f(T) e₁`` for a batch of tridiagonals: shape ``alpha.shape[:-1]``."""
    theta, vectors = _eig(alpha, beta, f)
    weights = vectors[..., 0, :].pow(2)
    return (weights * f.value(theta)).sum(-1)


def quadrature_grad_matrix(alpha: Tensor, beta: Tensor, f: MatrixFunction) -> tuple[Tensor, Tensor]:
    """``q = e₁ᵀ f(T) e₁`` and the full symmetric gradient ``∂q/∂T = V (F ∘ u uᵀ) Vᵀ`` ``(..., K, K)``.

    ``∂q/∂alpha`` is its diagonal and ``∂q/∂beta`` twice its first
    super-diagonal (``quadrature_with_grad``). The whole matrix also gives the
    gradient with respect to ``A`` of the quadrature on a fixed Krylov space,
    ``Q (∂q/∂T) Qᵀ`` (``gpsparse.core.slq``).
    """
    theta, vectors = _eig(alpha, beta, f)
    u = vectors[..., 0, :]
    fvals = f.value(theta)
    value = (u.pow(2) * fvals).sum(-1)
    grad_t = vectors @ (_loewner(theta, fvals, f) * (u.unsqueeze(-1) * u.unsqueeze(-2))) @ vectors.mT
    return value, grad_t


def quadrature_with_grad(alpha: Tensor, beta: Tensor, f: MatrixFunction) -> tuple[Tensor, Tensor, Tensor]:
    """``q = e₁ᵀ f(T) e₁`` and its gradients ``(∂q/∂alpha, ∂q/∂beta)`` (Daleckii–Krein, see module doc)."""
    value, grad_t = quadrature_grad_matrix(alpha, beta, f)
    grad_alpha = torch.diagonal(grad_t, dim1=-2, dim2=-1)
    grad_beta = 2.0 * torch.diagonal(grad_t, offset=1, dim1=-2, dim2=-1)
    return value, grad_alpha, grad_beta


def apply_with_grad(alpha: Tensor, beta: Tensor, f: MatrixFunction):
    """``y = f(T) e₁`` and a closure giving the cotangents of ``(alpha, beta)`` for a cotangent ``w`` of ``y``.

    ``wᵀ f(T) e₁ = tᵀ f(Θ) u`` with ``t = Vᵀw``, ``u = Vᵀe₁``; by
    Daleckii–Krein its gradient with respect to symmetric ``T`` is
    ``sym(V (F ∘ t uᵀ) Vᵀ)`` with the Loewner matrix ``F`` (module doc).
    """
    theta, vectors = _eig(alpha, beta, f)
    u = vectors[..., 0, :]
    fvals = f.value(theta)
    y = (vectors * (fvals * u).unsqueeze(-2)).sum(-1)

    def vjp(cotangent: Tensor) -> tuple[Tensor, Tensor]:
        t = (vectors * cotangent.unsqueeze(-1)).sum(-2)
        grad_t = vectors @ (_loewner(theta, fvals, f) * (t.unsqueeze(-1) * u.unsqueeze(-2))) @ vectors.mT
        grad_t = 0.5 * (grad_t + grad_t.mT)
        return torch.diagonal(grad_t, dim1=-2, dim2=-1), 2.0 * torch.diagonal(grad_t, offset=1, dim1=-2, dim2=-1)

    return y, vjp


def _loewner(theta: Tensor, fvals: Tensor, f: MatrixFunction) -> Tensor:
    """Divided differences ``(f(θ_i) − f(θ_j))/(θ_i − θ_j)``, ``f'`` where eigenvalues (nearly) coincide."""
    fprime = f.derivative(theta)
    diff = theta.unsqueeze(-1) - theta.unsqueeze(-2)
    scale = theta.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1.0)
    close = diff.abs() <= 1e3 * torch.finfo(theta.dtype).eps * scale
    divided = (fvals.unsqueeze(-1) - fvals.unsqueeze(-2)) / torch.where(close, torch.ones_like(diff), diff)
    return torch.where(close, 0.5 * (fprime.unsqueeze(-1) + fprime.unsqueeze(-2)), divided)


def rademacher(shape: tuple[int, ...], *, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """Rademacher probes (entries ±1, ``‖z‖² = n``) drawn from ``generator`` (on its device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    bits = torch.randint(0, 2, shape, generator=generator, device=gen_device, dtype=torch.int8)
    return bits.to(device=device, dtype=dtype).mul_(2).sub_(1)
