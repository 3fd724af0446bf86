"""Autograd Functions: a core forward paired with a named core adjoint.

Every Function here takes values already laid out as ``(B, nnz)`` and dense
operands as ``(B, n, k)`` (the batch flattened, see ``gpsparse.core.batching``),
and returns the gradient with respect to the values as a ``(B, nnz)`` tensor
aligned with them — never anything ``n × n``.

Gradient formulas (``A`` with values ``a[e]`` at ``(i_e, j_e)``; ``G`` the
upstream gradient):

* matmul ``Y = A X``: ``∂/∂X = Aᵀ G``, ``∂/∂a[e] = Σ_c G[i_e, c] X[j_e, c]``;
* solve ``X = A⁻¹ B``: ``Ĝ = A⁻ᵀ G`` (a genuine transpose solve),
    ``∂/∂B = Ĝ``, ``∂/∂a[e] = −Σ_c Ĝ[i_e, c] X[j_e, c]``;
* inverse quadratic ``q_c = b_cᵀ A⁻¹ b_c`` (A symmetric): with ``x = A⁻¹ b``,
    ``∂/∂b_c = 2 x_c ḡ_c``, ``∂/∂a[e] = −Σ_c ḡ_c x_c[i_e] x_c[j_e]``.

For a pattern declared symmetric the value gradients are symmetrised
(``gpsparse.core.sparse_ops.values_grad``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.core.config import SolverConfig
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import build_preconditioner
from gpsparse.core.solver import run_solver
from gpsparse.core.sparse_ops import sampled_product, spmm, transpose_values, values_grad

__all__ = ["SparseMatmul", "SparseSolve", "SparseInvQuad", "SampledProduct"]


class SparseMatmul(Function):
    """``Y[b] = A[b] X[b]`` with sparse value gradients."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, rhs: Tensor, pattern: SparsityPattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, rhs)
        return spmm(values, pattern, rhs)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        values, rhs = ctx.saved_tensors
        pattern = ctx.pattern
        grad_values = grad_rhs = None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
            if ctx.needs_input_grad[0]:
                grad_values = _values_grad_differentiable(pattern, grad_out, rhs)
            if ctx.needs_input_grad[1]:
                values_t, pattern_t = transpose_values(values, pattern)
                grad_rhs = SparseMatmul.apply(values_t, grad_out, pattern_t)
            return grad_values, grad_rhs, None
        if ctx.needs_input_grad[0]:
            grad_values = values_grad(pattern, grad_out, rhs)
        if ctx.needs_input_grad[1]:
            values_t, pattern_t = transpose_values(values, pattern)
            grad_rhs = spmm(values_t, pattern_t, grad_out)
        return grad_values, grad_rhs, None


class SparseSolve(Function):
    """``X[b] = A[b]⁻¹ B[b]`` by an iterative method; the backward solves with ``Aᵀ``."""

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, rhs: Tensor, pattern: SparsityPattern, config: SolverConfig, x0: Tensor | None
    ) -> Tensor:
        ctx.pattern, ctx.config = pattern, config
        preconditioner = build_preconditioner(
            config.preconditioner, values, pattern, cholesky_refresh=config.cholesky_refresh
        )
        # M is symmetric, so it serves Aᵀ as well when A is symmetric or M is Jacobi (diag Aᵀ = diag A).
        ctx.preconditioner = preconditioner if pattern.symmetric or config.preconditioner == "jacobi" else None
        solution = run_solver(config, values, pattern, rhs, x0=x0, preconditioner=preconditioner, what="solve")
        ctx.save_for_backward(values, solution)
        return solution

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        values, solution = ctx.saved_tensors
        pattern, config = ctx.pattern, ctx.config
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: the same Functions, so the gradient is differentiable
            values_t, pattern_t = transpose_values(values, pattern)
            if pattern.symmetric and not config.symmetrize_grad:  # entry-wise: Aᵀ is a different function of v
                values_t = values[..., pattern.transpose_perm]
            adjoint = SparseSolve.apply(values_t, grad_out, pattern_t, config, None)
            grad_values = None
            if ctx.needs_input_grad[0]:
                grad_values = _values_grad_differentiable(pattern, adjoint, solution, -1.0, config.symmetrize_grad)
            return grad_values, adjoint, None, None, None
        values_t, pattern_t = transpose_values(values, pattern)
        adjoint = run_solver(
            config, values_t, pattern_t, grad_out, preconditioner=ctx.preconditioner, what="backward solve with Aᵀ"
        )
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = values_grad(pattern, adjoint, solution, -1.0, symmetrize=config.symmetrize_grad)
        return grad_values, adjoint, None, None, None


class SparseInvQuad(Function):
    """``q[b, c] = B[b, :, c]ᵀ A[b]⁻¹ B[b, :, c]`` for symmetric ``A``; one solve in total."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, rhs: Tensor, pattern: SparsityPattern, config: SolverConfig) -> Tensor:
        if not pattern.symmetric:
            raise ValueError("SparseInvQuad needs a pattern declared symmetric")
        ctx.pattern, ctx.config = pattern, config
        solution = run_solver(config, values, pattern, rhs, what="inv_quad solve")
        ctx.save_for_backward(solution, values, rhs)
        return (solution * rhs).sum(-2)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        solution, values, rhs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: x = A⁻¹b again, through the differentiable solve
            solution = SparseSolve.apply(values, rhs, ctx.pattern, ctx.config, solution.detach())
            weighted = solution * grad_out.unsqueeze(-2)
            grad_values = None
            if ctx.needs_input_grad[0]:
                grad_values = _values_grad_differentiable(ctx.pattern, weighted, solution, -1.0)
            return grad_values, (2.0 * weighted if ctx.needs_input_grad[1] else None), None, None
        weighted = solution * grad_out.unsqueeze(-2)
        grad_values = values_grad(ctx.pattern, weighted, solution, -1.0) if ctx.needs_input_grad[0] else None
        grad_rhs = 2.0 * weighted if ctx.needs_input_grad[1] else None
        return grad_values, grad_rhs, None, None


class SampledProduct(Function):
    """``g[b, e] = Σ_c L[b, i_e, c] R[b, j_e, c]`` as a differentiable operation (for double backward).

    Backward: ``∂/∂L = G R`` and ``∂/∂R = Gᵀ L`` with ``G`` the sparse matrix
    of the cotangent ``ḡ`` on the pattern — two SpMMs.
    """

    @staticmethod
    def forward(ctx: Any, left: Tensor, right: Tensor, pattern: SparsityPattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(left, right)
        return sampled_product(pattern, left, right)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        left, right = ctx.saved_tensors
        pattern = ctx.pattern
        grad_left = grad_right = None
        general = pattern.derived("as_general", lambda: pattern.with_symmetric(False))  # ḡ is not symmetric
        if ctx.needs_input_grad[0]:
            grad_left = SparseMatmul.apply(grad_out, right, general)
        if ctx.needs_input_grad[1]:
            grad_right = SparseMatmul.apply(grad_out[..., pattern.transpose_perm], left, general.transposed)
        return grad_left, grad_right, None


def _values_grad_differentiable(
    pattern: SparsityPattern, left: Tensor, right: Tensor, scale: float = 1.0, symmetrize: bool = True
) -> Tensor:
    """``values_grad`` through differentiable operations (used when the backward itself is differentiated)."""
    grad = SampledProduct.apply(left, right, pattern)
    if scale != 1.0:
        grad = grad * scale
    if symmetrize and pattern.symmetric:
        grad = 0.5 * (grad + grad[..., pattern.transpose_perm])
    return grad
