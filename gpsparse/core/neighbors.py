"""Fixed-radius neighbour search (core layer).

``radius_pairs`` finds every pair of points closer than a radius without
an ``n × m`` distance matrix. Coordinates are first scaled by the radius, so
the search is always for scaled distances ``< 1``.

* **CPU tensors**: SciPy's ``scipy.spatial.cKDTree`` (``query_pairs``
    for ``y = None``, ``sparse_distance_matrix`` between two trees otherwise),
    searched with the radius widened by a few ulps; the candidates whose
    distance lies within that band of 1 are re-tested with the grid path's own
    torch expression, so the pair set is identical to the grid search's
    (strict ``< 1`` in the input dtype). 1.3–3× faster than the grid search on
    one core (benchmarked for d = 1, 2, 3, 30–100 neighbours, 10⁴–10⁵ points).
* **Other devices (CUDA)**: a uniform grid in torch. Points are binned into
    cells of side 1 (scaled), and each point is compared only with the points
    of its own and the ``3^d − 1`` adjacent cells. Cost O((n + m) log m +
    candidates), memory O(pairs + a bounded chunk of candidates). Candidates
    per true neighbour: ``3^d / V_d`` on average (``V_d`` the unit-ball volume:
    1.5 in 1-D, 2.9 in 2-D, 6.4 in 3-D).

This module is a core: plain tensors, no autograd, no gpytorch.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

__all__ = ["radius_pairs"]

#: Candidate pairs examined per chunk of the grid search (bounds the temporaries: ~40 B per candidate plus 8·d).
_CHUNK_CANDIDATES = 2**22
#: Largest number of grid cells whose linear index the grid search forms (keys are int64).
_MAX_CELLS = 2**62
#: Search backend for CPU tensors: "kdtree" (SciPy) or "grid" (the torch grid search, as on CUDA).
_CPU_BACKEND = "kdtree"
#: cKDTree construction options (an unbalanced tree without node compaction builds ~2× faster, queries as fast).
_TREE_OPTIONS = dict(leafsize=16, balanced_tree=False, compact_nodes=False)


def radius_pairs(
    x: Tensor,
    y: Tensor | None = None,
    *,
    radius: float | Tensor,
    max_pairs: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""All pairs ``(i, j)`` with ``‖(x_i − y_j) / radius‖₂ < 1``.

    Parameters
    ----------
    x : Tensor
        ``(n, d)`` points (finite).
    y : Tensor, optional
        ``(m, d)`` points. ``None`` means ``y = x``: the returned pair set is
        then symmetric (``(i, j)`` present iff ``(j, i)`` is) and holds every
        diagonal pair ``(i, i)``.
    radius : float or Tensor
        A positive scalar, or ``(d,)`` positive per-dimension radii (the
        neighbourhood is then the axis-aligned ellipsoid
        ``Σ_k ((x_ik − y_jk) / radius_k)² < 1``).
    max_pairs : int, optional
        Raise ``RuntimeError`` as soon as more pairs than this are found
        (guards against a radius that makes the pattern nearly dense).

    Returns
    -------
    row, col : Tensor
        ``(npairs,)`` int64 indices into ``x`` and ``y`` (on their device), in
        no particular order, without duplicates.

    Raises
    ------
    ValueError
        Shapes that are not ``(n, d)`` / ``(m, d)`` with the same ``d``,
        non-finite points, a radius that is not positive and finite, or (grid
        search, non-CPU tensors) a grid with more than 2⁶² cells (points
        spread over more than ~10¹⁹ radii).
    RuntimeError
        More than ``max_pairs`` pairs.

    Notes
    -----
    With ``y = None`` only pairs ``i < j`` are searched (``query_pairs`` on
    CPU; on other devices the "forward half" of the adjacent cells: pairs in
    the same cell with ``i < j``, and cells at a lexicographically positive
    offset) and the result is mirrored, which halves the work and makes the
    symmetry exact. ``max_pairs`` counts the off-diagonal pairs (both
    directions) for ``y = None``. On CPU with ``max_pairs`` set, a
    ``cKDTree.count_neighbors`` pass (a lower bound, no pairs stored) runs
    first so that a nearly dense pattern is refused before it is built.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    >>> row, col = radius_pairs(x, radius=1.0)
    >>> sorted(zip(row.tolist(), col.tolist()))
    [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
    """
    symmetric = y is None
    _check_points(x, "x")
    if not symmetric:
        _check_points(y, "y")
        if y.shape[-1] != x.shape[-1]:
            raise ValueError(f"x and y must have the same number of dimensions, got {x.shape[-1]} and {y.shape[-1]}")
        if y.device != x.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
    n, d = x.shape
    device = x.device
    dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    radius = torch.as_tensor(radius, dtype=dtype, device=device).detach()
    if radius.dim() > 1 or radius.numel() not in (1, d) or not bool(torch.isfinite(radius).all() & (radius > 0).all()):
        raise ValueError(f"radius must be a positive finite scalar or ({d},) tensor, got {radius.tolist()}")

    zx = x.detach().to(dtype) / radius
    zy = zx if symmetric else y.detach().to(dtype) / radius
    m = zy.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n == 0 or m == 0:
        return empty, empty
    if not bool(torch.isfinite(zx).all() & torch.isfinite(zy).all()):
        raise ValueError(
            f"the points divided by the radius {radius.tolist()} overflow {dtype}; "
            "the radius is too small for the extent of the inputs"
        )
    if device.type == "cpu" and _CPU_BACKEND == "kdtree" and d > 0:
        return _kdtree_pairs(zx, zy, symmetric, radius, max_pairs)
    return _grid_pairs(zx, zy, symmetric, radius, max_pairs)


