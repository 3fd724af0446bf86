r"""Lanczos as a differentiable operation, and matrix functions ``f(A) v`` with adjoint gradients.

* :func:`lanczos` — ``(Q, α, β)`` of ``A`` from start vectors ``v``, as an
  autograd Function whose backward is the Lanczos adjoint
  (:func:`gpsparse.core.lanczos.lanczos_adjoint`, Krämer et al. 2024): one SpMM
  per step, the value gradient a sampled product at the nonzeros.
* :func:`funm` — ``f(A) v ≈ ‖v‖ Q f(T) e₁`` (Lanczos approximation,
  exact when ``num_lanczos`` reaches the Krylov dimension) for ``f`` in
  ``sqrt``, ``inv_sqrt``, ``log``, ``exp``, ``inv``. The backward maps the
  cotangent ``ȳ`` to cotangents of the decomposition,

      Q̄ = ‖v‖ ȳ (f(T)e₁)ᵀ,   (ᾱ, β̄) = ‖v‖ · DK(Qᵀȳ),   ‖v‖‾ = ȳᵀ Q f(T) e₁,

  (``DK``: the Daleckii–Krein gradient of ``wᵀ f(T) e₁``,
  :func:`gpsparse.core.quadrature.apply_with_grad`) and runs the Lanczos adjoint
  once. No autograd tape of the loop is kept: memory O(n·p·K).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.core.lanczos import LanczosDecomposition, lanczos_adjoint
from gpsparse.core.lanczos import lanczos as lanczos_core
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.quadrature import FUNCTIONS, apply_with_grad
from gpsparse.core.sparse_ops import sampled_product, spmm, symmetrize_values_grad

__all__ = ["lanczos", "funm", "LanczosFunction", "FunmFunction"]


def _matvec(values: Tensor, pattern: SparsityPattern):
    # The Lanczos core keeps references to matvec outputs, so no buffer reuse here.
    return lambda x: spmm(values, pattern, x)


def _values_grad(pattern: SparsityPattern, left: Tensor, right: Tensor) -> Tensor:
    return symmetrize_values_grad(sampled_product(pattern, left, right), pattern)


class LanczosFunction(Function):
    """``(basis, alpha, beta)`` of the Lanczos decomposition, differentiable in ``values`` and ``v``."""

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, v: Tensor, pattern: SparsityPattern, num_lanczos: int, reorthogonalize: bool, tol
    ):
        dec = lanczos_core(_matvec(values, pattern), v, num_lanczos, reorthogonalize=reorthogonalize, breakdown_tol=tol)
        ctx.pattern, ctx.dec = pattern, dec
        ctx.save_for_backward(values)
        ctx.mark_non_differentiable(dec.steps)
        return dec.basis, dec.alpha, dec.beta, dec.norm, dec.steps

    @staticmethod
    def backward(ctx: Any, grad_basis, grad_alpha, grad_beta, grad_norm, _grad_steps):
        (values,) = ctx.saved_tensors
        grad_v, left, right = lanczos_adjoint(
            _matvec(values, ctx.pattern), ctx.dec, grad_basis, grad_alpha, grad_beta, grad_norm=grad_norm
        )
        grad_values = _values_grad(ctx.pattern, left, right) if ctx.needs_input_grad[0] else None
        return grad_values, grad_v, None, None, None, None


class FunmFunction(Function):
    """``y = ‖v‖ Q f(T) e₁`` with the backward of the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        values: Tensor,
        v: Tensor,
        pattern: SparsityPattern,
        num_lanczos: int,
        name: str,
        reorthogonalize: bool,
        tol,
    ):
        f = FUNCTIONS[name]
        dec = lanczos_core(_matvec(values, pattern), v, num_lanczos, reorthogonalize=reorthogonalize, breakdown_tol=tol)
        coeff, vjp = apply_with_grad(dec.alpha, dec.beta, f)  # (B, p, K)
        out = torch.einsum("bnpk,bpk->bnp", dec.basis, coeff) * dec.norm.unsqueeze(-2)
        ctx.pattern, ctx.dec, ctx.vjp, ctx.coeff = pattern, dec, vjp, coeff
        ctx.save_for_backward(values)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        (values,) = ctx.saved_tensors
        dec: LanczosDecomposition = ctx.dec
        norm = dec.norm  # (B, p)
        grad_basis = grad_out.unsqueeze(-1) * (ctx.coeff * norm.unsqueeze(-1)).unsqueeze(-3)
        projected = torch.einsum("bnpk,bnp->bpk", dec.basis, grad_out)
        grad_alpha, grad_beta = ctx.vjp(projected)
        grad_alpha, grad_beta = grad_alpha * norm.unsqueeze(-1), grad_beta * norm.unsqueeze(-1)
        grad_norm = (projected * ctx.coeff).sum(-1)
        grad_v, left, right = lanczos_adjoint(
            _matvec(values, ctx.pattern), dec, grad_basis, grad_alpha, grad_beta, grad_norm=grad_norm
        )
        grad_values = _values_grad(ctx.pattern, left, right) if ctx.needs_input_grad[0] else None
        return grad_values, grad_v, None, None, None, None, None


