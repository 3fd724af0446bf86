"""Preconditioners for Krylov solvers on sparse symmetric positive definite matrices.

A preconditioner is a fixed symmetric positive definite matrix ``M ≈ A`` in
split form ``M = C Cᵀ`` whose solves are cheap. Every preconditioner here
offers

* ``P(r)`` / ``P.solve(r)``: ``M⁻¹ r``,
* ``P.apply_inv_factor(r)``: ``C⁻¹ r`` and ``P.apply_inv_factor_t(r)``: ``C⁻ᵀ r``,
* ``P.logdet()``: ``log det M``, exact,

so that it can be passed straight to ``cg(..., preconditioner=P)`` and used
for preconditioned log-determinants,

$$
\\log\\det A = \\log\\det M + \\log\\det(C^{-1} A C^{-T}),
$$

where the second term is estimated with the matvec
``v ↦ C⁻¹ A C⁻ᵀ v``.

Preconditioners are never differentiated. Their state is detached from the
autograd graph when they are built, and every apply runs under
``torch.no_grad``, so outputs never carry autograd history even when
``r`` does. Gradients of a preconditioned quantity flow only through the
parts that use ``A`` itself (see ``DESIGN.md``, section "Preconditioning").

Shapes: ``r`` is ``(*batch, n, k)`` (at least 2-D); the result has the same
shape (Jacobi broadcasts its own batch dimensions against ``r``'s).

Classes
-------
Preconditioner
    The abstract contract.
JacobiPreconditioner
    ``M = diag(A)``, batched.
IncompleteCholeskyPreconditioner
    ``M = L Lᵀ`` with ``L`` the zero fill-in incomplete Cholesky factor,
    IC(0).

Names and the registry
----------------------
``PRECONDITIONER_NAMES`` (``"jacobi"``, ``"ic0"``, ``"cholesky"``) are the
keys of ``PRECONDITIONER_BUILDERS``; ``build_preconditioner`` resolves a
name for the detached values of a matrix on a
SparsityPattern
(``gpsparse.core.preconditioners.registry``). Adding a preconditioner is
one class and one registry entry.

Layout
------
``base`` (the contract and shared input
checks), ``jacobi``,
``ic0`` (IC(0) with its numba/numpy
kernels) and ``registry``. The CHOLMOD
factor ([`CholeskyPreconditioner`][gpsparse.CholeskyPreconditioner]) implements the
same contract in ``gpsparse.core.cholmod``.

Backends
--------
IC(0) uses numba kernels when numba is installed, a plain Python loop and
``torch.triangular_solve`` otherwise; measured costs in ``gpsparse.core.preconditioners.ic0``.
"""

from __future__ import annotations

from gpsparse.core.preconditioners.base import Preconditioner
from gpsparse.core.preconditioners.base import _as_sparse as _as_sparse
from gpsparse.core.preconditioners.base import _check_dtype as _check_dtype
from gpsparse.core.preconditioners.ic0 import IncompleteCholeskyPreconditioner
from gpsparse.core.preconditioners.jacobi import JacobiPreconditioner
from gpsparse.core.preconditioners.registry import (
    DEFAULT_CHOLESKY_REFRESH,
    IC_SHIFTS,
    PRECONDITIONER_BUILDERS,
    PRECONDITIONER_NAMES,
    PreconditionerBuilder,
    build_preconditioner,
    incomplete_cholesky_with_shift,
    stale_cholesky,
)

__all__ = [
    "Preconditioner",
    "JacobiPreconditioner",
    "IncompleteCholeskyPreconditioner",
    "PRECONDITIONER_NAMES",
    "PRECONDITIONER_BUILDERS",
    "PreconditionerBuilder",
    "DEFAULT_CHOLESKY_REFRESH",
    "build_preconditioner",
    "incomplete_cholesky_with_shift",
    "stale_cholesky",
    "IC_SHIFTS",
]
