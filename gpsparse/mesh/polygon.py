"""Planar polygons for mesh construction: validation, self-intersection, containment, a buffered convex hull.

All vectorised NumPy. The segment-intersection test is the orientation
test of the pairs of edges whose bounding boxes overlap (a sweep over the
edges sorted by their smallest x, pairs in blocks of ~4·10⁶; ``O(s²)`` in the
worst case, typically far fewer: 20 000 edges of a wavy ring in 0.05 s),
exact up to a relative tolerance on the orientation determinants.

Core layer: NumPy and SciPy only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import ConvexHull

__all__ = ["as_polygon", "check_simple", "points_in_polygon", "signed_area", "buffered_hull"]

_BLOCK = 2**22
_ORIENT_RTOL = 1e-12


def as_polygon(polygon, name: str) -> np.ndarray:
    """``(b, 2)`` float64 ring (≥ 3 vertices, finite, no repeated consecutive vertex; a closing copy dropped)."""
    p = np.asarray(polygon, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} must be an array of shape (b, 2) (polygon vertices in order), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} has non-finite coordinates")
    if len(p) > 1 and np.array_equal(p[0], p[-1]):
        p = p[:-1]
    if len(p) < 3:
        raise ValueError(f"{name} needs at least 3 distinct vertices, got {len(p)}")
    step = np.linalg.norm(np.roll(p, -1, axis=0) - p, axis=1)
    scale = float(np.linalg.norm(p.max(0) - p.min(0)))
    short = step <= 1e-12 * scale
    if short.any():
        k = int(np.flatnonzero(short)[0])
        raise ValueError(f"{name} repeats vertex {k} ({p[k].tolist()}) as vertex {(k + 1) % len(p)}")
    return np.ascontiguousarray(p)


def signed_area(polygon: np.ndarray) -> float:
    """Shoelace area, positive for counterclockwise rings."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _orient(a, b, c):
    return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])


def check_simple(rings: list[np.ndarray], names: list[str]) -> None:
    """Raise ``ValueError`` when two edges of ``rings`` cross or touch (other than neighbours sharing a vertex).

    Covers a ring crossing itself, a ring touching itself at a vertex, a spike
    folding back onto its own edge, and two rings crossing or touching each
    other (e.g. a hole meeting the boundary).
    """
    starts, ends, ring_of, index_in = [], [], [], []
    for r, ring in enumerate(rings):
        starts.append(ring)
        ends.append(np.roll(ring, -1, axis=0))
        ring_of.append(np.full(len(ring), r))
        index_in.append(np.arange(len(ring)))
    a, b = np.concatenate(starts), np.concatenate(ends)
    ring_of, index_in = np.concatenate(ring_of), np.concatenate(index_in)
    sizes = np.array([len(r) for r in rings])
    scale = float(np.linalg.norm(a.max(0) - a.min(0)))
    tol = _ORIENT_RTOL * scale**2
    slack = _ORIENT_RTOL * scale
    for i, j in _candidate_pairs(a, b, slack):
        same = ring_of[i] == ring_of[j]
        gap = np.abs(index_in[i] - index_in[j])
        adjacent = same & ((gap == 1) | (gap == sizes[ring_of[i]] - 1))
        a1, b1, a2, b2 = a[i], b[i], a[j], b[j]
        o1, o2 = _orient(a1, b1, a2), _orient(a1, b1, b2)
        o3, o4 = _orient(a2, b2, a1), _orient(a2, b2, b1)
        proper = (o1 * o2 < -tol * tol) & (o3 * o4 < -tol * tol)
        touch = (
            _on_segment(a1, b1, a2, o1, tol, slack)
            | _on_segment(a1, b1, b2, o2, tol, slack)
            | _on_segment(a2, b2, a1, o3, tol, slack)
            | _on_segment(a2, b2, b1, o4, tol, slack)
        )
        # Neighbouring edges share one vertex; they intersect wrongly only when they overlap (a spike).
        bad = (~adjacent & (proper | touch)) | (adjacent & _folds_back(a1, b1, a2, b2, tol))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            e1, e2 = sorted((int(i[k]), int(j[k])))
            raise ValueError(
                f"the polygons are not simple: edge {int(index_in[e1])} of {names[ring_of[e1]]} "
                f"({a[e1].tolist()} → {b[e1].tolist()}) and edge {int(index_in[e2])} of {names[ring_of[e2]]} "
                f"({a[e2].tolist()} → {b[e2].tolist()}) intersect; a boundary or hole must not cross or touch "
                "itself or another one"
            )
    for ring, name in zip(rings, names):
        if abs(signed_area(ring)) <= _ORIENT_RTOL * scale**2:
            raise ValueError(f"{name} encloses no area (its vertices are collinear)")