def _too_many(max_pairs: int, radius: Tensor, n: int, m: int) -> RuntimeError:
    return RuntimeError(
        f"the neighbour search found more than max_pairs = {max_pairs:,} pairs within the radius "
        f"{radius.tolist()} ({n:,} × {m:,} points); the radius is too large for a sparse pattern"
    )


def _kdtree_pairs(zx: Tensor, zy: Tensor, symmetric: bool, radius: Tensor, max_pairs: int | None):
    """CPU search with cKDTree on the scaled points; same pair set as ``_grid_pairs``.

    The trees are searched with radius ``1 + δ`` (``δ`` a few ulps of the dtype, covering the rounding of
    the dtype's arithmetic against SciPy's float64); candidates with float64 squared distance ``< 1 − δ``
    are kept, those within ``δ`` of 1 are decided by the grid search's expression in the input dtype.
    """
    n, d = zx.shape
    m = zy.shape[0]
    delta = 8.0 * (d + 2) * torch.finfo(zx.dtype).eps
    px = zx.double().numpy()
    tree_x = cKDTree(px, **_TREE_OPTIONS)
    tree_y = tree_x if symmetric else cKDTree(zy.double().numpy(), **_TREE_OPTIONS)
    if max_pairs is not None:  # lower bound (pairs certainly < 1) before anything is stored
        certain = int(tree_x.count_neighbors(tree_y, 1.0 - delta)) - (n if symmetric else 0)
        if certain > max_pairs:
            raise _too_many(max_pairs, radius, n, m)
    if symmetric:
        pairs = tree_x.query_pairs(1.0 + delta, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        q = None  # float64 squared distances, one coordinate at a time (no (pairs, d) temporaries)
        for k in range(d):
            column = np.ascontiguousarray(px[:, k])
            t = np.take(column, i)
            t -= np.take(column, j)
            t *= t
            q = t if q is None else np.add(q, t, out=q)
    else:
        found = tree_x.sparse_distance_matrix(tree_y, 1.0 + delta, output_type="ndarray")
        i, j, q = found["i"], found["j"], found["v"]
        q = q * q
    band = np.abs(q - 1.0) <= 2.0 * delta
    keep = q < 1.0
    if band.any():  # decide the near-ties exactly as the grid search does
        bi, bj = torch.from_numpy(i[band]), torch.from_numpy(j[band])
        keep[band] = (((zx[bi] - zy[bj]) ** 2).sum(-1) < 1).numpy()
    if not keep.all():
        i, j = i[keep], j[keep]
    row = torch.from_numpy(np.ascontiguousarray(i, dtype=np.int64))
    col = torch.from_numpy(np.ascontiguousarray(j, dtype=np.int64))
    if max_pairs is not None and (2 if symmetric else 1) * row.numel() > max_pairs:
        raise _too_many(max_pairs, radius, n, m)
    if symmetric:
        diag = torch.arange(n)
        row, col = torch.cat([row, col, diag]), torch.cat([col, row, diag])
    return row, col


def _grid_pairs(zx: Tensor, zy: Tensor, symmetric: bool, radius: Tensor, max_pairs: int | None):
    """Uniform-grid search in torch (any device) for scaled points (pairs with squared distance ``< 1``)."""
    n, d = zx.shape
    m = zy.shape[0]
    device = zx.device
    empty = torch.zeros(0, dtype=torch.long, device=device)

    lo = torch.minimum(zx.amin(0), zy.amin(0))
    extent = torch.floor(torch.maximum(zx.amax(0), zy.amax(0)) - lo).double() + 1  # before .long() can overflow
    if not bool(torch.isfinite(extent).all()) or float(torch.prod(extent)) > _MAX_CELLS:
        raise ValueError(
            f"the points span {extent.tolist()} cells of the search radius per dimension, more than 2^62 in all; "
            "the radius is too small for the extent of the inputs"
        )
    cx = torch.floor(zx - lo).long()
    cy = cx if symmetric else torch.floor(zy - lo).long()
    shape = torch.maximum(cx.amax(0), cy.amax(0)) + 1
    strides = torch.ones(d, dtype=torch.long, device=device)
    for k in range(d - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]

    # Sort both point sets by cell so that every cell is a contiguous run and gathers stay local.
    key_x, perm_x = torch.sort((cx * strides).sum(-1))
    zx = zx[perm_x]
    if symmetric:
        key_y, perm_y, zy = key_x, perm_x, zx
    else:
        key_y, perm_y = torch.sort((cy * strides).sum(-1))
        zy = zy[perm_y]
    cells_y, count_y = torch.unique_consecutive(key_y, return_counts=True)
    start_y = torch.cumsum(count_y, 0) - count_y
    cells_x, cell_of_x = torch.unique_consecutive(key_x, return_inverse=True)
    coords_x = cx[perm_x][torch.cumsum(torch.bincount(cell_of_x), 0) - 1]  # (cells in x, d) cell coordinates

    rows, cols = [], []
    found = 0
    position = torch.arange(n, device=device)
    for offset in _offsets(d, symmetric):
        neighbour = coords_x + torch.tensor(offset, dtype=torch.long, device=device)
        valid = ((neighbour >= 0) & (neighbour < shape)).all(-1)
        query = (neighbour * strides).sum(-1)
        idx = torch.searchsorted(cells_y, query).clamp_max(cells_y.numel() - 1)
        hit = valid & (cells_y[idx] == query)
        start = torch.where(hit, start_y[idx], 0)[cell_of_x]
        counts = torch.where(hit, count_y[idx], 0)[cell_of_x]
        if symmetric and not any(offset):  # own cell: only the points after i (pairs i < j, diagonal added below)
            counts = start + counts - (position + 1)
            start = position + 1
        for i, j in _candidate_chunks(start, counts):
            keep = ((zx[i] - zy[j]) ** 2).sum(-1) < 1
            i, j = perm_x[i[keep]], perm_y[j[keep]]
            rows.append(i)
            cols.append(j)
            found += (2 if symmetric else 1) * i.numel()
            if max_pairs is not None and found > max_pairs:
                raise _too_many(max_pairs, radius, n, m)
    row = torch.cat(rows) if rows else empty
    col = torch.cat(cols) if cols else empty
    if symmetric:
        diag = torch.arange(n, device=device)
        row, col = torch.cat([row, col, diag]), torch.cat([col, row, diag])
    return row, col


def _offsets(d: int, symmetric: bool) -> list[tuple[int, ...]]:
    """Cell offsets to visit: all ``3^d``, or the zero offset and the lexicographically positive half."""
    offsets = list(itertools.product((-1, 0, 1), repeat=d))
    if symmetric:
        offsets = [o for o in offsets if o >= (0,) * d]
    return offsets


def _candidate_chunks(start: Tensor, counts: Tensor):
    """Yield ``(i, j)`` candidate index pairs, at most ~``_CHUNK_CANDIDATES`` per chunk (plus one row).

    Point ``i`` is paired with ``j ∈ [start[i], start[i] + counts[i])``.
    """
    n = counts.numel()
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if n else 0
    if total == 0:
        return
    # Split the points where the running candidate count crosses multiples of the chunk size.
    bounds = [0, n]
    if total > _CHUNK_CANDIDATES:
        marks = torch.arange(_CHUNK_CANDIDATES, total, _CHUNK_CANDIDATES, device=ends.device)
        cuts = (torch.searchsorted(ends, marks) + 1).clamp_max(n)
        bounds = [0, *sorted(set(cuts.tolist())), n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        c = counts[a:b]
        num = int(c.sum())
        if num == 0:
            continue
        i = torch.repeat_interleave(torch.arange(a, b, device=c.device), c, output_size=num)
        shift = start[a:b] - (torch.cumsum(c, 0) - c)  # j = shift[i] + running candidate index
        yield i, torch.arange(num, device=c.device) + shift[i - a]


def _check_points(points: Tensor, name: str) -> None:
    if not isinstance(points, Tensor) or points.dim() != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be a 2-D tensor of points (n, d), got {shape}")
    if points.numel() and not bool(torch.isfinite(points.detach()).all()):
        bad = "NaN" if bool(torch.isnan(points.detach()).any()) else "Inf"
        raise ValueError(f"{name} contains {bad}")
