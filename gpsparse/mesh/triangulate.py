r"""Quality triangulations of a polygonal domain (with holes and an outer extension) by Shewchuk's Triangle.

``triangulate_domain`` builds the planar straight-line graph — the boundary
polygon, the hole polygons, optionally an outer ring (the convex hull of the
boundary and the points grown by ``extension``) and the data points — and
calls Triangle (the ``triangle`` package, Python bindings of J. R.
Shewchuk's C library: constrained conforming Delaunay triangulation with
Ruppert refinement) with the switches ``p`` (segments kept), ``q<angle>``
(no angle below ``min_angle``) and ``a`` (area bounds per region), plus
``A`` (region labels). Why Triangle: it is maintained, ships wheels, and its
refinement guarantees the minimum angle (up to ~33°) that finite-element
accuracy needs; ``scipy.spatial.Delaunay`` has no constraints or refinement.

The inner region (inside the boundary, outside the holes) is refined to
``max_area``; the extension ring to a coarser bound (16× the inner area,
i.e. edges ~4× longer, unless given), as in R-INLA's two-level ``max.edge``:
the ring only moves the artificial boundary away from the data, where the
SPDE's Neumann condition inflates the variance (Lindgren, Rue & Lindström
2011, §2.3; Bakka et al. 2018 recommend an extension of about one range).
Holes are not meshed (natural boundary conditions on their edges).

The input polygons are checked first (``gpsparse.mesh.polygon``): simple
(no crossing or touching edges, also between rings), holes inside the
boundary and outside each other, points inside the domain (or the extension).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from gpsparse.mesh.polygon import as_polygon, buffered_hull, check_simple, points_in_polygon

__all__ = ["triangulate_domain", "import_triangle", "MAX_MIN_ANGLE"]

#: Triangle's refinement terminates for minimum angles up to about 33.8°.
MAX_MIN_ANGLE = 33.8
#: Default area ratio of the extension ring's triangles to the inner ones.
EXTENSION_AREA_RATIO = 16.0


def import_triangle():
    """The ``triangle`` module, or ``ImportError`` naming the extra that installs it."""
    try:
        import triangle
    except ImportError as err:
        raise ImportError(
            "Mesh.from_points_and_boundary needs the 'triangle' package (Shewchuk's Triangle): "
            f'pip install "gpsparse[mesh]" (or pip install "triangle>=20230923") ({err})'
        ) from err
    return triangle


def triangulate_domain(
    points,
    boundary,
    holes=None,
    *,
    extension: float | None = None,
    max_area=None,
    min_angle: float = 25.0,
    cutoff: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vertices (N, 2), triangles (m, 3), regions (m,))``: 0 inside the boundary, 1 in the extension.

    Parameters: see [`Mesh.from_points_and_boundary`][gpsparse.mesh.Mesh.from_points_and_boundary].
    """
    outer = as_polygon(boundary, "the boundary")
    hole_rings = [as_polygon(h, f"hole {k}") for k, h in enumerate(holes or [])]
    check_simple([outer, *hole_rings], ["the boundary", *(f"hole {k}" for k in range(len(hole_rings)))])
    for k, ring in enumerate(hole_rings):
        if not points_in_polygon(ring, outer).all():
            raise ValueError(f"hole {k} is not inside the boundary")
        for k2, other in enumerate(hole_rings):
            if k2 != k and points_in_polygon(ring[:1], other).any():
                raise ValueError(f"hole {k} lies inside hole {k2}; holes must be disjoint")
    if not (math.isfinite(min_angle) and 0 <= min_angle <= MAX_MIN_ANGLE):
        raise ValueError(f"min_angle must be in [0, {MAX_MIN_ANGLE}] degrees (Triangle's limit), got {min_angle!r}")
    if extension is not None and not (math.isfinite(extension) and extension > 0):
        raise ValueError(f"extension must be a positive distance (or None), got {extension!r}")
    inner_area, outer_area = _areas(max_area, extension is not None)
    pts = _points(points, outer, hole_rings, extension is not None, cutoff)

    rings = [outer, *hole_rings]
    ext_ring = None
    if extension is not None:
        ext_ring = buffered_hull(np.concatenate([outer, pts]) if len(pts) else outer, extension)
        rings = [ext_ring, *rings]
    vertices, segments, offset = [], [], 0
    for ring in rings:
        count = len(ring)
        vertices.append(ring)
        segments.append(offset + np.stack([np.arange(count), (np.arange(count) + 1) % count], 1))
        offset += count
    vertices.append(pts)
    pslg = {"vertices": np.concatenate(vertices), "segments": np.concatenate(segments)}
    if hole_rings:
        pslg["holes"] = np.array([_interior_point(ring) for ring in hole_rings])
    regions = [[*_interior_point(outer, hole_rings), 0, inner_area]]
    if ext_ring is not None:
        right = int(np.argmax(outer[:, 0]))
        regions.append([outer[right, 0] + 0.5 * extension, outer[right, 1], 1, outer_area])
    pslg["regions"] = np.array(regions, dtype=np.float64)
    triangle = import_triangle()
    result = triangle.triangulate(pslg, f"pq{min_angle:g}aAQ")
    labels = np.asarray(result["triangle_attributes"]).reshape(-1).round().astype(np.int64)
    return np.asarray(result["vertices"], dtype=np.float64), np.asarray(result["triangles"], np.int64), labels


