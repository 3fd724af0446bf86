"""Numerics of regular lattices: Neumann Laplacians, their spectrum, and the Matérn-SPDE marginal variance.

Core layer (numpy, scipy, torch). Used by
[`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel], which re-exports
``neumann_laplacian``, ``neumann_eigenvalues`` and ``lattice_variance``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["neumann_laplacian", "neumann_eigenvalues", "lattice_variance"]

#: Trapezoid rule of ``lattice_variance`` in ``s = log t``: step and range. The integrand is
#: analytic in the strip ``|Im s| < π/2``, so the error is ~``exp(−π²/step)`` (7e-18 at 0.25);
#: the range leaves out ≤ ``exp(−40 α)`` below and ``t κ² > 80`` above (both < 1e-16 relative).
_QUAD_STEP = 0.25
_QUAD_LOWER = 40.0
_QUAD_UPPER = 80.0


# ------------------------------------------------------------------ lattice
def _path_laplacian(m: int, h: float) -> sp.csr_matrix:
    """Neumann path Laplacian ``(1/h²)·tridiag(−1, [1, 2, …, 2, 1], −1)`` (m × m)."""
    main = np.full(m, 2.0)
    main[[0, -1]] = 1.0
    off = -np.ones(m - 1)
    return sp.diags([off, main, off], [-1, 0, 1], format="csr") / h**2


def neumann_laplacian(grid_size, spacing) -> sp.csr_matrix:
    r"""Finite-difference Laplacian ``L`` of a regular grid with Neumann (reflecting) boundaries.

    $$
    L = \sum_d I ⊗ \cdots ⊗ \frac{1}{h_d^2} L^{path}_{m_d} ⊗ \cdots ⊗ I,
    $$

    ``L^{path}_m = tridiag(−1, [1, 2, …, 2, 1], −1)``: the graph Laplacian of
    a path, i.e. the 2·d+1-point stencil ``−Δ`` with a mirror half a cell
    beyond the outermost nodes (zero normal derivative). Nodes are numbered
    in C order (the first dimension varies slowest).

    Parameters
    ----------
    grid_size : sequence of int
        Nodes per dimension ``(m_1, …, m_d)``, each ≥ 2.
    spacing : sequence of float
        Node spacing per dimension ``(h_1, …, h_d)``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``N × N`` (``N = Π m_d``), symmetric positive semi-definite (constants in its kernel).
    """
    sizes, spacing = [int(m) for m in grid_size], [float(h) for h in spacing]
    total = sp.csr_matrix((math.prod(sizes), math.prod(sizes)))
    for d, (m, h) in enumerate(zip(sizes, spacing)):
        left = sp.identity(math.prod(sizes[:d]), format="csr")
        right = sp.identity(math.prod(sizes[d + 1 :]), format="csr")
        total = total + sp.kron(sp.kron(left, _path_laplacian(m, h)), right)
    return total.tocsr()


def neumann_eigenvalues(grid_size, spacing) -> np.ndarray:
    r"""The ``N`` eigenvalues of ``neumann_laplacian``, in closed form, O(N).

    $$
    λ_{k} = \sum_d \frac{2 − 2\cos(π k_d / m_d)}{h_d^2}, \qquad k_d = 0, …, m_d − 1
    $$

    (the eigenvectors are products of DCT-II vectors). Returned in C order of ``k``.
    """
    total = np.zeros(())
    for m, h in zip(grid_size, spacing):
        total = np.add.outer(total, (2.0 - 2.0 * np.cos(np.pi * np.arange(int(m)) / int(m))) / float(h) ** 2)
    return total.reshape(-1)


def lattice_variance(kappa2: Tensor, spacing, alpha: int) -> Tensor:
    r"""Marginal variance of ``(κ² I + L)^{−α}`` on the *infinite* lattice of spacing ``h``, differentiable in κ².

    With ``1/x^α = Γ(α)⁻¹ ∫₀^∞ t^{α−1} e^{−t x} dt`` and the separability of
    the lattice Laplacian,

    $$
    v(κ) = [(κ² I + L)^{−α}]_{ii} = \frac{1}{Γ(α)} \int_0^∞ t^{α−1} e^{−t κ²}
    \prod_d e^{−z_d} I_0(z_d)\, dt, \qquad z_d = 2t / h_d^2,
    $$

    (``e^{−z} I₀(z)``, ``torch.special.i0e``, is the diagonal of the heat
    kernel ``e^{−tL}`` of the infinite path). The integral runs by the
    trapezoid rule in ``s = log t`` (exponentially convergent, ~200 nodes,
    relative error ~1e-14; see ``_QUAD_STEP``), in float64, through a
    log-sum-exp; gradients with respect to ``κ²`` are those of the rule.

    Parameters
    ----------
    kappa2 : Tensor
        ``κ² > 0``, any shape ``(*batch)``.
    spacing : sequence of float
        Node spacing per dimension.
    alpha : int
        Power ``α ≥ 1``.

    Returns
    -------
    Tensor
        ``v(κ)``, shape and dtype of ``kappa2``.

    Examples
    --------
    >>> import torch
    >>> v = lattice_variance(torch.tensor(0.5, dtype=torch.float64), [1.0], alpha=1)
    >>> round(float(v), 12)  # 1-D, α = 1: 1 / √(κ² (κ² + 4))
    0.666666666667
    """
    h = torch.as_tensor([float(s) for s in spacing], dtype=torch.float64, device=kappa2.device)
    k2 = kappa2.to(torch.float64)
    detached = k2.detach()
    smallest = min(float(h.min()) ** 2, 1.0 / float(detached.max()))
    lower = math.log(smallest) - _QUAD_LOWER
    upper = math.log(_QUAD_UPPER / float(detached.min()))
    steps = int(math.ceil((upper - lower) / _QUAD_STEP)) + 1
    s = lower + _QUAD_STEP * torch.arange(steps, dtype=torch.float64, device=kappa2.device)
    t = s.exp()
    heat = torch.log(torch.special.i0e(2.0 * t.unsqueeze(-1) / h**2)).sum(-1)  # (K,)
    log_integrand = alpha * s + heat - t * k2.unsqueeze(-1)  # (*batch, K); dt = t ds
    log_v = torch.logsumexp(log_integrand, -1) + math.log(_QUAD_STEP) - math.lgamma(alpha)
    return log_v.exp().to(kappa2.dtype)


# ------------------------------------------------------------ interpolation
