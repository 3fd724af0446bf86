"""Laplace approximation (issue 14): objective + gradient on a 2-D lattice Poisson model, with warm starts.

``LaplaceGP`` with ``ScaleKernel(LatticeMaternKernel)`` (d = 2, α = 2: a 13-point precision) on an
m × m lattice over [−0.1, 1.1]² (N = m² latent nodes; 316² ≈ 10⁵, 1000² = 10⁶), 8 cells per
lengthscale, N Poisson counts at uniform random points with log-rate ``1 + sin(6x)cos(4y)``,
float64, ``LaplaceMarginalLogLikelihood`` and the unchanged GPyTorch loop
``loss = -mll(model(x), y); loss.backward(); optimizer.step()`` (Adam, lr 0.05):

* step 0: cold start (Newton from x = 0);
* steps 1…k: warm start from the previous step's mode, hyperparameters moved by one Adam step.

Per step: Newton iterations, forward time (the Newton iterations: one CHOLMOD factorisation of
``P = Q + WᵀHW`` each, plus log det P from the last one), backward time (the selected inverse of P,
one solve, the gradient assembly and GPyTorch's own backward through the kernel), and the peak RSS
of the worker process during the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
the whole process, data and model included). One worker subprocess per size; torch, OpenMP and BLAS
limited to ``--threads`` (default 1); the load average is recorded (the machine is shared).

    python benchmarks/laplace_benchmark.py                                 # 10⁵ (CHOLMOD), 10⁶ (CHOLMOD, Krylov)
    python benchmarks/laplace_benchmark.py --cases 100:auto:2 316:auto:1   # a smoke run, ~1 min

Writes benchmarks/results/laplace.md and .json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # pragma: no cover - not Linux
        pass


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import gpytorch

    from gpsparse.kernels import LatticeMaternKernel
    from gpsparse.likelihoods import PoissonLikelihood
    from gpsparse.mlls import LaplaceMarginalLogLikelihood
    from gpsparse.models import LaplaceGP

    side = spec["side"]
    gen = torch.Generator().manual_seed(0)
    n = side * side
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    rate = torch.exp(1.0 + torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]))
    y = torch.poisson(rate, generator=gen)
    lattice = LatticeMaternKernel([[-0.1, -0.1], [1.1, 1.1]], side, alpha=2)
    lattice.lengthscale = 8 * lattice.spacing[0]
    model = LaplaceGP(
        x,
        y,
        PoissonLikelihood(),
        covar_module=gpytorch.kernels.ScaleKernel(lattice),
        road=spec["road"],
        num_probes=spec["probes"],
    )
    model = model.double()
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    out = {
        "side": side,
        "nodes": lattice.num_nodes,
        "observations": n,
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg()[0],
        "baseline_rss_mib": _peak_mib(),
        "rows": [],
    }
    for step in range(spec["steps"] + 1):
        _reset_peak()
        load = os.getloadavg()[0]
        optimizer.zero_grad()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        forward = time.perf_counter() - start
        iterations = mll.newton_iterations
        start = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - start
        peak = _peak_mib()
        optimizer.step()
        out["road"] = model.laplace_state.road
        out["rows"].append(
            {
                "step": step,
                "start": "cold" if step == 0 else "warm",
                "newton_iterations": iterations,
                "forward_s": forward,
                "backward_s": backward,
                "total_s": forward + backward,
                "peak_rss_mib": peak,
                "objective": -float(loss.detach()),
                "load": load,
            }
        )
        print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    return out


def render(results: list[dict], meta: dict) -> str:
    lines = [
        "# Laplace approximation: objective + gradient, 2-D lattice Poisson (issue 14)",
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['date']}; torch/BLAS threads per worker: "
        f"{meta['threads']}; load average at start {meta['load']:.2f} (shared machine). `LaplaceGP` with "
        "`ScaleKernel(LatticeMaternKernel(α = 2))`, N Poisson counts at random points, float64; step 0 cold "
        "(Newton from 0), later steps warm-started from the previous mode after one Adam step. Peak RSS: the "
        "worker process's `VmHWM` during the step (data, model and the process's baseline included).",
        "",
        "| latent nodes N | observations | road | step | start | Newton iterations | forward s | backward s "
        "| objective + gradient s | peak RSS MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['nodes']:,} | | {res['road']} | | failed: {res['error']} | | | | | | |")
            continue
        for row in res["rows"]:
            lines.append(
                f"| {res['nodes']:,} | {res['observations']:,} | {res['road']} | {row['step']} | {row['start']} | "
                f"{row['newton_iterations']} | {row['forward_s']:.2f} | {row['backward_s']:.2f} | "
                f"{row['total_s']:.2f} | {row['peak_rss_mib']:.0f} | {row['load']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["316:auto:3", "1000:auto:1", "1000:krylov:1"],
        help="side:road:warm_steps per case (N = side²; road auto = CHOLMOD where installed, or krylov)",
    )
    parser.add_argument("--probes", type=int, default=16, help="Rademacher probes of the Krylov road")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/laplace")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    results = []
    for case in args.cases:
        side, road, steps = case.split(":")
        side, steps = int(side), int(steps)
        spec = {"side": side, "steps": steps, "road": road, "threads": args.threads, "probes": args.probes}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
        )
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr else str(proc.returncode)
            res = {"nodes": side * side, "road": road, "error": tail}
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["worker_seconds"] = time.perf_counter() - start
        results.append(res)
        print(json.dumps(res), flush=True)
    import torch

    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg()[0],
    }
    text = render(results, meta)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
