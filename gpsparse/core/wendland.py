r"""Numerics of Wendland's compactly supported function φ₃,₁ (Wendland, 1995).

$$
φ_{3,1}(r) = (1 − r)_+^4 (4r + 1), \qquad
ψ(q) = φ_{3,1}(\sqrt{q}), \qquad ψ'(q) = −10 (1 − \sqrt{q})_+^3,
$$

positive definite on ℝ^d for d ≤ 3, twice continuously differentiable,
``φ(0) = 1`` and ``φ(r) = 0`` for ``r ≥ 1``. The kernel evaluates it in the
squared scaled distance ``q = r²/ρ²``: the derivative ``ψ'`` is then finite at
``q = 0`` (``dφ(√q)/dq`` through a plain ``sqrt`` would be ``0·∞`` there) and
exactly zero for ``q ≥ 1``. The derivative depends on ``u = (1 − √q)₊``
only, the one tensor the Function of
``gpsparse.autograd.wendland`` keeps for its backward.

Pure tensor functions (DESIGN.md §1: no GPyTorch, no Function subclasses).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["wendland_of_square_forward", "wendland_of_square_vjp"]


def wendland_of_square_forward(q: Tensor) -> tuple[Tensor, Tensor]:
    r"""``ψ(q) = φ₃,₁(√q) = (1 − √q)₊⁴ (4√q + 1)`` and ``u = (1 − √q)₊`` for ``q`` of any shape.

    ``q < 0`` is read as 0. Returns ``(ψ, u)``; ``u`` is what
    ``wendland_of_square_vjp`` needs.

    Examples
    --------
    >>> import torch
    >>> value, u = wendland_of_square_forward(torch.tensor([0.0, 0.25, 1.0, 4.0]))
    >>> value
    tensor([1.0000, 0.1875, 0.0000, 0.0000])
    """
    s = q.clamp_min(0).sqrt()
    u = (1 - s).clamp_min(0)
    u2 = u * u
    return u2 * u2 * (4 * s + 1), u


def wendland_of_square_vjp(u: Tensor, grad: Tensor) -> Tensor:
    """``grad · ψ'(q)`` with ``ψ'(q) = −10 u³``, from ``u = (1 − √q)₊`` of ``wendland_of_square_forward``."""
    return grad * (-10 * u * u * u)
