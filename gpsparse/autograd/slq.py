r"""Autograd Functions of the SLQ log-determinant (numerics in ``gpsparse.core.slq``).

* ``SLQLogdet`` — ``(B,)`` estimates of ``logdet A[b]`` from fixed probes;
    backward: the Lanczos adjoint (``"adjoint"``, the exact gradient of the
    estimate) or the probe-reuse estimate of ``A⁻¹`` at the nonzeros
    (``"hutchinson"``).
* ``SLQInvQuadLogdet`` — the Hutchinson mode of ``inv_quad_logdet``: one
    batched CG run serves the probes and the quadratic term.

Both return value gradients ``(B, nnz)`` aligned with the values, symmetrised.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.config import LogdetConfig
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.slq import (
    PreconditionedOperator,
    adjoint_backward,
    adjoint_forward,
    diagonal_scaling,
    hutchinson_forward,
    hutchinson_inv_quad_forward,
    resolve_preconditioner,
)
from gpsparse.core.sparse_ops import sampled_product, symmetrize_values_grad, values_grad

__all__ = ["SLQLogdet", "SLQInvQuadLogdet", "slq_apply"]


class SLQLogdet(Function):
    """``(B,)`` SLQ estimates of ``logdet A[b]`` from fixed probes ``(B, n, p)``."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, pattern: SparsityPattern, probes: Tensor, config: LogdetConfig) -> Tensor:
        precond = resolve_preconditioner(config.preconditioner, values, pattern, config.cholesky_refresh)
        split = PreconditionedOperator(values, pattern, precond)
        norms2 = probes.pow(2).sum(-2)  # (B, p)
        if config.gradient == "hutchinson":
            estimate, left, right = hutchinson_forward(split, probes, norms2, config)
            ctx.save_for_backward(left, right)
        else:
            estimate, chunks = adjoint_forward(split, probes, norms2, config)
            ctx.chunks = chunks
            ctx.save_for_backward(values, probes)
        ctx.pattern, ctx.config, ctx.precond, ctx.anchor = pattern, config, precond, values
        return estimate + split.logdet(values.shape[0], values.dtype, values.device)

    @staticmethod
    @first_order_only("the stochastic Lanczos quadrature log-determinant")
    def backward(ctx: Any, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        pattern = ctx.pattern
        if ctx.config.gradient == "hutchinson":
            left, right = ctx.saved_tensors
            grad = sampled_product(pattern, left, right)
        else:
            values, probes = ctx.saved_tensors
            split = PreconditionedOperator(values, pattern, ctx.precond)
            grad = adjoint_backward(split, probes, ctx.chunks, ctx.config, pattern)
        return symmetrize_values_grad(grad * grad_out.unsqueeze(-1), pattern), None, None, None


class SLQInvQuadLogdet(Function):
    """Hutchinson mode of ``inv_quad_logdet``: ONE batched CG run on ``Ã`` serves the probes and the quadratic term.

    With ``x_c = A⁻¹ y_c``: ``q_c = y_cᵀ x_c``, ``∂q_c/∂y_c = 2 x_c``,
    ``∂q_c/∂a[e] = −x_c[i_e] x_c[j_e]``; the log-determinant gradient is the
    probe-reuse estimate ``(1/p) Σ_l (A⁻¹z_l)[i_e] z_l[j_e]``. One sampled
    product gives both.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, rhs: Tensor, pattern: SparsityPattern, probes: Tensor, config: LogdetConfig):
        precond = resolve_preconditioner(config.preconditioner, values, pattern, config.cholesky_refresh)
        split = PreconditionedOperator(values, pattern, precond)
        quad, estimate, x_probe, x_rhs, z = hutchinson_inv_quad_forward(split, probes, rhs, config)
        ctx.save_for_backward(x_probe, x_rhs, z)
        ctx.pattern, ctx.anchor = pattern, values
        return quad, estimate

    @staticmethod
    @first_order_only("the stochastic Lanczos quadrature log-determinant (Hutchinson mode)")
    def backward(ctx: Any, grad_quad: Tensor, grad_logdet: Tensor):
        x_probe, x_rhs, z = ctx.saved_tensors
        p = z.shape[-1]
        weighted = x_rhs * grad_quad.unsqueeze(-2)
        grad_values = grad_rhs = None
        if ctx.needs_input_grad[0]:
            left = torch.cat([-weighted, x_probe * (grad_logdet / p).reshape(-1, 1, 1)], -1)
            grad_values = values_grad(ctx.pattern, left, torch.cat([x_rhs, z], -1))
        if ctx.needs_input_grad[1]:
            grad_rhs = 2.0 * weighted
        return grad_values, grad_rhs, None, None, None


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