def _layout(A, v: Tensor):
    from gpsparse.core.batching import flatten_operands
    from gpsparse.linalg.solve import check_operand, matrix_parts

    values, pattern = matrix_parts(A)
    if not pattern.symmetric:
        raise ValueError("Lanczos needs a symmetric matrix (pattern and values equal to their transpose)")
    check_operand(v, values, "v")
    return values, pattern, flatten_operands(values, v, pattern.size[0])


def lanczos(
    A, v: Tensor, num_lanczos: int, *, reorthogonalize: bool = True, breakdown_tol: float | None = None
) -> LanczosDecomposition:
    r"""Differentiable Lanczos decomposition ``A Q ≈ Q T`` of a symmetric sparse matrix.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric ``(n, n)`` torch sparse COO/CSR tensor or operator.
    v : Tensor
        Start vectors ``(n,)``, ``(n, p)`` or ``(*batch, n, p)``; each column
        runs its own Lanczos process (all columns share each SpMM).
    num_lanczos : int
        Steps ``K`` (at most ``n``).
    reorthogonalize : bool
        Full re-orthogonalisation (default on).
    breakdown_tol : float, optional
        A column stops when ``β_k ≤ tol·‖T‖`` (default ``√eps``): its Krylov
        space is invariant. A tiny value (e.g. ``10·eps``) lets a run that
        is invariant only up to rounding continue in a fresh orthogonal
        direction, which a full-rank root decomposition needs.

    Returns
    -------
    LanczosDecomposition
        ``basis (B, n, p, K)``, ``alpha (B, p, K)``, ``beta (B, p, K-1)``,
        ``norm (B, p)``, ``steps (B, p)`` with ``B`` the flattened batch
        (1 for a single matrix). ``basis``, ``alpha``, ``beta`` and ``norm``
        are differentiable in ``A``'s values and ``v``; the backward is the
        Lanczos adjoint (one SpMM per step, memory O(n·p·K)).

    Examples
    --------
    >>> import torch, gpsparse
    >>> A = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1]]), torch.tensor([2.0, 3.0]), (2, 2))
    >>> dec = gpsparse.lanczos(A, torch.ones(2), 2)
    >>> dec.alpha.shape
    torch.Size([1, 1, 2])
    """
    values, pattern, (values2d, v3d, _) = _layout(A, v)
    basis, alpha, beta, norm, steps = LanczosFunction.apply(
        values2d, v3d, pattern, int(num_lanczos), reorthogonalize, breakdown_tol
    )
    return LanczosDecomposition(basis=basis, alpha=alpha, beta=beta, norm=norm, steps=steps)


def funm(
    A, v: Tensor, f: str, *, num_lanczos: int = 64, reorthogonalize: bool = True, breakdown_tol: float | None = None
) -> Tensor:
    r"""``f(A) v`` by the Lanczos approximation ``‖v‖ Q f(T) e₁``, with adjoint gradients.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric ``(n, n)`` sparse matrix (positive definite for ``sqrt``,
        ``inv_sqrt``, ``log``, ``inv``).
    v : Tensor
        ``(n,)``, ``(n, p)`` or ``(*batch, n, p)``.
    f : {"sqrt", "inv_sqrt", "log", "exp", "inv"}
        The matrix function.
    num_lanczos : int
        Lanczos steps (the approximation is exact once ``K`` reaches the
        dimension of the Krylov space; the error otherwise falls
        geometrically with a rate set by the condition number and ``f``).
    breakdown_tol : float, optional
        See :func:`lanczos`. The value ``f(A)v`` is exact at an invariant
        Krylov space, but its *gradient* involves directions outside it: a
        tiny tolerance (continuing past rounding-level breakdowns) makes the
        gradient exact too when ``num_lanczos = n``.

    Returns
    -------
    Tensor
        ``f(A) v`` with ``v``'s (broadcast) shape.

    Raises
    ------
    ValueError
        Unknown ``f``, non-symmetric ``A``.
    NotPositiveDefiniteError
        A non-positive Ritz value for a function defined on positive numbers.
    """
    if f not in FUNCTIONS:
        raise ValueError(f"unknown matrix function {f!r}; choose one of {tuple(FUNCTIONS)}")
    values, pattern, (values2d, v3d, unflatten) = _layout(A, v)
    num_lanczos = min(int(num_lanczos), pattern.size[0])
    return unflatten(FunmFunction.apply(values2d, v3d, pattern, num_lanczos, f, reorthogonalize, breakdown_tol))
