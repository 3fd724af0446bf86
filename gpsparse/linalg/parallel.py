"""Probe-parallel Krylov roads: the dispatcher's estimators with probes and columns split across ranks.

When the frozen ``RoadConfig`` carries a ``ProbePartition`` (set by
``gpsparse.distributed.probe_parallel``), the dispatcher hands its Krylov-road
estimators here:

* ``inv_quad_logdet``: the ``p`` probes are drawn on every rank from the same
  generator stream (exactly the probes a single process would draw), rank ``r``
  takes the block ``P_r`` of ``tensor_split(arange(p), R)`` and the block of the
  ``k`` right-hand-side columns, and the estimate is the probe-weighted mean of
  the ranks' estimates, ``Σ_r (|P_r|/p) · mean_{i∈P_r} zᵢᵀ log(Ã) zᵢ`` — the
  single-process estimate, since every probe's Lanczos run (or CG column) is
  independent of the others. The inverse quadratic terms are gathered.
* ``logdet_difference``: the probe groups (whose spread gives the standard
  error) are split across the ranks; each group's difference is gathered.
* ``solve``: the right-hand-side columns are split (each CG column stops on its
  own, so the solution equals the single-process one).

Values gradients are summed over the ranks by one all-reduce in the backward
(``gpsparse.autograd.distributed``). Exact roads (banded, CHOLMOD, dense) are
not split: every rank runs them whole.

Before each split estimate the ranks compare a fingerprint of the problem (size,
pattern, probe count and probes, columns, dtype, device type) and a checksum of
the values; a disagreement raises ``ValueError`` on every rank (all ranks see
the same gathered fingerprints, so none is left waiting in a collective).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpsparse.autograd.distributed import all_gather_rows, gather_columns
from gpsparse.core.config import ProbePartition, share
from gpsparse.core.pattern import SparsityPattern

__all__ = ["check_agreement", "split_inv_quad_logdet", "split_groups", "split_solve"]

#: Relative tolerance of the values checksum comparison across ranks (values computed by the same code on
#: the same data agree bitwise on CPU; GPU atomics may differ in the last bits).
VALUES_RTOL = 1e-10

_FIELDS = ("rows", "columns", "stored entries", "pattern", "probes", "probe values", "columns", "dtype", "device type")


def _hash(tensor: Tensor) -> int:
    """An order-sensitive int64 hash of ``tensor``'s bits (wrapping arithmetic; identical tensors, identical hash)."""
    flat = tensor.detach().reshape(-1).contiguous()
    if flat.numel() == 0:
        return 0
    if flat.dtype.is_floating_point:
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        flat = flat.view(bits)
    flat = flat.to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) * 2654435761 + 97531
    return int((flat * weights).sum())


def _wrap(value: int) -> int:
    """``value`` reduced into the int64 range (two's complement)."""
    return (value + 2**63) % 2**64 - 2**63


def _pattern_hash(pattern: SparsityPattern) -> int:
    return pattern.derived("distributed.hash", lambda: _wrap(_hash(pattern.crow) * 31 + _hash(pattern.col)))


def check_agreement(
    partition: ProbePartition,
    pattern: SparsityPattern,
    values: Tensor,
    *,
    probes: Tensor | None = None,
    columns: int = 0,
    what: str,
) -> None:
    """Raise ``ValueError`` (on every rank) unless the ranks hold the same problem.

    Compared exactly: sizes, nnz, the pattern, the probes' shape and bits, the
    number of right-hand-side columns, dtype and device type; the values by
    checksums ``(Σv, Σ|v|, Σv²)`` to ``VALUES_RTOL``.
    """
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    fingerprint = [
        pattern.size[0],
        pattern.size[1],
        pattern.nnz,
        _pattern_hash(pattern),
        0 if probes is None else probes.shape[-1],
        0 if probes is None else _hash(probes),
        int(columns),
        dtypes.index(values.dtype) if values.dtype in dtypes else 99,
        0 if values.device.type == "cpu" else 1,
    ]
    device = values.device
    gathered = all_gather_rows(torch.tensor(fingerprint, dtype=torch.int64, device=device), partition)
    ranks = [g.tolist() for g in gathered]
    for field, column in zip(_FIELDS, zip(*ranks)):
        if len(set(column)) > 1:
            hint = (
                " — seed every rank's generator identically (torch.manual_seed on each rank, or the same "
                "torch.Generator state) so that all draw the same probes"
                if field == "probe values"
                else ""
            )
            raise ValueError(
                f"probe-parallel {what}: the ranks disagree on the {field} ({list(column)} by rank){hint}; every "
                "rank must run the same model on the same data (gpsparse.distributed is probe-parallel, not "
                "data-parallel)"
            )
    v = values.detach().to(torch.float64)
    sums = torch.stack([v.sum(), v.abs().sum(), v.pow(2).sum()])
    stacked = torch.stack(all_gather_rows(sums, partition))
    scale = stacked[:, 1:2].abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    spread = (stacked - stacked[0]).abs().max() / scale
    if not bool(spread <= VALUES_RTOL):
        raise ValueError(
            f"probe-parallel {what}: the ranks hold different matrix values (checksum spread {float(spread):.3g} "
            f"relative, above {VALUES_RTOL:g}); keep the models' parameters identical on every rank (same "
            "initialisation, same gradients: gpsparse sums the values gradient over the ranks)"
        )


