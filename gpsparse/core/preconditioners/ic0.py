"""Zero fill-in incomplete Cholesky, IC(0): the preconditioner class and its numba/numpy kernels.

The IC(0) factorisation and, on CPU, its triangular solves are compiled with
numba when it is installed (measured: factorisation of a 2-D lattice matrix
with n = 10⁶ and 13 nonzeros per row in ~0.1 s; the first call in a
process loads the compiled kernels from numba's cache, ~1 s, or compiles
them, a few seconds). Without numba the factorisation runs the same
algorithm as a plain Python loop (~11 s at that size) and CPU solves use
``torch.triangular_solve`` (needs a torch build with MKL).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from gpsparse.core.preconditioners.base import Preconditioner, _as_sparse, _check_dtype
from gpsparse.errors import NotPositiveDefiniteError

try:  # optional accelerator for the IC(0) factorisation and CPU solves
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

__all__ = ["IncompleteCholeskyPreconditioner"]

# Above this size a pure-Python IC(0) factorisation warns that it is slow.
_SLOW_PYTHON_SIZE = 200_000

# ---------------------------------------------------------------------------
# IC(0) kernels: plain Python, compiled by numba when available
# ---------------------------------------------------------------------------


def _ic0_kernel(indptr, indices, values, pos):
    """In-place IC(0) of a lower-triangular CSR pattern (row-oriented).

    ``indptr, indices, values`` hold the lower triangle of ``A`` with sorted
    columns and the diagonal as the last entry of every row; ``values`` is
    overwritten with ``L``. ``pos`` is an int array of length n filled with
    -1 (work space, restored on return). For row ``i`` and stored ``j < i``:

        L_ij = (A_ij - Σ_{k<j, (i,k),(j,k) stored} L_ik L_jk) / L_jj
        L_ii = sqrt(A_ii - Σ_{k<i} L_ik²)

    ``pos[k]`` maps a column ``k`` of row ``i`` to its slot, so the sum over
    the common pattern of rows ``i`` and ``j`` costs ``O(nnz(row j))``.
    Returns ``(-1, 0.0)`` on success or ``(row, pivot)`` at the first
    pivot that is not ``> 0`` (NaN included).
    """
    n = len(indptr) - 1
    for i in range(n):
        start = indptr[i]
        diag = indptr[i + 1] - 1
        for p in range(start, diag):
            pos[indices[p]] = p
        for p in range(start, diag):
            j = indices[p]
            s = values[p]
            for q in range(indptr[j], indptr[j + 1] - 1):
                pk = pos[indices[q]]
                if pk >= 0:
                    s -= values[pk] * values[q]
            values[p] = s / values[indptr[j + 1] - 1]
        d = values[diag]
        for p in range(start, diag):
            d -= values[p] * values[p]
        for p in range(start, diag):
            pos[indices[p]] = -1
        if not d > 0.0:
            return i, d
        values[diag] = math.sqrt(d)
    return -1, 0.0


def _tri_solve_kernel(indptr, indices, values, b, x, transpose):
    """Solve ``L x = b`` or (``transpose``) ``Lᵀ x = b`` with ``L`` lower-triangular CSR.

    ``L`` has sorted rows with the diagonal last. ``L x = b``: forward
    substitution reading row ``i`` (gather). ``Lᵀ x = b``: backward
    substitution; row ``i`` of ``L`` is column ``i`` of ``Lᵀ``, so once
    ``x_i`` is final it is scattered into the ``x_j``, ``j < i``. ``b, x``
    are C-contiguous ``(n, k)`` and ``x`` may alias ``b``: the gather reads
    ``b[i]`` once before writing ``x[i]`` and otherwise only final ``x[j]``;
    the scatter works on ``x`` after copying ``b`` into it.
    """
    n = len(indptr) - 1
    k = b.shape[1]
    if not transpose:
        for i in range(n):
            d = indptr[i + 1] - 1
            inv = 1.0 / values[d]
            if k == 1:
                s = b[i, 0]
                for p in range(indptr[i], d):
                    s -= values[p] * x[indices[p], 0]
                x[i, 0] = s * inv
            else:
                for c in range(k):
                    x[i, c] = b[i, c]
                for p in range(indptr[i], d):
                    v = values[p]
                    j = indices[p]
                    for c in range(k):
                        x[i, c] -= v * x[j, c]
                for c in range(k):
                    x[i, c] *= inv
    else:
        for i in range(n):
            for c in range(k):
                x[i, c] = b[i, c]
        for i in range(n - 1, -1, -1):
            d = indptr[i + 1] - 1
            inv = 1.0 / values[d]
            if k == 1:
                xi = x[i, 0] * inv
                x[i, 0] = xi
                for p in range(indptr[i], d):
                    x[indices[p], 0] -= values[p] * xi
            else:
                for c in range(k):
                    x[i, c] *= inv
                for p in range(indptr[i], d):
                    v = values[p]
                    j = indices[p]
                    for c in range(k):
                        x[j, c] -= v * x[i, c]


_JIT_CACHE: dict[str, Any] = {}


def _kernel(name: str):
    """The numba-compiled kernel ``name``, or ``None`` without numba."""
    if _numba is None:
        return None
    if name not in _JIT_CACHE:
        fn = {"ic0": _ic0_kernel, "tri_solve": _tri_solve_kernel}[name]
        _JIT_CACHE[name] = _numba.njit(cache=True, nogil=True)(fn)
    return _JIT_CACHE[name]


def _ic0_numpy(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> tuple[int, float]:
    """Run IC(0) in place on float64 ``values``; returns the kernel status."""
    n = len(indptr) - 1
    jit = _kernel("ic0")
    if jit is not None:
        status = jit(indptr, indices, values, np.full(n, -1, dtype=np.int64))
        return int(status[0]), float(status[1])
    if n > _SLOW_PYTHON_SIZE:
        warnings.warn(
            f"numba is not installed: IC(0) of n = {n} runs as a pure-Python loop "
            "(~10 s per 10^6 rows of a 13-point stencil); `pip install numba` makes it "
            "~80x faster",
            RuntimeWarning,
            stacklevel=3,
        )
    vals = values.tolist()  # Python lists are much faster than numpy scalar indexing
    row, pivot = _ic0_kernel(indptr.tolist(), indices.tolist(), vals, [-1] * n)
    values[:] = vals
    return int(row), float(pivot)


# ---------------------------------------------------------------------------
# Incomplete Cholesky
# ---------------------------------------------------------------------------


def _lower_csr(S: torch.Tensor, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower triangle of a validated 2-D sparse ``S`` as sorted, duplicate-free
    CSR numpy arrays ``(indptr, indices, values)`` (int64, int64, float64) with
    the diagonal stored last in every row."""
    n = S.shape[-1]
    if S.layout == torch.sparse_csr:
        crow = S.crow_indices().cpu().numpy().astype(np.int64, copy=False)
        cols = S.col_indices().cpu().numpy().astype(np.int64, copy=False)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(crow))
    else:  # coalesced COO: sorted row-major, no duplicates
        idx = S.indices().cpu().numpy()
        rows, cols = idx[0], idx[1]
    vals = S.values().cpu().numpy()
    keep = cols <= rows
    rows, cols, vals = rows[keep], cols[keep], vals[keep].astype(np.float64, copy=False)
    # CSR input may have unsorted columns or duplicates: sort and sum them
    same_row = rows[1:] == rows[:-1]
    if bool(np.any(same_row & (cols[1:] <= cols[:-1]))):
        key = rows * n + cols
        uniq, inverse = np.unique(key, return_inverse=True)
        vals = np.bincount(inverse, weights=vals, minlength=len(uniq))
        rows, cols = uniq // n, uniq % n
    counts = np.bincount(rows, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    last = indptr[1:] - 1
    has_diag = counts > 0
    has_diag[has_diag] = cols[last[has_diag]] == np.arange(n)[has_diag]
    if not bool(has_diag.all()):
        i = int(np.argmin(has_diag))
        raise NotPositiveDefiniteError(
            f"{who}: row {i} of A has no stored diagonal entry (a zero diagonal); A is not positive definite"
        )
    return indptr, cols.astype(np.int64, copy=False), np.ascontiguousarray(vals)


def _transpose_csr(L: torch.Tensor) -> torch.Tensor:
    """``Lᵀ`` of a CSR ``L`` as CSR (sorted rows) on ``L``'s device; built on the CPU."""
    n = L.shape[-1]
    indptr = L.crow_indices().cpu().numpy().astype(np.int64)
    indices = L.col_indices().cpu().numpy().astype(np.int64)
    values = L.values().cpu()
    order = np.argsort(indices, kind="stable")  # by column, then by row
    t_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(indices, minlength=n), out=t_indptr[1:])
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    return torch.sparse_csr_tensor(
        torch.from_numpy(t_indptr).to(L.crow_indices().dtype),
        torch.from_numpy(rows[order]).to(L.col_indices().dtype),
        values[torch.from_numpy(order)],
        (n, n),
        check_invariants=False,  # built from a valid CSR factor; an explicit choice keeps torch from warning
    ).to(L.device)


