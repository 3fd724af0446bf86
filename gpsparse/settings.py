"""Global settings of gpsparse, as context managers.

Only adapter code reads these (the operators, at their boundary); cores take
every setting as an argument.

Examples
--------
>>> import gpsparse
>>> with gpsparse.settings.max_dense_size(10_000):
...     pass  # to_dense / dense Cholesky refused above 10 000 rows·columns
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

__all__ = ["max_dense_size", "solver_defaults", "current"]


@dataclass(frozen=True)
class _Settings:
    #: Largest number of matrix elements (``batch · m · n``) that ``to_dense``
    #: and dense factorisations of a sparse operator may form: 2²⁴ ≈ 1.7·10⁷
    #: elements (128 MiB in float64; e.g. 4096 × 4096).
    max_dense_size: int = 2**24
    #: Relative tolerance of the operator's solves and inverse quadratic forms.
    rtol: float = 1e-6
    #: Absolute tolerance of the operator's solves.
    atol: float = 0.0
    #: Iteration cap of the operator's solves (``None``: ``10·n``).
    max_iters: int | None = None
    #: Preconditioner of the operator's solves: None, "jacobi" or "ic0".
    preconditioner: str | None = None


_state = threading.local()


def current() -> _Settings:
    """The settings in force in this thread."""
    return getattr(_state, "value", _Settings())


@contextmanager
def _override(**changes):
    previous = current()
    _state.value = replace(previous, **changes)
    try:
        yield _state.value
    finally:
        _state.value = previous


def max_dense_size(elements: int):
    """Allow dense materialisation (``to_dense``, dense Cholesky) up to ``elements`` matrix entries."""
    if int(elements) < 0:
        raise ValueError(f"max_dense_size must be non-negative, got {elements}")
    return _override(max_dense_size=int(elements))


def solver_defaults(*, rtol: float | None = None, atol: float | None = None, max_iters: int | None = None, preconditioner: str | None = None):
    """Override the iterative-solve settings used by :class:`~gpsparse.SparseLinearOperator`.

    The method is chosen by the operator: CG for symmetric matrices,
    BiCGSTAB otherwise. linear_operator's ``cg_tolerance`` (default 1, meant
    for training) is deliberately *not* used: gpsparse solves to ``rtol``
    (default 1e-6).
    """
    changes = {k: v for k, v in dict(rtol=rtol, atol=atol, max_iters=max_iters, preconditioner=preconditioner).items() if v is not None}
    return _override(**changes)
