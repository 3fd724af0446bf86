"""Fused column work of the Krylov loops: dots, axpy updates and residual norms in few passes over memory.

A Krylov iteration on ``k`` columns carried as one ``(*batch, n, k)`` block is
memory-bandwidth-bound: besides the ``matvec`` it only streams blocks through
dot products and axpy updates. Done one torch operation at a time, CG reads
and writes 12 blocks per iteration, and the column dots (diagonal of the GEMM
``aᵀb``) are slow besides (measured 64 ms per dot at n = 10⁶, k = 16). The
kernels here do CG's vector work in three passes:

* ``dot(a, b)``: ``Σ_i a[i, c] b[i, c]`` per column (reads 2 blocks);
* ``residual(r, q, α)``: ``r ← r − α q`` and ``‖r‖²`` per column in the same
  pass (reads 2, writes 1);
* ``step(x, p, z, αs, β)``: ``x ← x + αs p`` and then ``p ← z + β p`` in the
  same pass (reads 3, writes 2) — CG's solution update delayed until the
  search direction is overwritten, which is the same arithmetic on the same
  numbers.

That is 10 block passes per unpreconditioned CG iteration instead of 12, and
no GEMM. Lanczos (``gpsparse.core.lanczos``) uses two more:

* ``lanczos_alpha(w, q_prev, β, q, r)``: ``r ← w − β q_prev`` and ``α = qᵀr``
  per column in one pass (then ``residual`` for ``r ← r − αq`` with ``‖r‖²``);
* ``lanczos_next(r, scale, q_new, store, k)``: ``q_new ← r/β`` written both to
  the ``(n, k)`` block and, transposed, to the stored basis (``(p, K, n)``,
  each column's basis contiguous) in one pass — the strided copy torch makes of
  that transpose was a third of a 16-column iteration.

Coefficients (``α``, ``β``: ``(*batch, k)``) are applied exactly as
torch's ``addcmul`` does (``r − α·q``, ``x + (αs)·p``, ``z + β·p`` in the
block's dtype), so iterates agree with the torch path to rounding; the column
sums accumulate in float64 (also for float32 blocks) with four interleaved
partial sums for a single column, so they are at least as accurate as
torch's.

Why numba rather than ``torch.compile``: the kernels are three short loops,
compiled once per dtype (~5 s) and cached on disk (``cache=True``; a fresh
process loads them, numba's import included, in ~1 s), with no graph
capture, recompilation or C++ toolchain, and they run on plain CPU tensors
through zero-copy numpy views. ``torch.compile`` (inductor, same three
functions written as torch expressions) was measured too, at n = 10⁶,
k = 16, float64, one thread: dot 20 ms, residual with norms 34 ms, step
18 ms, against numba's 10, 13 and 23 ms in the same session (torch eager: 58,
72, 27), and its first call took 26 s to compile. The kernels are serial
(``nogil``) and bandwidth-bound (each close to a one-thread copy of the
same bytes). CG per iteration at that size
(``benchmarks/krylov_iteration_benchmark.py``): 106 ms instead of 215 ms,
2.0× the bare SpMM.

``column_ops(block, dot)`` chooses the implementation for a solve: the
numba kernels for float32/float64 CPU blocks of at least
``FUSED_MIN_ENTRIES`` entries when numba is installed, otherwise
``TorchColumnOps`` (CUDA, other dtypes, small blocks); the fused
object also falls back to torch, call by call, for an operand that is not a
contiguous block (e.g. a preconditioner returning a strided view).

Pure numerics: imports torch, numpy and numba only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

try:  # numba is a hard dependency; stay importable (torch path only) without it
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None

__all__ = ["FUSED_MIN_ENTRIES", "FUSED_MIN_ROWS", "TorchColumnOps", "FusedColumnOps", "column_ops", "fused_available"]

_FUSED_DTYPES = (torch.float32, torch.float64)

#: Smallest block (entries ``B·n·k``) for which ``column_ops`` picks the numba kernels by default.
FUSED_MIN_ENTRIES = 1 << 15

#: The same threshold in rows ``B·n`` (``column_ops(..., by_rows=True)``: Lanczos).
FUSED_MIN_ROWS = 1 << 12


def _jit(fn):
    """numba-compile ``fn`` lazily (cached on disk, GIL released) when numba is installed."""
    if _numba is None:  # pragma: no cover - numba is a dependency
        return fn
    return _numba.njit(cache=True, nogil=True)(fn)


def fused_available() -> bool:
    """Whether the numba kernels can run (numba installed)."""
    return _numba is not None


# --------------------------------------------------------------------------------------------------
# numba kernels on (B, n, k) C-contiguous blocks; coefficients (B, k) of the block's dtype
# --------------------------------------------------------------------------------------------------


@_jit
def _dot_vector(a, b):
    """``Σ_i a[i] b[i]`` of two 1-D arrays in float64, four interleaved partial sums."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    m = n - n % 4
    for i in range(0, m, 4):
        s0 += np.float64(a[i]) * np.float64(b[i])
        s1 += np.float64(a[i + 1]) * np.float64(b[i + 1])
        s2 += np.float64(a[i + 2]) * np.float64(b[i + 2])
        s3 += np.float64(a[i + 3]) * np.float64(b[i + 3])
    for i in range(m, n):
        s0 += np.float64(a[i]) * np.float64(b[i])
    return (s0 + s1) + (s2 + s3)


