r"""The SPDE/Matérn precision on a mesh as a differentiable function of ``κ``, ``τ`` (and ``H``) on a fixed pattern.

The finite-element discretisation (Lindgren, Rue & Lindström 2011) of
``(κ² − ∇·H∇)^{α/2} (τ u) = W`` with P1 elements and the lumped mass
``C̃`` gives, for ``α = 1, 2`` (and by recursion any integer ``α``),

$$
Q_1 = T (K) T, \qquad Q_2 = T\, K \tilde C^{-1} K\, T, \qquad K = \mathcal{K} \tilde C \mathcal{K} + G_H,
$$

``T = diag(τ_i)``, ``𝒦 = diag(κ_i)`` (constant for a stationary field:
``Q_2 = τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G)``). With ``D = C̃^{1/2}`` and the
mass-normalised Laplacian ``L = D⁻¹ G_H D⁻¹`` (the matrices commute with the
diagonal ones where needed) this is

$$
Q_α = T D\, M^α\, D T, \qquad M = \mathcal{K}^2 + L,
$$

so that, entry by entry on the pattern of ``Q`` (the ``α``-ring of the
mesh's vertex adjacency),

$$
Q_{ij} = (τ d)_i (τ d)_j \bigl[δ_{ij} κ_i^4 + (κ_i^2 + κ_j^2) L_{ij} + (L^2)_{ij}\bigr] \quad (α = 2),
$$

with ``L = Σ_k h_k L_k`` linear in the entries of ``H`` (``L_k`` from the
stiffness components, ``gpsparse.mesh.fem.stiffness_components``) and
``L² = Σ_{a ≤ b} h_a h_b (L_a L_b + L_b L_a)/(1 + δ_ab)`` — fixed sparse
products computed once (SciPy). A stationary isotropic field needs only the
``α + 1`` vectors ``d_i d_j (L^k)_{ij}``: ``values = τ² Σ_k \binom{α}{k}
κ^{2(α−k)} B_k``, one ``(α+1) × nnz`` product per call, as in
[`MaternPrecision`][gpsparse.kernels.MaternPrecision]. Either way ``Q`` is
built per call in ``O(nnz)`` and differentiated by plain autograd.

*Log-determinant.* ``C̃`` is diagonal, so

$$
\log\det Q_α = 2 \sum_i \log τ_i + \sum_i \log \tilde c_i + α \log\det M
$$

(for ``α = 2`` and constant ``τ``: ``2 log det(κ²C̃ + G) − log det C̃ + n log τ²``):
only the first-order factor ``M`` (the pattern of ``G``, ~7 entries per row
in 2-D, far better conditioned than ``Q``) needs a factorisation or an
estimate; ``factor_values`` gives its values.

Core layer: NumPy, SciPy and torch; no gpytorch.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern

__all__ = ["MeshSPDEStructure", "matern_tau", "nominal_smoothness", "sphere_variance_factor"]


class MeshSPDEStructure:
    r"""Patterns and fixed vectors of ``Q_α`` and of its factor ``M`` on one mesh (module docstring).

    Parameters
    ----------
    mesh : gpsparse.mesh.Mesh
        The mesh (its lumped mass and stiffness are read once).
    alpha : int
        ``α ≥ 1``; non-stationary or anisotropic fields need ``α ∈ {1, 2}``.
    anisotropic : bool
        Keep the three stiffness components (planar meshes) so that ``H`` can vary.
    general : bool
        Keep what per-vertex ``κ_i``, ``τ_i`` need (index vectors and the
        ``L`` vectors on the pattern of ``Q``); a stationary isotropic field
        uses the ``α`` basis vectors and ``c̃`` only.

    Attributes
    ----------
    pattern : SparsityPattern
        Symmetric pattern of ``Q`` (``nnz`` entries, full diagonal).
    factor_pattern : SparsityPattern
        Symmetric pattern of ``M`` (the vertex adjacency with the diagonal).
    lumped : numpy.ndarray
        ``(N,)`` lumped mass ``c̃``.

    Notes
    -----
    Memory (float64, ``N`` vertices of a planar mesh, ~7 entries per row of
    ``M`` and ~19 of ``Q_2``): the stationary basis ``α·19 N`` numbers (the
    ``k = 0`` term is the lumped mass on the diagonal); per-vertex fields keep
    ``3·19 N`` numbers and two index vectors instead; an anisotropic field ``(3 + 6)·19 N``.
    """

    def __init__(self, mesh, alpha: int = 2, *, anisotropic: bool = False, general: bool = False):
        if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 1:
            raise ValueError(f"alpha must be an integer ≥ 1, got {alpha!r}")
        alpha = int(alpha)
        if (anisotropic or general) and alpha > 2:
            raise ValueError(f"non-stationary or anisotropic mesh fields support alpha = 1 or 2, got {alpha}")
        if anisotropic and mesh.kind != "plane":
            raise ValueError(f"an anisotropy H needs a planar mesh, got a {mesh.kind} mesh")
        self.alpha, self.anisotropic, self.general = alpha, bool(anisotropic), bool(general) or bool(anisotropic)
        self.num_nodes = n = mesh.num_vertices
        self.lumped = mesh.lumped_mass()
        d_inv = 1.0 / np.sqrt(self.lumped)
        scale = sp.diags(d_inv)
        if anisotropic:
            components = mesh.stiffness_components()
        else:
            components = (mesh.stiffness_matrix(),)
        # The pattern of M: the vertex pairs sharing a cell — for an isotropic field only those where G is not
        # exactly zero (right angles on a triangulated lattice: then Q has the lattice's 13-point stencil).
        adjacency = _adjacency(mesh.cells, n) if anisotropic else _nonzero_pattern(components[0])
        laplacians = [_on_pattern((scale @ g @ scale).tocsr(), adjacency) for g in components]
        structure = adjacency
        for _ in range(alpha - 1):
            structure = _ones(structure @ adjacency)
        self.factor_pattern = _pattern(adjacency)
        self.pattern = _pattern(structure)
        keys = _keys(structure)
        index = np.int32 if n < 2**31 else np.int64
        row = np.repeat(np.arange(n, dtype=index), np.diff(structure.indptr))
        col = structure.indices
        self._diag = np.flatnonzero(row == col)  # vertex i's diagonal entry, in vertex order
        self._factor_diag = np.flatnonzero(np.repeat(np.arange(n), np.diff(adjacency.indptr)) == adjacency.indices)
        fperm = self.factor_pattern.transpose_perm.numpy()
        self.factor_laplacians = np.stack([_symmetric(lap.data.copy(), fperm) for lap in laplacians])  # (k, nnz_M)
        self.log_lumped_sum = float(np.log(self.lumped).sum())
        sqrt_c = np.sqrt(self.lumped)
        s = sqrt_c[row]
        s *= sqrt_c[col]  # d_i d_j
        perm = self.pattern.transpose_perm.numpy()
        self.second = None
        if not self.general:
            # Row k − 1 holds d_i d_j (L^k)_ij for k = 1 … α; the k = 0 term is c̃ on the diagonal.
            self.basis = np.empty((alpha, keys.shape[0]))
            power = laplacians[0]
            for k in range(1, alpha + 1):
                row_k = self.basis[k - 1]
                row_k[:] = _embed(power, keys, n)
                row_k *= s
                _symmetric(row_k, perm)
                if k < alpha:
                    power = (power @ laplacians[0]).tocsr()
        else:
            self._row, self._col = row.astype(np.int64), col.astype(np.int64)
            self.scale = s
            self.first = np.stack([_symmetric(_embed(lap, keys, n), perm) for lap in laplacians])  # L_k on Q's pattern
            if alpha == 2:
                second = []
                for a in range(len(laplacians)):
                    for b in range(a, len(laplacians)):
                        prod = laplacians[a] @ laplacians[b]
                        if a != b:
                            prod = prod + laplacians[b] @ laplacians[a]
                        second.append(_symmetric(_embed(prod.tocsr(), keys, n), perm))
                self.second = np.stack(second)  # (k(k+1)/2, nnz), pairs a ≤ b in order
        self._cache: dict = {}

    # ------------------------------------------------------------------ tensors
    def tensors(self, dtype: torch.dtype, device) -> dict:
        """The fixed vectors as tensors of ``dtype`` on ``device`` (cached)."""
        key = (dtype, torch.device(device))
        if key not in self._cache:

            def t(a):
                return None if a is None else torch.as_tensor(a, dtype=dtype, device=device)

            def i(a):
                return torch.as_tensor(a, dtype=torch.int64, device=device)

            entry = {
                "pattern": self.pattern.to(device),
                "factor_pattern": self.factor_pattern.to(device),
                "factor_laplacians": t(self.factor_laplacians),
                "factor_diag": i(self._factor_diag),
                "diag": i(self._diag),
                "lumped": t(self.lumped),
            }
            if not self.general:
                entry["basis"] = t(self.basis)
            else:
                entry.update(
                    scale=t(self.scale), first=t(self.first), second=t(self.second), row=i(self._row), col=i(self._col)
                )
            self._cache[key] = entry
        return self._cache[key]

    # ------------------------------------------------------------------ values
    def precision_values(self, kappa2: Tensor, tau: Tensor, anisotropy: Tensor | None = None) -> Tensor:
        r"""Values of ``Q`` ``(*batch, nnz)``.

        ``kappa2``, ``tau``: ``(*batch)`` for a stationary field, or
        ``(*batch, N)`` per vertex (``general=True``). ``anisotropy``:
        ``(*batch, 3)`` entries ``(h_11, h_22, h_12)`` of ``H`` (``anisotropic=True``).
        """
        t = self.tensors(kappa2.dtype, kappa2.device)
        if not self.general:
            alpha = self.alpha
            coefficients = torch.stack([kappa2 ** (alpha - k) * math.comb(alpha, k) for k in range(alpha + 1)], -1)
            return self.polynomial_values(coefficients, tau)
        k2, tau_n = _per_vertex(kappa2, self.num_nodes), _per_vertex(tau, self.num_nodes)
        h = self._weights(anisotropy, kappa2)
        row, col = t["row"], t["col"]
        first = h @ t["first"] if h is not None else t["first"][0]  # L on Q's pattern
        if self.alpha == 1:
            inner = first + _diagonal_term(k2, t, self.num_nodes)
        else:
            second = _pairs(h) @ t["second"] if h is not None else t["second"][0]
            inner = (k2[..., row] + k2[..., col]) * first + second + _diagonal_term(k2**2, t, self.num_nodes)
        return (tau_n[..., row] * tau_n[..., col]) * t["scale"] * inner

    def polynomial_values(self, coefficients: Tensor, tau: Tensor) -> Tensor:
        r"""Values ``(*batch, nnz)`` of ``τ² D p(L) D`` with ``p(L) = Σ_{k=0}^{α} a_k L^k`` (stationary, isotropic).

        ``coefficients``: ``(*batch, α + 1)`` the ``a_k``; ``tau``: ``(*batch)``.
        ``Q_α`` is ``a_k = \binom{α}{k} κ^{2(α−k)}``; other polynomials of degree
        ``≤ α`` (the blocks of a fractional field, ``gpsparse.mesh.fractional``) share the pattern.
        """
        if self.general:
            raise ValueError("polynomial_values needs a stationary isotropic structure (general=False)")
        t = self.tensors(coefficients.dtype, coefficients.device)
        if coefficients.shape[-1] != self.alpha + 1:
            raise ValueError(f"expected {self.alpha + 1} coefficients, got {coefficients.shape[-1]}")
        mass = coefficients[..., :1] * t["lumped"]  # a_0 c̃_i: the k = 0 term, on the diagonal
        values = (coefficients[..., 1:] @ t["basis"]).index_add(-1, t["diag"], mass)
        return (tau**2).unsqueeze(-1) * values

    def factor_values(self, kappa2: Tensor, anisotropy: Tensor | None = None) -> Tensor:
        """Values of ``M = 𝒦² + L_H`` ``(*batch, nnz_M)`` on ``factor_pattern``."""
        t = self.tensors(kappa2.dtype, kappa2.device)
        h = self._weights(anisotropy, kappa2)
        lap = h @ t["factor_laplacians"] if h is not None else t["factor_laplacians"][0]
        k2 = _per_vertex(kappa2, self.num_nodes)
        shift = torch.zeros(*k2.shape[:-1], self.factor_pattern.nnz, dtype=k2.dtype, device=k2.device)
        return lap + shift.index_copy(-1, t["factor_diag"], k2)  # κ_i² at the diagonal entries (row order)

    def logdet_offset(self, tau: Tensor) -> Tensor:
        """``2 Σ_i log τ_i + Σ_i log c̃_i`` ``(*batch)`` (``tau`` ``(*batch)`` or ``(*batch, N)``)."""
        if self.general and tau.dim() and tau.shape[-1] == self.num_nodes:
            log_tau = 2.0 * torch.log(tau).sum(-1)
        else:
            log_tau = 2.0 * self.num_nodes * torch.log(tau)
        return log_tau + self.log_lumped_sum

    def _weights(self, anisotropy: Tensor | None, like: Tensor) -> Tensor | None:
        if anisotropy is None:
            if self.anisotropic:
                raise ValueError("this structure is anisotropic: give H's entries (h11, h22, h12)")
            return None
        if not self.anisotropic:
            raise ValueError("an anisotropy H needs MeshSPDEStructure(..., anisotropic=True)")
        return anisotropy.to(like.dtype)


def _symmetric(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``values ← (values + values[perm]) / 2`` in place (exactly symmetric stored entries), returned."""
    values += values[perm]
    values *= 0.5
    return values


