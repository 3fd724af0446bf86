r"""``Mesh``: a validated triangulation (or 1-D interval mesh) with its FEM matrices and interpolation.

Three kinds, told apart by the shape of the vertices and cells:

| kind | vertices | cells | dimension ``d`` |
|---|---|---|---|
| ``"interval"`` | ``(N, 1)`` knots | ``(N − 1, 2)`` segments between neighbouring knots | 1 |
| ``"plane"`` | ``(N, 2)`` | ``(m, 3)`` triangles | 2 |
| ``"sphere"`` | ``(N, 3)`` on a sphere of radius ``R`` centred at 0 | ``(m, 3)`` triangles | 2 |

Construction checks the mesh (``gpsparse.mesh.validation``: indices in
range, no degenerate cell, no duplicated vertex, every vertex used, no edge
in more than two triangles) and orients the triangles (counterclockwise in
the plane, outward on the sphere).

The finite-element matrices (``gpsparse.mesh.fem``) and the point locator
(``gpsparse.mesh.locate``) are built on first use and cached on the mesh.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.mesh import builders, fem, validation
from gpsparse.mesh.locate import Locator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["Mesh"]


class Mesh:
    r"""A 1-D interval mesh, a planar triangulation or a triangulated sphere.

    Parameters
    ----------
    vertices : array_like
        ``(N, D)`` coordinates: ``D = 1`` (interval), 2 (plane) or 3 (sphere:
        every vertex at the same distance ``R`` from the origin).
    triangles : array_like
        ``(m, 3)`` vertex indices per triangle, or ``(m, 2)`` segments for
        ``D = 1`` (each joining two neighbouring knots: the mesh is one interval).
    regions : array_like, optional
        ``(m,)`` integer label per cell (``from_points_and_boundary``: 0 inside
        the boundary, 1 in the extension ring).

    Raises
    ------
    ValueError
        Wrong shapes, non-finite coordinates, out-of-range or repeated indices,
        degenerate (zero-length or zero-area) cells, duplicated vertices,
        unused vertices, an edge shared by three or more triangles, 3-D vertices
        off a common sphere, 1-D segments that do not join neighbouring knots.

    Examples
    --------
    >>> from gpsparse.mesh import Mesh
    >>> mesh = Mesh([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0, 1, 2]])
    >>> mesh.kind, mesh.num_vertices, float(mesh.measure)
    ('plane', 3, 0.5)
    >>> (2 * mesh.stiffness_matrix()).toarray()
    array([[ 2., -1., -1.],
           [-1.,  1.,  0.],
           [-1.,  0.,  1.]])
    >>> W = mesh.interpolation([[0.25, 0.25]])
    >>> W.to_dense()
    tensor([[0.5000, 0.2500, 0.2500]], dtype=torch.float64)
    """

    def __init__(self, vertices, triangles, *, regions=None):
        v = validation.as_vertices(vertices)
        per_cell = 2 if v.shape[1] == 1 else 3
        cells = validation.as_cells(triangles, v.shape[0], per_cell)
        validation.check_every_vertex_used(cells, v.shape[0])
        validation.check_duplicate_vertices(v)
        if v.shape[1] == 1:
            self.kind = "interval"
            _check_interval(v[:, 0], cells)
        elif v.shape[1] == 2:
            self.kind = "plane"
        else:
            self.kind = "sphere"
        self.radius = validation.sphere_radius(v) if self.kind == "sphere" else None
        sizes = fem.cell_sizes(v, cells)
        validation.check_cell_sizes(sizes, v, cells, "segment" if per_cell == 2 else "triangle")
        if per_cell == 3:
            validation.check_edges(cells)
            cells = _oriented(v, cells, self.kind)
        self.vertices = v
        self.cells = cells
        self.cell_sizes = sizes
        if regions is not None:
            regions = np.asarray(regions).reshape(-1).astype(np.int64)
            if regions.shape[0] != cells.shape[0]:
                raise ValueError(f"regions must have one label per cell ({cells.shape[0]}), got {regions.shape[0]}")
        self.regions = regions
        self._stiffness: dict = {}

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_points_and_boundary(
        cls,
        points,
        boundary,
        holes=None,
        *,
        extension: float | None = None,
        max_area=None,
        min_angle: float = 25.0,
        cutoff: float = 0.0,
    ) -> Mesh:
        r"""A quality planar mesh of the polygon ``boundary`` minus ``holes``, with the ``points`` as vertices.

        Triangle (``pip install "gpsparse[mesh]"``) refines a constrained
        Delaunay triangulation until no angle is below ``min_angle`` and no
        triangle exceeds ``max_area`` (``gpsparse.mesh.triangulate``).

        Parameters
        ----------
        points : array_like or None
            ``(q, 2)`` data locations made mesh vertices (inside the boundary,
            outside the holes; or anywhere in the extension); points closer
            than ``cutoff`` to each other or to a polygon vertex are merged.
        boundary : array_like
            ``(b, 2)`` vertices of a simple polygon, either orientation.
        holes : list of array_like, optional
            Simple polygons inside the boundary, disjoint; not meshed.
        extension : float, optional
            Width of an outer ring: the convex hull of the boundary and the
            points grown by this distance (round corners) is meshed too, with
            coarser triangles (labelled ``regions == 1``). About one range.
        max_area : float or (float, float), optional
            Largest triangle area inside the boundary, or ``(inner, extension)``
            (default extension bound: 16× the inner one). None: no bound.
        min_angle : float
            Smallest angle in degrees, at most 33.8 (Triangle's guarantee).
        cutoff : float
            Merge distance for the points (R-INLA's ``cutoff``).

        Raises
        ------
        ValueError
            A polygon that is not simple (crossing or touching edges, also
            between rings), a hole outside the boundary or inside another
            hole, points outside the domain, bad sizes or angles.
        ImportError
            Without the ``triangle`` package (the ``mesh`` extra).
        """
        from gpsparse.mesh.triangulate import triangulate_domain

        vertices, triangles, regions = triangulate_domain(
            points, boundary, holes, extension=extension, max_area=max_area, min_angle=min_angle, cutoff=cutoff
        )
        return cls(vertices, triangles, regions=regions)

    @classmethod
    def icosphere(cls, subdivisions: int, radius: float = 1.0) -> Mesh:
        """Icosahedral sphere mesh: ``10·4^s + 2`` vertices on the sphere of ``radius`` (``builders.icosphere``)."""
        return cls(*builders.icosphere(subdivisions, radius))

    @classmethod
    def regular_grid(cls, bounds, grid_size, *, diagonal: str = "up") -> Mesh:
        """The triangulated rectangular lattice of ``bounds`` (C node order, as ``LatticeMaternKernel``)."""
        return cls(*builders.regular_grid(bounds, grid_size, diagonal=diagonal))

    @classmethod
    def interval(cls, knots) -> Mesh:
        """A 1-D mesh on sorted distinct ``knots`` (segments between neighbours)."""
        return cls(*builders.interval(knots))

    # ---------------------------------------------------------------- geometry
    @property
    def num_vertices(self) -> int:
        """``N``."""
        return self.vertices.shape[0]

    @property
    def num_cells(self) -> int:
        """Number of triangles (segments for intervals)."""
        return self.cells.shape[0]

    @property
    def dim(self) -> int:
        """Manifold dimension ``d``: 1 for intervals, 2 for planar and spherical meshes."""
        return 1 if self.kind == "interval" else 2

    @property
    def measure(self) -> float:
        """Total length or area (of the polyhedral approximation on the sphere)."""
        return float(self.cell_sizes.sum())

    def edge_lengths(self) -> np.ndarray:
        """``(e,)`` lengths of the distinct edges (the mesh size ``h`` statistics)."""
        if self.kind == "interval":
            return self.cell_sizes.copy()
        edges = np.sort(np.concatenate([self.cells[:, [0, 1]], self.cells[:, [1, 2]], self.cells[:, [0, 2]]]), 1)
        edges = np.unique(edges, axis=0)
        return np.linalg.norm(self.vertices[edges[:, 0]] - self.vertices[edges[:, 1]], axis=1)

    # --------------------------------------------------------------------- FEM
    @cached_property
    def _mass(self) -> sp.csr_matrix:
        return fem.mass_matrix(self.vertices, self.cells)

    @cached_property
    def _lumped(self) -> np.ndarray:
        return fem.lumped_mass(self.vertices, self.cells)

    def mass_matrix(self) -> sp.csr_matrix:
        """Consistent P1 mass ``C`` (``N × N`` CSR; ``gpsparse.mesh.fem``)."""
        return self._mass

    def lumped_mass(self) -> np.ndarray:
        """``(N,)`` lumped mass ``C̃_ii = ∫ φ_i`` (row sums of ``C``)."""
        return self._lumped

    def stiffness_matrix(self, anisotropy=None) -> sp.csr_matrix:
        """P1 stiffness ``G`` (``H = I``), or ``G^H`` for an SPD 2 × 2 ``anisotropy`` (planar meshes)."""
        if anisotropy is not None:
            return fem.stiffness_matrix(self.vertices, self.cells, anisotropy)
        if "iso" not in self._stiffness:
            self._stiffness["iso"] = fem.stiffness_matrix(self.vertices, self.cells)
        return self._stiffness["iso"]

    def stiffness_components(self) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
        """``(G^{xx}, G^{yy}, G^{xy} + G^{yx})`` of a planar mesh (``G^H`` is linear in ``H``; ``fem``)."""
        if "components" not in self._stiffness:
            self._stiffness["components"] = fem.stiffness_components(self.vertices, self.cells)
        return self._stiffness["components"]

    # ------------------------------------------------------------ interpolation
    @cached_property
    def _locator(self) -> Locator:
        return Locator(self.vertices, self.cells, self.kind)

    def locate(self, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cells (q,), vertex ids (q, k), barycentric weights (q, k))`` of ``points (q, D)``.

        ``cells`` index the triangles (for intervals: the segments in the
        order of the sorted knots).

        Vertex ids are sorted within each row (weights permuted alike). On the
        sphere the points must lie on the mesh's sphere (relative tolerance
        1e-6) and are projected onto the flat triangle along their ray from
        the origin (``gpsparse.mesh.locate``).

        Raises
        ------
        ValueError
            Points of the wrong dimension, non-finite, off the sphere, or outside the mesh (the first is named).
        """
        p = self._check_points(points)
        cell, bary = self._locator.locate(p)
        ids = self._locator.cell_vertices(cell)
        order = np.argsort(ids, axis=1)
        return cell, np.take_along_axis(ids, order, 1), np.take_along_axis(bary, order, 1)

    def interpolation(self, points, *, dtype: torch.dtype = torch.float64, device=None) -> SparseLinearOperator:
        r"""``W`` (``q × N``): row ``i`` holds the barycentric weights of ``points[i]`` at its cell's vertices.

        A P1 field with vertex values ``u`` reads ``(W u)_i = u(x_i)``; rows
        sum to 1 and have ``d + 1`` stored entries. Returned as a
        [`SparseLinearOperator`][gpsparse.SparseLinearOperator] (``.to_sparse_csr()``
        gives the torch CSR tensor).
        """
        _, ids, bary = self.locate(points)
        q, k = ids.shape
        crow = torch.arange(q + 1, dtype=torch.int64) * k
        pattern = SparsityPattern(crow, torch.from_numpy(ids.reshape(-1)), (q, self.num_vertices))
        values = torch.from_numpy(bary.reshape(-1)).to(dtype)
        if device is not None:
            pattern, values = pattern.to(device), values.to(device)
        return SparseLinearOperator(values, pattern=pattern)

    def interpolation_weights(self, points: Tensor, cells: np.ndarray, vertex_ids: np.ndarray) -> Tensor:
        """``(q, k)`` barycentric weights of ``points`` (a tensor) in the given cells, differentiable in the points.

        The columns follow ``vertex_ids`` (as returned by ``locate``). Piecewise
        linear in the points (rational on the sphere: the central projection).
        """
        loc = self._locator
        dtype, device = points.dtype, points.device
        if self.kind == "interval":
            left = torch.as_tensor(loc.knots[cells], dtype=dtype, device=device)
            width = torch.as_tensor(loc.knots[cells + 1] - loc.knots[cells], dtype=dtype, device=device)
            t = (points[:, 0] - left) / width
            local = torch.stack([1 - t, t], -1)
            local_ids = loc.cell_vertices(cells)
        elif self.kind == "plane":
            inv = torch.as_tensor(loc.inverse[cells], dtype=dtype, device=device)
            origin = torch.as_tensor(loc.origin[cells], dtype=dtype, device=device)
            st = (inv @ (points - origin).unsqueeze(-1)).squeeze(-1)
            local = torch.cat([1 - st.sum(-1, keepdim=True), st], -1)
            local_ids = self.cells[cells]
        else:
            dual = torch.as_tensor(loc.dual[cells], dtype=dtype, device=device)
            lam = (dual @ points.unsqueeze(-1)).squeeze(-1)
            local = lam / lam.sum(-1, keepdim=True)
            local_ids = self.cells[cells]
        order = torch.as_tensor(np.argsort(local_ids, axis=1), device=device)
        return torch.take_along_dim(local, order, 1)

    def _check_points(self, points) -> np.ndarray:
        p = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float64)
        if self.kind == "interval" and p.ndim == 1:
            p = p[:, None]
        D = self.vertices.shape[1]
        if p.ndim != 2 or p.shape[1] != D:
            raise ValueError(f"points must have shape (q, {D}) for a {self.kind} mesh, got {p.shape}")
        bad = ~np.isfinite(p).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"point {i} has a non-finite coordinate {p[i].tolist()}")
        if self.kind == "sphere":
            radii = np.linalg.norm(p, axis=1)
            off = np.abs(radii - self.radius) > validation.SPHERE_RTOL * self.radius
            if off.any():
                i = int(np.flatnonzero(off)[0])
                raise ValueError(
                    f"point {i} at {p[i].tolist()} is at distance {radii[i]:.8g} from the origin, off the mesh's "
                    f"sphere of radius {self.radius:.8g} (gpsparse.mesh.lonlat_to_cartesian converts lon/lat)"
                )
        return p

    def __repr__(self) -> str:
        extra = f", radius={self.radius:g}" if self.radius is not None else ""
        return f"Mesh(kind={self.kind!r}, num_vertices={self.num_vertices}, num_cells={self.num_cells}{extra})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_locator", None)  # rebuilt on demand
        return state


