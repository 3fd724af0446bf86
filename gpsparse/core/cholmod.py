"""Exact sparse Cholesky through CHOLMOD (scikit-sparse): the numerics.

The exact counterpart of the stochastic / Krylov paths of gpsparse for
symmetric positive definite matrices that fit a sparse direct factorisation
(2-D lattices up to ~10⁶ unknowns on a laptop). This module holds the
optional import, the cached symbolic analysis, the numeric factorisation,
the selected-inversion driver and [`CholeskyPreconditioner`][gpsparse.CholeskyPreconditioner]; the
differentiable entry points are in ``gpsparse.autograd.cholmod``:

* ``cholesky_logdet`` — ``log det A``; gradient
    ``(A⁻¹)[i_e, j_e]`` at the stored entries by **selected inversion**
    (``gpsparse.core.selinv``) on the pattern of the Cholesky factor, never a
    dense inverse;
* ``cholesky_solve`` — ``X = A⁻¹ B``,
    differentiable in the values and in ``B``;
* ``cholesky_selected_inverse`` —
    ``(A⁻¹)[i_e, j_e]`` itself (the logdet adjoint; its diagonal entries are
    e.g. posterior marginal variances when ``A`` is a posterior precision);
* [`CholeskyPreconditioner`][gpsparse.CholeskyPreconditioner] — ``M = A`` factorised exactly, for the
    [`Preconditioner`][gpsparse.Preconditioner] contract.

Requirements and conventions
----------------------------
* scikit-sparse is an **optional** dependency:
    ``pip install "gpsparse[cholmod]"`` (it needs the SuiteSparse headers and
    libraries, Debian/Ubuntu ``libsuitesparse-dev``). Without it every entry
    point raises ``ImportError`` saying so; ``cholmod_available`` tells
    beforehand.
* ``values`` ``(*batch, nnz)`` on a pattern declared symmetric
    (``pattern.symmetric``); the values must be symmetric. CHOLMOD reads the
    **lower triangle** of ``A``. Value gradients are symmetrised
    (``symmetrize_values_grad``), the convention of
    every symmetric operator in gpsparse.
* Computation in float64 on the CPU. float32 inputs are converted and the
    results converted back; CUDA inputs are copied to the host and the results
    (and gradients) copied back to the device — there is no GPU factorisation.
* Batches: one factorisation per batch element, sharing one symbolic analysis.

Reuse of the symbolic analysis
------------------------------
The fill-reducing ordering and the symbolic factorisation depend only on the
pattern. They are computed once per [`SparsityPattern`][gpsparse.SparsityPattern]
object and cached on it (``pattern.derived("cholmod.analysis", ...)``,
dropped with the pattern; a pattern moved with ``to()`` is a new object and
is analysed again); later factorisations on the same pattern object run only
the numeric phase (timings below).

Timings
-------
2-core CPU shared with other jobs (load average ~2.5; under heavier load
everything was up to 2–3x slower), torch and BLAS 1 thread, CHOLMOD on
Debian's reference (netlib) BLAS, 5-point lattice precision ``κ²I + L``
(``κ = 0.5``); median of 5 runs at n = 10⁵, one run at n = 10⁶:

| step | n = 10⁵ (316²) | n = 10⁶ (1000²) |
|---|---|---|
| nnz(L) | 4.6·10⁶ | 5.8·10⁷ |
| symbolic analysis (cached) | 0.06 s | 1.6 s |
| numeric factorisation | 0.43 s | 11.9 s |
| ``logdet`` from the factor | 0.01 s | 0.1 s |
| selected inversion, all of it | 0.32 s | 5.7 s |
| of which ``L()`` (to simplicial) | 0.05 s | 0.6 s |
| ``cholesky_logdet`` + backward | 0.8 s | 16.7 s |

Reusing the analysis saves its time, ~10 % of a factorisation here
(``cholmod.cholesky`` from scratch: 0.47 s and 12.2–13.5 s). The first call
in a fresh environment compiles the numba kernels (~10–15 s, then cached on
disk; ~1 s to load in a new process).

This module is a core: it imports neither gpytorch, linear_operator nor
autograd machinery.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import scipy.linalg  # noqa: F401  (loads the BLAS that numba's dense blocks call, for _blas_threads)
import scipy.sparse as sp
import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners.base import Preconditioner, _as_sparse, _check_dtype
from gpsparse.core.selinv import _DENSE_MIN, _lookup_kernel, _supernodes, _takahashi_kernel
from gpsparse.errors import NotPositiveDefiniteError

__all__ = [
    "cholmod_available",
    "CholeskyPreconditioner",
]

_INSTALL_HINT = (
    'the CHOLMOD path needs scikit-sparse: `pip install "gpsparse[cholmod]"` '
    "(building it needs the SuiteSparse headers and libraries, e.g. Debian/Ubuntu "
    "`apt-get install libsuitesparse-dev`)"
)


# ---------------------------------------------------------------------------
# The optional import
# ---------------------------------------------------------------------------


def _import_cholmod():
    """``sksparse.cholmod``, or ``ImportError`` with the install hint."""
    try:
        from sksparse import cholmod
    except ImportError as err:
        raise ImportError(f"gpsparse.core.cholmod: {_INSTALL_HINT} ({err})") from err
    return cholmod


def cholmod_available() -> bool:
    """Whether scikit-sparse (CHOLMOD) can be imported.

    Examples
    --------
    >>> isinstance(cholmod_available(), bool)
    True
    """
    try:
        _import_cholmod()
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------
# Per-pattern analysis (cached) and factorisation
# ---------------------------------------------------------------------------


class _Analysis:
    """Everything about a pattern that CHOLMOD and the gradients reuse.

    ``indptr, indices`` are the CSC arrays of ``A`` (equal to the CSR arrays
    of a symmetric pattern); the CSC data of ``A`` is ``values[transpose_perm]``.
    ``symbolic`` is the analysed (not factorised) CHOLMOD ``Factor``.
    ``lookup`` (built lazily, checked against the factor's column pointers)
    holds those column pointers, the position in the factor ``L`` of every
    stored entry of ``A`` and the supernode starts of ``L``.
    """

    def __init__(self, pattern: SparsityPattern, cholmod: Any):
        cpu = pattern.cpu()
        # A CPU copy of a CUDA pattern for the sampled products. Never the pattern itself:
        # the analysis is cached on the pattern, and a reference back would make a cycle
        # that only the garbage collector frees.
        self.cpu_pattern = cpu if cpu is not pattern else None
        self.n = pattern.size[0]
        self.indptr = cpu.crow.numpy()
        self.indices = cpu.col.numpy()
        self.transpose_perm = cpu.transpose_perm  # int64 tensor
        self.row = cpu.row.numpy()
        self.col = cpu.col_long.numpy()
        self.symbolic = cholmod.analyze(self.matrix(np.zeros(pattern.nnz)))
        self.lookup: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (L.indptr, positions, starts)

    def matrix(self, data: np.ndarray) -> sp.csc_matrix:
        """``A`` as scipy CSC from its CSC-ordered ``data``."""
        A = sp.csc_matrix((data, self.indices, self.indptr), shape=(self.n, self.n), copy=False)
        A.has_sorted_indices = True  # CSR of a sorted pattern: skip scipy's O(nnz) check
        return A


_ANALYSIS_KEY = "cholmod.analysis"


def _analysis(pattern: SparsityPattern, who: str) -> tuple[_Analysis, SparsityPattern]:
    """The cached analysis of ``pattern`` and the pattern on the CPU."""
    cholmod = _import_cholmod()
    if not isinstance(pattern, SparsityPattern):
        raise TypeError(f"{who}: pattern must be a SparsityPattern, got {type(pattern).__name__}")
    if not pattern.symmetric:
        raise ValueError(
            f"{who}: the pattern must be declared symmetric (CHOLMOD factorises symmetric positive "
            "definite matrices); use pattern.with_symmetric(True) if the values are symmetric"
        )
    cached = pattern.derived(_ANALYSIS_KEY, lambda: _Analysis(pattern, cholmod))
    return cached, (pattern if cached.cpu_pattern is None else cached.cpu_pattern)


def _check_values(values: Tensor, pattern: SparsityPattern, who: str) -> None:
    if not isinstance(values, Tensor) or values.layout != torch.strided:
        raise TypeError(f"{who}: values must be a dense tensor (*batch, nnz)")
    if values.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{who}: values must be float32 or float64, got {values.dtype}")
    if values.dim() < 1 or values.shape[-1] != pattern.nnz:
        raise ValueError(
            f"{who}: values must have shape (*batch, nnz) with nnz = {pattern.nnz}, got {tuple(values.shape)}"
        )
    v = values.detach()
    if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{who}: values contain NaN or inf")


def _factorize(analysis: _Analysis, values: Tensor, who: str):
    """CHOLMOD factor of ``A`` with ``(nnz,)`` float64 CPU ``values`` (CSR order)."""
    cholmod = _import_cholmod()
    data = values.detach()[analysis.transpose_perm].numpy()  # CSC order of A: CHOLMOD reads A's lower triangle
    try:
        with _blas_threads():
            factor = analysis.symbolic.cholesky(analysis.matrix(data))
    except cholmod.CholmodNotPositiveDefiniteError as err:
        raise NotPositiveDefiniteError(f"{who}: A is not positive definite (CHOLMOD: {err})") from err
    # Simplicial factors are LDLᵀ and do not stop at a non-positive pivot: check D.
    d = factor.D()
    if not bool(np.all(d > 0)):
        j = int(np.argmin(d > 0))
        raise NotPositiveDefiniteError(
            f"{who}: A is not positive definite: pivot {j} of the reordered matrix is {d[j]:.6g} "
            f"(row/column {int(factor.P()[j])} of A)"
        )
    return factor


_BLAS_CONTROLLER: list = []  # [threadpoolctl.ThreadpoolController or None], created on first use


def _blas_threads():
    """Context limiting the BLAS thread pools to ``torch.get_num_threads()`` while it is active.

    CHOLMOD's supernodal factorisation and the dense blocks of the selected
    inversion call BLAS; a multi-threaded OpenBLAS on a busy 2-core machine
    made the selected inversion ~6x slower (n = 10⁵: 4.5 s against 0.8 s with
    one thread). Needs threadpoolctl (installed with scikit-learn); without it
    the BLAS default is used.
    """
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # pragma: no cover
            _BLAS_CONTROLLER.append(None)
    controller = _BLAS_CONTROLLER[0]
    if controller is None:  # pragma: no cover
        return contextlib.nullcontext()
    return controller.limit(limits=torch.get_num_threads(), user_api="blas")


def _to_host(values: Tensor) -> Tensor:
    """Differentiable copy to CPU float64 (no copy when already there)."""
    return values.to(device="cpu", dtype=torch.float64)


# ---------------------------------------------------------------------------
# Selected inversion (driver; the kernels are in gpsparse.core.selinv)
# ---------------------------------------------------------------------------


def _selected_inverse(factor: Any, analysis: _Analysis) -> np.ndarray:
    """``(A⁻¹)[i_e, j_e]`` for every stored entry ``e`` of ``A`` (CSR order), float64 ``(nnz,)``.

    Converts ``factor`` to a simplicial ``L Lᵀ`` factor in place (CHOLMOD's
    ``L()``), runs ``_takahashi_kernel`` on it and gathers the entries of
    ``A``'s pattern through the cached lookup.
    """
    L = factor.L()  # CSC, L Lᵀ = A[p][:, p]
    if not L.has_sorted_indices:  # pragma: no cover - CHOLMOD's factors are sorted
        L.sort_indices()
    indptr, indices, lvals = L.indptr, L.indices, np.ascontiguousarray(L.data, dtype=np.float64)
    lookup = analysis.lookup
    if lookup is None or not np.array_equal(lookup[0], indptr):
        perm = factor.P()
        pinv = np.empty_like(perm)
        pinv[perm] = np.arange(perm.size, dtype=perm.dtype)
        positions = np.empty(analysis.row.size, dtype=np.int64)
        _lookup_kernel(indptr, indices, analysis.row, analysis.col, pinv, positions)
        if positions.size and positions.min() < 0:  # pragma: no cover - L's pattern contains A's
            raise RuntimeError(
                "gpsparse.core.cholmod: an entry of A is missing from the pattern of its Cholesky factor"
            )
        analysis.lookup = lookup = (indptr.copy(), positions, _supernodes(indptr, indices))
    z = np.empty_like(lvals)
    with _blas_threads():
        _takahashi_kernel(indptr, indices, lvals, z, lookup[2], _DENSE_MIN)
    return z[lookup[1]]


def _solve_with(factors: list, rhs: Tensor) -> Tensor:
    """``A[b]⁻¹ rhs[b]`` for ``(B, n, k)`` float64 CPU ``rhs``."""
    if rhs.shape[-1] == 0:
        return rhs.clone()
    with _blas_threads():
        return torch.stack([torch.from_numpy(np.asarray(f.solve_A(r.numpy()))) for f, r in zip(factors, rhs)])


# ---------------------------------------------------------------------------
# Preconditioner
# ---------------------------------------------------------------------------


class CholeskyPreconditioner(Preconditioner):
    """The exact preconditioner ``M = A``, factorised by CHOLMOD.

    CHOLMOD computes ``L Lᵀ = A[p][:, p]`` with a fill-reducing permutation
    ``p`` ([`perm`][]). With the permutation matrix ``P`` (``(P r)[i] =
    r[p[i]]``), ``A = Pᵀ L Lᵀ P``, so the split factor is ``C = Pᵀ L``:

    * ``M⁻¹ r = A⁻¹ r``;
    * ``C⁻¹ r = L⁻¹ (P r)``, ``C⁻ᵀ r = Pᵀ (L⁻ᵀ r)``;
    * ``log det M = log det A``, exact.

    ``C`` is not triangular in the original ordering (``P C`` is). A
    Krylov method on ``C⁻¹ A C⁻ᵀ = I`` converges in one step, which makes
    this the reference preconditioner: exact preconditioned logdets, and a
    factor of ``A`` at an earlier optimiser step as a preconditioner for later
    steps (DESIGN.md, "Preconditioning").

    Build with [`from_matrix`][]. Batched values ``(*batch, nnz)`` give one
    factor per batch element; ``r`` ``(*rbatch, n, k)`` broadcasts against
    ``batch_shape``. Applies run on the CPU in float64; the preconditioner
    keeps the device and dtype it was built with (or given by ``to``) and
    converts ``r`` and the result (CUDA tensors are copied to the host and back).
    Not differentiable (see [`Preconditioner`][gpsparse.Preconditioner]).

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64).to_sparse_csr()
    >>> if cholmod_available():
    ...     P = CholeskyPreconditioner.from_matrix(A)
    ...     print(P(torch.tensor([[5.0], [4.0]], dtype=torch.float64)).squeeze(-1))
    ... else:
    ...     print(torch.ones(2, dtype=torch.float64))
    tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, factors: list, batch_shape: torch.Size, n: int, dtype: torch.dtype, device: torch.device):
        # Private: use from_matrix.
        self._factors = factors
        self._batch_shape = torch.Size(batch_shape)
        self._n = n
        self._dtype = dtype
        self._device = torch.device(device)
        self._logdet = torch.tensor([f.logdet() for f in factors], dtype=torch.float64).reshape(self._batch_shape)

    @classmethod
    def from_matrix(cls, A: Any, pattern: SparsityPattern | None = None) -> CholeskyPreconditioner:
        """Factorise ``A`` exactly.

        Parameters
        ----------
        A : sparse Tensor, object with ``to_sparse_csr()``, or Tensor of values
            * a 2-D torch sparse COO/CSR tensor (or an object with
                ``to_sparse_csr()``, e.g. a [`SparseLinearOperator`][gpsparse.SparseLinearOperator]),
                symmetric positive definite; CHOLMOD reads its lower triangle;
            * ``values`` ``(*batch, nnz)`` together with ``pattern``; the same
                pair may also be passed as a tuple ``A = (values, pattern)``.
                The symbolic analysis is cached on the pattern.
        pattern : SparsityPattern, optional
            Declared symmetric; only with ``values``.

        Raises
        ------
        ImportError
            scikit-sparse is not installed.
        NotPositiveDefiniteError
            ``A`` is not positive definite.
        TypeError, ValueError
            Unsupported input, dtype, shape, non-finite values.
        """
        who = "CholeskyPreconditioner.from_matrix"
        _import_cholmod()
        if isinstance(A, tuple) and len(A) == 2 and pattern is None:
            A, pattern = A
        if pattern is not None:
            values = A
            analysis, _ = _analysis(pattern, who)
            _check_values(values, pattern, who)
            dtype, device = values.dtype, values.device
        else:
            if isinstance(A, Tensor) and A.layout == torch.strided:
                raise TypeError(
                    f"{who}: got a dense tensor without a pattern; pass a sparse matrix (A.to_sparse_csr()) "
                    "or values together with their SparsityPattern"
                )
            S = _as_sparse(A, who)
            if S.dim() != 2:
                raise NotImplementedError(
                    f"{who}: batched sparse tensors are not supported; pass batched values with their pattern"
                )
            S = S.to_sparse_coo().coalesce()
            row, col = S.indices()
            # CHOLMOD reads the lower triangle; the values are made symmetric from it so the
            # pattern can be declared symmetric whatever the upper triangle holds.
            lower = row >= col
            row, col, vals = row[lower], col[lower], S.values()[lower]
            off = row != col
            pattern, order = SparsityPattern.from_indices(
                torch.cat([row, col[off]]), torch.cat([col, row[off]]), tuple(S.shape), symmetric=True
            )
            values = torch.cat([vals, vals[off]])[order]
            analysis, _ = _analysis(pattern, who)
            dtype, device = S.dtype, S.device
        batch = values.shape[:-1]
        flat = _to_host(values.detach()).reshape(-1, pattern.nnz)
        factors = [_factorize(analysis, v, who) for v in flat]
        return cls(factors, batch, pattern.size[0], dtype, device)

    # -- metadata -----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    @property
    def perm(self) -> Tensor:
        """``(*batch, n)`` CHOLMOD's fill-reducing permutation ``p``: ``L Lᵀ = A[p][:, p]``."""
        return torch.stack([torch.from_numpy(f.P().astype(np.int64)) for f in self._factors]).reshape(
            *self._batch_shape, self._n
        )

    def factor(self, index: int = 0) -> Tensor:
        """``L`` of batch element ``index`` (flat index) as an ``(n, n)`` torch sparse CSC tensor (CPU, float64).

        Converts that factor to simplicial ``L Lᵀ`` form (once).
        """
        L = self._factors[index].L()
        return torch.sparse_csc_tensor(
            torch.from_numpy(L.indptr.astype(np.int64)),
            torch.from_numpy(L.indices.astype(np.int64)),
            torch.from_numpy(np.asarray(L.data, dtype=np.float64)),
            L.shape,
            check_invariants=False,
        )

    def logdet(self) -> Tensor:
        return self._logdet.to(device=self._device, dtype=self._dtype)

    def to(self, device=None, dtype=None) -> CholeskyPreconditioner:
        if dtype is not None:
            _check_dtype(dtype, "CholeskyPreconditioner.to")
        return CholeskyPreconditioner(
            self._factors,
            self._batch_shape,
            self._n,
            self._dtype if dtype is None else dtype,
            self._device if device is None else torch.device(device),
        )

    # -- applies ------------------------------------------------------------

    def _solve(self, r: Tensor) -> Tensor:
        return self._apply(r, lambda f, b: f.solve_A(b))

    def _apply_inv_factor(self, r: Tensor) -> Tensor:
        return self._apply(r, lambda f, b: f.solve_L(f.apply_P(b), use_LDLt_decomposition=False))

    def _apply_inv_factor_t(self, r: Tensor) -> Tensor:
        return self._apply(r, lambda f, b: f.apply_Pt(f.solve_Lt(b, use_LDLt_decomposition=False)))

    def _apply(self, r: Tensor, op) -> Tensor:
        n, k = self._n, r.shape[-1]
        batch = torch.broadcast_shapes(r.shape[:-2], self._batch_shape)
        nb = self._batch_shape.numel()
        host = r.to(device="cpu", dtype=torch.float64).expand(*batch, n, k)
        # (*lead, *pbatch, n, k) -> (nb, n, lead·k): one call per factor with all columns
        blocks = host.reshape(-1, nb, n, k).permute(1, 2, 0, 3).reshape(nb, n, -1)
        if blocks.shape[-1] == 0:
            out = blocks.clone()
        else:
            with _blas_threads():
                out = torch.stack(
                    [
                        torch.from_numpy(np.asarray(op(f, np.ascontiguousarray(b.numpy())), dtype=np.float64))
                        for f, b in zip(self._factors, blocks)
                    ]
                )
        out = out.reshape(nb, n, -1, k).permute(2, 0, 1, 3).reshape(*batch, n, k)
        return out.to(device=self._device, dtype=self._dtype)

    def __repr__(self) -> str:
        batch = f", batch_shape={tuple(self._batch_shape)}" if len(self._batch_shape) else ""
        return f"CholeskyPreconditioner(size={self._n}{batch}, dtype={self._dtype}, device={self._device})"
