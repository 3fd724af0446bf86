r"""Finite-element matrices of piecewise-linear (P1) elements: mass ``C``, lumped mass ``C̃``, stiffness ``G``.

With the hat functions ``φ_i`` of the vertices (``φ_i(v_j) = δ_ij``, linear
on each cell),

$$
C_{ij} = \int φ_i φ_j, \qquad \tilde C_{ii} = \sum_j C_{ij} = \int φ_i, \qquad
G_{ij} = \int ∇φ_i \cdot H ∇φ_j
$$

(``H = I`` unless an anisotropy is given). On one cell the integrals are
exact and closed-form:

* triangle of area ``A`` with edge vectors ``e_k`` (the edge opposite
  vertex ``k``): ``C = A/12·(1 + δ_ij)``, ``C̃ = A/3`` per vertex,
  ``G_ij = e_i·e_j / (4A)`` — the gradients are ``∇φ_i = J e_i / (2A)``
  (``J`` the rotation by 90° in the triangle's plane), so
  ``G^H_ij = (J e_i)ᵀ H (J e_j) / (4A)``;
* segment of length ``ℓ`` (1-D meshes): ``C = ℓ/6·[[2, 1], [1, 2]]``,
  ``C̃ = ℓ/2`` per vertex, ``G = (1/ℓ)·[[1, −1], [−1, 1]]``.

*Sphere.* For a triangulated sphere the cells are the flat triangles with the
mesh's vertices (3-D coordinates): ``A`` and ``e_i·e_j`` come from the 3-D
edge vectors, i.e. the matrices are those of the **polyhedral approximation**
of the sphere (surface metric of the inscribed polyhedron; its total area
converges to ``4πR²`` at second order in the edge length).

Assembly is vectorised: all local matrices ``(m, k, k)`` at once, scattered
as one COO list into SciPy CSR (duplicates summed, indices sorted) — no
Python loop over cells. Memory: ``m·k²`` triplets (about 2·10⁷ for a planar
mesh of 10⁶ vertices, ~300 MB transient with int32 indices).

Core layer: NumPy and SciPy only.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
    "cell_sizes",
    "mass_matrix",
    "lumped_mass",
    "stiffness_matrix",
    "stiffness_components",
    "assemble",
]

_INT32_MAX = 2**31 - 1


def _edges(vertices: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``(m, 3, D)``: edge vectors ``e_k`` opposite vertex ``k`` of each triangle (``e_0 = p_2 − p_1`` …)."""
    p0, p1, p2 = (vertices[cells[:, k]] for k in range(3))
    return np.stack([p2 - p1, p0 - p2, p1 - p0], axis=1)