def _check_interval(x: np.ndarray, segments: np.ndarray) -> None:
    """The segments must join each knot to its sorted neighbours: one interval, no gaps or overlaps."""
    order = np.argsort(x)
    rank = np.empty_like(order)
    rank[order] = np.arange(x.size)
    r = np.sort(rank[segments], axis=1)
    if (
        segments.shape[0] != x.size - 1
        or not np.array_equal(np.sort(r[:, 0]), np.arange(x.size - 1))
        or not ((r[:, 1] - r[:, 0]) == 1).all()
    ):
        raise ValueError(
            "a 1-D mesh must be one interval: N knots and N − 1 segments, each joining two neighbouring knots "
            "(Mesh.interval(knots) builds it)"
        )


def _oriented(vertices: np.ndarray, cells: np.ndarray, kind: str) -> np.ndarray:
    """Triangles counterclockwise (plane) or with outward normals (sphere)."""
    p0, p1, p2 = (vertices[cells[:, k]] for k in range(3))
    if kind == "plane":
        flip = ((p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])) < 0
    else:
        flip = np.einsum("md,md->m", np.cross(p1 - p0, p2 - p0), p0 + p1 + p2) < 0
    if flip.any():
        cells = cells.copy()
        cells[flip, 1], cells[flip, 2] = cells[flip, 2], cells[flip, 1].copy()
    return cells
