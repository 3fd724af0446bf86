"""The preconditioner contract (``Preconditioner``) and the input checks shared by its implementations.

Used by ``jacobi``,
``ic0`` and ``gpsparse.core.cholmod``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

__all__ = ["Preconditioner"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------


class Preconditioner(abc.ABC):
    """A fixed symmetric positive definite ``M = C Cᵀ ≈ A`` with cheap solves.

    Subclasses implement ``_solve``, ``_apply_inv_factor``,
    ``_apply_inv_factor_t``, [`logdet`][], [`to`][] and the
    properties ``size``, ``device``, ``dtype``; the public apply methods
    validate ``r`` and run the subclass method under ``torch.no_grad``.

    Contract
    --------
    * ``P(r)`` and ``P.solve(r)`` return ``M⁻¹ r``; ``r`` has shape
        ``(*batch, n, k)`` (at least 2-D, ``n = P.size``), the same dtype and
        device as ``P``. The result has shape ``(*batch, n, k)`` (broadcast
        against ``P.batch_shape``).
    * ``apply_inv_factor(r) = C⁻¹ r`` and ``apply_inv_factor_t(r) = C⁻ᵀ r``,
        so ``apply_inv_factor_t(apply_inv_factor(r)) = M⁻¹ r``.
    * ``logdet()`` is ``log det M`` exactly, shape ``P.batch_shape``.
    * ``to(device=None, dtype=None)`` returns a new preconditioner.
    * Inputs are never modified in place.
    * Not differentiable: state is detached and applies run under
        ``torch.no_grad()``; outputs have ``requires_grad=False``.
    """

    # -- metadata -----------------------------------------------------------

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """``n``, the order of ``M``."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device of the preconditioner's tensors (and of accepted ``r``)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the preconditioner (and of accepted ``r``)."""

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of ``M`` (``torch.Size([])`` when not batched)."""
        return torch.Size([])

    @abc.abstractmethod
    def logdet(self) -> torch.Tensor:
        """``log det M``, exact; shape [`batch_shape`][]."""

    @abc.abstractmethod
    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Preconditioner:
        """A copy on ``device`` with ``dtype`` (``None`` keeps the current one)."""

    # -- applies ------------------------------------------------------------

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ r`` for ``r`` of shape ``(*batch, n, k)``."""
        self._check_rhs(r)
        with torch.no_grad():
            return self._solve(r.detach())

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """Same as [`solve`][], so ``P`` can be passed as a callable."""
        return self.solve(r)

    def apply_inv_factor(self, r: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ r`` for ``r`` of shape ``(*batch, n, k)``, where ``M = C Cᵀ``."""
        self._check_rhs(r)
        with torch.no_grad():
            return self._apply_inv_factor(r.detach())

    def apply_inv_factor_t(self, r: torch.Tensor) -> torch.Tensor:
        """``C⁻ᵀ r`` for ``r`` of shape ``(*batch, n, k)``, where ``M = C Cᵀ``."""
        self._check_rhs(r)
        with torch.no_grad():
            return self._apply_inv_factor_t(r.detach())

    @abc.abstractmethod
    def _solve(self, r: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _apply_inv_factor(self, r: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _apply_inv_factor_t(self, r: torch.Tensor) -> torch.Tensor: ...

    def _check_rhs(self, r: Any) -> None:
        name = type(self).__name__
        if not isinstance(r, torch.Tensor) or r.layout != torch.strided:
            raise TypeError(f"{name}: r must be a dense torch.Tensor, got {type(r).__name__}")
        if r.dim() < 2 or r.shape[-2] != self.size:
            raise ValueError(
                f"{name}: r must have shape (*batch, n, k) with n = {self.size}, got "
                f"{tuple(r.shape)} (pass a vector as r.unsqueeze(-1))"
            )
        if r.dtype != self.dtype:
            raise TypeError(
                f"{name}: r has dtype {r.dtype} but the preconditioner has {self.dtype}; "
                f"convert one of them (e.g. P.to(dtype={r.dtype}))"
            )
        if r.device != self.device:
            raise ValueError(
                f"{name}: r is on {r.device} but the preconditioner is on {self.device}; "
                f"use P.to(device={str(r.device)!r})"
            )

    def __repr__(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if len(self.batch_shape) else ""
        return f"{type(self).__name__}(size={self.size}{batch}, dtype={self.dtype}, device={self.device})"


# ---------------------------------------------------------------------------
# Input validation shared by the from_matrix constructors
# ---------------------------------------------------------------------------


def _as_sparse(A: Any, who: str) -> torch.Tensor:
    """Validate ``A`` and return it as a detached sparse COO or CSR tensor."""
    if isinstance(A, torch.Tensor):
        S = A
    elif callable(getattr(A, "to_sparse_csr", None)):
        S = A.to_sparse_csr()
        if not isinstance(S, torch.Tensor):
            raise TypeError(
                f"{who}: {type(A).__name__}.to_sparse_csr() returned {type(S).__name__}, "
                "expected a torch sparse CSR tensor"
            )
    else:
        raise TypeError(
            f"{who}: A must be a torch sparse COO/CSR tensor or have a to_sparse_csr() method, got {type(A).__name__}"
        )
    if S.layout == torch.strided:
        raise TypeError(
            f"{who}: A is a dense tensor; convert it with A.to_sparse_csr() "
            "(preconditioners work on the stored nonzeros of a sparse matrix)"
        )
    if S.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise TypeError(f"{who}: unsupported sparse layout {S.layout}; convert A with A.to_sparse_csr()")
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"{who}: A must be square (*batch, n, n), got shape {tuple(S.shape)}")
    if S.layout == torch.sparse_coo and S.dense_dim() != 0:
        raise ValueError(f"{who}: hybrid COO tensors (dense_dim > 0) are not supported")
    if S.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: A must have dtype float32 or float64, got {S.dtype}")
    S = S.detach()
    if S.layout == torch.sparse_coo:
        S = S.coalesce()
    values = S.values()
    # a finite sum proves every value finite (NaN and ±inf propagate), at a
    # fraction of the cost of isfinite(values).all(); only then look closer
    if values.numel() and not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        e = int((~torch.isfinite(values)).flatten().nonzero()[0, 0])
        raise ValueError(f"{who}: A has non-finite values (first at stored entry {e}: {values.flatten()[e].item()})")
    return S


def _check_dtype(dtype: torch.dtype, who: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: dtype must be float32 or float64, got {dtype}")
