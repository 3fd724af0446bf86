"""Probe-parallel estimators across processes, through ``torch.distributed``.

Inside ``with gpsparse.distributed.probe_parallel():`` every Krylov-road
estimate of gpsparse — the SLQ / Hutchinson log-determinant and the inverse
quadratic terms beside it (``gpsparse.logdet``, ``gpsparse.inv_quad_logdet``,
the operators' ``inv_quad_logdet`` that GPyTorch's marginal likelihood calls),
the common-random-number difference ``log det P − log det Q`` of the noisy
sparse-precision covariances, and the columns of multi-column Krylov solves —
splits its probes (and right-hand-side columns) across the ranks of an
initialised process group (gloo on CPU, NCCL on GPUs), and combines the
results by collectives:

* **the same objective as one process**: the ``p`` probes are drawn on every
  rank from the same generator stream (torch's global generator, or the one
  passed), exactly as one process would draw them; rank ``r`` of ``R`` takes
  the contiguous block ``torch.tensor_split(arange(p), R)[r]``; the estimate is
  ``Σ_r (p_r/p) · (rank r's mean)`` and the inverse quadratic terms are
  gathered. Each probe's Lanczos run and each CG column is independent of the
  others, so the estimate and its gradient equal the single-process ones to
  rounding (tested to 1e-12 in float64 with 2 gloo processes);
* **gradients**: the values gradient is summed over the ranks by one
  all-reduce in the backward, so every rank ends the backward with the full
  gradient of every hyperparameter and an unchanged optimiser keeps the ranks'
  parameters identical;
* **checks**: before each split estimate the ranks compare a fingerprint of the
  problem (size, pattern, probes, columns, dtype, device type) and a checksum
  of the values, and all raise ``ValueError`` naming what differs.

Exact roads (banded, CHOLMOD, dense) are not split: each rank runs them whole.
This is probe parallelism, not data parallelism: every rank runs the same model
on the same data and the same training loop, and must call every estimate (each
one communicates). Memory: each rank draws the full ``(n, p)`` probe block (to
keep the single-process stream) and keeps Krylov work for its own ``p/R``
probes.

Launch (one process per CPU socket or per GPU)::

    torchrun --nproc-per-node 2 train.py

with, in ``train.py``::

    import torch, torch.distributed as dist, gpytorch, gpsparse
    dist.init_process_group("gloo")           # "nccl" with one GPU per rank
    torch.manual_seed(0)                      # the same probes on every rank
    model, likelihood = ...                   # identical on every rank
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with gpsparse.distributed.probe_parallel():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -mll(model(train_x), train_y)
            loss.backward()
            optimizer.step()

Row-partitioned operators (one matrix spread over several devices) are not
built; ``docs/distributed.md`` gives the design and the measured halo volume.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist

from gpsparse import settings
from gpsparse.core.config import ProbePartition

__all__ = ["probe_parallel", "partition_of"]


def partition_of(group=None) -> ProbePartition:
    """This process's ``ProbePartition`` in ``group`` (None: the default group).

    Raises
    ------
    RuntimeError
        ``torch.distributed`` is not available or no process group is initialised.
    ValueError
        This process is not a member of ``group``.
    """
    if not dist.is_available():
        raise RuntimeError("probe_parallel needs torch.distributed, which this torch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError(
            "probe_parallel needs an initialised process group: call torch.distributed.init_process_group "
            "(e.g. 'gloo' on CPU, 'nccl' on GPUs; launch with torchrun) first"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group given to probe_parallel")
    return ProbePartition(
        group=group, rank=rank, world_size=dist.get_world_size(group), backend=dist.get_backend(group)
    )


@contextmanager
def probe_parallel(group=None):
    """Split gpsparse's Krylov-road probes and right-hand-side columns across the ranks of ``group``.

    See the module docstring for what is split, the guarantees and the launch.
    ``group`` is a ``torch.distributed`` process group (None: the default
    group). With one rank the block changes nothing.

    Examples
    --------
    >>> import torch.distributed as dist, gpsparse
    >>> dist.is_initialized()  # no process group here: probe_parallel() would raise RuntimeError
    False
    """
    partition = partition_of(group)
    with settings.probe_partition(partition):
        yield partition
