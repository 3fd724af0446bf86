"""The Jacobi (diagonal) preconditioner ``M = diag(A)``, batched."""

from __future__ import annotations

from typing import Any

import torch

from gpsparse.core.preconditioners.base import Preconditioner, _as_sparse, _check_dtype
from gpsparse.errors import NotPositiveDefiniteError

__all__ = ["JacobiPreconditioner"]


class JacobiPreconditioner(Preconditioner):
    """Diagonal (Jacobi) preconditioner ``M = diag(A)``.

    ``C = diag(√a_ii)``, so ``M⁻¹ r = r / a``, ``C⁻¹ r = C⁻ᵀ r = r / √a`` and
    ``log det M = Σ log a_ii``. Batched diagonals ``(*batch, n)`` are
    supported; their batch dimensions broadcast against those of ``r``.

    Parameters
    ----------
    diagonal : Tensor, shape ``(*batch, n)``
        The diagonal of ``A``: float32 or float64, finite, strictly positive.
        Detached; never modified.

    Raises
    ------
    NotPositiveDefiniteError
        If an entry is ``≤ 0`` or not finite (the message names the first).
    TypeError, ValueError
        For a non-floating dtype or a 0-d tensor.

    Notes
    -----
    Works on any device with plain elementwise ops; cost ``O(n k)`` per
    apply. Not differentiable (see [`Preconditioner`][gpsparse.Preconditioner]).

    Examples
    --------
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 9.0]]).to_sparse_csr()
    >>> P = JacobiPreconditioner.from_matrix(A)
    >>> P(torch.ones(2, 1)).squeeze(-1)
    tensor([0.2500, 0.1111])
    """

    def __init__(self, diagonal: torch.Tensor) -> None:
        who = "JacobiPreconditioner"
        if not isinstance(diagonal, torch.Tensor) or diagonal.layout != torch.strided:
            raise TypeError(f"{who}: diagonal must be a dense torch.Tensor")
        _check_dtype(diagonal.dtype, who)
        if diagonal.dim() < 1 or diagonal.shape[-1] == 0:
            raise ValueError(f"{who}: diagonal must have shape (*batch, n), n ≥ 1, got {tuple(diagonal.shape)}")
        d = diagonal.detach()
        bad = ~(torch.isfinite(d) & (d > 0))
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            where = idx[0] if len(idx) == 1 else idx
            raise NotPositiveDefiniteError(
                f"{who}: diagonal entry at index {where} is {d[idx].item()}; a Jacobi "
                "preconditioner needs every diagonal entry finite and > 0 "
                "(is A positive definite?)"
            )
        self._diagonal = d.clone()  # private copy: later in-place edits of the input do not leak in
        self._sqrt = self._diagonal.sqrt()

    @classmethod
    def from_matrix(cls, A: Any) -> JacobiPreconditioner:
        """Build from the diagonal of a sparse ``A``.

        Parameters
        ----------
        A : sparse Tensor or object with ``to_sparse_csr()``
            Shape ``(*batch, n, n)``, COO (possibly uncoalesced: duplicates are
            summed) or CSR, float32/float64, finite values. Entries missing
            from the pattern count as zero (and are then rejected).

        Raises
        ------
        TypeError
            Dense or unsupported input, non-floating dtype.
        ValueError
            Non-square shape or non-finite values.
        NotPositiveDefiniteError
            A diagonal entry ``≤ 0`` (or missing).
        """
        S = _as_sparse(A, "JacobiPreconditioner.from_matrix")
        n = S.shape[-1]
        batch = S.shape[:-2]
        if S.dim() > 2 and S.layout == torch.sparse_csr:
            S = S.to_sparse_coo().coalesce()
        if S.layout == torch.sparse_csr:
            crow, col = S.crow_indices(), S.col_indices()
            row = torch.repeat_interleave(torch.arange(n, device=crow.device, dtype=crow.dtype), crow.diff())
            idx = (row, col)
        else:
            idx = S.indices()
        vals = S.values()
        on_diag = idx[-1] == idx[-2]
        # linear index (batch..., i) of each diagonal entry
        lin = idx[-1][on_diag]
        stride = n
        for dim in range(len(batch) - 1, -1, -1):
            lin = lin + idx[dim][on_diag] * stride
            stride *= batch[dim]
        diag = torch.zeros(stride, dtype=vals.dtype, device=vals.device)
        diag.index_add_(0, lin, vals[on_diag])
        return cls(diag.reshape(*batch, n))

    # -- metadata -----------------------------------------------------------

    @property
    def diagonal(self) -> torch.Tensor:
        """The stored diagonal ``(*batch, n)`` (do not modify)."""
        return self._diagonal

    @property
    def size(self) -> int:
        return self._diagonal.shape[-1]

    @property
    def device(self) -> torch.device:
        return self._diagonal.device

    @property
    def dtype(self) -> torch.dtype:
        return self._diagonal.dtype

    @property
    def batch_shape(self) -> torch.Size:
        return self._diagonal.shape[:-1]

    def logdet(self) -> torch.Tensor:
        return self._diagonal.log().sum(-1)

    def to(self, device=None, dtype=None) -> JacobiPreconditioner:
        if dtype is not None:
            _check_dtype(dtype, "JacobiPreconditioner.to")
        return JacobiPreconditioner(self._diagonal.to(device=device, dtype=dtype))

    # -- applies ------------------------------------------------------------

    def _solve(self, r: torch.Tensor) -> torch.Tensor:
        return r / self._diagonal.unsqueeze(-1)

    def _apply_inv_factor(self, r: torch.Tensor) -> torch.Tensor:
        return r / self._sqrt.unsqueeze(-1)

    _apply_inv_factor_t = _apply_inv_factor