@_jit
def _dot_kernel(a, b, out):
    """``out[s, c] = Σ_i a[s, i, c] b[s, i, c]`` (float64 accumulation), one pass over ``a`` and ``b``."""
    nb, n, k = a.shape
    acc = np.zeros((k, 4), np.float64)
    m = n - n % 4
    for s in range(nb):
        if k == 1:
            out[s, 0] = _dot_vector(a[s].reshape(n), b[s].reshape(n))
            continue
        acc[:] = 0.0
        for i in range(n):
            lane = i & 3 if i < m else 0
            for c in range(k):
                acc[c, lane] += np.float64(a[s, i, c]) * np.float64(b[s, i, c])
        for c in range(k):
            out[s, c] = (acc[c, 0] + acc[c, 1]) + (acc[c, 2] + acc[c, 3])


@_jit
def _residual_vector(r, q, alpha):
    """``r ← r − α q`` in place; returns ``‖r‖²`` (float64, four partial sums)."""
    n = r.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    m = n - n % 4
    for i in range(0, m, 4):
        v0 = r[i] - alpha * q[i]
        v1 = r[i + 1] - alpha * q[i + 1]
        v2 = r[i + 2] - alpha * q[i + 2]
        v3 = r[i + 3] - alpha * q[i + 3]
        r[i], r[i + 1], r[i + 2], r[i + 3] = v0, v1, v2, v3
        s0 += np.float64(v0) * np.float64(v0)
        s1 += np.float64(v1) * np.float64(v1)
        s2 += np.float64(v2) * np.float64(v2)
        s3 += np.float64(v3) * np.float64(v3)
    for i in range(m, n):
        v = r[i] - alpha * q[i]
        r[i] = v
        s0 += np.float64(v) * np.float64(v)
    return (s0 + s1) + (s2 + s3)


@_jit
def _residual_kernel(r, q, alpha, out):
    """``r[s, :, c] ← r[s, :, c] − α[s, c] q[s, :, c]`` and ``out[s, c] = ‖r[s, :, c]‖²``, one pass."""
    nb, n, k = r.shape
    acc = np.zeros((k, 4), np.float64)
    m = n - n % 4
    for s in range(nb):
        if k == 1:
            out[s, 0] = _residual_vector(r[s].reshape(n), q[s].reshape(n), alpha[s, 0])
            continue
        acc[:] = 0.0
        a = alpha[s]
        for i in range(n):
            lane = i & 3 if i < m else 0
            for c in range(k):
                v = r[s, i, c] - a[c] * q[s, i, c]
                r[s, i, c] = v
                acc[c, lane] += np.float64(v) * np.float64(v)
        for c in range(k):
            out[s, c] = (acc[c, 0] + acc[c, 1]) + (acc[c, 2] + acc[c, 3])