def _candidate_pairs(a: np.ndarray, b: np.ndarray, slack: float):
    """Blocks ``(i, j)`` of edge pairs whose bounding boxes overlap (a sweep in x, then a test in y).

    Edges sorted by their smallest x; edge ``i`` can only meet the later edges
    that start before it ends. Typically ``O(s√s)`` pairs instead of ``s²``.
    """
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.argsort(lo[:, 0], kind="stable")
    starts = lo[order, 0]
    ends = np.searchsorted(starts, hi[order, 0] + slack, side="right")
    counts = ends - np.arange(len(order)) - 1
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    block = _BLOCK
    first = 0
    while first < len(order):
        last = int(np.searchsorted(cumulative, cumulative[first] + block, side="right"))
        last = max(last - 1, first + 1)
        rows = np.arange(first, last)
        c = counts[rows]
        i_sorted = np.repeat(rows, c)
        offsets = np.arange(int(c.sum())) - np.repeat(cumulative[rows] - cumulative[first], c)
        j_sorted = i_sorted + 1 + offsets
        i, j = order[i_sorted], order[j_sorted]
        overlap = (lo[i, 1] <= hi[j, 1] + slack) & (lo[j, 1] <= hi[i, 1] + slack)
        yield i[overlap], j[overlap]
        first = last


def _on_segment(a, b, p, orientation, tol, slack):
    """``p`` collinear with segment ``ab`` (``|orient| ≤ tol``) and within its bounding box (± ``slack``)."""
    within = (
        (np.minimum(a[..., 0], b[..., 0]) - slack <= p[..., 0])
        & (p[..., 0] <= np.maximum(a[..., 0], b[..., 0]) + slack)
        & (np.minimum(a[..., 1], b[..., 1]) - slack <= p[..., 1])
        & (p[..., 1] <= np.maximum(a[..., 1], b[..., 1]) + slack)
    )
    return (np.abs(orientation) <= tol) & within


def _folds_back(a1, b1, a2, b2, tol):
    """Neighbouring edges (sharing a vertex) that are collinear and point back along each other."""
    d1, d2 = b1 - a1, b2 - a2
    cross = d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]
    dot = (d1 * d2).sum(-1)
    return (np.abs(cross) <= tol) & (dot < 0)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """``(q,)`` bool: strictly inside ``polygon`` by the even–odd ray rule (points on edges: either)."""
    x, y = points[:, 0][:, None], points[:, 1][:, None]
    inside = np.zeros(len(points), dtype=bool)
    a, b = polygon, np.roll(polygon, -1, axis=0)
    step = max(1, _BLOCK // max(len(points), 1))
    for start in range(0, len(a), step):
        xa, ya = a[start : start + step, 0], a[start : start + step, 1]
        xb, yb = b[start : start + step, 0], b[start : start + step, 1]
        straddles = (ya > y) != (yb > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            cross_x = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= (straddles & (x < cross_x)).sum(axis=1) % 2 == 1
    return inside


def buffered_hull(points: np.ndarray, distance: float, *, max_step_degrees: float = 15.0) -> np.ndarray:
    """Counterclockwise polygon ≈ the convex hull of ``points`` grown by ``distance`` (round corners).

    Each hull edge is moved out by ``distance``; each hull vertex gets an arc
    of radius ``distance`` in steps of at most ``max_step_degrees`` (the
    polygon lies inside the exact buffer, and within
    ``distance·(1 − cos(step/2))`` of it).
    """
    hull = points[ConvexHull(points).vertices]  # counterclockwise
    out = []
    count = len(hull)
    for k in range(count):
        prev, here, nxt = hull[k - 1], hull[k], hull[(k + 1) % count]
        n_in = _outward_normal(prev, here)
        n_out = _outward_normal(here, nxt)
        a0, a1 = math.atan2(n_in[1], n_in[0]), math.atan2(n_out[1], n_out[0])
        turn = (a1 - a0) % (2 * math.pi)
        steps = max(1, int(math.ceil(math.degrees(turn) / max_step_degrees)))
        angles = a0 + turn * np.arange(steps + 1) / steps
        out.append(here + distance * np.stack([np.cos(angles), np.sin(angles)], 1))
    return np.concatenate(out)


def _outward_normal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    n = np.array([d[1], -d[0]])  # right of a counterclockwise edge = outside
    return n / np.linalg.norm(n)
