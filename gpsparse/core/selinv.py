"""Selected inversion of a sparse Cholesky factor: numba kernels (Takahashi recurrences).

Pure numerics on the CSC arrays of a lower-triangular factor ``L``; the
CHOLMOD driver that produces ``L`` and gathers the result at the entries of
``A`` is ``gpsparse.core.cholmod._selected_inverse``.

Mathematics
-----------
CHOLMOD factorises ``Ã = A[p][:, p] = L Lᵀ`` (``p`` its fill-reducing
permutation). ``Z̃ = Ã⁻¹`` satisfies ``Lᵀ Z̃ = L⁻¹`` (upper triangular with
diagonal ``1/L_jj``), which gives, for ``j`` from ``n − 1`` down to ``0``
(Takahashi, Fagan and Chen, 1973; Erisman and Tinney, 1975):

    Z̃[i, j] = −(1 / L_jj) Σ_{k ∈ S_j} Z̃[i, k] L[k, j]          i ∈ S_j
    Z̃[j, j] = 1 / L_jj² − (1 / L_jj) Σ_{k ∈ S_j} L[k, j] Z̃[k, j]

with ``S_j`` the rows below the diagonal in column ``j`` of ``L``. Every
``Z̃[i, k]`` needed lies in the (filled, elimination-closed) pattern of ``L``,
so ``Z̃`` is computed on that pattern only and ``Z[i_e, j_e] =
Z̃[p⁻¹[i_e], p⁻¹[j_e]]`` is then read off (``_lookup_kernel``). Columns
sharing one structure (supernodes, found again in the factor CHOLMOD returns,
``_supernodes``) are done together with dense blocks: for columns ``J``
with rows ``R`` below them, ``Z̃_RJ = −Z̃_RR L_RJ L_JJ⁻¹`` and
``Z̃_JJ = L_JJ⁻ᵀ (L_JJ⁻¹ − L_RJᵀ Z̃_RJ)`` (Lin, Yang, Meza, Lu, Ying and E,
"SelInv", 2011). Cost ``O(Σ_J |R|² |J| + |J|³)`` — the order of the numeric
factorisation — and ``nnz(L)`` extra memory, never a dense inverse.

The kernels are compiled by numba on first use (~10–15 s in a fresh
environment, then cached on disk; ~1 s to load in a new process). The dense
blocks call BLAS: run them under
``gpsparse.core.cholmod._blas_threads``.

This module is a core: it imports numpy and numba only.
"""

from __future__ import annotations

import numpy as np

try:  # compiles the selected-inversion kernels; numba is a hard dependency, but stay importable without it
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None

__all__: list[str] = []  # private kernels, used by gpsparse.core.cholmod


def _jit(fn):
    """numba-compile ``fn`` (lazily, cached on disk) when numba is installed."""
    if _numba is None:  # pragma: no cover - numba is a dependency
        return fn
    return _numba.njit(cache=True, nogil=True)(fn)


@_jit
def _supernodes(indptr, indices):
    """Start columns of the supernodes of a CSC Cholesky factor, plus ``n`` at the end.

    Column ``j`` joins the supernode of column ``j − 1`` when the rows of
    column ``j − 1`` are exactly ``{j − 1} ∪ rows(j)`` (CHOLMOD stores the
    relaxed supernodes it factorised with, explicit zeros included, so they
    are found here again).
    """
    n = len(indptr) - 1
    starts = np.empty(n + 1, dtype=np.int64)
    count = 0
    for j in range(n):
        joins = False
        if j > 0:
            prev = indptr[j - 1]
            size = indptr[j + 1] - indptr[j]
            if indptr[j] - prev == size + 1 and indices[prev + 1] == j:
                joins = True
                for t in range(size):
                    if indices[prev + 1 + t] != indices[indptr[j] + t]:
                        joins = False
                        break
        if not joins:
            starts[count] = j
            count += 1
    starts[count] = n
    return starts[: count + 1]


@_jit
def _takahashi_column(indptr, indices, lvals, z, where, j):
    """Column ``j`` of ``Z = (L Lᵀ)⁻¹`` on ``L``'s pattern, columns ``> j`` done.

    Scatter the positions of ``S_j`` into ``where``; for every ``k ∈ S_j``
    walk column ``k`` of ``Z`` (rows ``i ≥ k``, all of ``S_j ∩ (k, n)`` among
    them) and add both halves of the symmetric sum,
    ``Z[i, j] += Z[i, k] L[k, j]`` and ``Z[k, j] += Z[i, k] L[i, j]`` (``i > k``),
    plus ``Z[k, k] L[k, j]``; then scale by ``−1 / L_jj``.
    Cost ``O(Σ_{k ∈ S_j} |col_k(L)|)``.
    """
    start = indptr[j]
    end = indptr[j + 1]
    if end - start > 1:
        last = indices[end - 1]
        for p in range(start + 1, end):
            where[indices[p]] = p
            z[p] = 0.0
        for p in range(start + 1, end):
            k = indices[p]
            lkj = lvals[p]
            qk = indptr[k]
            acc = z[qk] * lkj  # Z[k, k] L[k, j]
            for q in range(qk + 1, indptr[k + 1]):
                i = indices[q]
                if i > last:
                    break
                w = where[i]
                if w >= 0:
                    zik = z[q]
                    z[w] += zik * lkj
                    acc += zik * lvals[w]
            z[p] += acc
    d = lvals[start]
    s = 0.0
    for p in range(start + 1, end):
        z[p] = -z[p] / d
        s += lvals[p] * z[p]
    z[start] = (1.0 / d - s) / d
    for p in range(start + 1, end):
        where[indices[p]] = -1


