"""Meshes built from closed-form descriptions: intervals, triangulated rectangular lattices, icospheres.

Each function returns ``(vertices, cells)`` arrays; [`Mesh`][gpsparse.mesh.Mesh]'s
class methods wrap them. Vectorised NumPy (no loop over cells).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["interval", "regular_grid", "icosphere", "lonlat_to_cartesian"]


def interval(knots) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct knots ``(n,)`` → vertices ``(n, 1)`` and segments ``(n − 1, 2)`` between neighbours."""
    x = np.asarray(knots, dtype=np.float64).reshape(-1)
    if x.size < 2 or not np.isfinite(x).all():
        raise ValueError(f"an interval mesh needs at least 2 finite knots, got {x.size}")
    x = np.sort(x)
    n = x.size
    return x[:, None], np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)


def regular_grid(bounds, grid_size, *, diagonal: str = "up") -> tuple[np.ndarray, np.ndarray]:
    """Triangulate the ``m_0 × m_1`` lattice of ``bounds`` ``[[x_lo, y_lo], [x_hi, y_hi]]``: two triangles per cell.

    Vertices in C order (the first coordinate varies slowest), the node order
    of [`LatticeMaternKernel`][gpsparse.kernels.LatticeMaternKernel] with the
    same bounds and grid size. ``diagonal="up"`` cuts every cell along its
    diagonal from ``(i, j)`` to ``(i + 1, j + 1)``; ``"alternate"`` flips it in
    a checkerboard (the "union jack" pattern, isotropic at the mesh scale).
    """
    b = np.asarray(bounds, dtype=np.float64)
    if b.shape != (2, 2) or not np.isfinite(b).all() or not (b[1] > b[0]).all():
        raise ValueError(f"bounds must be [[x_lo, y_lo], [x_hi, y_hi]] with lo < hi, got {b.tolist()}")
    sizes = (int(grid_size), int(grid_size)) if np.ndim(grid_size) == 0 else tuple(int(m) for m in grid_size)
    if len(sizes) != 2 or min(sizes) < 2:
        raise ValueError(f"grid_size must be one or two integers ≥ 2, got {grid_size!r}")
    if diagonal not in ("up", "alternate"):
        raise ValueError(f"diagonal must be 'up' or 'alternate', got {diagonal!r}")
    m0, m1 = sizes
    axes = [np.linspace(b[0, d], b[1, d], sizes[d]) for d in range(2)]
    g0, g1 = np.meshgrid(*axes, indexing="ij")
    vertices = np.stack([g0.reshape(-1), g1.reshape(-1)], axis=1)
    i, j = np.meshgrid(np.arange(m0 - 1), np.arange(m1 - 1), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    v00, v10, v01, v11 = i * m1 + j, (i + 1) * m1 + j, i * m1 + j + 1, (i + 1) * m1 + j + 1
    up = np.stack([np.stack([v00, v10, v11], 1), np.stack([v00, v11, v01], 1)], 1)  # (cells, 2, 3)
    if diagonal == "alternate":
        down = np.stack([np.stack([v00, v10, v01], 1), np.stack([v10, v11, v01], 1)], 1)
        flip = ((i + j) % 2 == 1)[:, None, None]
        up = np.where(flip, down, up)
    return vertices, up.reshape(-1, 3)


def icosphere(subdivisions: int, radius: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The icosahedron refined ``subdivisions`` times (each triangle into 4, midpoints pushed to the sphere).

    ``10·4^s + 2`` vertices and ``20·4^s`` triangles, outward oriented; edge
    lengths vary by about ±20 % over the sphere (a near-uniform mesh).
    """
    if isinstance(subdivisions, bool) or int(subdivisions) != subdivisions or subdivisions < 0:
        raise ValueError(f"subdivisions must be an integer ≥ 0, got {subdivisions!r}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be positive and finite, got {radius!r}")
    phi = (1 + math.sqrt(5)) / 2
    v = np.array(
        [[-1, phi, 0], [1, phi, 0], [-1, -phi, 0], [1, -phi, 0], [0, -1, phi], [0, 1, phi],
         [0, -1, -phi], [0, 1, -phi], [phi, 0, -1], [phi, 0, 1], [-phi, 0, -1], [-phi, 0, 1]],
        dtype=np.float64,
    )  # fmt: skip
    f = np.array(
        [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
         [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
         [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]],
        dtype=np.int64,
    )  # fmt: skip
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(int(subdivisions)):
        n = v.shape[0]
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        unique, inverse = np.unique(edges[:, 0] * n + edges[:, 1], return_inverse=True)
        a, b = np.divmod(unique, n)
        mid = v[a] + v[b]
        v = np.concatenate([v, mid / np.linalg.norm(mid, axis=1, keepdims=True)])
        m01, m12, m20 = (n + inverse).reshape(3, -1)
        f = np.concatenate(
            [
                np.stack([f[:, 0], m01, m20], 1),
                np.stack([f[:, 1], m12, m01], 1),
                np.stack([f[:, 2], m20, m12], 1),
                np.stack([m01, m12, m20], 1),
            ]
        )
    return radius * v, f


def lonlat_to_cartesian(lonlat, radius: float = 1.0) -> np.ndarray:
    """``(q, 2)`` longitude, latitude in degrees → ``(q, 3)`` points on the sphere of ``radius``."""
    ll = np.radians(np.asarray(lonlat, dtype=np.float64).reshape(-1, 2))
    lon, lat = ll[:, 0], ll[:, 1]
    return radius * np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
