r"""The barrier model's precision (Bakka et al. 2019) on a fixed pattern, and flagging barrier triangles.

Bakka, Vanhatalo, Illian, Simpson & Rue (2019) let the range of the
stationary ``ν = 1`` Matérn SPDE in 2-D vary by region: the field solves

$$
u − ∇·\Bigl(\frac{r(s)^2}{8} ∇u\Bigr) = r(s) \sqrt{π/2}\; σ\, \mathcal W ,
$$

with ``r(s) = r`` in the normal region and ``r(s) = r_b = f r`` on the
*barrier* triangles (``f`` the range fraction, R-INLA's default 0.2), so
that correlation does not leak across a barrier (land for a marine species,
a mountain ridge) while the model remains one Gaussian field. (For constant
``r`` this is ``(κ² − Δ)u = κ² r \sqrt{π/2} σ \mathcal W``, ``κ² = 8/r²``:
the Matérn field with ``ν = 1``, range ``r`` and standard deviation ``σ``.)

*Discretisation* (P1 elements, as R-INLA's ``inla.barrier.fem``/``inla.barrier.q``).
With ``r_t`` the range on triangle ``t``, the weak form gives ``A u = ξ``
with ``A = C + Σ_t (r_t²/8) G_t`` (``G_t`` the stiffness of triangle ``t``,
``C`` the mass) and noise ``ξ`` of lumped covariance ``(π/2) σ² C̃_r``,
``C̃_r = diag(Σ_t r_t² |t|/3)`` over the triangles ``t`` at each vertex:

$$
Q = \frac{2}{π σ^2} A\, \tilde C_r^{-1} A .
$$

Writing ``r_t = r f_t`` (``f_t = 1`` or ``f``), ``G_f = Σ_t f_t² G_t`` and
``C̃_f = diag(Σ_t f_t² |t|/3)`` (both fixed), ``κ² = 8/r²`` and
``τ² = r²/(32πσ²) = 1/(4πκ²σ²)`` (R-INLA's ``τ`` of the stationary
``α = 2`` model) this is

$$
Q = τ^2 (κ^2 M + G_f)\, \tilde C_f^{-1} (κ^2 M + G_f)
  = τ^2 \bigl[κ^4 B_0 + κ^2 B_1 + B_2\bigr],
$$

``B_0 = M C̃_f⁻¹ M``, ``B_1 = M C̃_f⁻¹ G_f + G_f C̃_f⁻¹ M``,
``B_2 = G_f C̃_f⁻¹ G_f`` — three fixed vectors on the pattern of ``Q`` (the
2-ring of the mesh), so each call costs one ``3 × nnz`` product and is
differentiated by plain autograd.

*Mass matrix* ``M``. R-INLA's barrier code uses the **consistent** mass
``M = C`` in ``A`` (``mass="consistent"``, the default: values comparable with
R-INLA barrier fits); its stationary ``inla.spde2.pcmatern`` model uses the
lumped ``C̃``. Hence with ``f = 1`` the R-INLA barrier precision is
``τ²(κ²C + G)C̃⁻¹(κ²C + G)``, *not* the stationary
``τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G)`` of
[`MeshMaternKernel`][gpsparse.kernels.MeshMaternKernel] (the two differ by the
mass-lumping error, ``O(h²)`` relative in the covariance). ``mass="lumped"``
takes ``M = C̃``; with ``f = 1`` it is then exactly ``MeshMaternKernel(alpha=2)``.

*Log-determinant.* With ``D = C̃^{1/2}`` (the lumped mass of the whole mesh),
``κ²M + G_f = D F D`` with the first-order factor
``F = κ² D⁻¹MD⁻¹ + D⁻¹G_fD⁻¹`` (the mesh's 1-ring pattern; ``D⁻¹MD⁻¹ = I``
for the lumped mass), so

$$
\log\det Q = 2 \log\det F + 2N \log τ + 2 \sum_i \log \tilde c_i − \sum_i \log \tilde c_{f,i},
$$

exactly the form of
[`SPDEPrecisionLinearOperator`][gpsparse.mesh.operator.SPDEPrecisionLinearOperator]
with ``power = 2``.

*Sphere.* The construction only uses the P1 matrices of each (flat)
triangle, so it applies unchanged to spherical meshes (the polyhedral
approximation, ``gpsparse.mesh.fem``); ``τ`` is the planar formula there.

Core layer: NumPy, SciPy and torch; no gpytorch.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from gpsparse.mesh import fem
from gpsparse.mesh.polygon import as_polygon, points_in_polygon
from gpsparse.mesh.spde import _adjacency, _embed, _keys, _nonzero_pattern, _ones, _pattern, _symmetric

__all__ = ["BarrierSPDEStructure", "barrier_mask", "cells_in_polygon", "MASSES"]

#: The mass matrix ``M`` in ``A = κ²M + G_f``: R-INLA's barrier (``"consistent"``) or the lumped ``C̃``.
MASSES = ("consistent", "lumped")


def barrier_mask(mesh, barrier_triangles) -> np.ndarray:
    """``(m,)`` bool: the barrier triangles of ``mesh`` from indices (repeats allowed) or a boolean mask.

    Raises
    ------
    ValueError
        A mesh that is not a triangulation (interval meshes), indices that are
        not integers or lie outside ``0 … m − 1``, a mask of the wrong length.
    """
    if mesh.dim != 2:
        raise ValueError(
            f"the barrier model needs a triangulated 2-D mesh (planar or spherical), got a {mesh.kind} mesh"
        )
    m = mesh.num_cells
    b = np.asarray(barrier_triangles.detach().cpu() if isinstance(barrier_triangles, Tensor) else barrier_triangles)
    if b.dtype == bool:
        if b.shape != (m,):
            raise ValueError(f"a boolean barrier mask needs one entry per triangle ({m}), got shape {b.shape}")
        return b.copy()
    b = b.reshape(-1)
    if b.size and not np.issubdtype(b.dtype, np.integer):
        if not np.issubdtype(b.dtype, np.floating) or not np.array_equal(b, np.round(b)):
            raise ValueError(f"barrier_triangles must be integer triangle indices or a boolean mask, got {b.dtype}")
    b = b.astype(np.int64)
    bad = (b < 0) | (b >= m)
    if bad.any():
        raise ValueError(
            f"barrier triangle index {int(b[bad][0])} is out of range: the mesh has {m} triangles (0 … {m - 1})"
        )
    mask = np.zeros(m, dtype=bool)
    mask[b] = True
    return mask


def cells_in_polygon(mesh, polygon, holes=None) -> np.ndarray:
    """Sorted indices of the triangles of a planar mesh whose centroid lies inside ``polygon`` (and no hole).

    Parameters
    ----------
    mesh : gpsparse.mesh.Mesh
        A planar mesh.
    polygon : array_like
        ``(b, 2)`` vertices of a polygon (either orientation; a closing copy of the first vertex is dropped).
    holes : list of array_like, optional
        Polygons whose triangles are excluded.

    Returns
    -------
    numpy.ndarray
        ``(k,)`` int64 triangle indices, e.g. the ``barrier_triangles`` of
        [`BarrierMaternKernel`][gpsparse.kernels.BarrierMaternKernel].
        Triangles straddling the polygon's edge are in or out by their centroid:
        refine the mesh along the barrier's edge for a sharp barrier.
    """
    if mesh.kind != "plane":
        raise ValueError(f"cells_in_polygon needs a planar mesh, got a {mesh.kind} mesh")
    centroids = mesh.vertices[mesh.cells].mean(axis=1)
    inside = points_in_polygon(centroids, as_polygon(polygon, "polygon"))
    for k, hole in enumerate(holes or []):
        inside &= ~points_in_polygon(centroids, as_polygon(hole, f"holes[{k}]"))
    return np.flatnonzero(inside).astype(np.int64)


def _range_fraction(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"range_fraction must be a positive number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"range_fraction must be a positive number, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"range_fraction must be a finite number > 0 (barrier range = fraction · range), got {f}")
    return f


class BarrierSPDEStructure:
    r"""Patterns and fixed vectors of the barrier precision ``Q`` and of its factor ``F`` (module docstring).

    The interface is that of [`MeshSPDEStructure`][gpsparse.mesh.spde.MeshSPDEStructure]
    for a stationary ``α = 2`` field: ``precision_values(κ², τ)``,
    ``factor_values(κ²)``, ``logdet_offset(τ)``, ``tensors(dtype, device)``.

    Parameters
    ----------
    mesh : gpsparse.mesh.Mesh
        A planar or spherical triangulation.
    barrier_triangles : array_like
        Triangle indices or an ``(m,)`` boolean mask (``barrier_mask``).
    range_fraction : float
        ``f > 0``: the range on the barrier is ``f r`` (``f = 1``: no barrier;
        ``f > 1`` makes a region of longer range).
    mass : {"consistent", "lumped"}
        ``M`` in ``A = κ²M + G_f``: R-INLA's barrier (consistent mass) or ``C̃``.

    Attributes
    ----------
    pattern, factor_pattern : SparsityPattern
        Symmetric patterns of ``Q`` (the 2-ring) and of ``F`` (the 1-ring).
    barrier : numpy.ndarray
        ``(m,)`` bool mask of the barrier triangles.
    noise_mass : numpy.ndarray
        ``(N,)`` ``c̃_f``: the lumped mass with barrier triangles weighted by ``f²``.

    Notes
    -----
    Memory: three vectors on ``Q``'s pattern and two on ``F``'s (float64), about
    ``(3·19 + 2·7) N`` numbers for a planar mesh; assembly is vectorised (SciPy).
    """

    alpha = 2
    general = False
    anisotropic = False

    def __init__(self, mesh, barrier_triangles, range_fraction: float = 0.2, *, mass: str = "consistent"):
        if mass not in MASSES:
            raise ValueError(f"mass must be one of {MASSES}, got {mass!r}")
        self.barrier = barrier_mask(mesh, barrier_triangles)
        self.range_fraction = f = _range_fraction(range_fraction)
        self.mass = mass
        vertices, cells = mesh.vertices, mesh.cells
        self.num_nodes = n = mesh.num_vertices
        normal, inside = cells[~self.barrier], cells[self.barrier]
        self.lumped = mesh.lumped_mass()
        self.noise_mass = fem.lumped_mass(vertices, normal) + f**2 * fem.lumped_mass(vertices, inside)
        stiffness = _clean(fem.stiffness_matrix(vertices, normal) + f**2 * fem.stiffness_matrix(vertices, inside))
        if mass == "consistent":
            M = _clean(mesh.mass_matrix())
            adjacency = _adjacency(cells, n)
        else:
            M = sp.diags(self.lumped, format="csr")
            adjacency = _nonzero_pattern(stiffness)
        structure = _ones(adjacency @ adjacency)
        self.pattern, self.factor_pattern = _pattern(structure), _pattern(adjacency)
        keys, factor_keys = _keys(structure), _keys(adjacency)
        perm, factor_perm = self.pattern.transpose_perm.numpy(), self.factor_pattern.transpose_perm.numpy()
        inv = sp.diags(1.0 / self.noise_mass, format="csr")
        left = (M @ inv @ stiffness).tocsr()
        products = (M @ inv @ M, left + left.T, stiffness @ inv @ stiffness)
        self.basis = np.stack([_symmetric(_embed(_clean(b), keys, n), perm) for b in products])  # (3, nnz)
        d_inv = sp.diags(1.0 / np.sqrt(self.lumped), format="csr")
        self.factor_mass = _symmetric(_embed(_clean(d_inv @ M @ d_inv), factor_keys, n), factor_perm)
        self.factor_laplacian = _symmetric(_embed(_clean(d_inv @ stiffness @ d_inv), factor_keys, n), factor_perm)
        self.log_offset = float(2.0 * np.log(self.lumped).sum() - np.log(self.noise_mass).sum())
        self._cache: dict = {}

    def tensors(self, dtype: torch.dtype, device) -> dict:
        """The fixed vectors as tensors of ``dtype`` on ``device`` (cached)."""
        key = (dtype, torch.device(device))
        if key not in self._cache:

            def t(a):
                return torch.as_tensor(a, dtype=dtype, device=device)

            self._cache[key] = {
                "pattern": self.pattern.to(device),
                "factor_pattern": self.factor_pattern.to(device),
                "basis": t(self.basis),
                "factor_mass": t(self.factor_mass),
                "factor_laplacian": t(self.factor_laplacian),
            }
        return self._cache[key]

    def precision_values(self, kappa2: Tensor, tau: Tensor, anisotropy: Tensor | None = None) -> Tensor:
        """Values of ``Q = τ²(κ⁴B_0 + κ²B_1 + B_2)`` ``(*batch, nnz)``; ``kappa2``, ``tau`` ``(*batch)``."""
        _isotropic(anisotropy)
        t = self.tensors(kappa2.dtype, kappa2.device)
        coefficients = torch.stack([kappa2**2, kappa2, torch.ones_like(kappa2)], -1)
        return (tau**2).unsqueeze(-1) * (coefficients @ t["basis"])

    def factor_values(self, kappa2: Tensor, anisotropy: Tensor | None = None) -> Tensor:
        """Values of ``F = κ² D⁻¹MD⁻¹ + D⁻¹G_fD⁻¹`` ``(*batch, nnz_F)`` on ``factor_pattern``."""
        _isotropic(anisotropy)
        t = self.tensors(kappa2.dtype, kappa2.device)
        return kappa2.unsqueeze(-1) * t["factor_mass"] + t["factor_laplacian"]

    def logdet_offset(self, tau: Tensor) -> Tensor:
        """``2N log τ + 2Σ log c̃_i − Σ log c̃_{f,i}`` ``(*batch)``: ``log det Q = 2 log det F + offset``."""
        return 2.0 * self.num_nodes * torch.log(tau) + self.log_offset


def _isotropic(anisotropy) -> None:
    if anisotropy is not None:
        raise ValueError("the barrier model is isotropic: no anisotropy H")


def _clean(matrix) -> sp.csr_matrix:
    """CSR with duplicates summed and explicit zeros removed (so that products stay on the pattern)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix
