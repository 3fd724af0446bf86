r"""The Laplace objective with its exact implicit gradient: one ``torch.autograd.Function``.

``LaplaceObjective.apply(problem, q_values, mean, *params)`` returns

$$
F = \sum_i ℓ_i(\hat f_i) − \tfrac12 \hat x^\top Q \hat x − \tfrac12 \log\det P(\hat x)
$$

(the Laplace approximation without its ``½ log det Q`` term, which the caller
adds through ``Q``'s own differentiable log-determinant; on the Krylov road the
function returns the whole approximation with ``log det P − log det Q``
estimated from the same probes, common random numbers), where the mode
``x̂`` comes from Newton's method (``gpsparse.core.laplace.find_mode``) run
without a graph. The backward is the exact gradient of ``F`` as a function of
the inputs *through the mode* by implicit differentiation — no unrolled
Newton steps. With ``s = diag(W P⁻¹ Wᵀ)``, ``g = ½ s ∘ ℓ'''``,
``v = P⁻¹ Wᵀ g`` (one more solve with the mode's factor) and ``Z = P⁻¹`` at
``Q``'s entries (the selected inverse):

* ``∂F/∂Q[i, j] = −½ x̂_i x̂_j − ½ Z_ij − ½ (v_i x̂_j + v_j x̂_i)`` (symmetrised);
* ``∂F/∂μ = ℓ' + g + ℓ'' ∘ (W v)``;
* ``∂F/∂θ = ∂/∂θ [Σ_i ℓ_i + (Wv)_i ℓ'_i + ½ s_i ℓ''_i]`` at fixed ``f̂``, by
  autograd on the likelihood's closed forms (``problem.terms``).

``docs/mathematics.md`` ("Laplace approximation") derives these. ``W`` is a
constant (inputs that require grad get no gradient through it). On the
Krylov road ``s`` and ``Z`` are Hutchinson estimates (``Z`` of ``P⁻¹ − Q⁻¹``,
``gpsparse.core.laplace.GradientParts``), so the gradient is an unbiased
estimate rather than the exact gradient of the estimated objective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.laplace import LaplaceProblem, find_mode, gradient_parts
from gpsparse.core.sparse_ops import sampled_product, symmetrize_values_grad

__all__ = ["LaplaceObjective", "laplace_objective"]


class LaplaceObjective(Function):
    """``F(Q, μ, θ)`` of the module docstring; backward by implicit differentiation at the mode."""

    @staticmethod
    def forward(ctx: Any, problem: LaplaceProblem, q_values: Tensor, mean: Tensor, *params: Tensor) -> Tensor:
        result = find_mode(problem, q_values, mean, params)
        if problem.road == "krylov":  # common random numbers: the caller adds no log det Q (module notes)
            value = result.log_joint - 0.5 * result.factor.logdet_difference()
        else:
            value = result.log_joint - 0.5 * result.factor.logdet()
        ctx.problem, ctx.result = problem, result
        ctx.params = tuple(p.detach() for p in params)
        ctx.dtypes = (q_values.dtype, mean.dtype, tuple(p.dtype for p in params))
        ctx.anchor = q_values
        return value.to(q_values.dtype)

    @staticmethod
    @first_order_only("the Laplace objective (gpsparse.autograd.laplace)")
    def backward(ctx: Any, grad_out: Tensor):
        problem, result = ctx.problem, ctx.result
        parts = gradient_parts(problem, result)
        scale = grad_out.detach().to(torch.float64)
        q_dtype, mean_dtype, param_dtypes = ctx.dtypes
        grad_q = grad_mean = None
        if ctx.needs_input_grad[1]:
            pattern = problem.structure.q_pattern
            x = result.x.unsqueeze(-1)
            # entrywise −½ x_i x_j − v_i x_j, symmetrised (v_i x_j + v_j x_i)/2; then −½ Z_ij (already symmetric)
            left = torch.cat([0.5 * x, parts.v.unsqueeze(-1)], -1)
            right = torch.cat([x, x], -1)
            quad = symmetrize_values_grad(sampled_product(pattern, left.unsqueeze(0), right.unsqueeze(0)), pattern)[0]
            grad_q = (scale * (-quad - 0.5 * parts.inverse_q)).to(q_dtype)
        if ctx.needs_input_grad[2]:
            grad_mean = (scale * (result.d1 + parts.g + result.d2 * parts.wv)).to(mean_dtype)
        grad_params = [None] * len(ctx.params)
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[3 + i]]
        if wanted:
            with torch.enable_grad():
                leaves = [p.to(torch.float64).requires_grad_(True) for p in ctx.params]
                ell, d1, d2, _ = problem.terms(result.f, tuple(leaves))
                total = ell.sum() + (parts.wv * d1).sum() + 0.5 * (parts.s * d2).sum()
                grads = torch.autograd.grad(total, [leaves[i] for i in wanted], allow_unused=True)
            for i, g in zip(wanted, grads):
                grad_params[i] = None if g is None else (scale * g).to(param_dtypes[i]).reshape(ctx.params[i].shape)
        return (None, grad_q, grad_mean, *grad_params)


def laplace_objective(problem: LaplaceProblem, q_values: Tensor, mean: Tensor, params: tuple = ()) -> Tensor:
    """``Σ ℓ(f̂) − ½ x̂ᵀQx̂ − ½ log det P`` at the mode, differentiable in ``q_values``, ``mean`` and ``params``."""
    if q_values.dim() != 1 or mean.dim() != 1:
        raise ValueError(
            "the Laplace objective handles one field (Q values of shape (nnz,), a mean of shape (m,)); batched "
            f"models are not supported, got {tuple(q_values.shape)} and {tuple(mean.shape)}"
        )
    return LaplaceObjective.apply(problem, q_values, mean, *params)