def _widths(partition: ProbePartition, count: int) -> tuple[int, ...]:
    return tuple(
        stop - start for start, stop in (share(count, partition.world_size, r) for r in range(partition.world_size))
    )


def split_inv_quad_logdet(partition, local, values2d, rhs3d, probes, pattern: SparsityPattern):
    """The estimate ``(B,)`` and inverse quadratic terms ``(B, k)`` (None without ``rhs3d``) over all ranks.

    ``local(values2d, rhs_block, probe_block)`` returns ``(quad_block (B, k_r) or None, estimate (B,))``:
    the estimator on this rank's probes (mean over them) and columns.
    """
    p = probes.shape[-1]
    k = 0 if rhs3d is None else rhs3d.shape[-1]
    if p < partition.world_size:
        raise ValueError(
            f"probe-parallel log-determinant: {p} probes cannot be split across {partition.world_size} ranks; "
            "use at least as many probes as ranks (gpsparse.settings.logdet_defaults(num_probes=...))"
        )
    check_agreement(partition, pattern, values2d, probes=probes, columns=k, what="log-determinant")
    p0, p1 = partition.block(p)
    k0, k1 = partition.block(k)
    mine = probes[..., p0:p1]

    def run(values, rhs):
        rhs_block = None if rhs is None or k1 == k0 else rhs[..., k0:k1]
        quad, mean = local(values, rhs_block, mine)
        if rhs is None:
            return (mean.unsqueeze(-1),)
        return mean.unsqueeze(-1), (values.new_zeros(values.shape[0], 0) if quad is None else quad)

    probe_widths = _widths(partition, p)
    widths = ((1,) * partition.world_size,) + (() if rhs3d is None else (_widths(partition, k),))
    outputs = gather_columns(partition, run, widths, values2d, rhs3d)
    weights = torch.tensor([w / p for w in probe_widths], dtype=values2d.dtype, device=values2d.device)
    estimate = (outputs[0] * weights).sum(-1)
    return (None if rhs3d is None else outputs[1]), estimate


def split_groups(partition, local, values2d_list, pattern: SparsityPattern, probes: Tensor, num_groups: int):
    """Per-group results ``(B, G)``: rank ``r`` runs the groups of its block, ``local(values..., first, stop)``."""
    check_agreement(partition, pattern, values2d_list[0], probes=probes, what="log-determinant difference")
    g0, g1 = partition.block(num_groups)

    def run(*values):
        return (local(*values, g0, g1),)

    (per_group,) = gather_columns(partition, run, (_widths(partition, num_groups),), *values2d_list)
    return per_group


def split_solve(partition, local, values2d, rhs3d, pattern: SparsityPattern):
    """``A⁻¹ B`` ``(B, n, k)`` with the columns split across the ranks; ``local(values, rhs_block)`` solves a block."""
    k = rhs3d.shape[-1]
    check_agreement(partition, pattern, values2d, columns=k, what="solve")
    k0, k1 = partition.block(k)

    def run(values, rhs):
        if k1 == k0:  # more ranks than columns: nothing to solve here
            return (rhs.new_zeros(*rhs.shape[:-1], 0),)
        return (local(values, rhs[..., k0:k1]),)

    (solution,) = gather_columns(partition, run, (_widths(partition, k),), values2d, rhs3d)
    return solution