@_jit
def _lower_inverse(lower):
    """Inverse of a dense lower-triangular matrix by row-wise forward substitution (``w³/6`` flops)."""
    w = lower.shape[0]
    inv = np.zeros((w, w))
    for i in range(w):
        row = inv[i]
        row[i] = 1.0
        for k in range(i):
            lik = lower[i, k]
            if lik != 0.0:
                other = inv[k]
                for t in range(k + 1):
                    row[t] -= lik * other[t]
        d = 1.0 / lower[i, i]
        for t in range(i + 1):
            row[t] *= d
    return inv


@_jit
def _takahashi_supernode(indptr, indices, lvals, z, where, j0, j1):
    """Columns ``j0 … j1 − 1`` (one supernode) of ``Z``, columns ``≥ j1`` done; dense BLAS blocks.

    With ``J`` the supernode's columns and ``R`` the rows below them (shared
    by all its columns), ``Z_RJ = −Z_RR L_RJ L_JJ⁻¹`` and
    ``Z_JJ = L_JJ⁻ᵀ L_JJ⁻¹ − (L_JJ⁻ᵀ L_RJᵀ) Z_RJ``. ``Z_RR`` is gathered from
    the columns of ``R`` (closed under elimination, so every entry is stored).
    """
    w = j1 - j0
    p0 = indptr[j0]
    r = indptr[j0 + 1] - p0 - w
    rows = indices[p0 + w : p0 + w + r]
    ljj = np.zeros((w, w))
    lrj = np.empty((r, w))
    for c in range(w):
        p = indptr[j0 + c]
        for t in range(w - c):
            ljj[c + t, c] = lvals[p + t]
        for t in range(r):
            lrj[t, c] = lvals[p + w - c + t]
    linv = _lower_inverse(ljj)
    zjj = linv.T @ linv
    if r > 0:
        # gather Z_RR (symmetric) through the map row -> index in R
        for t in range(r):
            where[rows[t]] = t
        zrr = np.empty((r, r))
        last = rows[r - 1]
        for t2 in range(r):
            c = rows[t2]
            for q in range(indptr[c], indptr[c + 1]):
                i = indices[q]
                if i > last:
                    break
                t1 = where[i]
                if t1 >= 0:
                    zrr[t1, t2] = z[q]
                    zrr[t2, t1] = z[q]
        for t in range(r):
            where[rows[t]] = -1
        yt = np.ascontiguousarray(linv.T) @ np.ascontiguousarray(lrj.T)  # (w, r) = L_JJ⁻ᵀ L_RJᵀ
        zrj = -(zrr @ np.ascontiguousarray(yt.T))  # (r, w)
        zjj -= yt @ zrj
    for c in range(w):
        p = indptr[j0 + c]
        for t in range(w - c):
            z[p + t] = zjj[c + t, c]
        for t in range(r):
            z[p + w - c + t] = zrj[t, c]


@_jit
def _takahashi_kernel(indptr, indices, lvals, z, starts, dense_min):
    """Selected inverse ``Z = (L Lᵀ)⁻¹`` on the pattern of a CSC lower-triangular ``L``.

    ``L`` has sorted row indices, the diagonal first in every column, and a
    pattern closed under symbolic elimination (a Cholesky factor's). ``z``
    (same length as ``lvals``) receives ``Z`` on that pattern. Supernodes
    (``starts``) are processed last to first; those with at least
    ``dense_min`` entries in their first column use dense blocks
    (``_takahashi_supernode``), the others one column at a time
    (``_takahashi_column``).
    """
    n = len(indptr) - 1
    where = np.full(n, -1, dtype=np.int64)
    for s in range(len(starts) - 2, -1, -1):
        j0 = starts[s]
        j1 = starts[s + 1]
        if j1 - j0 > 1 and indptr[j0 + 1] - indptr[j0] >= dense_min:
            _takahashi_supernode(indptr, indices, lvals, z, where, j0, j1)
        else:
            for j in range(j1 - 1, j0 - 1, -1):
                _takahashi_column(indptr, indices, lvals, z, where, j)


@_jit
def _lookup_kernel(indptr, indices, rows, cols, pinv, out):
    """Position in CSC ``L`` of entry ``(pinv[r], pinv[c])`` (lower half) for every ``(r, c)``; -1 if absent."""
    for e in range(len(rows)):
        i = pinv[rows[e]]
        j = pinv[cols[e]]
        if i < j:
            i, j = j, i
        lo = indptr[j]
        hi = indptr[j + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < i:
                lo = mid + 1
            else:
                hi = mid
        out[e] = lo if lo < indptr[j + 1] and indices[lo] == i else -1


# Supernodes of two or more columns whose first column holds at least this many entries use dense blocks
# (measured at n = 10⁵: 0.7 s with 2 or 16, 3.7 s for columns only).
_DENSE_MIN = 2
