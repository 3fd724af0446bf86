r"""The SPDE/Matérn precision ``Q = τ (κ² I + L)^α`` on a fixed sparse Laplacian.

Lattice and graph Matérn models (Lindgren, Rue & Lindström 2011;
Borovitskiy et al. 2021) share one structure: a fixed symmetric positive
semi-definite sparse ``L`` (N × N) and an integer power ``α ≥ 1``. By the
binomial theorem (``I`` and ``L`` commute)

$$
Q(κ, τ) = τ \sum_{k=0}^{α} \binom{α}{k} κ^{2(α-k)} L^k ,
$$

so the stored values of ``Q`` are a linear combination of ``α + 1`` fixed
vectors — the entries of ``L⁰, …, L^α`` embedded in the pattern of
``(|L| + I)^α`` — with coefficients polynomial in ``κ²``. Building ``Q`` per
forward call is one ``(α+1) × nnz`` product, and its gradient with respect
to ``κ²`` and ``τ`` comes from plain autograd on those coefficients.

When the eigenvalues ``λ_k`` of ``L`` are known (lattices with Neumann
boundaries: closed form; small graphs: one dense eigendecomposition), the
log-determinant is exact and O(N),

$$
\log\det Q = N \log τ + α \sum_k \log(κ² + λ_k),
$$

and [`MaternPrecision.operator`][] returns a
``KnownLogdetSparseLinearOperator``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["MaternPrecision"]


class MaternPrecision:
    r"""Pattern and value basis of ``Q = τ (κ² I + L)^α`` (module docstring).

    Parameters
    ----------
    laplacian : scipy.sparse matrix
        Symmetric ``L`` (N × N), positive semi-definite (so ``Q`` is positive
        definite for every ``κ > 0``, ``τ > 0``). Not checked beyond symmetry.
    alpha : int
        Integer power ``α ≥ 1``.
    eigenvalues : array, optional
        ``(N,)`` eigenvalues of ``L``; when given, ``log det Q`` is exact.

    Attributes
    ----------
    pattern : SparsityPattern
        Symmetric pattern of ``Q`` (full diagonal), ``nnz`` entries.
    basis : numpy.ndarray
        ``(α + 1, nnz)``: row ``k`` holds the entries of ``L^k`` at the pattern.

    Notes
    -----
    Memory: the basis is ``(α+1)·nnz`` numbers, cached per device and dtype
    (e.g. 2-D lattice, α = 2: nnz ≈ 13 N, 39 N numbers). Building it costs
    ``α`` sparse products in SciPy (once).

    Examples
    --------
    >>> import scipy.sparse as sp, torch
    >>> L = sp.csr_matrix([[1.0, -1.0], [-1.0, 1.0]])
    >>> structure = MaternPrecision(L, alpha=2)
    >>> Q = structure.operator(torch.tensor(4.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    >>> Q.to_dense()
    tensor([[ 26., -10.],
            [-10.,  26.]], dtype=torch.float64)
    """

    def __init__(self, laplacian, alpha: int, *, eigenvalues=None):
        if int(alpha) != alpha or alpha < 1:
            raise ValueError(f"alpha must be an integer ≥ 1, got {alpha}")
        L = sp.csr_matrix(laplacian, dtype=np.float64)
        n = L.shape[0]
        if L.shape != (n, n):
            raise ValueError(f"the Laplacian must be square, got shape {L.shape}")
        if abs(L - L.T).max() > 1e-12 * max(abs(L).max(), 1.0):
            raise ValueError("the Laplacian must be symmetric")
        self.alpha = int(alpha)
        self.num_nodes = n
        structure = _power_structure(L, self.alpha)
        crow = torch.from_numpy(structure.indptr.astype(np.int64))
        self.pattern = SparsityPattern(crow, torch.from_numpy(structure.indices), (n, n), symmetric=True)
        # L^k is symmetric, but SciPy's products round (i, j) and (j, i) differently; a symmetric
        # pattern promises values == values[transpose_perm] exactly.
        basis = _basis(L, self.alpha, structure)
        self.basis = 0.5 * (basis + basis[:, self.pattern.transpose_perm.numpy()])
        self.eigenvalues = None if eigenvalues is None else np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
        if self.eigenvalues is not None and self.eigenvalues.shape[0] != n:
            raise ValueError(f"expected {n} eigenvalues, got {self.eigenvalues.shape[0]}")
        self._cache: dict[tuple, tuple[SparsityPattern, Tensor, Tensor | None]] = {}

    def _tensors(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, torch.device(device))
        if key not in self._cache:
            eig = None if self.eigenvalues is None else torch.as_tensor(self.eigenvalues, dtype=dtype, device=device)
            basis = torch.as_tensor(self.basis, dtype=dtype, device=device)
            self._cache[key] = (self.pattern.to(device), basis, eig)
        return self._cache[key]

    def coefficients(self, kappa2: Tensor) -> Tensor:
        """``(*batch, α + 1)``: ``binom(α, k) κ^{2(α−k)}`` for ``k = 0 … α``."""
        powers = [kappa2 ** (self.alpha - k) * math.comb(self.alpha, k) for k in range(self.alpha + 1)]
        return torch.stack(powers, dim=-1)

    def operator(self, kappa2: Tensor, tau: Tensor) -> SparseLinearOperator:
        """``Q`` for ``κ² (*batch)`` and ``τ (*batch)`` (broadcast), values ``(*batch, nnz)``.

        A ``KnownLogdetSparseLinearOperator``
        when the eigenvalues are known.
        """
        kappa2, tau = torch.broadcast_tensors(kappa2, tau)
        pattern, basis, eig = self._tensors(kappa2.dtype, kappa2.device)
        values = tau.unsqueeze(-1) * (self.coefficients(kappa2) @ basis)
        if eig is None:
            return SparseLinearOperator(values, pattern=pattern)
        return KnownLogdetSparseLinearOperator(values, self.logdet(kappa2, tau), pattern=pattern)

    def logdet(self, kappa2: Tensor, tau: Tensor) -> Tensor:
        """Exact ``log det Q = N log τ + α Σ_k log(κ² + λ_k)``, ``(*batch)`` (needs the eigenvalues)."""
        if self.eigenvalues is None:
            raise ValueError("the exact log-determinant needs the Laplacian's eigenvalues")
        _, _, eig = self._tensors(kappa2.dtype, kappa2.device)
        spectrum = torch.log(kappa2.unsqueeze(-1) + eig).sum(-1)
        return self.num_nodes * torch.log(tau) + self.alpha * spectrum

    def mean_variance(self, kappa2: Tensor) -> Tensor:
        """``(1/N) tr (κ² I + L)^{−α}`` (``τ = 1``), exact from the eigenvalues, ``(*batch)``."""
        if self.eigenvalues is None:
            raise ValueError("the mean variance needs the Laplacian's eigenvalues")
        _, _, eig = self._tensors(kappa2.dtype, kappa2.device)
        return (kappa2.unsqueeze(-1) + eig).pow(-self.alpha).mean(-1)


def _power_structure(L: sp.csr_matrix, alpha: int) -> sp.csr_matrix:
    """The pattern of ``(|L| + I)^α`` (contains every ``L^k``, k ≤ α, without cancellation), sorted CSR."""
    step = (abs(L) + sp.identity(L.shape[0], format="csr")).tocsr()
    step.data[:] = 1.0
    structure = step
    for _ in range(alpha - 1):
        structure = (structure @ step).tocsr()
        structure.data[:] = 1.0
    structure.sort_indices()
    return structure


def _basis(L: sp.csr_matrix, alpha: int, structure: sp.csr_matrix) -> np.ndarray:
    """``(α + 1, nnz)``: entries of ``L^k`` at the positions of ``structure`` (sorted CSR order)."""
    n = L.shape[0]
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(structure.indptr))
    keys = row * n + structure.indices.astype(np.int64)  # increasing: sorted CSR
    basis = np.zeros((alpha + 1, keys.shape[0]))
    power = sp.identity(n, format="csr")
    for k in range(alpha + 1):
        coo = power.tocoo()
        basis[k, np.searchsorted(keys, coo.row.astype(np.int64) * n + coo.col)] = coo.data
        if k < alpha:
            power = (power @ L).tocsr()
    return basis
