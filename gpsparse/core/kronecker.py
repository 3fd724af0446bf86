r"""Kronecker products of sparse matrices and row-wise Kronecker (face-splitting) products, on patterns.

Separable space–time fields have the precision ``Q = Q_t ⊗ Q_s`` (``n_t`` time
knots, ``n_s`` space nodes, node ``(a, i)`` at index ``a·n_s + i``: time
major, ``torch.kron(Q_t, Q_s)``'s order) and are read through
``W = W_t ⊙ W_s``, the row-wise Kronecker product of the time and space
interpolations (``W[r, (a, i)] = W_t[r, a] W_s[r, i]``). This core module holds
the index pattern of both, built once per pair of factor patterns, and the
O(nnz) value maps; it imports neither gpytorch nor linear_operator.

*Layout of ``Q_t ⊗ Q_s`` in CSR.* Row ``(a, i)`` stores, for each stored
column ``b`` of time row ``a`` (``r_a`` of them, in order), the stored columns
``j`` of space row ``i``: entry ``(e_t, e_s)`` (a time and a space entry) sits at

$$
\operatorname{pos}(e_t, e_s) = c^t_a\, \mathrm{nnz}_s + r_a\, c^s_i + k\, \ell_i + (e_s - c^s_i),
$$

with ``c^t, c^s`` the factor row pointers, ``k = e_t − c^t_a`` the place of
``e_t`` in its row and ``ℓ_i`` the length of space row ``i``. The ``r_a·nnz_s``
entries of the ``n_s`` rows of time row ``a`` follow one sequence that depends
on ``r_a`` only: for each ``p``, the place ``B_r[p] < r`` in the time row and
the space entry ``S_r[p]``. So the values of a run of consecutive time rows
of one length ``r`` are one small dense product,

$$
V_{\text{run}} = V^t_{\text{run}} \, E_r, \qquad E_r[k, p] = [B_r[p] = k]\; v^s[S_r[p]],
$$

``(rows, r) @ (r, r·nnz_s)``: no index array of the size of ``Q`` is formed,
and autograd keeps only the two small operands for the backward pass.

Positions of any entry, the transposition permutation and the diagonal follow
from ``pos`` and the factors' own (small) tables.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern, csr_tensor
from gpsparse.core.preconditioners.base import Preconditioner
from gpsparse.core.sparse_ops import gram_structure, spmm, values_grad

__all__ = [
    "KroneckerPattern",
    "kronecker_pattern",
    "kronecker_values",
    "kronecker_positions",
    "kronecker_transpose_perm",
    "kronecker_diagonal_positions",
    "face_split_structure",
    "kronecker_apply",
    "kronecker_bilinear",
    "KroneckerPosterior",
    "time_block_structure",
    "time_block_values",
    "TimeBlockPreconditioner",
    "MatrixFreeSplit",
]

_INT32_MAX = 2**31 - 1
#: Entries of the kron pattern processed at a time when building index arrays (bounds int64 temporaries).
_CHUNK = 2**22


class KroneckerPattern(SparsityPattern):
    """The pattern of ``Q_t ⊗ Q_s`` with its factor pattern (module docstring); build with ``kronecker_pattern``.

    A [`SparsityPattern`][gpsparse.SparsityPattern] whose position lookups,
    transposition permutation and diagonal come from the factor patterns
    (their size, not the product's): no ``(nnz,)`` int64 key or row arrays
    and no sort of the product's columns are formed for them.

    Attributes
    ----------
    time_pattern, space_pattern : SparsityPattern
        The square factor patterns (``n_t × n_t`` and ``n_s × n_s``).
    runs : tuple of (int, int, int)
        ``(a0, a1, r)``: consecutive time rows ``a0 … a1 − 1`` of ``r`` stored entries each.
    sequences : dict
        ``r -> (B_r, S_r)``, int64 ``(r·nnz_s,)`` each (module docstring).
    """

    def __init__(self, crow, col, size, *, symmetric, time_pattern, space_pattern, runs, sequences):
        super().__init__(crow, col, size, symmetric=symmetric)
        self.time_pattern, self.space_pattern = time_pattern, space_pattern
        self.runs, self.sequences = runs, sequences
        self._masks: dict = {}

    @property
    def num_times(self) -> int:
        return self.time_pattern.size[0]

    @property
    def num_space(self) -> int:
        return self.space_pattern.size[0]

    def mask(self, r: int, dtype: torch.dtype) -> Tensor:
        """``(r, r·nnz_s)`` 0/1 matrix ``[B_r[p] = k]`` in ``dtype`` (cached)."""
        key = (r, dtype)
        if key not in self._masks:
            b = self.sequences[r][0]
            ks = torch.arange(r, device=b.device).unsqueeze(-1)
            self._masks[key] = (ks == b.unsqueeze(0)).to(dtype)
        return self._masks[key]

    def tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-entry tables of ``pos``: time ``(c^t_a·nnz_s, r_a, k)``, space ``(c^s_i, ℓ_i, e_s − c^s_i)``, int64."""
        pt, ps = self.time_pattern, self.space_pattern
        ct, cs = pt.crow.long(), ps.crow.long()
        rt, ls = ct[1:] - ct[:-1], cs[1:] - cs[:-1]
        row_t, row_s = pt.row, ps.row
        t1 = ct[row_t] * ps.nnz
        t2 = rt[row_t]
        t3 = torch.arange(pt.nnz, device=pt.device) - ct[row_t]
        s1 = cs[row_s]
        s2 = ls[row_s]
        s3 = torch.arange(ps.nnz, device=ps.device) - s1
        return t1, t2, t3, s1, s2, s3

    def positions(self, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
        """As [`SparsityPattern.positions`][], from the factor patterns' lookups (``kronecker_positions``)."""
        return kronecker_positions(self, row, col)

    @cached_property
    def transpose_perm(self) -> Tensor:
        """From the factors' permutations (``kronecker_transpose_perm``), without a sort."""
        return kronecker_transpose_perm(self)

    @cached_property
    def diagonal_positions(self) -> Tensor:
        """From the factors' diagonals (``kronecker_diagonal_positions``)."""
        return kronecker_diagonal_positions(self)

    def __reduce__(self):
        return kronecker_pattern, (self.time_pattern, self.space_pattern)


def kronecker_pattern(time_pattern: SparsityPattern, space_pattern: SparsityPattern) -> KroneckerPattern:
    """The pattern of ``Q_t ⊗ Q_s`` (module docstring); O(nnz) time, int32 indices where they fit.

    Raises
    ------
    ValueError
        A non-square factor, factors on different devices, or more than 2³¹ − 1 nodes.
    """
    for name, p in (("time", time_pattern), ("space", space_pattern)):
        if not p.is_square:
            raise ValueError(f"the {name} factor of a Kronecker precision must be square, got size {p.size}")
    if time_pattern.device != space_pattern.device:
        raise ValueError("the Kronecker factors must be on one device")
    device = space_pattern.device
    n_t, n_s = time_pattern.size[0], space_pattern.size[0]
    n = n_t * n_s
    nnz_s = space_pattern.nnz
    nnz = time_pattern.nnz * nnz_s
    if n > _INT32_MAX:
        raise ValueError(f"a Kronecker precision of {n:,} nodes exceeds 2³¹ − 1 nodes")
    index_dtype = torch.int32 if nnz <= _INT32_MAX else torch.int64
    ct, cs = time_pattern.crow.long(), space_pattern.crow.long()
    rt, ls = ct[1:] - ct[:-1], cs[1:] - cs[:-1]
    # Runs of consecutive time rows with the same number of stored entries.
    runs = []
    rt_list = rt.tolist()
    a0 = 0
    for a in range(1, n_t + 1):
        if a == n_t or rt_list[a] != rt_list[a0]:
            runs.append((a0, a, rt_list[a0]))
            a0 = a
    sequences = {r: _sequence(r, cs, ls, device) for r in sorted({run[2] for run in runs})}
    # Row pointers: crow[(a, i)] = c^t_a·nnz_s + r_a·c^s_i.
    crow = (ct[:-1].unsqueeze(-1) * nnz_s + rt.unsqueeze(-1) * cs[:-1].unsqueeze(0)).reshape(-1)
    crow = torch.cat([crow, torch.tensor([nnz], device=device)]).to(index_dtype)
    col = torch.empty(nnz, dtype=index_dtype, device=device)
    col_t, col_s = time_pattern.col.long(), space_pattern.col.long()
    for a_start, a_stop, r in runs:
        b_seq, s_seq = sequences[r]
        space_col = col_s[s_seq]  # (K,)
        step = max(1, _CHUNK // max(r * nnz_s, 1))
        for c0 in range(a_start, a_stop, step):
            c1 = min(a_stop, c0 + step)
            time_col = col_t[ct[c0] : ct[c1]].reshape(c1 - c0, r)[:, b_seq]  # (c, K)
            block = time_col * n_s + space_col
            col[int(ct[c0]) * nnz_s : int(ct[c1]) * nnz_s] = block.reshape(-1).to(index_dtype)
    return KroneckerPattern(
        crow,
        col,
        (n, n),
        symmetric=time_pattern.symmetric and space_pattern.symmetric,
        time_pattern=time_pattern,
        space_pattern=space_pattern,
        runs=tuple(runs),
        sequences=sequences,
    )


def _sequence(r: int, cs: Tensor, ls: Tensor, device) -> tuple[Tensor, Tensor]:
    """``(B_r, S_r)`` for time rows of ``r`` entries: for each space row ``i``, ``k < r``, entry of row ``i``."""
    n_s = ls.numel()
    per_row = r * ls
    i_of_p = torch.repeat_interleave(torch.arange(n_s, device=device), per_row)
    offset = torch.arange(i_of_p.numel(), device=device) - r * cs[:-1][i_of_p]
    length = ls[i_of_p]
    return torch.div(offset, length, rounding_mode="floor"), cs[:-1][i_of_p] + offset % length


def kronecker_values(time_values: Tensor, space_values: Tensor, pattern: KroneckerPattern) -> Tensor:
    """Values ``(*batch, nnz_t·nnz_s)`` of ``Q_t ⊗ Q_s`` in the pattern's CSR order (differentiable).

    ``time_values (*batch_t, nnz_t)`` and ``space_values (*batch_s, nnz_s)``
    broadcast. Each entry is the product ``v_t[e_t]·v_s[e_s]`` exactly (one
    nonzero term per output of the run products; module docstring), so a
    symmetric pair of factors gives exactly symmetric values.
    """
    ct = pattern.time_pattern.crow.long()
    dtype = torch.promote_types(time_values.dtype, space_values.dtype)
    time_values, space_values = time_values.to(dtype), space_values.to(dtype)
    batch = torch.broadcast_shapes(time_values.shape[:-1], space_values.shape[:-1])
    parts = []
    for a0, a1, r in pattern.runs:
        _, s_seq = pattern.sequences[r]
        rows = time_values[..., int(ct[a0]) : int(ct[a1])].reshape(*time_values.shape[:-1], a1 - a0, r)
        expanded = space_values[..., s_seq].unsqueeze(-2) * pattern.mask(r, dtype)  # (*batch_s, r, K)
        block = torch.matmul(rows, expanded)  # (*batch, a1 − a0, K)
        parts.append(block.reshape(*block.shape[:-2], -1).expand(*batch, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def kronecker_positions(pattern: KroneckerPattern, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """Positions in the values of ``Q_t ⊗ Q_s`` of entries ``(row, col)`` (any shape), and a mask of those stored.

    From the factor patterns' own lookups (their size, not the Kronecker
    product's); missing entries get position 0 and ``False``.
    """
    n_s = pattern.num_space
    row, col = row.long(), col.long()
    a, i = torch.div(row, n_s, rounding_mode="floor"), row % n_s
    b, j = torch.div(col, n_s, rounding_mode="floor"), col % n_s
    pt, ft = pattern.time_pattern.positions(a, b)
    ps, fs = pattern.space_pattern.positions(i, j)
    ct, cs = pattern.time_pattern.crow.long(), pattern.space_pattern.crow.long()
    r_a = ct[a + 1] - ct[a]
    l_i = cs[i + 1] - cs[i]
    pos = ct[a] * pattern.space_pattern.nnz + r_a * cs[i] + (pt - ct[a]) * l_i + (ps - cs[i])
    found = ft & fs
    return torch.where(found, pos, torch.zeros_like(pos)), found


def _entry_tables_in_order(pattern: KroneckerPattern, transposed: bool):
    """Iterate ``(start, stop, value)`` over CSR chunks, ``value`` the int64 position table of the entries."""
    t1, t2, t3, s1, s2, s3 = pattern.tables()
    if transposed:
        tp_t, tp_s = pattern.time_pattern.transpose_perm, pattern.space_pattern.transpose_perm
        t1, t2, t3 = t1[tp_t], t2[tp_t], t3[tp_t]
        s1, s2, s3 = s1[tp_s], s2[tp_s], s3[tp_s]
    ct = pattern.time_pattern.crow.long()
    nnz_s = pattern.space_pattern.nnz
    for a_start, a_stop, r in pattern.runs:
        b_seq, s_seq = pattern.sequences[r]
        width = r * nnz_s
        step = max(1, _CHUNK // max(width, 1))
        sa, sb, sc = s1[s_seq], s2[s_seq], s3[s_seq]
        for c0 in range(a_start, a_stop, step):
            c1 = min(a_stop, c0 + step)
            e_t = (ct[c0:c1].unsqueeze(-1) + b_seq.unsqueeze(0)).reshape(-1, b_seq.numel())  # (c, K)
            value = t1[e_t] + t2[e_t] * sa + t3[e_t] * sb + sc
            yield int(ct[c0]) * nnz_s, int(ct[c1]) * nnz_s, value


def kronecker_transpose_perm(pattern: KroneckerPattern) -> Tensor:
    """The transposition permutation of ``Q_t ⊗ Q_s`` (``SparsityPattern.transpose_perm``), from the factors'.

    ``perm[pos(e_t, e_s)] = pos(p_t[e_t], p_s[e_s])`` with the factors'
    permutations ``p_t, p_s``: O(nnz) without the sort of the generic path.
    """
    out = torch.empty(pattern.nnz, dtype=torch.long, device=pattern.device)
    for start, stop, value in _entry_tables_in_order(pattern, transposed=True):
        out[start:stop] = value.reshape(-1)
    return out


def kronecker_diagonal_positions(pattern: KroneckerPattern) -> Tensor:
    """``(N,)`` int64 positions of the diagonal entries of ``Q_t ⊗ Q_s`` (``-1`` where a factor has none)."""
    t1, t2, t3, s1, s2, s3 = pattern.tables()
    dt = pattern.time_pattern.diagonal_positions
    ds = pattern.space_pattern.diagonal_positions
    ok_t, ok_s = dt >= 0, ds >= 0
    dt, ds = dt.clamp_min(0), ds.clamp_min(0)
    pos = t1[dt].unsqueeze(-1) + t2[dt].unsqueeze(-1) * s1[ds] + t3[dt].unsqueeze(-1) * s2[ds] + s3[ds]
    pos = torch.where(ok_t.unsqueeze(-1) & ok_s, pos, torch.full_like(pos, -1))
    return pos.reshape(-1)


def face_split_structure(
    time_pattern: SparsityPattern, space_pattern: SparsityPattern
) -> tuple[SparsityPattern, Tensor, Tensor]:
    r"""Pattern of the row-wise Kronecker product ``W = W_t ⊙ W_s`` of an ``m × n_t`` and an ``m × n_s`` pattern.

    Row ``r`` of ``W`` holds ``W_t[r, a] W_s[r, i]`` at column ``a·n_s + i``
    for every stored ``(r, a)`` and ``(r, i)``. Returns the ``m × (n_t·n_s)``
    pattern and the int64 entry maps ``time_entry, space_entry`` with
    ``values = w_t[..., time_entry] * w_s[..., space_entry]``.

    Raises
    ------
    ValueError
        Patterns with different numbers of rows.
    """
    m = time_pattern.size[0]
    if space_pattern.size[0] != m:
        raise ValueError(
            f"a row-wise Kronecker product needs factors with as many rows, got {m} and {space_pattern.size[0]}"
        )
    device = space_pattern.device
    n_s = space_pattern.size[1]
    ct, cs = time_pattern.crow.long(), space_pattern.crow.long()
    lt, ls = ct[1:] - ct[:-1], cs[1:] - cs[:-1]
    counts = lt * ls
    row = torch.repeat_interleave(torch.arange(m, device=device), counts)
    crow = torch.zeros(m + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=crow[1:])
    offset = torch.arange(row.numel(), device=device) - crow[:-1][row]
    length = ls[row]
    time_entry = ct[:-1][row] + torch.div(offset, length, rounding_mode="floor")
    space_entry = cs[:-1][row] + offset % length
    col = time_pattern.col.long()[time_entry] * n_s + space_pattern.col.long()[space_entry]
    pattern = SparsityPattern(crow, col, (m, time_pattern.size[1] * n_s))
    return pattern, time_entry, space_entry


# ---------------------------------------------------------------------------
# Matrix-free posterior precision P = Q_t ⊗ Q_s + Wᵀ diag(w) W
# ---------------------------------------------------------------------------


def kronecker_apply(
    time_values: Tensor, time_pattern: SparsityPattern, space_values: Tensor, space_pattern: SparsityPattern, x: Tensor
) -> Tensor:
    """``(Q_t ⊗ Q_s) x = vec(Q_s X Q_tᵀ)`` for unbatched values and ``x`` ``(N, k)``: two factor SpMMs, no autograd."""
    n_t, n_s, k = time_pattern.size[0], space_pattern.size[0], x.shape[-1]
    xs = x.reshape(n_t, n_s, k).transpose(0, 1).reshape(1, n_s, n_t * k)
    ys = spmm(space_values.reshape(1, -1), space_pattern, xs)
    yt = ys.reshape(n_s, n_t, k).transpose(0, 1).reshape(1, n_t, n_s * k)
    return spmm(time_values.reshape(1, -1), time_pattern, yt).reshape(n_t * n_s, k)


def kronecker_bilinear(
    time_values: Tensor,
    time_pattern: SparsityPattern,
    space_values: Tensor,
    space_pattern: SparsityPattern,
    left: Tensor,
    right: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""Value gradients of ``Σ_c left_cᵀ (Q_t ⊗ Q_s) right_c`` for unbatched factors, ``left, right`` ``(N, c)``.

    ``∂/∂Q_t[a, b] = Σ_{i,c} L[(a, i), c] ((I ⊗ Q_s) R)[(b, i), c]`` and
    ``∂/∂Q_s[i, j] = Σ_{a,c} L[(a, i), c] ((Q_t ⊗ I) R)[(a, j), c]``: a
    sampled product on each factor pattern (symmetrised for symmetric patterns).
    """
    n_t, n_s, c = time_pattern.size[0], space_pattern.size[0], left.shape[-1]
    right4 = right.reshape(n_t, n_s, c)
    space_applied = spmm(space_values.reshape(1, -1), space_pattern, right4.transpose(0, 1).reshape(1, n_s, n_t * c))
    space_applied = space_applied.reshape(n_s, n_t, c).transpose(0, 1).reshape(1, n_t, n_s * c)
    time_applied = spmm(time_values.reshape(1, -1), time_pattern, right.reshape(1, n_t, n_s * c))
    time_applied = time_applied.reshape(n_t, n_s, c).transpose(0, 1).reshape(1, n_s, n_t * c)
    left_time = left.reshape(1, n_t, n_s * c)
    left_space = left.reshape(n_t, n_s, c).transpose(0, 1).reshape(1, n_s, n_t * c)
    grad_t = values_grad(time_pattern, left_time, space_applied).reshape(-1)
    grad_s = values_grad(space_pattern, left_space, time_applied).reshape(-1)
    return grad_t, grad_s


class KroneckerPosterior:
    r"""``P = Q_t ⊗ Q_s + Wᵀ diag(w) W`` as a matvec on ``(1, N, k)`` blocks (detached, unbatched values).

    One product costs a space SpMM on ``(n_s, n_t·k)``, a time SpMM on
    ``(n_t, n_s·k)``, two block transpositions and ``W``/``Wᵀ`` products on
    the ``m`` observation rows: nothing of the size of ``nnz(Q_t)·nnz(Q_s)``.
    """

    def __init__(self, time_values, time_pattern, space_values, space_pattern, interp_values, interp_pattern, weights):
        self.time_values, self.time_pattern = time_values.detach(), time_pattern
        self.space_values, self.space_pattern = space_values.detach(), space_pattern
        self.interp_values, self.interp_pattern = interp_values.detach().reshape(1, -1), interp_pattern
        self.interp_values_t = self.interp_values[..., interp_pattern.transpose_perm]
        self.weights = weights.detach().reshape(-1, 1)
        n_t, n_s = time_pattern.size[0], space_pattern.size[0]
        self.size = n = n_t * n_s
        # I ⊗ Q_s as one block-diagonal CSR matrix (the pattern's cached block layout): the space
        # product then runs on the time-major vector without transposing it.
        crow, col = space_pattern.block_diagonal(n_t)
        values = self.space_values.reshape(1, -1).expand(n_t, -1).reshape(-1)
        self._space = csr_tensor(crow, col, values, (n, n))

    def matvec(self, x: Tensor) -> Tensor:
        """``P x`` for ``x`` ``(1, N, k)``."""
        n_t, k = self.time_pattern.size[0], x.shape[-1]
        flat = x.reshape(self.size, k)
        space = torch.empty_like(flat)
        torch.addmm(space, self._space, flat, beta=0.0, out=space)
        y = spmm(self.time_values.reshape(1, -1), self.time_pattern, space.reshape(1, n_t, -1)).reshape(1, self.size, k)
        wx = spmm(self.interp_values, self.interp_pattern, x)
        wx = wx * self.weights
        return y.add_(spmm(self.interp_values_t, self.interp_pattern.transposed, wx))

    def diagonal(self) -> Tensor:
        """``diag P`` ``(N,)``: ``diag Q_t ⊗ diag Q_s + Σ_r w_r W[r, j]²``."""
        dt = self.time_values[self.time_pattern.diagonal_positions]
        ds = self.space_values[self.space_pattern.diagonal_positions]
        diagonal = (dt.unsqueeze(-1) * ds).reshape(-1)
        w = self.interp_values[0]
        contrib = w * w * self.weights[:, 0][self.interp_pattern.row]
        return diagonal.index_add(0, self.interp_pattern.col_long, contrib)


def time_block_structure(time_interp: SparsityPattern, space_interp: SparsityPattern, space_pattern: SparsityPattern):
    """Index structure of the time-diagonal blocks ``P_aa = Q_t[a, a] Q_s + Σ_r W_t[r, a]² w_r W_s[r]ᵀ W_s[r]``.

    Returns ``(block_pattern, position_q, position_g, time_entry, pair_left, pair_right, pair_row, block_target)``:
    the ``n_s × n_s`` pattern of every block (``Q_s``'s, merged with the space Gram's when
    needed), the positions there of ``Q_s``'s entries and of the space Gram's, and for every
    (time entry of ``W_t``, pair of entries of the same row of ``W_s``) contribution its time
    entry, the pair and its row, and its flat target ``a·nnz_block + position``.
    """
    gram_pattern, pair_left, pair_right, pair_row, target = gram_structure(space_interp)
    block_pattern, position = space_pattern.union(gram_pattern)
    position_q, position_g = position[: space_pattern.nnz], position[space_pattern.nnz :]
    ct = time_interp.crow.long()
    per_pair = (ct[1:] - ct[:-1])[pair_row]  # time entries of each pair's row
    pair = torch.repeat_interleave(torch.arange(pair_row.numel(), device=pair_row.device), per_pair)
    offset = torch.arange(pair.numel(), device=pair.device) - torch.repeat_interleave(
        torch.cumsum(per_pair, 0) - per_pair, per_pair
    )
    time_entry = ct[pair_row[pair]] + offset
    knot = time_interp.col_long[time_entry]
    block_target = knot * block_pattern.nnz + position_g[target[pair]]
    return block_pattern, position_q, time_entry, pair_left[pair], pair_right[pair], pair_row[pair], block_target


def time_block_values(
    structure,
    time_values: Tensor,
    time_pattern: SparsityPattern,
    space_values: Tensor,
    time_interp_values,
    space_interp_values,
    weights,
) -> Tensor:
    """``(n_t, nnz_block)`` values of the time-diagonal blocks of ``P`` (``time_block_structure``), detached."""
    block_pattern, position_q, time_entry, left, right, row, block_target = structure
    n_t = time_pattern.size[0]
    dt = time_values[time_pattern.diagonal_positions].detach()
    values = space_values.new_zeros(n_t, block_pattern.nnz)
    values[:, position_q] = dt.unsqueeze(-1) * space_values.detach()
    wt = time_interp_values.detach()[time_entry]
    contrib = wt * wt * weights.detach()[row] * space_interp_values.detach()[left] * space_interp_values.detach()[right]
    return values.reshape(-1).index_add(0, block_target, contrib).reshape(n_t, block_pattern.nnz)


class TimeBlockPreconditioner(Preconditioner):
    """``M = blockdiag_a(P_aa)`` over the time knots, each block factorised exactly (one batched preconditioner).

    ``C = blockdiag(C_a)`` from a batched preconditioner of batch ``(n_t,)`` on
    the ``n_s × n_s`` blocks (CHOLMOD's ``CholeskyPreconditioner``); applies
    reshape ``(*b, N, k)`` to ``(n_t, n_s, k)`` blocks; ``log det M = Σ_a log det P_aa``.
    """

    def __init__(self, blocks: Preconditioner, num_times: int, num_space: int):
        self._blocks, self._n_t, self._n_s = blocks, num_times, num_space

    @property
    def size(self) -> int:
        return self._n_t * self._n_s

    @property
    def device(self) -> torch.device:
        return self._blocks.device

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks.dtype

    def logdet(self) -> Tensor:
        return self._blocks.logdet().sum().to(self.dtype)

    def to(self, device=None, dtype=None) -> TimeBlockPreconditioner:
        return TimeBlockPreconditioner(self._blocks.to(device=device, dtype=dtype), self._n_t, self._n_s)

    def _blockwise(self, r: Tensor, apply) -> Tensor:
        *batch, n, k = r.shape
        blocks = r.reshape(-1, self._n_t, self._n_s, k).movedim(0, -2).reshape(self._n_t, self._n_s, -1)
        out = apply(blocks.contiguous())
        return out.reshape(self._n_t, self._n_s, -1, k).movedim(-2, 0).reshape(*batch, n, k)

    def _solve(self, r: Tensor) -> Tensor:
        return self._blockwise(r, self._blocks._solve)

    def _apply_inv_factor(self, r: Tensor) -> Tensor:
        return self._blockwise(r, self._blocks._apply_inv_factor)

    def _apply_inv_factor_t(self, r: Tensor) -> Tensor:
        return self._blockwise(r, self._blocks._apply_inv_factor_t)


class MatrixFreeSplit:
    """``Ã = C⁻¹ P C⁻ᵀ`` for a matvec and a fixed preconditioner (the interface of ``gpsparse.core.slq``)."""

    def __init__(self, matvec, preconditioner: Preconditioner | None):
        self.matvec_a, self.precond = matvec, preconditioner

    def matvec(self, x: Tensor) -> Tensor:
        if self.precond is None:
            return self.matvec_a(x)
        return self.precond.apply_inv_factor(self.matvec_a(self.precond.apply_inv_factor_t(x)))

    def to_original(self, x: Tensor) -> Tensor:
        return x if self.precond is None else self.precond.apply_inv_factor_t(x)

    def logdet(self, num: int, dtype, device) -> Tensor:
        if self.precond is None:
            return torch.zeros(num, dtype=dtype, device=device)
        return self.precond.logdet().reshape(-1).expand(num).to(dtype)
