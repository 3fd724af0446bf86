r"""Autograd Functions: Lanczos as a differentiable operation, and ``f(A) v`` with adjoint gradients.

The public entry points are [`gpsparse.lanczos`][] and [`gpsparse.funm`][].

* ``LanczosFunction`` — ``(Q, α, β)`` of ``A`` from start vectors ``v``, as an
    autograd Function whose backward is the Lanczos adjoint
    (``gpsparse.core.lanczos.lanczos_adjoint``, Krämer et al. 2024): one SpMM
    per step, the value gradient a sampled product at the nonzeros.
* ``FunmFunction`` — ``f(A) v ≈ ‖v‖ Q f(T) e₁`` (Lanczos approximation,
    exact when ``num_lanczos`` reaches the Krylov dimension) for ``f`` in
    ``sqrt``, ``inv_sqrt``, ``log``, ``exp``, ``inv``. The backward maps the
    cotangent ``ȳ`` to cotangents of the decomposition,

        Q̄ = ‖v‖ ȳ (f(T)e₁)ᵀ,   (ᾱ, β̄) = ‖v‖ · DK(Qᵀȳ),   ‖v‖‾ = ȳᵀ Q f(T) e₁,

    (``DK``: the Daleckii–Krein gradient of ``wᵀ f(T) e₁``,
    ``gpsparse.core.quadrature.apply_with_grad``) and runs the Lanczos adjoint
    once. No autograd tape of the loop is kept: memory O(n·p·K).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.lanczos import LanczosDecomposition
from gpsparse.core.lanczos import lanczos as lanczos_core
from gpsparse.core.lanczos_adjoint import lanczos_adjoint
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.quadrature import FUNCTIONS, apply_with_grad
from gpsparse.core.sparse_ops import spmm, values_grad

__all__ = ["LanczosFunction", "FunmFunction"]


def _matvec(values: Tensor, pattern: SparsityPattern):
    # The Lanczos core keeps references to matvec outputs, so no buffer reuse here.
    return lambda x: spmm(values, pattern, x)


class LanczosFunction(Function):
    """``(basis, alpha, beta)`` of the Lanczos decomposition, differentiable in ``values`` and ``v``."""

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, v: Tensor, pattern: SparsityPattern, num_lanczos: int, reorthogonalize: bool, tol
    ):
        dec = lanczos_core(_matvec(values, pattern), v, num_lanczos, reorthogonalize=reorthogonalize, breakdown_tol=tol)
        ctx.pattern, ctx.dec, ctx.anchor = pattern, dec, values
        ctx.save_for_backward(values)
        ctx.mark_non_differentiable(dec.steps)
        return dec.basis, dec.alpha, dec.beta, dec.norm, dec.steps

    @staticmethod
    @first_order_only("the Lanczos decomposition (gpsparse.lanczos)")
    def backward(ctx: Any, grad_basis, grad_alpha, grad_beta, grad_norm, _grad_steps):
        (values,) = ctx.saved_tensors
        grad_v, left, right = lanczos_adjoint(
            _matvec(values, ctx.pattern), ctx.dec, grad_basis, grad_alpha, grad_beta, grad_norm=grad_norm
        )
        grad_values = values_grad(ctx.pattern, left, right) if ctx.needs_input_grad[0] else None
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
        ctx.pattern, ctx.dec, ctx.vjp, ctx.coeff, ctx.anchor = pattern, dec, vjp, coeff, values
        ctx.save_for_backward(values)
        return out

    @staticmethod
    @first_order_only("the Lanczos matrix function f(A)v (gpsparse.funm)")
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
        grad_values = values_grad(ctx.pattern, left, right) if ctx.needs_input_grad[0] else None
        return grad_values, grad_v, None, None, None, None, None
