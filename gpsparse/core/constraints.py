r"""Numerics of intrinsic GMRFs and linear constraints (core layer: numpy, scipy, torch).

* ``constraint_basis``: an orthonormal basis ``V`` (N × k) of the row space
  of a user's constraint matrix ``A`` (k × N), so that ``A x = 0`` ⇔
  ``Vᵀ x = 0``; rank-deficient or non-finite matrices are refused.
* ``component_basis``: the null space of a random-walk or Besag structure
  matrix, per connected component: the constant ``1_C/√|C|`` (order 1) and,
  for order 2, the orthonormalised linear function of the positions.
* ``pivot_nodes``: ``k`` nodes ``p`` with ``V[p]`` well conditioned (QR with
  column pivoting on ``Vᵀ``), the sparse rank completion
  ``R = Q + s² Σ_j e_{p_j} e_{p_j}ᵀ`` of the constrained operators
  (``gpsparse.operators.constrained``).
* ``random_walk_structure``: first- and second-order random-walk structure
  matrices on sorted, distinct, possibly irregular 1-D locations.
* ``constrained_inverse_dense``: the dense float64 reference
  ``V_⊥ (V_⊥ᵀ Q V_⊥)⁻¹ V_⊥ᵀ`` (``= Q⁺`` for an intrinsic ``Q`` whose null
  space is spanned by ``V``), for small problems and tests.

The mathematics is in ``docs/mathematics.md`` ("Intrinsic GMRFs and linear
constraints").
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

__all__ = [
    "constraint_basis",
    "component_basis",
    "pivot_nodes",
    "random_walk_structure",
    "constrained_inverse_dense",
    "RANK_RTOL",
]

#: Relative tolerance on the singular values of a constraint matrix: rows whose singular value is
#: below ``RANK_RTOL · σ_max`` are linearly dependent (a rank-deficient constraint matrix is refused).
RANK_RTOL = 1e-10


def constraint_basis(matrix) -> np.ndarray:
    r"""Orthonormal basis ``V`` (N × k, float64) of the row space of a constraint matrix ``A`` (k × N).

    ``A x = 0`` and ``Vᵀ x = 0`` define the same subspace; ``V`` holds the
    left singular vectors of ``Aᵀ``.

    Raises
    ------
    ValueError
        ``A`` not two-dimensional, empty, with non-finite entries, with at
        least as many rows as columns (nothing left to model), or of rank
        below its number of rows (``σ_min < RANK_RTOL · σ_max``: dependent or
        zero rows; remove them).
    """
    A = np.asarray(matrix, dtype=np.float64)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"a constraint matrix must be a non-empty (k, N) matrix, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError("the constraint matrix holds non-finite entries")
    k, n = A.shape
    if k >= n:
        raise ValueError(f"{k} constraints on {n} nodes leave no free direction (need fewer constraints than nodes)")
    U, s, _ = np.linalg.svd(A.T, full_matrices=False)
    if s[0] == 0.0 or s[-1] < RANK_RTOL * s[0]:
        rank = int((s > RANK_RTOL * s[0]).sum()) if s[0] > 0 else 0
        raise ValueError(
            f"the constraint matrix is rank deficient: rank {rank} for {k} rows (singular values down to "
            f"{s[-1]:.3g}, largest {s[0]:.3g}); remove the dependent or zero rows"
        )
    return np.ascontiguousarray(U)


def component_basis(labels, num_components: int, *, order: int = 1, positions=None) -> np.ndarray:
    r"""Orthonormal null-space basis ``V`` (N × k) of an order-1 or order-2 structure, per connected component.

    Order 1 (RW1, Besag): one column per component, ``1_C / √|C|``. Order 2
    (RW2): two per component, the constant and the linear function of
    ``positions`` centred and normalised on the component (so ``k = 2 c``).
    Columns of different components have disjoint supports.

    Parameters
    ----------
    labels : array of int
        ``(N,)`` component of every node, ``0 … num_components − 1``.
    num_components : int
        Number of components.
    order : {1, 2}
        1: constants; 2: constants and linear functions.
    positions : array, optional
        ``(N,)`` node positions (order 2).

    Raises
    ------
    ValueError
        Order 2 without positions, or a component whose positions are all
        equal (no linear function on it).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.shape[0]
    counts = np.bincount(labels, minlength=num_components).astype(np.float64)
    if order == 1:
        V = np.zeros((n, num_components))
        V[np.arange(n), labels] = 1.0 / np.sqrt(counts[labels])
        return V
    if order != 2:
        raise ValueError(f"order must be 1 or 2, got {order}")
    if positions is None:
        raise ValueError("an order-2 null space needs the node positions")
    t = np.asarray(positions, dtype=np.float64).reshape(-1)
    mean = np.bincount(labels, weights=t, minlength=num_components) / counts
    centred = t - mean[labels]
    norm = np.sqrt(np.bincount(labels, weights=centred**2, minlength=num_components))
    if (norm <= 1e-14 * max(1.0, float(np.abs(t).max(initial=0.0)))).any():
        raise ValueError("an order-2 null space needs at least two distinct positions in every component")
    V = np.zeros((n, 2 * num_components))
    V[np.arange(n), 2 * labels] = 1.0 / np.sqrt(counts[labels])
    V[np.arange(n), 2 * labels + 1] = centred / norm[labels]
    return V