def _per_vertex(x: Tensor, n: int) -> Tensor:
    """``(*batch, N)``: per-vertex values, or a ``(*batch)`` constant broadcast to every vertex."""
    if x.dim() and x.shape[-1] == n:
        return x
    return x.unsqueeze(-1).expand(*x.shape, n)


def _diagonal_term(per_vertex: Tensor, t: dict, n: int) -> Tensor:
    """``(*batch, nnz)``: ``per_vertex[i]`` at the diagonal entries ``(i, i)``, zero elsewhere."""
    values = _per_vertex(per_vertex, n)  # the diagonal entries are stored in row order: vertex i at diag[i]
    out = torch.zeros(*values.shape[:-1], t["row"].shape[0], dtype=values.dtype, device=values.device)
    return out.index_copy(-1, t["diag"], values)


def _pairs(h: Tensor) -> Tensor:
    """``(*batch, k(k+1)/2)``: ``h_a h_b`` for ``a ≤ b`` (the order of ``MeshSPDEStructure.second``)."""
    k = h.shape[-1]
    return torch.stack([h[..., a] * h[..., b] for a in range(k) for b in range(a, k)], -1)


def _adjacency(cells: np.ndarray, n: int) -> sp.csr_matrix:
    """``N × N`` pattern (data 1) of every vertex pair sharing a cell, diagonal included, sorted CSR."""
    k = cells.shape[1]
    rows = np.repeat(cells, k, axis=1).reshape(-1)
    cols = np.tile(cells, (1, k)).reshape(-1)
    return _ones(sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr())