@_jit
def _step_kernel(x, p, z, alpha, beta):
    """``x ← x + α p`` then ``p ← z + β p`` per column (coefficients ``(B, k)``), one pass."""
    nb, n, k = x.shape
    for s in range(nb):
        if k == 1:
            xs, ps, zs = x[s].reshape(n), p[s].reshape(n), z[s].reshape(n)
            a, b = alpha[s, 0], beta[s, 0]
            for i in range(n):
                pv = ps[i]
                xs[i] = xs[i] + a * pv
                ps[i] = zs[i] + b * pv
            continue
        a, b = alpha[s], beta[s]
        for i in range(n):
            for c in range(k):
                pv = p[s, i, c]
                x[s, i, c] = x[s, i, c] + a[c] * pv
                p[s, i, c] = z[s, i, c] + b[c] * pv


@_jit
def _lanczos_alpha_vector(w, q_prev, beta, q, r, first):
    """``r ← w − β q_prev`` (or ``r ← w``) on 1-D arrays; returns ``qᵀ r`` (float64, four partial sums)."""
    n = w.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    m = n - n % 4
    for i in range(0, m, 4):
        if first:
            v0, v1, v2, v3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        else:
            v0 = w[i] - beta * q_prev[i]
            v1 = w[i + 1] - beta * q_prev[i + 1]
            v2 = w[i + 2] - beta * q_prev[i + 2]
            v3 = w[i + 3] - beta * q_prev[i + 3]
        r[i], r[i + 1], r[i + 2], r[i + 3] = v0, v1, v2, v3
        s0 += np.float64(q[i]) * np.float64(v0)
        s1 += np.float64(q[i + 1]) * np.float64(v1)
        s2 += np.float64(q[i + 2]) * np.float64(v2)
        s3 += np.float64(q[i + 3]) * np.float64(v3)
    for i in range(m, n):
        v = w[i] if first else w[i] - beta * q_prev[i]
        r[i] = v
        s0 += np.float64(q[i]) * np.float64(v)
    return (s0 + s1) + (s2 + s3)


@_jit
def _lanczos_alpha_kernel(w, q_prev, beta, q, r, out, first):
    """``r ← w − β q_prev`` (``r ← w`` when ``first``) and ``out[s, c] = Σ_i q r`` (float64), one pass."""
    nb, n, k = w.shape
    acc = np.zeros((k, 4), np.float64)
    m = n - n % 4
    for s in range(nb):
        if k == 1:
            out[s, 0] = _lanczos_alpha_vector(
                w[s].reshape(n), q_prev[s].reshape(n), beta[s, 0], q[s].reshape(n), r[s].reshape(n), first
            )
            continue
        acc[:] = 0.0
        b = beta[s]
        for i in range(n):
            lane = i & 3 if i < m else 0
            for c in range(k):
                v = w[s, i, c] if first else w[s, i, c] - b[c] * q_prev[s, i, c]
                r[s, i, c] = v
                acc[c, lane] += np.float64(q[s, i, c]) * np.float64(v)
        for c in range(k):
            out[s, c] = (acc[c, 0] + acc[c, 1]) + (acc[c, 2] + acc[c, 3])


#: Rows per cache block of the transposed basis write (``256 × k`` entries: a few tens of kB).
_TRANSPOSE_ROWS = 256


@_jit
def _lanczos_next_kernel(r, scale, q_new, store, step):
    """``q_new ← scale · r`` per column, also written to the basis ``store[s, c, step, :]``, one pass."""
    nb, n, k = r.shape
    for s in range(nb):
        a = scale[s]
        if k == 1:
            rs, qs, st, a0 = r[s].reshape(n), q_new[s].reshape(n), store[s, 0, step], a[0]
            for i in range(n):
                v = rs[i] * a0
                qs[i] = v
                st[i] = v
            continue
        for start in range(0, n, _TRANSPOSE_ROWS):  # cache blocks: contiguous runs in every column's basis
            stop = min(n, start + _TRANSPOSE_ROWS)
            for i in range(start, stop):
                for c in range(k):
                    q_new[s, i, c] = r[s, i, c] * a[c]
            for c in range(k):
                column = store[s, c, step]
                for i in range(start, stop):
                    column[i] = q_new[s, i, c]