def _csr_tensor(indptr, indices, values, n, dtype, device) -> torch.Tensor:
    index_dtype = torch.int32 if max(n, len(indices)) < 2**31 - 1 else torch.int64
    return torch.sparse_csr_tensor(
        torch.from_numpy(indptr).to(index_dtype),
        torch.from_numpy(indices).to(index_dtype),
        torch.from_numpy(values).to(dtype),
        (n, n),
        check_invariants=False,  # valid by construction; an explicit choice keeps torch from warning
    ).to(device)


# On CPU without numba, solve with Lᵀ through torch.triangular_solve(transpose=True)
# on L (MKL: ~3x faster than an explicit upper-triangular CSR Lᵀ, measured at
# n = 10⁶); other devices use an explicit CSR Lᵀ. Tests flip it to run the
# explicit-Lᵀ (CUDA) code path on the CPU.
_CPU_TRANSPOSED_SOLVE = True


class IncompleteCholeskyPreconditioner(Preconditioner):
    """Zero fill-in incomplete Cholesky preconditioner, IC(0).

    ``M = L Lᵀ`` where ``L`` is lower triangular with exactly the pattern of
    the lower triangle of ``A`` (diagonal included) and ``(L Lᵀ)_ij = A_ij``
    on that pattern (Meijerink and van der Vorst, 1977). ``C = L``, so
    ``C⁻¹ r = L⁻¹ r``, ``C⁻ᵀ r = L⁻ᵀ r``, ``M⁻¹ r = L⁻ᵀ L⁻¹ r`` and
    ``log det M = 2 Σ log L_ii``. When the Cholesky factor of ``A`` has no
    fill-in (tridiagonal, banded with full band, ...) IC(0) is the exact
    Cholesky factor.

    Build with [`from_matrix`][]. Not batched: ``A`` is ``(n, n)``; ``r`` may
    carry batch dimensions ``(*batch, n, k)``, which share the factor.

    IC(0) exists for M-matrices and diagonally dominant matrices, but can
    break down (a non-positive pivot) on other SPD matrices. Squared
    Laplacians such as ``τ(κ²I + L)² + σ⁻²I`` with small ``κ²`` and ``σ⁻²``
    are such a case; ``shift=1e-2`` fixed it there and cut CG iterations
    about 9x (24×24 grid, κ² = 1e-3, σ⁻² = 1e-2: 311 → 35).

    Algorithm and cost
    ------------------
    Row-oriented IC(0) in float64 on the CPU,
    ``O(Σ_i Σ_{j ∈ row i} nnz(row j))`` flops (about 50 per row for a
    13-point stencil), compiled with numba when installed; the factor is then
    cast to ``A``'s dtype. Storage: ``L`` as CSR (int32 indices when they
    fit), ``nnz(tril A)`` values. Measured (2-core CPU, 1 torch thread, 2-D
    lattice, 13 nonzeros per row, n = 10⁶): [`from_matrix`][] ~0.4 s, of
    which ~0.1 s is the numba factorisation (~11 s in pure Python) and the
    rest input conversion; ``M⁻¹ r`` costs 1.1–1.8 int32 CSR SpMVs of ``A``
    for ``k = 1`` and about one SpMM for ``k = 16``.

    Devices
    -------
    * **CPU**: triangular solves by numba substitution kernels (one thread)
        reading ``L`` only; without numba, by ``torch.triangular_solve``
        with the sparse CSR ``L`` (MKL), ``transpose=True`` for ``Lᵀ``.
    * **CUDA**: the factorisation always runs on the CPU (``A``'s values are
        copied to the host once, ``L`` is copied back to ``A``'s device); solves
        use ``torch.triangular_solve`` on the GPU (cuSPARSE) with CSR ``L``
        and an explicit CSR ``Lᵀ`` built on the CPU at the first solve and
        cached. Vectors never leave the GPU. This is the same torch call tested
        on the CPU (MKL), but it was not run on a GPU during development.

    Not differentiable (see [`Preconditioner`][gpsparse.Preconditioner]).

    Raises
    ------
    NotPositiveDefiniteError
        From [`from_matrix`][], when a pivot ``L_ii² ≤ 0`` (or the factor
        overflows); the message names the row and suggests ``shift``.
    """

    def __init__(self, lower: torch.Tensor, logdet: torch.Tensor) -> None:
        # Private: use from_matrix. `lower` is L as CSR with sorted rows and the
        # diagonal last in every row; `logdet` is 2 Σ log L_ii.
        self._lower = lower
        self._logdet = logdet
        self._upper: torch.Tensor | None = None  # CSR Lᵀ, built on demand
        self._numpy: tuple | None = None  # numpy views of L's arrays (CPU)

    @classmethod
    def from_matrix(cls, A: Any, *, shift: float = 0.0) -> IncompleteCholeskyPreconditioner:
        """Factorise ``A + shift·diag(A)`` with IC(0).

        Parameters
        ----------
        A : sparse Tensor or object with ``to_sparse_csr()``
            Shape ``(n, n)``, symmetric positive definite, COO (possibly
            uncoalesced: duplicates are summed) or CSR (columns may be
            unsorted), float32/float64, finite values. Only the lower
            triangle is read (``A`` is assumed symmetric, not checked).
            The preconditioner has ``A``'s dtype and device.
        shift : float, default 0
            Relative diagonal shift ``≥ 0``: the diagonal is multiplied by
            ``1 + shift`` before factorising (Manteuffel, 1980). A shift of
            ``1e-3 … 1e-1`` avoids breakdowns at some cost in quality.

        Raises
        ------
        TypeError
            Dense or unsupported input, non-floating dtype.
        ValueError
            Non-square shape, non-finite values, invalid ``shift``.
        NotImplementedError
            Batched ``A`` (``(*batch, n, n)``).
        NotPositiveDefiniteError
            A non-positive pivot, a missing diagonal entry or an overflowing
            factor; the message names the row.

        Examples
        --------
        >>> import torch
        >>> A = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 4.0]])
        >>> P = IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr())
        >>> torch.allclose(P(A @ torch.ones(3, 1)), torch.ones(3, 1))  # tridiagonal: exact
        True
        """
        who = "IncompleteCholeskyPreconditioner.from_matrix"
        S = _as_sparse(A, who)
        if S.dim() != 2:
            raise NotImplementedError(
                f"{who}: batched A (shape {tuple(S.shape)}) is not supported; build one "
                "preconditioner per batch element"
            )
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
            raise ValueError(f"{who}: shift must be a finite number ≥ 0, got {shift!r}")
        n = S.shape[-1]
        indptr, indices, values = _lower_csr(S, who)
        if shift:
            values[indptr[1:] - 1] *= 1.0 + shift
        row, pivot = _ic0_numpy(indptr, indices, values)
        if row >= 0:
            hint = f"try a larger shift than {shift}" if shift else "retry with from_matrix(A, shift=1e-2)"
            raise NotPositiveDefiniteError(
                f"{who}: IC(0) broke down at row {row} (pivot {pivot:.6g} ≤ 0): A is not "
                f"positive definite or IC(0) is unstable for it; {hint}, which factorises "
                "A + shift·diag(A)"
            )
        if not bool(np.isfinite(values).all()):
            raise NotPositiveDefiniteError(
                f"{who}: IC(0) factor overflowed (near-zero pivot); A is nearly singular, "
                "retry with from_matrix(A, shift=1e-2), which factorises A + shift·diag(A)"
            )
        logdet = 2.0 * np.log(values[indptr[1:] - 1]).sum()
        return cls(
            _csr_tensor(indptr, indices, values, n, S.dtype, S.device),
            torch.tensor(logdet, dtype=S.dtype, device=S.device),
        )

    # -- metadata -----------------------------------------------------------

    @property
    def factor(self) -> torch.Tensor:
        """``L`` as an ``(n, n)`` sparse CSR tensor (do not modify)."""
        return self._lower

    @property
    def size(self) -> int:
        return self._lower.shape[-1]

    @property
    def device(self) -> torch.device:
        return self._lower.device

    @property
    def dtype(self) -> torch.dtype:
        return self._lower.dtype

    def logdet(self) -> torch.Tensor:
        return self._logdet

    def to(self, device=None, dtype=None) -> IncompleteCholeskyPreconditioner:
        if dtype is not None:
            _check_dtype(dtype, "IncompleteCholeskyPreconditioner.to")
        return IncompleteCholeskyPreconditioner(
            self._lower.to(device=device, dtype=dtype),
            self._logdet.to(device=device, dtype=dtype),
        )

    # -- applies ------------------------------------------------------------

    def _solve(self, r: torch.Tensor) -> torch.Tensor:
        return self._apply(r, (False, True))

    def _apply_inv_factor(self, r: torch.Tensor) -> torch.Tensor:
        return self._apply(r, (False,))

    def _apply_inv_factor_t(self, r: torch.Tensor) -> torch.Tensor:
        return self._apply(r, (True,))

    def _apply(self, r: torch.Tensor, steps: tuple[bool, ...]) -> torch.Tensor:
        """Solve with ``L`` (step ``False``) and/or ``Lᵀ`` (step ``True``), in order."""
        n = self.size
        batch, k = r.shape[:-2], r.shape[-1]
        # (*batch, n, k) -> row-major (n, batch·k) with exact strides:
        # torch.triangular_solve (MKL) silently returns wrong results for some
        # strided right-hand sides (e.g. a column slice of a wider matrix) and
        # for a batched B with a 2-D sparse A (torch 2.13).
        b = r.movedim(-2, 0).reshape(n, -1)
        if b.stride() != (b.shape[1], 1):
            b = torch.empty((n, b.shape[1]), dtype=b.dtype, device=b.device).copy_(b)
        if b.shape[1] == 0:
            x = b.clone()
        elif b.device.type == "cpu" and _kernel("tri_solve") is not None:
            kernel = _kernel("tri_solve")
            if self._numpy is None:
                L = self._lower
                self._numpy = (L.crow_indices().numpy(), L.col_indices().numpy(), L.values().numpy())
            x = torch.empty_like(b)
            src, dst = b.numpy(), x.numpy()
            for transpose in steps:
                kernel(*self._numpy, src, dst, transpose)
                src = dst  # the kernel allows x to alias b
        else:
            if b.device.type == "cpu" and not torch.backends.mkl.is_available():
                raise RuntimeError(
                    "IncompleteCholeskyPreconditioner: CPU triangular solves need numba "
                    "(`pip install numba`) or a torch build with MKL"
                )
            x = b
            for transpose in steps:
                if not transpose:
                    x = torch.triangular_solve(x, self._lower, upper=False).solution
                elif x.device.type == "cpu" and _CPU_TRANSPOSED_SOLVE:
                    x = torch.triangular_solve(x, self._lower, upper=False, transpose=True).solution
                else:
                    if self._upper is None:
                        self._upper = _transpose_csr(self._lower)
                    x = torch.triangular_solve(x, self._upper, upper=True).solution
        return x.reshape(n, *batch, k).movedim(0, -2).contiguous()
