r"""Point location and barycentric (P1) interpolation weights on a mesh.

For each query point the cell that contains it and its barycentric
coordinates ``b`` (``Σ b_k = 1``, ``b_k ≥ 0``), so that a P1 field with
vertex values ``u`` reads ``u(x) = Σ_k b_k u_{v_k}``: row ``x`` of the
interpolation matrix ``W`` holds ``b`` at the cell's vertices.

* 1-D (intervals): ``np.searchsorted`` on the sorted knots.
* Planar triangles: ``b = (1 − s − t, s, t)`` with ``(s, t) = T⁻¹(x − p_0)``,
  ``T = [p_1 − p_0, p_2 − p_0]``.
* Sphere: the spherical triangle under a flat triangle is the cone of rays
  from the origin through it. A point ``x`` on the sphere is **projected
  onto the flat triangle along its ray** (the central, gnomonic projection):
  solving ``[p_0 p_1 p_2] λ = x`` gives ``λ = t·b`` with ``t > 0``, so ``x``
  lies in the cone iff ``λ ≥ 0``, and ``b = λ / Σλ`` are the barycentric
  coordinates of the projected point ``x / t`` in the flat triangle.

Point location for triangles: a k-d tree (SciPy ``cKDTree``) on the cell
centroids proposes the ``k`` nearest cells (``k = 8``, then 64), whose
barycentric coordinates are tested in one vectorised pass; points still not
found are tested against every cell (in blocks, only those few points), and
a point in no cell is reported by ``ValueError`` naming it. Cost
``O(q log m)`` for ``q`` points in the common case.

Core layer: NumPy and SciPy only.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Locator", "OUTSIDE_TOL"]

#: A barycentric coordinate down to ``−OUTSIDE_TOL`` counts as inside (points on edges, rounding).
OUTSIDE_TOL = 1e-10
_CANDIDATES = (8, 64)
_BLOCK = 2**22  # (points × cells) per block of the exhaustive test


class Locator:
    """Point location on a fixed mesh (built once, reused for every query).

    Parameters
    ----------
    vertices : numpy.ndarray
        ``(N, D)`` float64.
    cells : numpy.ndarray
        ``(m, 2)`` segments (``D = 1``) or ``(m, 3)`` triangles (``D = 2`` or 3).
    kind : str
        ``"interval"``, ``"plane"`` or ``"sphere"``.
    """

    def __init__(self, vertices: np.ndarray, cells: np.ndarray, kind: str):
        self.vertices, self.cells, self.kind = vertices, cells, kind
        if kind == "interval":
            x = vertices[:, 0]
            self.order = np.argsort(x)
            self.knots = x[self.order]
            return
        p = vertices[cells]  # (m, 3, D)
        self.tree = cKDTree(p.mean(axis=1))
        if kind == "plane":
            T = np.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]], axis=-1)  # (m, 2, 2): columns p1−p0, p2−p0
            self.inverse = np.linalg.inv(T)
            self.origin = p[:, 0]
        else:
            # λ_k = x · n_k / det with n_0 = p1 × p2, n_1 = p2 × p0, n_2 = p0 × p1 (Cramer's rule).
            normals = np.stack([np.cross(p[:, 1], p[:, 2]), np.cross(p[:, 2], p[:, 0]), np.cross(p[:, 0], p[:, 1])], 1)
            det = np.einsum("md,md->m", p[:, 0], normals[:, 0])
            self.dual = normals / det[:, None, None]  # (m, 3, 3): λ = dual @ x

    # ------------------------------------------------------------------ queries
    def locate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cell ids (q,), barycentric coordinates (q, k))`` for ``points (q, D)``; ValueError outside."""
        if self.kind == "interval":
            return self._locate_interval(points[:, 0])
        q = points.shape[0]
        cell = np.full(q, -1, dtype=np.int64)
        bary = np.zeros((q, 3))
        todo = np.arange(q)
        for k in _CANDIDATES:
            if not todo.size:
                break
            k = min(k, self.cells.shape[0])
            _, candidates = self.tree.query(points[todo], k=k)
            candidates = candidates.reshape(todo.size, k)
            b = self.barycentric(points[todo, None, :], candidates)  # (t, k, 3)
            score = b.min(axis=-1)  # ≥ −tol inside
            best = score.argmax(axis=1)
            found = score[np.arange(todo.size), best] >= -OUTSIDE_TOL
            cell[todo[found]] = candidates[found, best[found]]
            bary[todo[found]] = b[found, best[found]]
            todo = todo[~found]
        if todo.size:
            self._exhaustive(points, todo, cell, bary)
        bary = np.clip(bary, 0.0, None)
        bary /= bary.sum(axis=1, keepdims=True)
        return cell, bary

    def barycentric(self, points: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Barycentric coordinates ``(…, 3)`` of ``points (…, D)`` in ``cells (…)`` (broadcast), unclipped."""
        if self.kind == "plane":
            st = np.einsum("...ij,...j->...i", self.inverse[cells], points - self.origin[cells])
            return np.concatenate([1.0 - st.sum(-1, keepdims=True), st], axis=-1)
        lam = np.einsum("...ij,...j->...i", self.dual[cells], points)
        total = lam.sum(-1, keepdims=True)
        # A point on the far side of the sphere has λ ≤ 0 in total: mark it outside.
        return np.where(total > 0, lam / np.where(total > 0, total, 1.0), -1.0)

    def _exhaustive(self, points, todo, cell, bary) -> None:
        """Test the points ``todo`` against every cell (blocks of ``_BLOCK`` pairs); raise for one in none."""
        m = self.cells.shape[0]
        for start in range(0, todo.size, max(1, _BLOCK // m)):
            chunk = todo[start : start + max(1, _BLOCK // m)]
            step = max(1, _BLOCK // chunk.size)
            for first in range(0, m, step):
                ids = np.arange(first, min(m, first + step))
                b = self.barycentric(points[chunk, None, :], ids[None, :])
                score = b.min(-1)
                best = score.argmax(1)
                ok = (score[np.arange(chunk.size), best] >= -OUTSIDE_TOL) & (cell[chunk] < 0)
                cell[chunk[ok]] = ids[best[ok]]
                bary[chunk[ok]] = b[ok, best[ok]]
            missing = chunk[cell[chunk] < 0]
            if missing.size:
                i = int(missing[0])
                where = " (no spherical triangle contains it)" if self.kind == "sphere" else ""
                raise ValueError(
                    f"point {i} at {points[i].tolist()} lies outside the mesh{where}; extend the mesh "
                    "(e.g. Mesh.from_points_and_boundary(..., extension=...)) or drop the point"
                )

    def _locate_interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        knots = self.knots
        span = knots[-1] - knots[0]
        tol = OUTSIDE_TOL * span
        outside = (x < knots[0] - tol) | (x > knots[-1] + tol)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"point {i} at {float(x[i]):.10g} lies outside the mesh [{knots[0]:.10g}, {knots[-1]:.10g}]; "
                "extend the knots or drop the point"
            )
        x = np.clip(x, knots[0], knots[-1])
        j = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, knots.size - 2)
        t = (x - knots[j]) / (knots[j + 1] - knots[j])
        # Vertex ids of the segment [knots[j], knots[j+1]]; the segment id is the sorted position j.
        bary = np.stack([1.0 - t, t], axis=1)
        return j, bary

    def cell_vertices(self, cell: np.ndarray) -> np.ndarray:
        """``(q, k)`` vertex ids of the located cells (for intervals: of the sorted-knot segments)."""
        if self.kind == "interval":
            return np.stack([self.order[cell], self.order[cell + 1]], axis=1)
        return self.cells[cell]
