r"""The autograd Function of the Wendland φ₃,₁ covariance: the core forward paired with its derivative.

``_WendlandOfSquare`` — forward ``gpsparse.core.wendland.wendland_of_square_forward``,
backward ``gpsparse.core.wendland.wendland_of_square_vjp``
(``ψ'(q) = −10 (1 − √q)₊³``, finite at ``q = 0`` and exactly zero for
``q ≥ 1``; saves one tensor of the shape of ``q``). ``wendland_of_square``
and [`wendland_phi31`][gpsparse.kernels.wendland_phi31] apply it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gpsparse.core.wendland import wendland_of_square_forward, wendland_of_square_vjp

__all__ = ["wendland_of_square", "wendland_phi31"]


class _WendlandOfSquare(torch.autograd.Function):
    r"""``ψ(q) = φ₃,₁(√q) = (1 − √q)₊⁴ (4√q + 1)`` with ``ψ'(q) = −10 (1 − √q)₊³``.

    Written in the squared scaled distance ``q = r²/ρ²`` so that the
    derivative is finite at ``q = 0`` (a plain ``sqrt`` would give ``0·∞``
    there) and exactly zero for ``q ≥ 1``. Saves one ``(*, nnz)`` tensor.
    """

    @staticmethod
    def forward(ctx, q: Tensor) -> Tensor:
        value, u = wendland_of_square_forward(q)
        ctx.save_for_backward(u)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return wendland_of_square_vjp(u, grad)


def wendland_of_square(q: Tensor) -> Tensor:
    """``ψ(q) = φ₃,₁(√q)`` of squared scaled distances ``q``, differentiable (``_WendlandOfSquare``)."""
    return _WendlandOfSquare.apply(q)


def wendland_phi31(r: Tensor) -> Tensor:
    r"""Wendland's φ₃,₁(r) = (1 − r)₊⁴ (4r + 1) for scaled distances ``r ≥ 0`` (differentiable).

    Positive definite on ℝ^d for d ≤ 3, twice continuously differentiable,
    ``φ(0) = 1`` and ``φ(r) = 0`` for ``r ≥ 1``. Evaluated as ``ψ(r²)``
    (``gpsparse.core.wendland``), so the gradient ``−20 r (1 − r)₊³`` is
    exact at ``r = 0``.

    Examples
    --------
    >>> import torch
    >>> wendland_phi31(torch.tensor([0.0, 0.5, 1.0, 2.0]))
    tensor([1.0000, 0.1875, 0.0000, 0.0000])
    """
    return _WendlandOfSquare.apply(r * r)
