"""Backward passes that are differentiable once, with a clear error when differentiated again.

torch's ``once_differentiable`` lets a second differentiation fail with
"element 0 of tensors does not require grad" when the cotangent does not
require grad, which names neither the operation nor a way out. Functions of
gpsparse whose backward is not written with autograd Functions (the exact
banded / CHOLMOD roads, SLQ) decorate it with :func:`first_order_only`: under
``create_graph=True`` its results carry a node that raises
:class:`~gpsparse.errors.DoubleBackwardError` naming the road when it is
differentiated.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd import Function

from gpsparse.errors import DoubleBackwardError

__all__ = ["first_order_only"]


class _RefuseSecondDerivative(Function):
    """Identity on ``outputs``, connected to ``anchor``; its backward raises."""

    @staticmethod
    def forward(ctx: Any, message: str, anchor: torch.Tensor, *outputs: torch.Tensor):
        ctx.message = message
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads):
        raise DoubleBackwardError(ctx.message)


def first_order_only(what: str):
    """Decorate ``backward(ctx, *grads)`` of a Function that saved its ``values`` as ``ctx.anchor``.

    The backward runs without a graph; under ``create_graph=True`` its tensor
    results are wrapped so that differentiating them raises a
    :class:`~gpsparse.errors.DoubleBackwardError` naming ``what``.
    """
    message = (
        f"double backward (create_graph=True, Hessian-vector products) is not supported through {what}: its "
        "backward is differentiable once. The Krylov road's solve and inverse quadratic form support it "
        "(gpsparse.solve(..., road='krylov') with the values in a SparseLinearOperator)"
    )

    def decorator(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            differentiate = torch.is_grad_enabled()
            with torch.no_grad():
                results = backward(ctx, *grads)
            anchor = getattr(ctx, "anchor", None)
            if not differentiate or anchor is None or not anchor.requires_grad:
                return results
            tensors = [r for r in results if isinstance(r, torch.Tensor)]
            if not tensors:
                return results
            wrapped = iter(_RefuseSecondDerivative.apply(message, anchor, *tensors))
            return tuple(next(wrapped) if isinstance(r, torch.Tensor) else r for r in results)

        return wrapper

    return decorator