def _nonzero_pattern(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The pattern (data 1) of the structurally and numerically nonzero entries of ``matrix`` and the diagonal."""
    pattern = abs(matrix).tocsr() + sp.identity(matrix.shape[0], format="csr")
    pattern.eliminate_zeros()
    return _ones(pattern)


def _ones(matrix: sp.csr_matrix) -> sp.csr_matrix:
    matrix = matrix.tocsr()
    matrix.sum_duplicates()
    matrix.sort_indices()
    matrix.data[:] = 1.0
    return matrix


def _keys(structure: sp.csr_matrix) -> np.ndarray:
    n = structure.shape[0]
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(structure.indptr))
    return row * n + structure.indices.astype(np.int64)


def _embed(matrix: sp.csr_matrix, keys: np.ndarray, n: int) -> np.ndarray:
    """Entries of ``matrix`` at the sorted CSR ``keys`` of a containing pattern (zeros where absent)."""
    coo = matrix.tocoo()
    out = np.zeros(keys.shape[0])
    wanted = coo.row.astype(np.int64) * n + coo.col
    where = np.searchsorted(keys, wanted)
    if where.size and (where.max() >= keys.size or not np.array_equal(keys[where], wanted)):
        raise AssertionError("a product left the pattern of Q")  # cannot happen: the pattern contains every product
    np.add.at(out, where, coo.data)
    return out


def _on_pattern(matrix: sp.csr_matrix, pattern: sp.csr_matrix) -> sp.csr_matrix:
    """``matrix`` stored on exactly ``pattern`` (explicit zeros where it has none), sorted CSR."""
    out = pattern.copy().astype(np.float64)
    out.data[:] = _embed(matrix, _keys(pattern), pattern.shape[0])
    return out


def _pattern(structure: sp.csr_matrix) -> SparsityPattern:
    crow = torch.from_numpy(structure.indptr.astype(np.int64))
    col = torch.from_numpy(structure.indices.astype(np.int64))
    return SparsityPattern(crow, col, structure.shape, symmetric=True)


# ---------------------------------------------------------------- normalisation
def nominal_smoothness(alpha: float, dim: int) -> tuple[float, float]:
    r"""R-INLA's nominal ``(ν, α)``: ``ν_nom = max(1/2, α − d/2)``, ``α_nom = max(ν_nom + d/2, α)``.

    Equal to ``(α − d/2, α)`` whenever ``ν = α − d/2 ≥ 1/2``; for ``α = 1`` in
    2-D (``ν = 0``) it is ``(1/2, 3/2)``: the smoothness R-INLA's
    ``inla.spde2.matern`` puts into ``κ = √(8ν_nom)/ρ`` and its nominal ``τ``.
    """
    nu = max(0.5, alpha - dim / 2.0)
    return nu, max(nu + dim / 2.0, float(alpha))


def matern_tau(kappa: Tensor, sigma: Tensor, alpha: int, dim: int, *, nominal: bool = False) -> Tensor:
    r"""R-INLA's ``τ`` for marginal standard deviation ``σ`` in ``ℝ^d``: ``σ² = Γ(ν) / (Γ(α)(4π)^{d/2} κ^{2ν} τ²)``.

    ``ν = α − d/2 > 0``. Differentiable in ``κ`` and ``σ`` (any broadcastable shapes).
    ``nominal=True`` allows ``ν ≤ 0`` (``α = 1`` in 2-D) with R-INLA's nominal
    ``(ν, α)`` of ``nominal_smoothness`` in the formula (``τ² = 1/(2πκσ²)`` for
    ``α = 1``, ``d = 2``): there ``σ`` is a nominal scale, not the marginal
    standard deviation (which diverges as the mesh is refined).
    """
    nu = alpha - dim / 2.0
    if nu <= 0:
        if not nominal:
            raise ValueError(f"alpha = {alpha} gives ν = α − d/2 = {nu:g} ≤ 0 in d = {dim}: no finite variance")
        nu, alpha = nominal_smoothness(alpha, dim)
    log_c = math.lgamma(nu) - math.lgamma(alpha) - (dim / 2.0) * math.log(4 * math.pi)
    return torch.exp(0.5 * log_c - nu * torch.log(kappa) - torch.log(sigma))


def sphere_variance_factor(kappa: Tensor, radius: float, alpha: int, *, terms: int = 4096) -> Tensor:
    r"""``v_S / v_ℝ²``: the marginal variance on the sphere of radius ``R`` relative to the planar formula, same ``τ``.

    On ``S²_R`` the field ``(κ² − Δ)^{α/2}(τu) = W`` has the Legendre
    expansion ``Var u = (4πR²τ²)⁻¹ Σ_l (2l + 1) (κ² + l(l+1)/R²)^{−α}``
    (Lindgren et al. 2011, §3.1; Laplace–Beltrami eigenvalues ``l(l+1)/R²``).
    The series is summed to ``terms`` and its tail by the integral
    ``R²(κ² + x_L)^{1−α}/(α − 1)`` from the midpoint ``x_L = (L+½)(L+3/2)/R²``
    (relative error ~1e-9 for ``α = 2`` at the default length). The ratio
    tends to 1 as ``κR → ∞`` (range ≪ radius). Differentiable in ``κ``; ``α ≥ 2``.
    """
    if alpha < 2:
        raise ValueError("the sphere's series diverges for alpha < 2 (ν ≤ 0 in 2-D)")
    dtype = kappa.dtype if kappa.dtype.is_floating_point else torch.float64
    l_ = torch.arange(terms, dtype=torch.float64, device=kappa.device)
    k2 = kappa.to(torch.float64).unsqueeze(-1) ** 2
    series = ((2 * l_ + 1) * (k2 + l_ * (l_ + 1) / radius**2) ** (-alpha)).sum(-1)
    x_tail = (terms + 0.5) * (terms + 1.5) / radius**2
    tail = radius**2 * (k2.squeeze(-1) + x_tail) ** (1 - alpha) / (alpha - 1)
    sphere = (series + tail) / (4 * math.pi * radius**2)
    plane = math.gamma(alpha - 1) / (math.gamma(alpha) * 4 * math.pi) * k2.squeeze(-1) ** (1 - alpha)
    return (sphere / plane).to(dtype)
