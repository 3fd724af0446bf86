r"""Sums of sparse-precision covariances: block-diagonal precisions and side-by-side interpolations.

Independent Gaussian Markov random fields ``u_i ~ N(0, Q_i⁻¹)`` (``N_i``
nodes each) observed through ``W_i`` (m × N_i) add up to

$$
\sum_i W_i Q_i^{-1} W_i^\top = W Q^{-1} W^\top, \qquad
W = [W_1 \; W_2 \; \cdots \; W_k] \;(m × N), \qquad
Q = \operatorname{blockdiag}(Q_1, \dots, Q_k) \;(N × N),
$$

``N = Σ_i N_i``: the sum is again a sparse-precision covariance, on the
stacked nodes ``u = (u_1, …, u_k)``. So is its posterior precision
``P = Q + WᵀD⁻¹W`` (sparse; the off-diagonal blocks ``W_iᵀD⁻¹W_j`` couple
the components through the data), and the marginal likelihood and
predictions of an additive model go through the one sparse ``P``
(``gpsparse.operators.precision``). The helpers below build ``Q`` and
``W``; ``SparsePrecisionLinearOperator.__add__`` calls them and records the
node offsets ``(0, N_1, N_1 + N_2, …, N)`` of the components
(its ``components`` attribute).

*Log-determinants.* ``log det Q = Σ_i log det Q_i``: when every block
carries a closed form
([`KnownLogdetSparseLinearOperator`][gpsparse.operators.known_logdet.KnownLogdetSparseLinearOperator],
the lattice and graph kernels' precisions), the block diagonal is one too,
with the summed log-determinant (differentiable in each block's
parameters). When some block has none, the block diagonal is a plain
[`SparseLinearOperator`][gpsparse.SparseLinearOperator] whose ``log det``
goes through the general roads on the whole ``Q`` (exact where banded,
CHOLMOD or dense apply; else stochastic, with the same probes as ``P``).

*Caches.* The block pattern (offset CSR blocks) and the side-by-side
pattern of ``W`` are cached on the first block's pattern
(``SparsityPattern.derived``) by the identity of
all the block patterns, so repeated training steps with fixed patterns
(lattices, graphs, cached interpolations) build them once; only the value
concatenation (O(nnz), differentiable) runs per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["block_diagonal", "hstack_interpolations", "component_offsets", "restrict_columns"]

_CACHE_SIZE = 8


def block_diagonal(blocks: Sequence[SparseLinearOperator]) -> SparseLinearOperator:
    r"""``Q = blockdiag(Q_1, …, Q_k)`` as one sparse operator, ``(*batch, N, N)`` with ``N = Σ N_i``.

    Parameters
    ----------
    blocks : sequence of SparseLinearOperator
        Square blocks ``(*batch_i, N_i, N_i)`` of one dtype and device; batch
        shapes broadcast.

    Returns
    -------
    SparseLinearOperator
        Values ``cat(values_1, …, values_k)`` (gradients reach every block's
        values) on the offset-CSR pattern (symmetric when every block is);
        a ``KnownLogdetSparseLinearOperator`` with ``log det Q = Σ log det Q_i``
        when every block is one (module notes).

    Raises
    ------
    ValueError
        A non-square block, or mixed dtypes or devices.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("block_diagonal needs at least one block")
    first = blocks[0]
    for block in blocks:
        if not isinstance(block, SparseLinearOperator) or not block.pattern.is_square:
            raise ValueError("block_diagonal needs square SparseLinearOperator blocks")
        if block.dtype != first.dtype or block.device != first.device:
            raise ValueError("block_diagonal needs blocks of one dtype and device")
    if len(blocks) == 1:
        return first
    pattern = _cached(tuple(b.pattern for b in blocks), _block_pattern, "block_diagonal")
    batch = torch.broadcast_shapes(*(b.values.shape[:-1] for b in blocks))
    values = torch.cat([b.values.expand(*batch, b.pattern.nnz) for b in blocks], dim=-1)
    if all(isinstance(b, KnownLogdetSparseLinearOperator) for b in blocks):
        logdet = sum(b.known_logdet.expand(batch) for b in blocks)
        return KnownLogdetSparseLinearOperator(values, logdet, pattern=pattern)
    return SparseLinearOperator(values, pattern=pattern)


