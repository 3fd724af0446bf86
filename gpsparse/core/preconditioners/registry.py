"""The one registry of named preconditioners, and ``build_preconditioner``, which resolves a name.

A name in a ``SolverConfig`` or
``LogdetConfig`` (``preconditioner="ic0"``) is
turned into a preconditioner for the current, detached values of the matrix
by the builder registered under that name in ``PRECONDITIONER_BUILDERS``.
A builder has the signature

    builder(values, pattern, *, cholesky_refresh) -> Preconditioner or callable r ↦ M⁻¹r

with ``values`` the detached ``(B, nnz)`` values and ``pattern`` their
[`SparsityPattern`][gpsparse.SparsityPattern]. Adding a preconditioner is
one class (the [`Preconditioner`][gpsparse.Preconditioner]
contract) and one entry here; ``PRECONDITIONER_NAMES``, which the
configurations validate against, follows the registry.

Registered:

``"jacobi"``
:   [`JacobiPreconditioner`][gpsparse.JacobiPreconditioner] from
    the stored diagonal (batched; a missing diagonal entry counts as 0 and is
    rejected).

``"ic0"``
    ``incomplete_cholesky_with_shift``: IC(0), retried with growing
    diagonal shifts (``IC_SHIFTS``) when it breaks down. Not batched.
``"cholesky"``
    ``stale_cholesky``: a CHOLMOD factor from an earlier call, cached on
    the pattern and refactorised every ``cholesky_refresh`` uses.

This module reads no global settings: ``cholesky_refresh`` is an argument
(the configurations carry it; its default is
``DEFAULT_CHOLESKY_REFRESH``, repeated here as
``DEFAULT_CHOLESKY_REFRESH`` because the configuration module imports
this package).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gpsparse.core.defaults import DEFAULT_CHOLESKY_REFRESH
from gpsparse.core.preconditioners.base import Preconditioner
from gpsparse.core.preconditioners.ic0 import IncompleteCholeskyPreconditioner
from gpsparse.core.preconditioners.jacobi import JacobiPreconditioner
from gpsparse.errors import NotPositiveDefiniteError

if TYPE_CHECKING:
    from gpsparse.core.pattern import SparsityPattern

__all__ = [
    "PRECONDITIONER_BUILDERS",
    "PRECONDITIONER_NAMES",
    "PreconditionerBuilder",
    "DEFAULT_CHOLESKY_REFRESH",
    "build_preconditioner",
    "incomplete_cholesky_with_shift",
    "stale_cholesky",
    "IC_SHIFTS",
]

#: ``(values (B, nnz) detached, pattern, *, cholesky_refresh) -> Preconditioner or callable r ↦ M⁻¹r``.
PreconditionerBuilder = Callable[..., Preconditioner | Callable[[Tensor], Tensor]]

#: Relative diagonal shifts tried in turn by ``incomplete_cholesky_with_shift``.
IC_SHIFTS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)

#: Key of the stale CHOLMOD factor in the pattern's derived-structure cache.
_STALE_CHOLESKY_KEY = "preconditioners.stale_cholesky"


def incomplete_cholesky_with_shift(matrix: Any) -> IncompleteCholeskyPreconditioner:
    """IC(0) of ``A + s·diag(A)`` for the first shift ``s`` in ``IC_SHIFTS`` that has positive pivots.

    IC(0) can break down on SPD matrices that are not M-matrices (e.g. the
    13-point lattice precision ``τ(κ²I + L)² + σ⁻²I`` with small κ and
    σ⁻²); a diagonal shift (Manteuffel, 1980) restores it at the price of a
    slightly weaker preconditioner. The shift only changes ``M``, never the
    solution.

    Parameters
    ----------
    matrix : sparse Tensor or object with ``to_sparse_csr()``
        ``(n, n)``, as for
        ``from_matrix``.

    Raises
    ------
    NotPositiveDefiniteError
        When IC(0) breaks down even with the largest shift; the message
        carries the last error.
    """
    error = None
    for shift in IC_SHIFTS:
        try:
            return IncompleteCholeskyPreconditioner.from_matrix(matrix, shift=shift)
        except NotPositiveDefiniteError as err:
            # The message only: keeping the exception would keep its traceback, whose frames (and their
            # callers' frames, with the factor attempts' arrays) form a cycle with this one — memory that
            # only the cyclic collector frees (at N = 10⁶ in the Laplace Newton loop: gigabytes).
            error = str(err)
    raise NotPositiveDefiniteError(f"IC(0) broke down even with a diagonal shift of {IC_SHIFTS[-1]}: {error}")


@dataclass(eq=False)
class _StaleFactor:
    factor: Preconditioner
    uses: int = 0


def stale_cholesky(
    values: Tensor, pattern: SparsityPattern, *, cholesky_refresh: int = DEFAULT_CHOLESKY_REFRESH
) -> Preconditioner:
    """A CHOLMOD factor of this pattern's matrix from an earlier call, as a fixed preconditioner.

    Cached on the pattern (``pattern.derived``) and refactorised from the
    current (detached) values every ``cholesky_refresh`` uses, or when the
    batch size changes: during optimisation the matrix changes slowly, so an
    earlier factor keeps ``C⁻¹AC⁻ᵀ`` close to the identity and Krylov methods
    converge in a few steps, while the factorisation cost is paid only now
    and then.

    Parameters
    ----------
    values : Tensor
        ``(B, nnz)`` values on ``pattern`` (detached here).
    pattern : SparsityPattern
    cholesky_refresh : int
        Uses of one factor before it is rebuilt, ``≥ 1``.

    Raises
    ------
    ValueError
        ``cholesky_refresh`` not a positive integer.
    NotPositiveDefiniteError
        From the factorisation.
    """
    if isinstance(cholesky_refresh, bool) or not isinstance(cholesky_refresh, int) or cholesky_refresh < 1:
        raise ValueError(f"cholesky_refresh must be a positive integer, got {cholesky_refresh!r}")
    from gpsparse.core.cholmod import CholeskyPreconditioner  # lazy: cholmod imports this package

    values = values.detach()

    def factorise() -> _StaleFactor:
        return _StaleFactor(CholeskyPreconditioner.from_matrix(values, pattern))

    entry = pattern.derived(_STALE_CHOLESKY_KEY, factorise)
    if entry.uses >= cholesky_refresh or entry.factor.batch_shape.numel() != values.shape[0]:
        entry = factorise()
        pattern.set_derived(_STALE_CHOLESKY_KEY, entry)
    entry.uses += 1
    return entry.factor


def _jacobi(values: Tensor, pattern: SparsityPattern, *, cholesky_refresh: int) -> JacobiPreconditioner:
    pos = pattern.diagonal_positions
    diagonal = torch.where(pos >= 0, values[:, pos.clamp_min(0)], values.new_zeros(()))
    return JacobiPreconditioner(diagonal)


def _ic0(values: Tensor, pattern: SparsityPattern, *, cholesky_refresh: int) -> IncompleteCholeskyPreconditioner:
    if values.shape[0] != 1:
        raise NotImplementedError("the 'ic0' preconditioner needs a single (non-batched) matrix")
    return incomplete_cholesky_with_shift(pattern.to_sparse_csr(values[0]))


def _cholesky(values: Tensor, pattern: SparsityPattern, *, cholesky_refresh: int) -> Preconditioner:
    return stale_cholesky(values, pattern, cholesky_refresh=cholesky_refresh)


#: The registry: preconditioner name → builder (``PreconditionerBuilder``). Read-only.
PRECONDITIONER_BUILDERS: Mapping[str, PreconditionerBuilder] = MappingProxyType(
    {
        "jacobi": _jacobi,
        "ic0": _ic0,
        "cholesky": _cholesky,
    }
)

#: Names a preconditioner can be given by (SolverConfig / LogdetConfig / build_preconditioner).
PRECONDITIONER_NAMES = tuple(PRECONDITIONER_BUILDERS)


def build_preconditioner(
    spec: Any,
    values: Tensor,
    pattern: SparsityPattern,
    *,
    cholesky_refresh: int = DEFAULT_CHOLESKY_REFRESH,
) -> Preconditioner | Callable[[Tensor], Tensor] | None:
    """Resolve a preconditioner spec for the ``(B, nnz)`` values on ``pattern``.

    Parameters
    ----------
    spec : None, str, Preconditioner or callable
        A name from ``PRECONDITIONER_NAMES`` is built by its registered
        builder from the detached values; None or any non-string (an object
        or callable ``r ↦ M⁻¹ r``) is returned unchanged.
    values : Tensor
        ``(B, nnz)`` values (detached here).
    pattern : SparsityPattern
    cholesky_refresh : int
        Passed to the builder (used by ``"cholesky"``).

    Returns
    -------
    Preconditioner, callable or None

    Raises
    ------
    ValueError
        An unknown name.
    NotImplementedError
        ``"ic0"`` for batched values.
    NotPositiveDefiniteError
        From the factorisation.

    Examples
    --------
    >>> from gpsparse.core.pattern import SparsityPattern
    >>> pattern, order = SparsityPattern.from_indices(torch.tensor([0, 1]), torch.tensor([0, 1]), (2, 2))
    >>> P = build_preconditioner("jacobi", torch.tensor([[4.0, 9.0]]), pattern)
    >>> P(torch.ones(1, 2, 1)).squeeze(-1)
    tensor([[0.2500, 0.1111]])
    """
    if spec is None or not isinstance(spec, str):
        return spec
    try:
        builder = PRECONDITIONER_BUILDERS[spec]
    except KeyError:
        raise ValueError(
            f"unknown preconditioner {spec!r}; choose one of {PRECONDITIONER_NAMES}, an object or None"
        ) from None
    return builder(values.detach(), pattern, cholesky_refresh=cholesky_refresh)
