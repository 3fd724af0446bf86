"""A registry of named test matrices ("operator market") shared by the tests.

Each builder returns a coalesced float64 torch sparse COO tensor; tests cast
and convert as they need. Readable ids drive parametrisation.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def scipy_to_torch(matrix: sp.spmatrix, dtype=torch.float64) -> torch.Tensor:
    coo = sp.coo_matrix(matrix)
    coo.sum_duplicates()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(coo.data).to(dtype), coo.shape, check_invariants=False
    ).coalesce()


def laplacian_1d(m: int) -> sp.csr_matrix:
    """Neumann 1-D graph Laplacian (tridiagonal, singular)."""
    main = np.full(m, 2.0)
    main[[0, -1]] = 1.0
    return sp.diags([-np.ones(m - 1), main, -np.ones(m - 1)], [-1, 0, 1], format="csr")


def lattice_laplacian(m: int) -> sp.csr_matrix:
    """Neumann 5-point Laplacian on an m × m lattice (n = m², 5 nnz per interior row)."""
    one = laplacian_1d(m)
    eye = sp.identity(m, format="csr")
    return (sp.kron(one, eye) + sp.kron(eye, one)).tocsr()


def lattice_precision_5pt(m: int, kappa: float = 0.5) -> sp.csr_matrix:
    """``κ²I + L``: SPD, 5 nnz/row."""
    return (kappa**2 * sp.identity(m * m) + lattice_laplacian(m)).tocsr()


def lattice_precision_13pt(m: int, kappa: float = 0.5, tau: float = 1.0, noise: float = 1.0) -> sp.csr_matrix:
    """``τ(κ²I + L)² + σ⁻²I``: SPD, 13 nnz/row."""
    base = lattice_precision_5pt(m, kappa)
    return (tau * (base @ base) + (1.0 / noise) * sp.identity(m * m)).tocsr()


def random_spd(n: int, density: float = 0.1, seed: int = 0) -> sp.csr_matrix:
    """Random sparse SPD matrix (diagonally dominant)."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=density, random_state=rng)
    a = a + a.T
    return (a + sp.diags(np.asarray(abs(a).sum(axis=1)).ravel() + 1.0)).tocsr()


def symmetric_indefinite(n: int, seed: int = 1) -> sp.csr_matrix:
    """Sparse symmetric matrix with eigenvalues of both signs, well away from zero."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=0.08, random_state=rng)
    a = 0.3 * (a + a.T)
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * (2.0 + rng.random(n))
    return (a + sp.diags(signs)).tocsr()


def nonsymmetric(n: int, seed: int = 2) -> sp.csr_matrix:
    """Sparse non-symmetric, diagonally dominant matrix (convection–diffusion-like)."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=0.08, random_state=rng) - 0.5 * sp.random(n, n, density=0.05, random_state=rng)
    conv = sp.diags([-1.3 * np.ones(n - 1), 0.7 * np.ones(n - 1)], [-1, 1])
    return (a + conv + sp.diags(np.asarray(abs(a).sum(axis=1)).ravel() + 3.0)).tocsr()


TINY = {
    "lattice5-3x3": lambda: lattice_precision_5pt(3),
    "nonsym-10": lambda: nonsymmetric(10),
}
SPD = {
    "lattice5-6x6": lambda: lattice_precision_5pt(6),
    "lattice13-5x5": lambda: lattice_precision_13pt(5, kappa=0.8, noise=0.5),
    "random-spd-40": lambda: random_spd(40),
}
INDEFINITE = {"sym-indefinite-40": lambda: symmetric_indefinite(40)}
NONSYMMETRIC = {"nonsym-40": lambda: nonsymmetric(40)}


def build(name: str, dtype=torch.float64) -> torch.Tensor:
    for registry in (SPD, INDEFINITE, NONSYMMETRIC, TINY):
        if name in registry:
            return scipy_to_torch(registry[name](), dtype)
    raise KeyError(name)
