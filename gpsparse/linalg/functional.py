r"""The public linear-algebra functions: ``solve``, ``logdet``, ``inv_quad_logdet``, ``lanczos``, ``funm``.

Each validates its operands, builds a frozen configuration from its arguments
and the settings in force (``gpsparse.linalg.config.road_config``, read
once here), and hands ``(values, pattern)`` to the one dispatcher
(``gpsparse.linalg.dispatch``) that the operators call too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gpsparse.autograd.funm import FunmFunction, LanczosFunction
from gpsparse.core.batching import flatten_operands
from gpsparse.core.config import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_NUM_LANCZOS,
    DEFAULT_NUM_PROBES,
    DEFAULT_RTOL,
    LogdetConfig,
    PreconditionerSpec,
    SolverConfig,
)
from gpsparse.core.convert import check_finite, check_operand, sparse_parts
from gpsparse.core.lanczos import LanczosDecomposition
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.quadrature import FUNCTIONS
from gpsparse.linalg import dispatch
from gpsparse.linalg.config import road_config

__all__ = ["solve", "logdet", "inv_quad_logdet", "lanczos", "funm", "matrix_parts", "lanczos_roots"]


def solve(
    A,
    B: Tensor,
    *,
    method: str = "cg",
    preconditioner: PreconditionerSpec = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    max_iters: int | None = None,
    x0: Tensor | None = None,
    strict: bool = False,
    road: str = "auto",
    symmetric_grad: bool | None = None,
) -> Tensor:
    r"""Solve ``A X = B`` with gradients that stay sparse (exactly where the structure allows, else iteratively).

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        ``(n, n)`` torch sparse COO or CSR tensor (its values may require
        grad), or a [`SparseLinearOperator`][gpsparse.SparseLinearOperator] (values
        ``(*batch, nnz)``).
    B : Tensor
        Dense right-hand side ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``.
    method : {"cg", "minres", "bicgstab"}
        ``cg`` (symmetric positive definite), ``minres`` (symmetric
        indefinite) or ``bicgstab`` (non-symmetric).
    preconditioner : None, "jacobi", "ic0", Preconditioner or callable
        See ``SolverConfig``.
    rtol, atol : float
        Stop a column when ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``.
    max_iters : int, optional
        Iteration cap (default ``10·n``).
    x0 : Tensor, optional
        Initial guess, shaped like ``B`` (forward solve only).
    strict : bool
        Raise instead of warning when the tolerance is not reached.
    road : {"auto", "banded", "cholesky", "krylov"}
        ``"auto"`` (default): for a symmetric ``A`` with ``method="cg"`` and
        no ``x0`` or preconditioner, the exact roads of the dispatcher
        (``gpsparse.linalg.dispatch``) where they apply — the banded
        Cholesky for half-bandwidth ≤ ``max_banded_bandwidth``
        ([`gpsparse.settings.solver_defaults`][]), CHOLMOD under
        ``logdet_defaults(method="cholesky")`` — else the iterative solve.
        The Krylov arguments (``method``, ``preconditioner``, ``rtol``,
        ``atol``, ``max_iters``, ``x0``, ``strict``) apply only on the
        ``"krylov"`` road; pass ``road="krylov"`` to force it.
    symmetric_grad : bool, optional
        The value gradient of a symmetric ``A``: ``None`` (default) or
        ``True``, symmetrised, ``(g + gᵀ)/2`` on the pattern — the gradient
        with respect to a symmetric matrix parameterised by its stored entries
        (as ``torch.linalg.cholesky`` and linear_operator treat symmetric
        inputs); ``False``, entry-wise, ``g[e] = −Ĝ[i_e]·X[j_e]``, as dense
        ``torch.linalg.solve`` and torchsparsegradutils give for a matrix of
        independent entries (then the Krylov road is taken; for a torch sparse
        tensor, or an operator whose values were not symmetrised when it was
        built — ``SparseLinearOperator.from_tensor`` symmetrises them, so its
        leaf gradients are symmetric whatever this says). ``True`` for a
        non-symmetric ``A`` is an error.

    Returns
    -------
    Tensor
        ``X`` with the broadcast shape of ``B``.

    Notes
    -----
    Gradients (``G`` the upstream gradient of ``X``):

        Ĝ = A⁻ᵀ G                    (one solve with Aᵀ, same method)
        ∂L/∂B    = Ĝ
        ∂L/∂a[e] = −Σ_c Ĝ[i_e, c] · X[j_e, c]   at the stored entries only

    The value gradient has shape ``(nnz,)`` (``(*batch, nnz)``); nothing
    ``n × n`` is formed. For a matrix detected or declared symmetric it is
    symmetrised (``(g + gᵀ)/2`` on the pattern). Cost: the forward solve,
    one transpose solve and one sampled product (SDDMM) over the nonzeros.

    Double backward (``create_graph=True``: Hessian-vector products, Newton
    steps) works on the Krylov road: the backward pass is written with the
    same autograd Functions. Give the values through a
    [`SparseLinearOperator`][gpsparse.SparseLinearOperator] (``from_csr`` or
    ``(values, pattern=...)``): torch's own sparse tensors are differentiable
    only once in their values. The exact banded and CHOLMOD roads are
    differentiable once.

    Raises
    ------
    TypeError
        ``A`` dense or of an unsupported layout; ``B`` not floating.
    ValueError
        Non-square ``A``, mismatched shapes, dtype or device, NaN/Inf, or
        ``method="cg"``/``"minres"`` with a non-symmetric ``A``.
    NotPositiveDefiniteError
        CG met ``pᵀAp ≤ 0``.
    NonConvergenceError
        ``strict=True`` and the tolerance was not reached (otherwise a
        [`ConvergenceWarning`][gpsparse.errors.ConvergenceWarning] names the residual).

    Examples
    --------
    >>> import torch, gpsparse
    >>> i = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    >>> v = torch.tensor([4.0, 1.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> A = torch.sparse_coo_tensor(i, v, (2, 2))
    >>> x = gpsparse.solve(A, torch.ones(2, dtype=torch.float64))
    >>> x.sum().backward()   # v.grad has shape (4,)
    """
    solver = SolverConfig(
        method=method, rtol=rtol, atol=atol, max_iters=max_iters, preconditioner=preconditioner, strict=strict
    )
    values, pattern = matrix_parts(A, symmetrize=symmetric_grad is not False)
    if solver.method in ("cg", "minres") and not pattern.symmetric:
        raise ValueError(
            f"method={solver.method!r} needs a symmetric matrix, but A is not symmetric "
            "(pattern or values differ from Aᵀ); use method='bicgstab'"
        )
    if symmetric_grad and not pattern.symmetric:
        raise ValueError("symmetric_grad=True needs a symmetric matrix (its gradient is symmetrised on the pattern)")
    if symmetric_grad is False and pattern.symmetric:
        if road not in ("auto", "krylov"):
            raise ValueError(f"symmetric_grad=False is served by the Krylov road, not road={road!r}")
        road, solver = "krylov", replace(solver, symmetrize_grad=False)
    if road == "auto" and (method != "cg" or x0 is not None or preconditioner is not None):
        road = "krylov"
    config = road_config(
        symmetric=pattern.symmetric, num_rows=pattern.size[0], device_type=values.device.type, road=road
    )
    return dispatch.solve(values, pattern, B, replace(config, solver=solver), x0=x0)


def logdet(
    A,
    *,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_lanczos: int = DEFAULT_NUM_LANCZOS,
    gradient: str = "adjoint",
    preconditioner: Any = "jacobi",
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    reorthogonalize: bool = False,
    rtol: float = DEFAULT_RTOL,
    max_memory: int = DEFAULT_MAX_MEMORY,
    road: str = "auto",
) -> Tensor:
    r"""``log det A`` with sparse gradients: exact where the structure allows, else stochastic Lanczos quadrature.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric positive definite ``(n, n)`` torch sparse COO/CSR tensor
        (values may require grad) or operator with values ``(*batch, nnz)``.
    num_probes : int
        Rademacher probes ``p``. The estimate's standard deviation falls like
        ``1/√p``.
    num_lanczos : int
        Lanczos steps ``K`` per probe (adjoint mode).
    gradient : {"adjoint", "hutchinson"}
        Exact gradient of the estimate, or the probe-reuse (Hutchinson)
        estimate of ``A⁻¹`` at the nonzeros; see the module docstring.
    preconditioner : "jacobi" (default), "ic0", None or Preconditioner
        Fixed preconditioner with exact ``logdet M``; ``"jacobi"`` is the
        free, exact diagonal scaling.
    generator : torch.Generator, optional
        Source of the probes: the same generator state gives the same
        estimate, bit for bit.
    probes : Tensor, optional
        Explicit probes ``(n, p)`` or ``(*batch, n, p)`` with
        ``E[z zᵀ] = I`` (e.g. ``√n · I`` with ``num_lanczos = n`` makes the
        estimate exact).
    reorthogonalize : bool
        Full re-orthogonalisation in the Lanczos runs (O(n·p·K²)).
    rtol : float
        CG tolerance of the Hutchinson mode.
    max_memory : int
        Byte budget for stored Krylov bases (adjoint mode).
    road : {"auto", "banded", "cholesky", "dense", "krylov"}
        ``"auto"`` (default): the dispatcher's exact roads where they apply
        (``gpsparse.linalg.dispatch``) — the banded Cholesky for symmetric
        matrices of half-bandwidth ≤ ``max_banded_bandwidth``
        ([`gpsparse.settings.solver_defaults`][], default 6), CHOLMOD under
        ``logdet_defaults(method="cholesky")`` — else stochastic Lanczos
        quadrature. All stochastic arguments above (probes, depth, gradient,
        preconditioner, generator) apply only on the Krylov road; explicit
        ``probes`` select it, and ``road="krylov"`` forces it. ``"dense"`` forms the
        matrix (within [`gpsparse.settings.max_dense_size`][]).

    Returns
    -------
    Tensor
        ``(*batch,)`` estimates.

    Notes
    -----
    Cost (adjoint): ``2K`` SpMMs with ``p`` columns (forward + adjoint),
    memory ``n·p·K`` numbers (chunked to ``max_memory``, then ``3K`` SpMMs).
    Hutchinson: one CG run with ``p`` columns, memory O(n·p).

    Raises
    ------
    ValueError
        Non-symmetric ``A``, non-positive counts, bad probe shapes.
    NotPositiveDefiniteError
        A non-positive Ritz value or CG curvature (``A`` is not SPD).

    Examples
    --------
    >>> import torch, gpsparse
    >>> i = torch.tensor([[0, 1], [0, 1]])
    >>> A = torch.sparse_coo_tensor(i, torch.tensor([2.0, 3.0], dtype=torch.float64), (2, 2))
    >>> est = gpsparse.logdet(A, num_lanczos=2, probes=torch.eye(2, dtype=torch.float64) * 2**0.5)
    >>> torch.allclose(est, torch.tensor(6.0, dtype=torch.float64).log())
    True
    """
    if road == "auto" and probes is not None:
        road = "krylov"  # explicit probes ask for the estimator
    values, pattern, config = _logdet_parts(
        A, num_probes, num_lanczos, gradient, preconditioner, reorthogonalize, rtol, max_memory, road
    )
    return dispatch.logdet(values, pattern, config, probes=probes, generator=generator)


def inv_quad_logdet(
    A,
    rhs: Tensor | None = None,
    *,
    reduce_inv_quad: bool = True,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_lanczos: int = DEFAULT_NUM_LANCZOS,
    gradient: str = "adjoint",
    preconditioner: Any = "jacobi",
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    reorthogonalize: bool = False,
    rtol: float = DEFAULT_RTOL,
    max_memory: int = DEFAULT_MAX_MEMORY,
    road: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""``(Σ_c r_cᵀ A⁻¹ r_c, log det A)`` of a symmetric positive definite sparse ``A``, with sparse gradients.

    The inverse quadratic form of the columns of ``rhs`` (``(n,)``, ``(n, k)``
    or ``(*batch, n, k)``; per column ``(*batch, k)`` when
    ``reduce_inv_quad=False``; zero without ``rhs``) and the log-determinant,
    by the same road (see [`logdet`][gpsparse.logdet] for the arguments and roads). With
    ``gradient="hutchinson"`` on the Krylov road one batched CG run serves the
    probes and the quadratic term; with ``"adjoint"`` the quadratic term gets
    its own CG solve (``rtol``).

    Examples
    --------
    >>> import torch, gpsparse
    >>> i = torch.tensor([[0, 1], [0, 1]])
    >>> A = torch.sparse_coo_tensor(i, torch.tensor([2.0, 4.0], dtype=torch.float64), (2, 2))
    >>> quad, ld = gpsparse.inv_quad_logdet(A, torch.ones(2, dtype=torch.float64))
    >>> round(float(quad), 12), round(float(ld.exp()), 12)
    (0.75, 8.0)
    """
    if road == "auto" and probes is not None:
        road = "krylov"  # explicit probes ask for the estimator
    values, pattern, config = _logdet_parts(
        A, num_probes, num_lanczos, gradient, preconditioner, reorthogonalize, rtol, max_memory, road
    )
    quad, logdet_term = dispatch.inv_quad_logdet(values, pattern, rhs, config, probes=probes, generator=generator)
    if quad is None:
        return torch.zeros((), dtype=values.dtype, device=values.device), logdet_term
    return (quad.sum(-1) if reduce_inv_quad else quad), logdet_term


def _logdet_parts(A, num_probes, num_lanczos, gradient, preconditioner, reorthogonalize, rtol, max_memory, road):
    logdet_config = LogdetConfig(
        num_probes=num_probes,
        num_lanczos=num_lanczos,
        gradient=gradient,
        preconditioner=preconditioner,
        reorthogonalize=reorthogonalize,
        rtol=rtol,
        max_memory=max_memory,
    )
    values, pattern = matrix_parts(A)
    if not pattern.symmetric:
        raise ValueError("the log-determinant needs a symmetric positive definite matrix (pattern declared symmetric)")
    config = road_config(symmetric=True, num_rows=pattern.size[0], device_type=values.device.type, road=road)
    logdet_config = replace(logdet_config, cholesky_refresh=config.logdet.cholesky_refresh)
    return values, pattern, replace(config, logdet=logdet_config, solver=replace(config.solver, rtol=rtol))


def _layout(A, v: Tensor):
    values, pattern = matrix_parts(A)
    if not pattern.symmetric:
        raise ValueError("Lanczos needs a symmetric matrix (pattern and values equal to their transpose)")
    check_operand(v, values, "v")
    return values, pattern, flatten_operands(values, v, pattern.size[0])


def lanczos(
    A, v: Tensor, num_lanczos: int, *, reorthogonalize: bool = True, breakdown_tol: float | None = None
) -> LanczosDecomposition:
    r"""Differentiable Lanczos decomposition ``A Q ≈ Q T`` of a symmetric sparse matrix.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric ``(n, n)`` torch sparse COO/CSR tensor or operator.
    v : Tensor
        Start vectors ``(n,)``, ``(n, p)`` or ``(*batch, n, p)``; each column
        runs its own Lanczos process (all columns share each SpMM).
    num_lanczos : int
        Steps ``K`` (at most ``n``).
    reorthogonalize : bool
        Full re-orthogonalisation (default on).
    breakdown_tol : float, optional
        A column stops when ``β_k ≤ tol·‖T‖`` (default ``√eps``): its Krylov
        space is invariant. A tiny value (e.g. ``10·eps``) lets a run that
        is invariant only up to rounding continue in a fresh orthogonal
        direction, which a full-rank root decomposition needs.

    Returns
    -------
    LanczosDecomposition
        ``basis (B, n, p, K)``, ``alpha (B, p, K)``, ``beta (B, p, K-1)``,
        ``norm (B, p)``, ``steps (B, p)`` with ``B`` the flattened batch
        (1 for a single matrix). ``basis``, ``alpha``, ``beta`` and ``norm``
        are differentiable in ``A``'s values and ``v``; the backward is the
        Lanczos adjoint (one SpMM per step, memory O(n·p·K)).

    Examples
    --------
    >>> import torch, gpsparse
    >>> A = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1]]), torch.tensor([2.0, 3.0]), (2, 2))
    >>> dec = gpsparse.lanczos(A, torch.ones(2), 2)
    >>> dec.alpha.shape
    torch.Size([1, 1, 2])
    """
    values, pattern, (values2d, v3d, _) = _layout(A, v)
    basis, alpha, beta, norm, steps = LanczosFunction.apply(
        values2d, v3d, pattern, int(num_lanczos), reorthogonalize, breakdown_tol
    )
    return LanczosDecomposition(basis=basis, alpha=alpha, beta=beta, norm=norm, steps=steps)


def funm(
    A,
    v: Tensor,
    f: str,
    *,
    num_lanczos: int = DEFAULT_NUM_LANCZOS,
    reorthogonalize: bool = True,
    breakdown_tol: float | None = None,
) -> Tensor:
    r"""``f(A) v`` by the Lanczos approximation ``‖v‖ Q f(T) e₁``, with adjoint gradients.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        Symmetric ``(n, n)`` sparse matrix (positive definite for ``sqrt``,
        ``inv_sqrt``, ``log``, ``inv``).
    v : Tensor
        ``(n,)``, ``(n, p)`` or ``(*batch, n, p)``.
    f : {"sqrt", "inv_sqrt", "log", "exp", "inv"}
        The matrix function.
    num_lanczos : int
        Lanczos steps (the approximation is exact once ``K`` reaches the
        dimension of the Krylov space; the error otherwise falls
        geometrically with a rate set by the condition number and ``f``).
    breakdown_tol : float, optional
        See [`lanczos`][gpsparse.lanczos]. The value ``f(A)v`` is exact at an invariant
        Krylov space, but its *gradient* involves directions outside it: a
        tiny tolerance (continuing past rounding-level breakdowns) makes the
        gradient exact too when ``num_lanczos = n``.

    Returns
    -------
    Tensor
        ``f(A) v`` with ``v``'s (broadcast) shape.

    Raises
    ------
    ValueError
        Unknown ``f``, non-symmetric ``A``.
    NotPositiveDefiniteError
        A non-positive Ritz value for a function defined on positive numbers.
    """
    if f not in FUNCTIONS:
        raise ValueError(f"unknown matrix function {f!r}; choose one of {tuple(FUNCTIONS)}")
    values, pattern, (values2d, v3d, unflatten) = _layout(A, v)
    num_lanczos = min(int(num_lanczos), pattern.size[0])
    return unflatten(FunmFunction.apply(values2d, v3d, pattern, num_lanczos, f, reorthogonalize, breakdown_tol))


def matrix_parts(A, *, symmetrize: bool = True) -> tuple[Tensor, SparsityPattern]:
    """``(values, pattern)`` of a torch sparse COO/CSR tensor or of any operator carrying them.

    Operators are recognised by their ``values`` tensor and
    [`SparsityPattern`][gpsparse.SparsityPattern] attributes (so this layer needs no
    import of the operator classes above it). ``symmetrize=False`` keeps a
    symmetric tensor's values as given (see ``gpsparse.core.convert.declare_symmetry``).
    """
    pattern = getattr(A, "pattern", None)
    values = getattr(A, "values", None)
    if isinstance(pattern, SparsityPattern) and isinstance(values, Tensor):
        check_finite(values, "sparse matrix values")
        return values, pattern
    return sparse_parts(A, symmetrize=symmetrize)


#: Breakdown tolerance of Lanczos root decompositions, which must span the whole space when
#: K = n: only an exactly zero β stops a run, so rounding-level breakdowns (degenerate spectra)
#: continue in a fresh, re-orthogonalised direction.
_FULL_RANK_TOL = 0.0


def lanczos_roots(A, start: Tensor, num_lanczos: int) -> tuple[Tensor, Tensor]:
    """Rank-K roots ``R = Q V Θ^{1/2}`` and inverse roots ``Q V Θ^{-1/2}`` of a symmetric ``A``.

    ``start`` ``(*batch, n, p)``: one Lanczos run of ``num_lanczos`` steps per
    column (``T = V Θ Vᵀ``); returns two ``(p, *batch, n, K)`` tensors,
    differentiable through the Lanczos adjoint. ``R Rᵀ ≈ A`` (exact at ``K = n``).
    """
    dec = lanczos(A, start, num_lanczos, breakdown_tol=_FULL_RANK_TOL)
    theta, vectors = torch.linalg.eigh(dec.tridiagonal())  # (B, p, K), (B, p, K, K)
    ritz = dec.basis.movedim(-2, -3) @ vectors  # (B, p, n, K)
    theta = theta.clamp_min(torch.finfo(theta.dtype).tiny)
    roots, inv_roots = ritz * theta.sqrt().unsqueeze(-2), ritz * theta.rsqrt().unsqueeze(-2)
    shape = (*start.shape[:-2], start.shape[-1], start.shape[-2], num_lanczos)
    return tuple(r.reshape(shape).movedim(-3, 0) for r in (roots, inv_roots))
