r"""Autograd Functions of the Matérn state-space model: each backward calls a named core function.

* ``_RegularizedGamma`` — ``P(m + 1, 2x)``, forward
    ``gpsparse.core.markov.regularized_gamma``, backward
    gpsparse.core.markov.regularized_gamma_vjp
    (``∂P(m + 1, 2x)/∂x = 2 e^{−2x} (2x)^m/m!``; saves ``x`` only).
* ``_PrecisionValues`` — the CSR values of the block-tridiagonal
    precision from the scaled gaps, forward
    ``gpsparse.core.markov.assemble_precision_values``, backward
    ``gpsparse.core.markov.precision_values_vjp`` (recomputes the blocks;
    ``O(n)`` memory between the passes).

The public functions ``matern_transition_and_noise`` and
``matern_precision_values`` apply them. The mathematics is in
``gpsparse.core.markov``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gpsparse.core.markov import (
    assemble_precision_values,
    matern_state_space,
    precision_values_vjp,
    regularized_gamma_vjp,
    stack_entries,
    transition_and_noise_entries,
)
from gpsparse.core.markov import (
    regularized_gamma as _regularized_gamma_forward,
)

__all__ = ["regularized_gamma", "matern_transition_and_noise", "matern_precision_values"]


class _RegularizedGamma(torch.autograd.Function):
    r"""``P(m + 1, 2x)`` for ``m = 0 … M`` and ``x ≥ 0``, shape ``(M + 1, *x.shape)``.

    Forward ``gpsparse.core.markov.regularized_gamma`` (series below the
    branch point ``2x = 2``, closed form above, downward recurrence for the
    lower orders). Backward ``gpsparse.core.markov.regularized_gamma_vjp``:
    ``∂P(m + 1, 2x)/∂x = 2 e^{−y} y^m/m!`` (``y = 2x``). Saves ``x`` only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, top: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.top = top
        return _regularized_gamma_forward(x, top)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return regularized_gamma_vjp(x, ctx.top, grad), None


def regularized_gamma(x: Tensor, top: int) -> Tensor:
    """``P(m + 1, 2x)`` for ``m = 0 … top``, ``(top + 1, *x.shape)``, with the analytic backward.

    Applies ``_RegularizedGamma``; the same values as ``gpsparse.core.markov.regularized_gamma``.
    """
    return _RegularizedGamma.apply(x, top)


def matern_transition_and_noise(scaled_gaps: Tensor, nu: float) -> tuple[Tensor, Tensor]:
    r"""Transition ``A(x)`` and process noise ``Σ(x)`` of the scaled Matérn state over gaps ``x = λΔ``.

    Parameters
    ----------
    scaled_gaps : Tensor
        ``(*batch, k)`` non-negative gaps ``λ Δ`` (any floating dtype, differentiable).
    nu : float
        0.5, 1.5 or 2.5.

    Returns
    -------
    (Tensor, Tensor)
        ``A`` and ``Σ``, each ``(*batch, k, s, s)``: ``z(t + Δ) = A z(t) + ε``,
        ``ε ~ N(0, Σ)``, for the state ``z_c = f^{(c)}/λ^c`` of a unit-variance
        Matérn process. ``A = e^{Fx}`` and ``Σ = P∞ − A P∞ Aᵀ``
        (``gpsparse.core.markov``); ``Σ`` is accurate to a few ulps of
        ``√(Σ_aa Σ_bb)`` also for tiny ``x``, where the difference
        ``P∞ − A P∞ Aᵀ`` would cancel.

    Examples
    --------
    >>> import torch
    >>> A, S = matern_transition_and_noise(torch.tensor([0.5], dtype=torch.float64), 0.5)
    >>> bool(torch.allclose(A[0, 0, 0], torch.exp(torch.tensor(-0.5, dtype=torch.float64))))
    True
    >>> bool(torch.allclose(S[0, 0, 0], 1 - torch.exp(torch.tensor(-1.0, dtype=torch.float64))))
    True
    """
    A, S = transition_and_noise_entries(scaled_gaps, nu, gamma=regularized_gamma)
    return stack_entries(A), stack_entries(S)


class _PrecisionValues(torch.autograd.Function):
    """CSR values of ``Q`` from the scaled gaps ``x`` ``(*batch, n − 1)``.

    The forward (``gpsparse.core.markov.assemble_precision_values``)
    builds the blocks without a graph and saves only ``x``; the backward
    (``gpsparse.core.markov.precision_values_vjp``) recomputes the entry
    arrays under autograd and pulls the gradient of the values back to ``x``:
    memory between forward and backward is ``O(n)``, not ``O(nnz)`` per
    intermediate.
    """

    @staticmethod
    def forward(ctx, x: Tensor, nu: float, p_inv: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.nu = nu
        return assemble_precision_values(x, nu, p_inv)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return precision_values_vjp(x, ctx.nu, grad, gamma=regularized_gamma), None, None


def matern_precision_values(times: Tensor, rate: Tensor, nu: float) -> Tensor:
    """CSR values ``(*batch, nnz)`` of the state precision at sorted distinct ``times`` ``(n,)``.

    Layout of ``gpsparse.core.markov.precision_pattern`` ``(n, s)``;
    differentiable in ``times`` and ``rate`` ``(*batch,)`` through the gaps
    (``_PrecisionValues``). Values in the promoted dtype of ``times``
    and ``rate``. ``gpsparse.kernels.markov.matern_precision`` validates the
    inputs and wraps the values in a ``SparseLinearOperator``.
    """
    space = matern_state_space(nu)
    s = space.order
    n = times.shape[-1]
    dtype = torch.promote_types(times.dtype, rate.dtype)
    rate = rate.to(dtype)
    p_inv = space.stationary_inverse.to(device=times.device, dtype=dtype)
    if n == 1:
        return p_inv.reshape(-1).expand(*rate.shape, s * s)
    times = times.to(dtype)
    scaled = rate[..., None] * (times[1:] - times[:-1])  # (*batch, n − 1)
    return _PrecisionValues.apply(scaled, float(nu), p_inv)