def cell_sizes(vertices: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``(m,)`` segment lengths (1-D) or triangle areas (planar or flat 3-D triangles)."""
    if cells.shape[1] == 2:
        return np.abs(vertices[cells[:, 1], 0] - vertices[cells[:, 0], 0])
    e = _edges(vertices, cells)
    if vertices.shape[1] == 2:
        return 0.5 * np.abs(e[:, 1, 0] * e[:, 2, 1] - e[:, 1, 1] * e[:, 2, 0])
    return 0.5 * np.linalg.norm(np.cross(e[:, 1], e[:, 2]), axis=1)


def assemble(cells: np.ndarray, local: np.ndarray, num_vertices: int) -> sp.csr_matrix:
    """Sum the local matrices ``local (m, k, k)`` of the cells ``(m, k)`` into an ``N × N`` CSR matrix.

    Sorted indices, duplicates summed, int32 indices when the size allows.
    """
    k = cells.shape[1]
    index = np.int32 if max(num_vertices, cells.shape[0] * k * k) <= _INT32_MAX else np.int64
    cells = cells.astype(index, copy=False)
    rows = np.repeat(cells, k, axis=1).reshape(-1)
    cols = np.tile(cells, (1, k)).reshape(-1)
    matrix = sp.coo_matrix((local.reshape(-1), (rows, cols)), shape=(num_vertices, num_vertices)).tocsr()
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def mass_matrix(vertices: np.ndarray, cells: np.ndarray) -> sp.csr_matrix:
    """Consistent mass ``C`` (``N × N``, symmetric positive definite)."""
    sizes = cell_sizes(vertices, cells)
    k = cells.shape[1]
    pattern = np.ones((k, k)) + np.eye(k)  # (1 + δ_ij)
    scale = 1.0 / 6.0 if k == 2 else 1.0 / 12.0
    return assemble(cells, sizes[:, None, None] * (scale * pattern), vertices.shape[0])


def lumped_mass(vertices: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``(N,)`` diagonal of the lumped mass ``C̃ = diag(Σ_j C_ij) = diag(∫ φ_i)``."""
    sizes = cell_sizes(vertices, cells)
    k = cells.shape[1]
    out = np.zeros(vertices.shape[0])
    np.add.at(out, cells.reshape(-1), np.repeat(sizes / k, k))
    return out


def stiffness_matrix(vertices: np.ndarray, cells: np.ndarray, anisotropy=None) -> sp.csr_matrix:
    """Stiffness ``G_ij = ∫ ∇φ_i·H∇φ_j`` (``N × N``, symmetric positive semi-definite, ``G·1 = 0``).

    ``anisotropy``: a symmetric positive definite ``2 × 2`` ``H`` (planar
    meshes only); ``None`` for ``H = I``.
    """
    n = vertices.shape[0]
    if cells.shape[1] == 2:
        if anisotropy is not None:
            raise ValueError("an anisotropy H needs a planar (2-D) mesh")
        lengths = cell_sizes(vertices, cells)
        local = np.array([[1.0, -1.0], [-1.0, 1.0]])
        return assemble(cells, local / lengths[:, None, None], n)
    if anisotropy is None:
        e = _edges(vertices, cells)
        area = cell_sizes(vertices, cells)
        local = np.einsum("mid,mjd->mij", e, e) / (4.0 * area)[:, None, None]
        return assemble(cells, local, n)
    H = np.asarray(anisotropy, dtype=np.float64)
    if H.shape != (2, 2) or not np.allclose(H, H.T) or np.linalg.eigvalsh(H).min() <= 0:
        raise ValueError(f"the anisotropy H must be a symmetric positive definite 2 × 2 matrix, got {H.tolist()}")
    xx, yy, xy = stiffness_components(vertices, cells)
    return (H[0, 0] * xx + H[1, 1] * yy + H[0, 1] * xy).tocsr()


def stiffness_components(vertices: np.ndarray, cells: np.ndarray) -> tuple[sp.csr_matrix, ...]:
    r"""``(G^{xx}, G^{yy}, G^{xy} + G^{yx})`` with ``G^{ab}_{ij} = ∫ ∂_a φ_i ∂_b φ_j`` (planar meshes).

    ``G^H = h_{11} G^{xx} + h_{22} G^{yy} + h_{12}(G^{xy} + G^{yx})`` for a
    symmetric ``H``: the stiffness is linear in the entries of ``H``, so an
    anisotropic precision is a fixed combination of these three. All three
    share one pattern (the mesh's vertex adjacency with the diagonal).
    """
    if vertices.shape[1] != 2 or cells.shape[1] != 3:
        raise ValueError("stiffness components (anisotropy) need a planar (2-D) triangle mesh")
    e = _edges(vertices, cells)
    area = cell_sizes(vertices, cells)[:, None, None]
    ex, ey = e[..., 0], e[..., 1]  # (m, 3); ∇φ_i ∝ J e_i = (−e_y, e_x)
    n = vertices.shape[0]
    xx = assemble(cells, ey[:, :, None] * ey[:, None, :] / (4.0 * area), n)
    yy = assemble(cells, ex[:, :, None] * ex[:, None, :] / (4.0 * area), n)
    xy = assemble(cells, -(ey[:, :, None] * ex[:, None, :] + ex[:, :, None] * ey[:, None, :]) / (4.0 * area), n)
    return xx, yy, xy