def pivot_nodes(basis: np.ndarray) -> np.ndarray:
    """``k`` node indices ``p`` (int64) for which ``V[p]`` (k × k) is well conditioned (QR with pivoting on ``Vᵀ``)."""
    V = np.asarray(basis, dtype=np.float64)
    k = V.shape[1]
    _, _, perm = scipy.linalg.qr(V.T, mode="economic", pivoting=True)
    return np.asarray(perm[:k], dtype=np.int64)


def random_walk_structure(locations, order: int) -> sp.csr_matrix:
    r"""Structure matrix of a first- or second-order random walk on sorted distinct locations (CSR, N × N).

    With gaps ``d_i = t_{i+1} − t_i``:

    * order 1: ``xᵀ R x = Σ_i (x_{i+1} − x_i)² / d_i`` — the increments of
        a Brownian motion of unit variance per unit of ``t`` (weights
        ``1/d_i``; tridiagonal, null space: constants);
    * order 2: ``xᵀ R x = Σ_{i=2}^{N−1} (Lx)_i² / c_i`` with
        ``(Lx)_i = (x_{i+1} − x_i)/d_i − (x_i − x_{i−1})/d_{i−1}`` the weak
        second derivative at the interior node ``i`` (the finite-element
        stiffness matrix tested against its hat function) and
        ``c_i = (d_{i−1} + d_i)/2`` the lumped mass of that hat function:
        the irregular-grid construction of Lindgren & Rue (2008)
        (pentadiagonal, null space: constants and linear functions of
        ``t``). On a regular grid of spacing ``h`` it is the standard RW2
        ``Σ (Δ²x)² / h³``.

    Raises
    ------
    ValueError
        Locations not one-dimensional, non-finite, not strictly increasing,
        or fewer than ``order + 1`` of them.
    """
    t = np.asarray(locations, dtype=np.float64).reshape(-1)
    n = t.shape[0]
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if n < order + 1:
        raise ValueError(f"a random walk of order {order} needs at least {order + 1} distinct locations, got {n}")
    if not np.isfinite(t).all():
        raise ValueError("random-walk locations must be finite")
    gaps = np.diff(t)
    if (gaps <= 0).any():
        raise ValueError("random-walk locations must be strictly increasing (sort and merge duplicates first)")
    if order == 1:
        w = 1.0 / gaps
        main = np.zeros(n)
        main[:-1] += w
        main[1:] += w
        return sp.diags([-w, main, -w], [-1, 0, 1], format="csr")
    # rows i = 1 … n−2 of the stiffness matrix: (1/d_{i−1}, −1/d_{i−1} − 1/d_i, 1/d_i) at (i−1, i, i+1)
    left, right = 1.0 / gaps[:-1], 1.0 / gaps[1:]
    rows = np.repeat(np.arange(n - 2), 3)
    cols = (np.arange(n - 2)[:, None] + np.arange(3)[None, :]).reshape(-1)
    vals = np.stack([left, -(left + right), right], axis=1).reshape(-1)
    B = sp.csr_matrix((vals, (rows, cols)), shape=(n - 2, n))
    mass = 0.5 * (gaps[:-1] + gaps[1:])
    R = (B.T @ sp.diags(1.0 / mass) @ B).tocsr()
    R = 0.5 * (R + R.T)
    R = sp.csr_matrix(R)
    R.sum_duplicates()
    R.sort_indices()
    return R


def constrained_inverse_dense(Q, basis) -> np.ndarray:
    r"""Dense ``Σ = V_⊥ (V_⊥ᵀ Q V_⊥)⁻¹ V_⊥ᵀ`` (float64), the covariance of ``N(0, Q⁻¹)`` given ``Vᵀx = 0``.

    ``V_⊥`` is an orthonormal basis of the complement of ``V``'s columns. For
    an intrinsic ``Q`` whose null space is spanned by ``V`` this is the
    Moore–Penrose inverse ``Q⁺``. O(N³); a reference for small problems.
    """
    Q = Q.toarray() if sp.issparse(Q) else np.asarray(Q, dtype=np.float64)
    V = np.asarray(basis, dtype=np.float64)
    full, _ = np.linalg.qr(np.concatenate([V, np.eye(Q.shape[0])], axis=1))
    perp = full[:, V.shape[1] : Q.shape[0]]
    inner = perp.T @ Q @ perp
    return perp @ np.linalg.solve(0.5 * (inner + inner.T), perp.T)
