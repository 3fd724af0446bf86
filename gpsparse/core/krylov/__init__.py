"""Krylov solver cores: preconditioned CG, MINRES and BiCGSTAB on a ``matvec`` closure.

These are pure tensor functions (no gpytorch, no autograd machinery). They run
inside ``torch.no_grad()`` and return detached tensors; gradients are the job of
the autograd Functions built on top of them.

Conventions shared by [`cg`][gpsparse.cg], [`minres`][gpsparse.minres] and [`bicgstab`][gpsparse.bicgstab]
-----------------------------------------------------------------------

Shapes
:   ``rhs`` is ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``. Internally every
    solver works on blocks ``(*batch, n, k)``: a vector is viewed as ``(n, 1)``
    and the solution is squeezed back, so the solution always has ``rhs``'s
    shape. The per-column fields of [`SolverInfo`][gpsparse.SolverInfo] have shape
    ``(*batch, k)``; for a vector ``rhs`` that is ``(1,)``.

The ``matvec`` contract
:   ``matvec(v)`` receives a tensor of shape ``(*batch, n, k)`` (always at
    least 2-D, even for a vector ``rhs``) and must return ``A v`` with exactly
    that shape, dtype and device. It must not modify ``v``. It may return a
    buffer that it reuses between calls: the solvers never write into a
    tensor returned by ``matvec`` or ``preconditioner``, and read it only
    until the next call of the same callable. ``preconditioner(r)`` follows
    the same contract and returns ``M⁻¹ r``.

Stopping rule (one rule, per column)
:   ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``, evaluated with the residual the
    method carries: the recursively updated residual vector in CG and
    BiCGSTAB, the Paige–Saunders residual-norm estimate ``φ̄`` in
    unpreconditioned MINRES, and a recursively updated residual vector in
    preconditioned MINRES (whose ``φ̄`` would measure the ``M⁻¹``-norm
    instead). The recursive residual may drift from the true one by about
    ``ε·‖A‖·‖x‖`` at the end of a long run. Internally each column is
    normalised to ``‖b‖ = 1`` (as linear_operator's CG does), so tiny or huge
    right-hand sides do not under- or overflow the squared norms, and a column
    whose relative residual squared underflows (``‖r‖/‖b‖`` below about
    ``1e-154`` in float64, ``1e-19`` in float32) counts as converged even
    with ``rtol = atol = 0``. Columns converge independently:
    once a column meets the rule its step size is masked to zero, so its
    solution stops changing while other columns continue. The loop ends when
    every column has converged or after ``max_iters`` iterations; the
    convergence test is the only host synchronisation per iteration.
    Columns with ``b = 0`` return ``x = 0`` (whatever ``x0`` says), converged
    after 0 iterations, with residual 0.

Failures
:   Slow convergence is never an error here: it is reported in
    [`SolverInfo`][gpsparse.SolverInfo] (``converged``, ``residual_norm``). A genuine
    breakdown raises: [`NotPositiveDefiniteError`][gpsparse.errors.NotPositiveDefiniteError] when
    CG meets ``pᵀAp ≤ 0`` or a preconditioner gives ``rᵀM⁻¹r ≤ 0`` on an
    unconverged column, [`SolverBreakdownError`][gpsparse.errors.SolverBreakdownError] when
    MINRES or BiCGSTAB would divide by (numerically) zero or when a NaN/Inf
    appears in the iterates. Messages name the quantity, its value (of the
    system normalised to ``‖b‖ = 1``), the iteration and the column.

Default ``max_iters``
:   ``min(10·n, 10_000)``. CG needs at most ``n`` steps in exact arithmetic;
    the factor 10 leaves room for rounding on small ill-conditioned systems,
    the cap keeps a solve on a large system from running for hours (raise
    it, or precondition, when a problem needs more).

Performance
:   The methods are memory-bandwidth-bound: besides the ``matvec``, each
    iteration costs a few passes over ``(n, k)`` blocks. All vectors are
    preallocated and updated in place (``addcmul_``); column dot products
    (``gpsparse.core.columns.column_dot``) use one GEMM ``aᵀb`` and keep
    its diagonal for ``k ≤ 32`` (one read of each operand, measured faster
    than ``sum(a*b)`` and ``einsum``) and ``torch.dot`` for a single vector.
    On CPU (float32/float64 blocks of at least ``2¹⁵`` entries) CG runs its
    column work through the fused numba kernels of ``gpsparse.core.fused``:
    ``pᵀAp``; ``r ← r − αAp`` with ``‖r‖²``; ``x ← x + αp`` with
    ``p ← z + βp`` — 10 block passes per iteration without preconditioner
    (12 as torch operations, on CUDA). MINRES makes about 22 passes,
    BiCGSTAB about 30 with two matvecs (torch operations).

Layout
:   ``problem`` (validation, the normalised initial
    state, [`SolverInfo`][gpsparse.SolverInfo], breakdown messages) and one module per
    method: ``cg``, ``minres``,
    ``bicgstab``. The package attributes ``cg``,
    ``minres`` and ``bicgstab`` are the functions (they shadow the submodules
    of the same name; callers look methods up by name with
    ``getattr(krylov, method)``, and tests patch them there).
"""

from __future__ import annotations

from gpsparse.core.krylov.bicgstab import bicgstab
from gpsparse.core.krylov.cg import cg
from gpsparse.core.krylov.minres import minres
from gpsparse.core.krylov.problem import Matvec as Matvec
from gpsparse.core.krylov.problem import SolverInfo, default_max_iters
from gpsparse.core.krylov.problem import _checked as _checked

__all__ = ["SolverInfo", "cg", "minres", "bicgstab", "default_max_iters"]
