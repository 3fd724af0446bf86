"""Probe-parallel scaling (issue 16, item 5): 1, 2 and 4 gloo processes on this machine's CPU cores.

Workloads, each timed per step (median of ``--repeats`` steps after one warm-up step, the slowest
rank's time; 1 torch/numba thread per process):

* ``logdet``: ``gpsparse.logdet`` forward + backward of a 2-D lattice precision (5-point
  ``κ²I + L``, ``side²`` nodes), 16 probes × 64 Lanczos steps, adjoint gradients;
* ``mll``: one stock GPyTorch step ``-ExactMarginalLogLikelihood(model(x), y).backward()`` of a
  ``ScaleKernel(LatticeMaternKernel)`` model (``grid²`` nodes, ``n`` observations; the estimator
  road of ``log det P − log det Q``, 16 probes in 4 groups).

Every rank's estimate is also compared with the single-process one (relative difference printed).
Communication per step: the fingerprint/values checksums (a few dozen bytes), the gathered estimates,
and one all-reduce of the values gradient (``nnz`` doubles) per estimate.

    python benchmarks/distributed_benchmark.py [--ranks 1 2 4] [--side 400] [--grid 200] [--n 20000]

Writes benchmarks/results/distributed_cpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lattice(side: int):
    import scipy.sparse as sp
    import torch

    lap1 = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(side, side))
    eye = sp.identity(side)
    A = (sp.kron(lap1, eye) + sp.kron(eye, lap1) + 0.01 * sp.identity(side * side)).tocoo()
    indices = torch.tensor(__import__("numpy").vstack([A.row, A.col]), dtype=torch.int64)
    return indices, torch.tensor(A.data, dtype=torch.float64), (side * side, side * side)


def logdet_step(args):
    import torch

    import gpsparse

    indices, values, shape = _lattice(args.side)

    def step():
        v = values.clone().requires_grad_(True)
        A = torch.sparse_coo_tensor(indices, v, shape, check_invariants=False)
        est = gpsparse.logdet(A, num_probes=16, num_lanczos=64, generator=torch.Generator().manual_seed(0))
        est.backward()
        return float(est)

    return step


def mll_step(args):
    import gpytorch
    import torch

    import gpsparse

    torch.manual_seed(0)
    x = torch.rand(args.n, 2, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(args.n, dtype=torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            lattice = gpsparse.kernels.LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], [args.grid, args.grid])
            self.covar_module = gpytorch.kernels.ScaleKernel(lattice)

        def forward(self, t):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(t), self.covar_module(t))

    model = GP().double()
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

    def step():
        model.zero_grad()
        with gpsparse.settings.logdet_defaults(num_probes=16, large_size=0):
            torch.manual_seed(1)  # the same probes at every step and on every rank
            loss = -mll(model(x), y)
        loss.backward()
        return float(loss)

    return step


WORKLOADS = {"logdet": logdet_step, "mll": mll_step}


def _worker(rank: int, world: int, directory: str, args) -> None:
    import contextlib
    import warnings

    import numba
    import torch
    import torch.distributed as dist

    import gpsparse

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    results = {}
    with gpsparse.distributed.probe_parallel() if world > 1 else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.workloads:
            step = WORKLOADS[name](args)
            value = step()  # warm-up: patterns, numba, preconditioner structure
            times = []
            for _ in range(args.repeats):
                if world > 1:
                    dist.barrier()
                start = time.perf_counter()
                value = step()
                times.append(time.perf_counter() - start)
            results[name] = {"value": value, "median_s": statistics.median(times), "times": times}
    Path(directory, f"rank{rank}.json").write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args) -> dict:
    import torch.multiprocessing as mp

    directory = tempfile.mkdtemp()
    if world == 1:
        _worker(0, 1, directory, args)
    else:
        mp.start_processes(_worker, args=(world, directory, args), nprocs=world, start_method="spawn")
    ranks = [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        name: {
            "median_s": max(r[name]["median_s"] for r in ranks),
            "values": [r[name]["value"] for r in ranks],
        }
        for name in args.workloads
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--side", type=int, default=400)
    parser.add_argument("--grid", type=int, default=200)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_cpu")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    load = os.getloadavg()
    rows = []
    baseline = {}
    for world in args.ranks:
        result = run(world, args)
        for name, r in result.items():
            baseline.setdefault(name, (r["median_s"], r["values"][0]))
            t1, v1 = baseline[name]
            spread = max(abs(v - v1) / abs(v1) for v in r["values"])
            row = {"workload": name, "ranks": world, "step_s": r["median_s"], "speedup": t1 / r["median_s"]}
            row["max_rel_diff_vs_first"] = spread
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"# Probe-parallel scaling (gloo, CPU)\n\nMachine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; 1 thread per process; load average before the run {load[0]:.2f} "
        f"(1 min), {load[1]:.2f} (5 min). logdet: {args.side}² lattice, 16 probes × 64 steps, adjoint, "
        f"fwd + bwd; mll: {args.grid}² LatticeMaternKernel, {args.n} observations, 16 probes, stock "
        "ExactMarginalLogLikelihood step. Step time: median of "
        f"{args.repeats} after a warm-up, slowest rank.\n\n"
        "| workload | ranks | step (s) | speed-up vs 1 rank | max relative difference of the value vs the first row |\n"
        "|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['workload']} | {r['ranks']} | {r['step_s']:.2f} | {r['speedup']:.2f} "
        f"| {r['max_rel_diff_vs_first']:.1e} |"
        for r in rows
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "loadavg": load, "args": vars(args)}, default=str)
    )


if __name__ == "__main__":
    main()
