"""Collectives of probe-parallel runs, and the one autograd Function that crosses processes.

A probe-parallel estimate is a function of column blocks: rank ``r`` of ``R``
computes the outputs of its own probes / right-hand-side columns,
``y_r = f_r(v, b)`` (``(..., c_r)``), from the values ``v`` and the dense
operand ``b`` that every rank holds identically. ``GatherColumns`` returns
their concatenation ``y = [y_0 ⋯ y_{R−1}]`` (``(..., Σ c_r)``) on every rank,
and its backward is

    ∂L/∂v = Σ_r (∂y_r/∂v)ᵀ ḡ_r,   ḡ_r = (∂L/∂y)[..., block r],

with each term computed on its own rank from its local graph and summed by
one all-reduce (likewise ∂L/∂b). Every rank then holds the full gradient of the
values, so the rest of the model's backward (kernel hyperparameters → values)
runs locally and identically on every rank, and an optimiser step keeps the
ranks in agreement without further communication.

This requires every rank to call the same operations in the same order (each
``forward`` and ``backward`` issues collectives): probe-parallel is *not*
data-parallel; every rank runs the same model on the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core.config import ProbePartition

__all__ = ["GatherColumns", "gather_columns", "all_gather_rows", "all_reduce_sum", "check_backend"]


def check_backend(partition: ProbePartition, device: torch.device) -> None:
    """NCCL communicates CUDA tensors only: refuse CPU operands with a clear error."""
    if partition.backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"probe-parallel run on an NCCL process group with operands on {device}: NCCL needs CUDA tensors "
            "(move the model and data to this rank's GPU, or use a gloo group on CPU)"
        )


def _wire(tensor: Tensor, partition: ProbePartition) -> Tensor:
    """The tensor on the device the backend communicates from (CUDA for NCCL; the CPU for gloo and others)."""
    check_backend(partition, tensor.device)
    device = tensor.device if partition.backend == "nccl" else torch.device("cpu")
    return tensor.detach().to(device).contiguous()


def all_reduce_sum(tensor: Tensor, partition: ProbePartition) -> Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device; the input is not modified)."""
    out = _wire(tensor, partition).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=partition.group)
    return out.to(tensor.device)


def all_gather_rows(tensor: Tensor, partition: ProbePartition) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), in rank order, on ``tensor``'s device."""
    wire = _wire(tensor, partition)
    parts = [torch.empty_like(wire) for _ in range(partition.world_size)]
    dist.all_gather(parts, wire, group=partition.group)
    return [part.to(tensor.device) for part in parts]


def _gather_blocks(local: Tensor, widths: list[int], partition: ProbePartition) -> Tensor:
    """Concatenate every rank's ``(..., c_r)`` block along the last dimension (padded to the widest)."""
    widest = max(max(widths), 1)
    padded = local.new_zeros(*local.shape[:-1], widest)
    padded[..., : local.shape[-1]] = local.detach()
    parts = all_gather_rows(padded, partition)
    return torch.cat([part[..., :w] for part, w in zip(parts, widths)], -1)


class GatherColumns(Function):
    """``[f_0(v, b) ⋯ f_{R−1}(v, b)]`` on every rank; backward sums the ranks' local gradients (module docstring).

    ``local`` maps the (detached, re-leafed) inputs to a tuple of tensors
    ``(..., c_r^{(j)})``; ``widths[j]`` lists ``c_r^{(j)}`` for every rank ``r``
    (known in advance, so no extra collective). Inputs that are None stay None.
    """

    @staticmethod
    def forward(
        ctx: Any,
        partition: ProbePartition,
        local: Callable[..., tuple[Tensor, ...]],
        widths: tuple[tuple[int, ...], ...],
        *inputs: Tensor | None,
    ):
        leaves = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad():
            outputs = local(*leaves)
        ctx.partition, ctx.widths, ctx.leaves, ctx.outputs = partition, widths, leaves, outputs
        ctx.anchor = next((x for x in inputs if x is not None), None)
        ctx.needs = [x is not None and x.requires_grad for x in inputs]
        return tuple(_gather_blocks(out, list(w), partition) for out, w in zip(outputs, widths))

    @staticmethod
    @first_order_only("a probe-parallel estimate (gpsparse.distributed)")
    def backward(ctx: Any, *grads: Tensor):
        partition, rank = ctx.partition, ctx.partition.rank
        pairs = []
        for out, grad, widths in zip(ctx.outputs, grads, ctx.widths):
            start = sum(widths[:rank])
            if out.requires_grad and out.numel():
                pairs.append((out, grad[..., start : start + widths[rank]]))
        wanted = [leaf for leaf, need in zip(ctx.leaves, ctx.needs) if need]
        local = [None] * len(wanted)
        if pairs and wanted:
            local = list(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        results, it = [], iter(local)
        for leaf, need in zip(ctx.leaves, ctx.needs):
            if not need:
                results.append(None)
                continue
            grad = next(it)
            grad = torch.zeros_like(leaf) if grad is None else grad
            results.append(all_reduce_sum(grad, partition))  # every rank takes part, with or without a graph
        ctx.outputs = ctx.leaves = None
        return (None, None, None, *results)


def gather_columns(
    partition: ProbePartition,
    local: Callable[..., tuple[Tensor, ...]],
    widths: tuple[tuple[int, ...], ...],
    *inputs: Tensor | None,
) -> tuple[Tensor, ...]:
    """``GatherColumns.apply`` with a plain tuple result (see ``GatherColumns``)."""
    return tuple(GatherColumns.apply(partition, local, widths, *inputs))
