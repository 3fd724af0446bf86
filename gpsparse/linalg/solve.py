"""The public sparse solve with sparse gradients."""

from __future__ import annotations

from torch import Tensor

from gpsparse.autograd.sparse import SparseSolve
from gpsparse.core.batching import flatten_operands
from gpsparse.core.convert import check_finite, sparse_parts
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.solver import PreconditionerSpec, SolverConfig

__all__ = ["solve", "matrix_parts", "check_operand"]


def solve(
    A,
    B: Tensor,
    *,
    method: str = "cg",
    preconditioner: PreconditionerSpec = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iters: int | None = None,
    x0: Tensor | None = None,
    strict: bool = False,
) -> Tensor:
    r"""Solve ``A X = B`` iteratively, with gradients that stay sparse.

    Parameters
    ----------
    A : Tensor or SparseLinearOperator
        ``(n, n)`` torch sparse COO or CSR tensor (its values may require
        grad), or a :class:`~gpsparse.SparseLinearOperator` (values
        ``(*batch, nnz)``).
    B : Tensor
        Dense right-hand side ``(n,)``, ``(n, k)`` or ``(*batch, n, k)``.
    method : {"cg", "minres", "bicgstab"}
        ``cg`` (symmetric positive definite), ``minres`` (symmetric
        indefinite) or ``bicgstab`` (non-symmetric).
    preconditioner : None, "jacobi", "ic0", Preconditioner or callable
        See :class:`~gpsparse.core.solver.SolverConfig`.
    rtol, atol : float
        Stop a column when ``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``.
    max_iters : int, optional
        Iteration cap (default ``10·n``).
    x0 : Tensor, optional
        Initial guess, shaped like ``B`` (forward solve only).
    strict : bool
        Raise instead of warning when the tolerance is not reached.

    Returns
    -------
    Tensor
        ``X`` with the broadcast shape of ``B``.

    Notes
    -----
    Gradients (``G`` the upstream gradient of ``X``)::

        Ĝ = A⁻ᵀ G                    (one solve with Aᵀ, same method)
        ∂L/∂B    = Ĝ
        ∂L/∂a[e] = −Σ_c Ĝ[i_e, c] · X[j_e, c]   at the stored entries only

    The value gradient has shape ``(nnz,)`` (``(*batch, nnz)``); nothing
    ``n × n`` is formed. For a matrix detected or declared symmetric it is
    symmetrised (``(g + gᵀ)/2`` on the pattern). Cost: the forward solve,
    one transpose solve and one sampled product (SDDMM) over the nonzeros.

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
        :class:`~gpsparse.errors.ConvergenceWarning` names the residual).

    Examples
    --------
    >>> import torch, gpsparse
    >>> i = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    >>> v = torch.tensor([4.0, 1.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> A = torch.sparse_coo_tensor(i, v, (2, 2))
    >>> x = gpsparse.solve(A, torch.ones(2, dtype=torch.float64))
    >>> x.sum().backward()   # v.grad has shape (4,)
    """
    config = SolverConfig(
        method=method, rtol=rtol, atol=atol, max_iters=max_iters, preconditioner=preconditioner, strict=strict
    )
    values, pattern = matrix_parts(A)
    if config.method in ("cg", "minres") and not pattern.symmetric:
        raise ValueError(
            f"method={config.method!r} needs a symmetric matrix, but A is not symmetric "
            "(pattern or values differ from Aᵀ); use method='bicgstab'"
        )
    return solve_parts(values, pattern, B, config, x0=x0)


def solve_parts(
    values: Tensor, pattern: SparsityPattern, B: Tensor, config: SolverConfig, *, x0: Tensor | None = None
) -> Tensor:
    """:func:`solve` on an already validated ``(values, pattern)`` pair."""
    if not pattern.is_square:
        raise ValueError(f"A must be square to solve with it, got size {pattern.size}")
    check_operand(B, values, "B")
    values2d, rhs3d, unflatten = flatten_operands(values, B, pattern.size[1])
    x03d = None
    if x0 is not None:
        if x0.shape != B.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but B has shape {tuple(B.shape)}")
        check_operand(x0, values, "x0")
        x03d = flatten_operands(values, x0.detach(), pattern.size[1])[1]
    return unflatten(SparseSolve.apply(values2d, rhs3d, pattern, config, x03d))


def matrix_parts(A) -> tuple[Tensor, SparsityPattern]:
    """``(values, pattern)`` of a torch sparse tensor or a SparseLinearOperator."""
    from gpsparse.operators.sparse import SparseLinearOperator

    if isinstance(A, SparseLinearOperator):
        check_finite(A.values, "sparse matrix values")
        return A.values, A.pattern
    return sparse_parts(A)


def check_operand(tensor: Tensor, values: Tensor, name: str) -> None:
    """A dense operand must be a floating tensor of the matrix's dtype and device, without NaN/Inf."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != values.layout:
        raise TypeError(f"{name} must be a dense tensor, got layout {tensor.layout}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.dtype != values.dtype:
        raise ValueError(
            f"{name} has dtype {tensor.dtype} but the matrix has dtype {values.dtype}; convert one of them"
        )
    if tensor.device != values.device:
        raise ValueError(f"{name} is on {tensor.device} but the matrix is on {values.device}; move one of them")
    check_finite(tensor, name)