# --------------------------------------------------------------------------------------------------
# the two implementations of the column work
# --------------------------------------------------------------------------------------------------


class TorchColumnOps:
    """The column work of a Krylov loop as torch operations (any device and dtype).

    Parameters
    ----------
    dot : callable
        ``(a, b) ↦ (*batch, k)`` column inner products of ``(*batch, n, k)``
        blocks (``gpsparse.core.columns.column_dot`` with its buffer).
    """

    fused = False

    def __init__(self, dot: Callable[[Tensor, Tensor], Tensor]) -> None:
        self._dot = dot

    def own(self, *blocks: Tensor) -> None:
        """Register the solver's long-lived buffers (nothing to do for torch operations)."""

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Column inner products ``Σ_i a[..., i, c] b[..., i, c]``: ``(*batch, k)``."""
        return self._dot(a, b)

    def residual(self, r: Tensor, q: Tensor, alpha: Tensor) -> Tensor:
        """``r ← r − α q`` in place (``α``: ``(*batch, k)``); returns ``‖r‖²`` per column, ``(*batch, k)``."""
        r.addcmul_(q, alpha.unsqueeze(-2), value=-1.0)
        return self.dot(r, r)

    def step(self, x: Tensor, p: Tensor, z: Tensor, alpha: Tensor, beta: Tensor) -> None:
        """``x ← x + α p``, then ``p ← z + β p``, in place (coefficients ``(*batch, k)``)."""
        x.addcmul_(p, alpha.unsqueeze(-2))
        torch.addcmul(z, p, beta.unsqueeze(-2), out=p)

    def lanczos_alpha(self, w: Tensor, q_prev: Tensor | None, beta: Tensor, q: Tensor, r: Tensor) -> Tensor:
        """Lanczos: ``r ← w − β q_prev`` (``r ← w`` without ``q_prev``); returns ``α = qᵀ r`` per column."""
        if q_prev is None:
            r.copy_(w)
        else:
            torch.addcmul(w, q_prev, -beta.unsqueeze(-2), out=r)
        return self.dot(q, r)

    def lanczos_next(self, r: Tensor, scale: Tensor, q_new: Tensor, store: Tensor, step: int) -> Tensor:
        """Lanczos: ``q_new ← scale · r`` per column, stored as ``store[..., c, step, :]`` (``(*batch, p, K, n)``)."""
        torch.mul(r, scale.unsqueeze(-2), out=q_new)
        store[..., step, :] = q_new.mT
        return q_new


class FusedColumnOps(TorchColumnOps):
    """The column work of a Krylov loop as numba kernels on contiguous CPU blocks.

    Same interface and results (to rounding) as ``TorchColumnOps``. Each call
    views its ``(*batch, n, k)`` operands as ``(B, n, k)`` numpy arrays
    (zero-copy; the solver's own buffers, registered with ``own``, are
    viewed once) and runs one kernel; an operand that is not a contiguous CPU
    block of the solve's shape and dtype sends that call to the torch
    implementation. Only the ``(*batch, k)`` results are allocated.

    Parameters
    ----------
    dot : callable
        The torch column dot, for the fallback.
    block : Tensor
        A ``(*batch, n, k)`` block of the solve (shape and dtype reference).
    """

    fused = True

    def __init__(self, dot: Callable[[Tensor, Tensor], Tensor], block: Tensor) -> None:
        super().__init__(dot)
        self.shape = block.shape
        self.dtype = block.dtype
        self._block_shape = (-1, block.shape[-2], block.shape[-1])
        self._columns = tuple(block.shape[:-2]) + (block.shape[-1],)
        self._owned: dict[int, tuple[Tensor, np.ndarray]] = {}

    def own(self, *blocks: Tensor) -> None:
        """Register buffers that live (and keep their storage) for the whole solve: viewed once."""
        for t in blocks:
            array = self._array(t)
            if array is not None:
                self._owned[id(t)] = (t, array)

    def _array(self, t: Tensor) -> np.ndarray | None:
        """``t`` as a ``(B, n, k)`` numpy view, or ``None`` when the kernels cannot take it."""
        hit = self._owned.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        if t.shape != self.shape or t.dtype != self.dtype or t.device.type != "cpu" or not t.is_contiguous():
            return None
        return t.detach().view(self._block_shape).numpy()

    def _coef(self, c: Tensor) -> np.ndarray:
        return c.detach().to(self.dtype).contiguous().view(-1, self._columns[-1]).numpy()

    def _out(self) -> tuple[Tensor, np.ndarray]:
        out = torch.empty(self._columns, dtype=self.dtype)
        return out, out.view(-1, self._columns[-1]).numpy()

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        av, bv = self._array(a), self._array(b)
        if av is None or bv is None:
            return self._dot(a, b)
        out, view = self._out()
        _dot_kernel(av, bv, view)
        return out

    def residual(self, r: Tensor, q: Tensor, alpha: Tensor) -> Tensor:
        rv, qv = self._array(r), self._array(q)
        if rv is None or qv is None:
            return super().residual(r, q, alpha)
        out, view = self._out()
        _residual_kernel(rv, qv, self._coef(alpha), view)
        return out

    def step(self, x: Tensor, p: Tensor, z: Tensor, alpha: Tensor, beta: Tensor) -> None:
        xv, pv, zv = self._array(x), self._array(p), self._array(z)
        if xv is None or pv is None or zv is None:
            return super().step(x, p, z, alpha, beta)
        _step_kernel(xv, pv, zv, self._coef(alpha), self._coef(beta))
        return None

    def lanczos_alpha(self, w: Tensor, q_prev: Tensor | None, beta: Tensor, q: Tensor, r: Tensor) -> Tensor:
        wv, qv, rv = self._array(w), self._array(q), self._array(r)
        pv = qv if q_prev is None else self._array(q_prev)
        if wv is None or qv is None or rv is None or pv is None:
            return super().lanczos_alpha(w, q_prev, beta, q, r)
        out, view = self._out()
        _lanczos_alpha_kernel(wv, pv, self._coef(beta), qv, rv, view, q_prev is None)
        return out

    def lanczos_next(self, r: Tensor, scale: Tensor, q_new: Tensor, store: Tensor, step: int) -> Tensor:
        rv, qv = self._array(r), self._array(q_new)
        ok = store.device.type == "cpu" and store.dtype == self.dtype and store.is_contiguous()
        if rv is None or qv is None or not ok:
            return super().lanczos_next(r, scale, q_new, store, step)
        sv = store.detach().view(-1, *store.shape[-3:]).numpy()
        _lanczos_next_kernel(rv, self._coef(scale), qv, sv, int(step))
        return q_new


def column_ops(
    block: Tensor, dot: Callable[[Tensor, Tensor], Tensor], *, fused: bool | None = None, by_rows: bool = False
) -> TorchColumnOps:
    """The column-work implementation for a solve on ``(*batch, n, k)`` blocks like ``block``.

    Parameters
    ----------
    block : Tensor
        A block of the solve (its device, dtype and shape decide).
    dot : callable
        The torch column dot (used by ``TorchColumnOps`` and as the fallback).
    fused : bool, optional
        ``None`` (default): the numba kernels where they apply (numba
        installed, CPU, float32/float64) and pay (blocks of at least
        ``FUSED_MIN_ENTRIES`` entries: below, the ~10 µs of call overhead per
        kernel exceed what fusing saves); ``False``: torch operations;
        ``True``: the numba kernels, ``ValueError`` where they cannot run.
    by_rows : bool
        Decide the default by the rows ``B·n`` (``≥ FUSED_MIN_ROWS``), not the
        entries: the choice, and so each column's arithmetic, then does not
        depend on how many columns run together (what probe-parallel runs need).
    """
    can = fused_available() and block.device.type == "cpu" and block.dtype in _FUSED_DTYPES
    if fused is None:
        rows = block.numel() // max(block.shape[-1], 1)
        fused = can and (rows >= FUSED_MIN_ROWS if by_rows else block.numel() >= FUSED_MIN_ENTRIES)
    elif fused and not can:
        raise ValueError(
            f"fused column kernels need numba and a float32/float64 CPU block, got {block.dtype} on {block.device}"
        )
    return FusedColumnOps(dot, block) if fused else TorchColumnOps(dot)
