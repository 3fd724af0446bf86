"""Checks of a mesh's vertices and cells: shapes, finite coordinates, indices, degenerate and duplicated pieces.

Every check is vectorised (NumPy, one pass over the cells, a k-d tree for
near-duplicate vertices) and raises ``ValueError`` naming the first offending
vertex or cell, so that a bad mesh fails at construction and not as a
singular precision matrix later.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "as_vertices",
    "as_cells",
    "check_cell_sizes",
    "check_duplicate_vertices",
    "check_every_vertex_used",
    "check_edges",
    "sphere_radius",
]

#: Relative tolerances (times the mesh diameter, or its square for areas).
DUPLICATE_RTOL = 1e-10
DEGENERATE_RTOL = 1e-12
SPHERE_RTOL = 1e-6


def as_vertices(vertices) -> np.ndarray:
    """``(n, D)`` float64 with ``D`` in 1, 2, 3 and finite entries (a ``(n,)`` array is a 1-D mesh)."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[1] not in (1, 2, 3) or v.shape[0] < 2:
        raise ValueError(
            f"vertices must have shape (n, D) with n ≥ 2 and D = 1 (interval), 2 (plane) or 3 (sphere), got {v.shape}"
        )
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"vertex {i} has a non-finite coordinate {v[i].tolist()}")
    return np.ascontiguousarray(v)


def as_cells(cells, num_vertices: int, per_cell: int) -> np.ndarray:
    """``(m, per_cell)`` int64 vertex indices, each in ``[0, num_vertices)``, distinct within a cell."""
    name = "triangles" if per_cell == 3 else "segments"
    c = np.asarray(cells)
    if c.ndim != 2 or c.shape[1] != per_cell or c.shape[0] == 0:
        raise ValueError(f"{name} must have shape (m, {per_cell}) with m ≥ 1, got {c.shape}")
    if c.dtype.kind not in "iu":
        if c.dtype.kind != "f" or not np.array_equal(c, np.round(c)):
            raise ValueError(f"{name} must hold integer vertex indices, got dtype {c.dtype}")
    c = c.astype(np.int64)
    out = (c < 0) | (c >= num_vertices)
    if out.any():
        k = int(np.flatnonzero(out.any(axis=1))[0])
        raise ValueError(f"{name[:-1]} {k} has vertex indices {c[k].tolist()} out of range for {num_vertices} vertices")
    s = np.sort(c, axis=1)
    repeated = (s[:, 1:] == s[:, :-1]).any(axis=1)
    if repeated.any():
        k = int(np.flatnonzero(repeated)[0])
        raise ValueError(f"{name[:-1]} {k} repeats a vertex: {c[k].tolist()}")
    return np.ascontiguousarray(c)


def diameter(vertices: np.ndarray) -> float:
    """The length of the bounding-box diagonal (1 for a single point)."""
    span = float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))
    return span if span > 0 else 1.0


def check_cell_sizes(sizes: np.ndarray, vertices: np.ndarray, cells: np.ndarray, kind: str) -> None:
    """Raise for a cell of (relative) zero length/area: ``size ≤ DEGENERATE_RTOL · diameter^dim``."""
    power = 1 if cells.shape[1] == 2 else 2
    limit = DEGENERATE_RTOL * diameter(vertices) ** power
    bad = ~(sizes > limit)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        what = "length" if power == 1 else "area"
        raise ValueError(
            f"{kind} {k} (vertices {cells[k].tolist()}) is degenerate: {what} {float(sizes[k]):.3g} "
            f"(collinear or coincident vertices {vertices[cells[k]].tolist()})"
        )


def check_duplicate_vertices(vertices: np.ndarray) -> None:
    """Raise when two vertices lie within ``DUPLICATE_RTOL · diameter`` of each other."""
    tree = cKDTree(vertices)
    pairs = tree.query_pairs(DUPLICATE_RTOL * diameter(vertices), output_type="ndarray")
    if len(pairs):
        i, j = sorted(int(p) for p in pairs[np.lexsort(pairs.T[::-1])][0])
        raise ValueError(
            f"vertices {i} and {j} are duplicates ({vertices[i].tolist()} and {vertices[j].tolist()}); "
            "merge them and renumber the cells"
        )


def check_every_vertex_used(cells: np.ndarray, num_vertices: int) -> None:
    """Raise when a vertex belongs to no cell (its lumped mass would be zero and ``Q`` singular)."""
    used = np.zeros(num_vertices, dtype=bool)
    used[cells.reshape(-1)] = True
    if not used.all():
        i = int(np.flatnonzero(~used)[0])
        raise ValueError(
            f"vertex {i} belongs to no cell ({int((~used).sum())} unused vertices); drop unused vertices "
            "(their lumped mass is zero, so the SPDE precision would be singular)"
        )


def check_edges(triangles: np.ndarray) -> None:
    """Raise when an edge is shared by more than two triangles, or a triangle is listed twice (overlaps)."""
    sorted_tris = np.sort(triangles, axis=1)
    n = int(triangles.max()) + 1
    if n < 2**21:  # one int64 key per triangle (n³ < 2⁶³)
        keys = (sorted_tris[:, 0] * n + sorted_tris[:, 1]) * n + sorted_tris[:, 2]
        order = np.argsort(keys, kind="stable")
        repeated = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        first = order[repeated[0]] if repeated.size else None
    else:
        _, index, counts = np.unique(sorted_tris, axis=0, return_index=True, return_counts=True)
        first = index[np.flatnonzero(counts > 1)[0]] if (counts > 1).any() else None
    if first is not None:
        raise ValueError(f"triangle {int(first)} ({triangles[first].tolist()}) is listed more than once")
    edges = np.concatenate([sorted_tris[:, [0, 1]], sorted_tris[:, [1, 2]], sorted_tris[:, [0, 2]]])
    keys = np.sort(edges[:, 0] * n + edges[:, 1])
    triple = np.flatnonzero(keys[2:] == keys[:-2])  # three equal keys in a row: an edge in ≥ 3 triangles
    if triple.size:
        a, b = divmod(int(keys[triple[0]]), n)
        count = int(np.count_nonzero(keys == keys[triple[0]]))
        raise ValueError(
            f"edge ({a}, {b}) is shared by {count} triangles; a surface mesh shares each edge "
            "between at most two (overlapping or folded triangles)"
        )


def sphere_radius(vertices: np.ndarray) -> float:
    """The common distance of 3-D vertices from the origin; raise when they are not on one sphere."""
    radii = np.linalg.norm(vertices, axis=1)
    radius = float(np.median(radii))
    if not radius > 0:
        raise ValueError("3-D vertices must lie on a sphere centred at the origin (radius > 0)")
    bad = np.abs(radii - radius) > SPHERE_RTOL * radius
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"3-D meshes must be triangulated spheres centred at the origin: vertex {i} is at distance "
            f"{float(radii[i]):.8g} from the origin, the others at {radius:.8g} (relative tolerance {SPHERE_RTOL:g})"
        )
    return radius