def hstack_interpolations(
    interps: Sequence[SparseLinearOperator | None], num_nodes: Sequence[int], num_rows: int, device, dtype
) -> SparseLinearOperator:
    """``W = [W_1 ⋯ W_k]`` (``num_rows × Σ N_i``), ``W_i`` None meaning the ``num_rows × num_rows`` identity.

    Gradients reach the values of every ``W_i``. The pattern is cached by the
    identity of the block patterns (module notes).
    """
    parts = []
    for W, n in zip(interps, num_nodes):
        if W is None:
            if n != num_rows:
                raise ValueError(f"an identity interpolation needs as many rows as nodes, got {num_rows} and {n}")
            W = _identity(n, device, dtype)
        if W.shape[-2] != num_rows:
            raise ValueError(f"interpolations with {W.shape[-2]} and {num_rows} rows cannot be stacked side by side")
        parts.append(W)
    if len(parts) == 1:
        return parts[0]
    pattern, order = _cached(tuple(W.pattern for W in parts), _hstack_pattern, "hstack")
    values = torch.cat([W.values for W in parts], dim=-1)[..., order]
    return SparseLinearOperator(values, pattern=pattern)


def component_offsets(components_a, nodes_a: int, components_b, nodes_b: int) -> tuple[int, ...]:
    """Node offsets of the flattened sum of two terms (each with its own offsets or one component)."""
    a = tuple(components_a) if components_a is not None else (0, nodes_a)
    b = tuple(components_b) if components_b is not None else (0, nodes_b)
    return a + tuple(nodes_a + o for o in b[1:])


def restrict_columns(W: SparseLinearOperator | None, start: int, stop: int, num_rows: int, dtype, device):
    """``W`` with its entries outside columns ``[start, stop)`` set to zero (same pattern; the identity if None).

    ``f_i = W_i u_i`` for the component on nodes ``[start, stop)``: keeping the
    pattern (zeros stored) lets the prediction's selected inverse and widened
    patterns be shared between the components and the total.
    """
    if W is None:
        W = _identity(num_rows, device, dtype)
    col = W.pattern.col_long
    mask = (col >= start) & (col < stop)
    return SparseLinearOperator(W.values * mask.to(W.values.dtype), pattern=W.pattern)


# -------------------------------------------------------------- patterns
def _cached(patterns: tuple[SparsityPattern, ...], build, name: str):
    """``build(patterns)`` cached on the first pattern by the identity of all (strong references kept)."""
    cache = patterns[0].derived(("block", name), dict)
    key = tuple(id(p) for p in patterns)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], patterns)):
        return hit[1]
    value = build(patterns)
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = (patterns, value)
    return value


def _block_pattern(patterns: tuple[SparsityPattern, ...]) -> SparsityPattern:
    crows, cols = [], []
    nnz = nodes = 0
    for p in patterns:
        crows.append(p.crow[:-1].long() + nnz)
        cols.append(p.col.long() + nodes)
        nnz += p.nnz
        nodes += p.size[0]
    crow = torch.cat([*crows, torch.tensor([nnz], device=patterns[0].device)])
    symmetric = all(p.symmetric for p in patterns)
    return SparsityPattern(crow, torch.cat(cols), (nodes, nodes), symmetric=symmetric)


def _hstack_pattern(patterns: tuple[SparsityPattern, ...]) -> tuple[SparsityPattern, Tensor]:
    rows, cols = [], []
    nodes = 0
    for p in patterns:
        rows.append(p.row)
        cols.append(p.col_long + nodes)
        nodes += p.size[1]
    return SparsityPattern.from_indices(torch.cat(rows), torch.cat(cols), (patterns[0].size[0], nodes))


_IDENTITY_PATTERNS: dict[tuple[int, str], SparsityPattern] = {}


def _identity(n: int, device, dtype) -> SparseLinearOperator:
    """The explicit ``n × n`` identity; its pattern is kept per size and device (so the stacked pattern caches)."""
    key = (n, str(device))
    pattern = _IDENTITY_PATTERNS.get(key)
    if pattern is None:
        if len(_IDENTITY_PATTERNS) >= _CACHE_SIZE:
            _IDENTITY_PATTERNS.pop(next(iter(_IDENTITY_PATTERNS)))
        index = torch.arange(n, device=device)
        pattern = _IDENTITY_PATTERNS[key] = SparsityPattern.from_indices(index, index, (n, n))[0]
    return SparseLinearOperator(torch.ones(n, dtype=dtype, device=device), pattern=pattern)
