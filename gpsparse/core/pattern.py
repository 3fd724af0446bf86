"""Sparsity patterns: the non-differentiable half of a sparse matrix.

A sparse matrix in gpsparse is split in two (DESIGN.md §2):

* ``values`` — a dense tensor of shape ``(*batch, nnz)``, the only thing that
    carries gradients;
* a [`SparsityPattern`][gpsparse.SparsityPattern] — row pointers, column indices, the permutation to
    the transpose, the positions of the diagonal and cached block-diagonal
    layouts for batches. It holds no gradients and travels through
    linear_operator's representation machinery *by reference* as a keyword
    argument, so rebuilding an operator from ``(values, pattern)`` costs O(1).

Entries are stored in CSR order (sorted by row, then column, no duplicates).
Batched operators share one pattern; values carry the batch dimensions.

This module is a core: it imports neither gpytorch nor linear_operator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cached_property
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["SparsityPattern", "csr_tensor"]

_INT32_MAX = 2**31 - 1

T = TypeVar("T")

#: Partner patterns whose merged pattern ``SparsityPattern.union`` keeps.
_UNION_CACHE_SIZE = 4


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """Build a torch CSR tensor without invariant checks or beta warnings.

    Parameters
    ----------
    crow, col : Tensor
        Row pointers ``(m + 1,)`` and column indices ``(nnz,)`` (same integer dtype).
    values : Tensor
        ``(nnz,)`` values in CSR order.
    size : tuple of int
        ``(m, n)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class SparsityPattern:
    """An immutable CSR sparsity pattern of an ``m × n`` matrix.

    Construct it with [`from_indices`][] (any order, duplicates rejected)
    or ``from_csr`` (already sorted CSR). Operators built on the same
    pattern object share all its caches.

    Parameters
    ----------
    crow : Tensor
        ``(m + 1,)`` row pointers.
    col : Tensor
        ``(nnz,)`` column indices, sorted within each row.
    size : tuple of int
        ``(m, n)``.
    symmetric : bool
        Declares that the operators built on this pattern are symmetric:
        the pattern equals its transpose *and* the values satisfy
        ``values == values[..., transpose_perm]``. For such operators every
        gradient with respect to the values is symmetrised,
        ``g ← (g + g[transpose_perm]) / 2`` — the gradient with respect to a
        symmetric matrix parameterised by its stored entries. It keeps a
        gradient step symmetric and matches linear_operator's convention.

    Notes
    -----
    Index tensors use int32 when ``m, n, nnz < 2³¹`` (torch's MKL path for CSR
    SpMM is several times faster with int32 indices, DESIGN.md §6), int64
    otherwise. ``row`` (int64, ``(nnz,)``) is kept for gathers.
    """

    def __init__(self, crow: Tensor, col: Tensor, size: tuple[int, int], *, symmetric: bool = False):
        m, n = int(size[0]), int(size[1])
        index_dtype = torch.int32 if max(m, n, col.numel()) <= _INT32_MAX else torch.int64
        self.crow = crow.to(index_dtype).contiguous()
        self.col = col.to(index_dtype).contiguous()
        self.size = (m, n)
        self.symmetric = bool(symmetric)
        if self.symmetric and m != n:
            raise ValueError(f"a symmetric pattern must be square, got size {self.size}")
        self._block_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._derived: dict[object, object] = {}

    # ------------------------------------------------------------ derived
    def derived(self, key: object, build: Callable[[], T]) -> T:
        """The structure ``key`` derived from this pattern, built by ``build()`` on first use and cached.

        The one cache of pattern-derived structure (bandwidth, band layouts,
        merged patterns, Gram patterns, symbolic factorisations, stale
        factors): it lives and dies with the pattern object, is not copied by
        [`to`][] / [`with_symmetric`][] (device- or declaration-specific
        structures are rebuilt there), and is not pickled. Keys are strings
        or tuples whose first element names the owner (``"banded.layout"``,
        ``("union", id(other))``).
        """
        try:
            return self._derived[key]
        except KeyError:
            value = self._derived[key] = build()
            return value

    def union(self, other: SparsityPattern) -> tuple[SparsityPattern, Tensor]:
        """Pattern of ``A + B`` and the positions of this pattern's then ``other``'s entries in it.

        Cached ([`derived`][]) for the last few partner patterns by identity,
        holding a strong reference so an ``id`` is never reused while cached: a
        training loop adding the same two patterns every step
        (``P = Q + WᵀD⁻¹W``) merges them once.
        """
        cache = self.derived("union", dict)
        hit = cache.get(id(other))
        if hit is not None and hit[0] is other:
            return hit[1], hit[2]
        pattern, position = self._union_if_subset(other)
        if pattern is None:
            union, inverse = torch.unique(torch.cat([self.keys, other.keys]), return_inverse=True)
            n = self.size[1]
            symmetric = self.symmetric and other.symmetric
            pattern, order = SparsityPattern.from_indices(union // n, union % n, self.size, symmetric=symmetric)
            position = torch.argsort(order)[inverse]
        if len(cache) >= _UNION_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[id(other)] = (other, pattern, position)
        return pattern, position

    def _union_if_subset(self, other: SparsityPattern) -> tuple[SparsityPattern | None, Tensor | None]:
        """The union when one pattern contains the other: one ``searchsorted``, ``O(nnz log nnz)``, no sort.

        The common case ``P = Q + WᵀD⁻¹W`` (interpolation within the stencil of
        ``Q``, e.g. bilinear weights and a 13-point lattice precision) then skips
        the ``unique`` + ``argsort`` merge of the general path. ``(None, None)``
        when neither contains the other.
        """
        if self.size != other.size or self.device != other.device:
            return None, None
        for big, small, big_first in ((self, other, True), (other, self, False)):
            if small.nnz > big.nnz or big.nnz == 0:
                continue
            pos, found = big.positions(small.row, small.col_long)
            if bool(found.all()):
                same = torch.arange(big.nnz, device=pos.device)
                position = torch.cat([same, pos] if big_first else [pos, same])
                symmetric = self.symmetric and other.symmetric  # as the general path declares
                return (big if big.symmetric == symmetric else big.with_symmetric(symmetric)), position
        return None, None

    def set_derived(self, key: object, value: object) -> None:
        """Replace a derived structure (e.g. a refreshed stale factor)."""
        self._derived[key] = value

    def drop_derived(self, key: object) -> None:
        """Forget a derived structure (no error if absent)."""
        self._derived.pop(key, None)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_indices(
        cls, row: Tensor, col: Tensor, size: tuple[int, int], *, symmetric: bool = False
    ) -> tuple[SparsityPattern, Tensor]:
        """Pattern from coordinate lists in any order.

        Returns the pattern and ``order``, the permutation with
        ``values_csr = values_coo[..., order]``.

        Raises
        ------
        ValueError
            If indices are out of range or a coordinate appears twice.
        """
        m, n = int(size[0]), int(size[1])
        row = row.reshape(-1).long()
        col = col.reshape(-1).long()
        if row.numel() and (row.min() < 0 or row.max() >= m or col.min() < 0 or col.max() >= n):
            raise ValueError(f"sparse indices out of range for size {(m, n)}")
        key = row * n + col
        if key.numel() > 1 and bool((key[1:] > key[:-1]).all()):  # already in CSR order (e.g. coalesced COO)
            key_sorted, order = key, torch.arange(key.numel(), device=key.device)
        else:
            key_sorted, order = torch.sort(key, stable=True)
        if key_sorted.numel() > 1 and bool((key_sorted[1:] == key_sorted[:-1]).any()):
            raise ValueError("duplicate coordinates in the sparse indices; coalesce the tensor first")
        counts = torch.bincount(row, minlength=m)
        crow = torch.zeros(m + 1, dtype=torch.long, device=row.device)
        torch.cumsum(counts, 0, out=crow[1:])
        return cls(crow, col[order], (m, n), symmetric=symmetric), order

    # ------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def is_square(self) -> bool:
        return self.size[0] == self.size[1]

    @cached_property
    def row(self) -> Tensor:
        """``(nnz,)`` int64 row index of every stored entry."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.size[0], device=self.device), counts.long())

    @cached_property
    def col_long(self) -> Tensor:
        """``(nnz,)`` int64 column index of every stored entry."""
        return self.col.long()

    @cached_property
    def transpose_perm(self) -> Tensor:
        """``(nnz,)`` permutation ``p`` with ``values_T = values[..., p]`` in the CSR order of ``Aᵀ``.

        Entries are stored row-major, so a *stable* sort by column alone gives
        column-major (row within column ascending) order: one sort of the
        (int32) column indices, 2.2× faster than sorting int64 keys at 1.3·10⁷ entries.
        """
        return torch.sort(self.col, stable=True).indices

    @cached_property
    def transposed(self) -> SparsityPattern:
        """The pattern of ``Aᵀ`` (its [`transposed`][] is ``self``)."""
        if self.symmetric:
            return self
        perm = self.transpose_perm
        counts = torch.bincount(self.col_long, minlength=self.size[1])
        crow = torch.zeros(self.size[1] + 1, dtype=torch.long, device=self.device)
        torch.cumsum(counts, 0, out=crow[1:])
        out = SparsityPattern(crow, self.row[perm], (self.size[1], self.size[0]))
        out.__dict__["transposed"] = self
        out.__dict__["transpose_perm"] = torch.argsort(perm)
        return out

    @cached_property
    def pattern_is_symmetric(self) -> bool:
        """Whether the set of stored coordinates equals that of the transpose."""
        if not self.is_square:
            return False
        perm = self.transpose_perm
        return bool(torch.equal(self.row[perm], self.col_long) and torch.equal(self.col_long[perm], self.row))

    @cached_property
    def diagonal_positions(self) -> Tensor:
        """``(min(m, n),)`` int64 position of each diagonal entry in the values, ``-1`` where not stored."""
        k = min(self.size)
        pos = torch.full((k,), -1, dtype=torch.long, device=self.device)
        on_diag = (self.row == self.col_long).nonzero().squeeze(-1)
        pos[self.row[on_diag]] = on_diag
        return pos

    @cached_property
    def keys(self) -> Tensor:
        """``(nnz,)`` int64 linear index ``i·n + j`` of every entry (sorted ascending)."""
        return self.row * self.size[1] + self.col_long

    def positions(self, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
        """Positions in the values of entries ``(row, col)`` (any shape) and a mask of those stored.

        Missing entries get position 0 and ``False`` in the mask.
        """
        query = row.long() * self.size[1] + col.long()
        if self.nnz == 0:
            zeros = torch.zeros_like(query)
            return zeros, zeros.bool()
        pos = torch.searchsorted(self.keys, query.reshape(-1)).reshape(query.shape).clamp_max(self.nnz - 1)
        found = self.keys[pos] == query
        return torch.where(found, pos, torch.zeros_like(pos)), found

    def select(self, rows: Tensor, cols: Tensor) -> tuple[SparsityPattern, Tensor]:
        """Sub-pattern of rows ``rows`` and columns ``cols`` (int64, any order, repeats allowed).

        Returns the ``(len(rows), len(cols))`` pattern and ``entries``, the
        positions in this pattern's values of the new pattern's entries
        (``values_new = values[..., entries]``). Cost O(selected nnz · log).
        """
        rows, cols = rows.long().to(self.device), cols.long().to(self.device)
        crow = self.crow.long()
        counts = crow[rows + 1] - crow[rows]
        new_row = torch.repeat_interleave(torch.arange(rows.numel(), device=self.device), counts)
        first = torch.repeat_interleave(crow[rows], counts)
        offsets = torch.arange(new_row.numel(), device=self.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        entries = first + offsets
        sorted_cols, col_order = torch.sort(cols)
        old_col = self.col_long[entries]
        lo = torch.searchsorted(sorted_cols, old_col, right=False)
        hi = torch.searchsorted(sorted_cols, old_col, right=True)
        hits = hi - lo
        entries = torch.repeat_interleave(entries, hits)
        new_row = torch.repeat_interleave(new_row, hits)
        lo = torch.repeat_interleave(lo, hits)
        within = torch.arange(entries.numel(), device=self.device) - torch.repeat_interleave(
            torch.cumsum(hits, 0) - hits, hits
        )
        new_col = col_order[lo + within]
        symmetric = self.symmetric and torch.equal(rows, cols)
        pattern, order = SparsityPattern.from_indices(
            new_row, new_col, (rows.numel(), cols.numel()), symmetric=symmetric
        )
        return pattern, entries[order]

    @cached_property
    def with_full_diagonal(self) -> tuple[SparsityPattern, Tensor]:
        """This pattern with every diagonal entry stored, and the map of old positions into it.

        Returns ``(pattern, old_positions)`` with ``values_new[..., old_positions] = values``.
        Returns ``(self, arange(nnz))`` when the diagonal is already stored.
        """
        missing = (self.diagonal_positions < 0).nonzero().squeeze(-1)
        if missing.numel() == 0:
            return self, torch.arange(self.nnz, device=self.device)
        row = torch.cat([self.row, missing])
        col = torch.cat([self.col_long, missing])
        pattern, order = SparsityPattern.from_indices(row, col, self.size, symmetric=self.symmetric)
        return pattern, torch.argsort(order)[: self.nnz]

    # -------------------------------------------------------------- storage
    def block_diagonal(self, num_blocks: int) -> tuple[Tensor, Tensor]:
        """CSR ``(crow, col)`` of ``num_blocks`` copies of this pattern on a block diagonal.

        A batch of ``B`` matrices sharing this pattern acts as one
        ``(B·m) × (B·n)`` matrix with values ``values.reshape(-1)``, which turns
        a batched SpMM or sampled product into a single kernel call. Cached
        per ``num_blocks``.
        """
        if num_blocks == 1:
            return self.crow, self.col
        cached = self._block_cache.get(num_blocks)
        if cached is not None:
            return cached
        m, n = self.size
        if max(num_blocks * max(m, n), num_blocks * self.nnz) > _INT32_MAX and self.col.dtype == torch.int32:
            crow, col = self.crow.long(), self.col.long()
        else:
            crow, col = self.crow, self.col
        b = torch.arange(num_blocks, device=self.device, dtype=crow.dtype)
        crows = (crow[:-1].unsqueeze(0) + (b * self.nnz).unsqueeze(1)).reshape(-1)
        crows = torch.cat([crows, crows.new_tensor([num_blocks * self.nnz])])
        cols = (col.unsqueeze(0) + (b * n).unsqueeze(1)).reshape(-1)
        self._block_cache[num_blocks] = (crows, cols)
        return crows, cols

    def to_sparse_csr(self, values: Tensor) -> Tensor:
        """The torch CSR tensor with these ``(nnz,)`` values (no batch dims)."""
        return csr_tensor(self.crow, self.col, values, self.size)

    # ---------------------------------------------------------------- moves
    def to(self, device=None, *args, **kwargs) -> SparsityPattern:
        """The same pattern on ``device`` (dtype arguments are ignored: indices stay integers)."""
        if isinstance(device, torch.dtype) or device is None:
            device = kwargs.get("device", None)
        if device is None or torch.device(device) == self.device:
            return self
        out = SparsityPattern(self.crow.to(device), self.col.to(device), self.size, symmetric=self.symmetric)
        return out

    def cuda(self, device=None) -> SparsityPattern:
        return self.to(
            torch.device("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)
        )

    def cpu(self) -> SparsityPattern:
        return self.to(torch.device("cpu"))

    def with_symmetric(self, symmetric: bool) -> SparsityPattern:
        """A pattern sharing these indices with another ``symmetric`` declaration."""
        if symmetric == self.symmetric:
            return self
        if symmetric and not self.pattern_is_symmetric:
            raise ValueError("the sparsity pattern is not symmetric, so the matrix cannot be declared symmetric")
        out = SparsityPattern(self.crow, self.col, self.size, symmetric=symmetric)
        for name in ("row", "col_long", "transpose_perm", "diagonal_positions"):
            if name in self.__dict__:
                out.__dict__[name] = self.__dict__[name]
        return out

    def __repr__(self) -> str:
        sym = ", symmetric" if self.symmetric else ""
        return f"SparsityPattern(size={self.size}, nnz={self.nnz}, device={self.device}{sym})"

    def __getstate__(self):
        return {"crow": self.crow, "col": self.col, "size": self.size, "symmetric": self.symmetric}

    def __setstate__(self, state):
        self.__init__(state["crow"], state["col"], state["size"], symmetric=state["symmetric"])