def _areas(max_area, extended: bool) -> tuple[float, float]:
    """Inner and extension area bounds (−1: none, Triangle's convention)."""
    if max_area is None:
        return -1.0, -1.0
    if np.ndim(max_area) == 0:
        inner, outer = float(max_area), EXTENSION_AREA_RATIO * float(max_area)
    else:
        values = [float(a) for a in max_area]
        if len(values) != 2:
            raise ValueError(f"max_area must be a number or a pair (inner, extension), got {max_area!r}")
        inner, outer = values
    for name, value in (("max_area", inner), ("the extension's max_area", outer)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return inner, (outer if extended else -1.0)


def _points(points, outer, hole_rings, extended: bool, cutoff: float) -> np.ndarray:
    """Data points as mesh vertices: checked inside the domain, duplicates (within ``cutoff``) merged."""
    if points is None:
        return np.zeros((0, 2))
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or not np.isfinite(p).all():
        raise ValueError(f"points must be a finite array of shape (q, 2), got shape {p.shape}")
    if not len(p):
        return p
    if not extended:
        outside = ~points_in_polygon(p, outer)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"point {i} at {p[i].tolist()} lies outside the boundary ({int(outside.sum())} points do); "
                "give an extension, or drop the points"
            )
    for k, ring in enumerate(hole_rings):
        inside = points_in_polygon(p, ring)
        if inside.any():
            i = int(np.flatnonzero(inside)[0])
            raise ValueError(f"point {i} at {p[i].tolist()} lies inside hole {k}")
    scale = float(np.linalg.norm(outer.max(0) - outer.min(0)))
    radius = max(float(cutoff), 1e-10 * scale)
    keep = np.ones(len(p), dtype=bool)
    for i, j in sorted(cKDTree(p).query_pairs(radius)):
        if keep[i] and keep[j]:
            keep[j] = False  # greedy: the first point of a cluster stays
    p = p[keep]
    # Points on (or within the radius of) a polygon vertex would duplicate it.
    rings = np.concatenate([outer, *hole_rings]) if hole_rings else outer
    near_ring = cKDTree(rings).query(p, distance_upper_bound=radius)[0] < math.inf
    return p[~near_ring]


def _interior_point(ring: np.ndarray, holes=()) -> np.ndarray:
    """A point strictly inside ``ring`` and outside ``holes``: the centroid of the largest triangle of a CDT."""
    triangle = import_triangle()
    rings = [ring, *holes]
    vertices = np.concatenate(rings)
    segments, offset = [], 0
    for r in rings:
        segments.append(offset + np.stack([np.arange(len(r)), (np.arange(len(r)) + 1) % len(r)], 1))
        offset += len(r)
    pslg = {"vertices": vertices, "segments": np.concatenate(segments)}
    if holes:
        pslg["holes"] = np.array([_interior_point(h) for h in holes])
    tri = triangle.triangulate(pslg, "pQ")
    v, t = tri["vertices"], tri["triangles"]
    p0, p1, p2 = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    area = np.abs((p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0]))
    k = int(np.argmax(area))
    return (p0[k] + p1[k] + p2[k]) / 3.0
