"""Separable space–time model (issue 13, item 3): marginal likelihood + gradient at n_s × n_t ≥ 10⁶ latent nodes.

Model: ``ScaleKernel(SpaceTimeKernel(LatticeMaternKernel(unit square, m × m, α = 2), AR1Kernel(0 … n_t − 1)))``
— ``Q = Q_t ⊗ Q_s`` on ``N = m²·n_t`` nodes (13-point space stencil × tridiagonal time: 39 nonzeros per row
if materialised) — with a Gaussian likelihood, ``n`` observations at uniform random space–time points
(continuous times: ``W = W_t ⊙ W_s`` has 2 × 4 entries per row), space lengthscale 12 cells, ρ = 0.8,
σ² = 0.05. For each case the script runs, in a fresh subprocess with 1 torch thread, the GPyTorch
training step ``-ExactMarginalLogLikelihood(model(x), y).backward()`` twice: the first call (one-time
costs: the Kronecker and Gram patterns, numba kernels, the IC(0) shift search) and the second (every
later optimiser step); it records forward and forward+backward times, the peak RSS of the process
(``ru_maxrss``), the largest CG iteration count of the step, the loss and the five gradients.

Configurations (``SpaceTimeKernel(posterior=...)``):

* ``kronecker`` — the matrix-free road: ``P = Q_t ⊗ Q_s + WᵀD⁻¹W`` as a matvec from the factors, SLQ
  (Hutchinson gradients, gpsparse's large-size defaults: 4 probes) with the time-block IC(0)
  preconditioner; what ``posterior="auto"`` takes at these sizes;
* ``sparse`` — ``P`` materialised on ``Q``'s pattern through gpsparse's generic roads (the same
  large-size defaults: Hutchinson, 4 probes, IC(0) on ``P``; the quadratic term's CG unpreconditioned,
  gpsparse's default);
* ``exact-cholmod`` — ``P`` materialised, exact log-determinants and gradients by CHOLMOD
  (``logdet_defaults(method="cholesky")``): the reference for the relative error column.

    python benchmarks/space_time_benchmark.py [--cases 100x10:1e4 250x16:1e5 100x100:1e5] [--quick]

Writes benchmarks/results/space_time_cpu_1thread.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("exact-cholmod", "kronecker", "sparse")
#: largest N per configuration (above it the case is reported as skipped)
LIMITS = {"sparse": 200_000, "exact-cholmod": 200_000}
DEFAULT_CASES = ("100x10:1e4", "250x16:1e5", "100x100:1e5")


def parse_case(text: str) -> tuple[int, int, int]:
    grid, obs = text.split(":")
    m, n_t = grid.split("x")
    return int(m), int(n_t), int(float(obs))


def worker(spec: dict) -> dict:
    import gpytorch
    import torch

    import gpsparse
    import gpsparse.core.krylov as krylov
    from gpsparse.kernels import AR1Kernel, LatticeMaternKernel, SpaceTimeKernel

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    m, n_t, n = spec["m"], spec["n_t"], spec["n"]
    config = spec["config"]

    iterations = []
    cg = krylov.cg

    def counting_cg(*args, **kwargs):  # the cores are wrapped here; the library is not modified
        x, info = cg(*args, **kwargs)
        iterations.append(int(info.iterations))
        return x, info

    krylov.cg = counting_cg

    class Model(gpytorch.models.ExactGP):
        def __init__(self, x, y, kernel):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covar = kernel

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

    space = LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], m)
    time_kernel = AR1Kernel(torch.arange(float(n_t)))
    posterior = "kronecker" if config == "kronecker" else "sparse"
    kernel = gpytorch.kernels.ScaleKernel(SpaceTimeKernel(space, time_kernel, posterior=posterior))
    x = torch.cat([torch.rand(n, 2), (n_t - 1) * torch.rand(n, 1)], -1).double()
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) * torch.cos(0.3 * x[:, 2]) + 0.2 * torch.randn(n).double()
    model = Model(x, y, kernel).double()
    space.lengthscale = torch.tensor(12.0 / (m - 1), dtype=torch.float64)
    time_kernel.rho = 0.8
    model.likelihood.noise = torch.tensor(0.05, dtype=torch.float64)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    settings = gpsparse.settings.logdet_defaults(method="cholesky" if config == "exact-cholmod" else None)

    def step():
        model.zero_grad()
        iterations.clear()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        forward = time.perf_counter() - start
        loss.backward()
        return float(loss.detach()), forward, time.perf_counter() - start, max(iterations, default=0)

    with settings:
        _, _, first, _ = step()
        value, forward, total, its = step()
    return {
        "value": value,
        "first_s": first,
        "forward_s": forward,
        "total_s": total,
        "cg_iterations": its,
        "grads": [float(p.grad) for p in model.parameters()],
        "grad_names": [name for name, _ in model.named_parameters()],
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_case(spec: dict, timeout: float) -> dict:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; threads {threads}; "
        f"load average at start {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="m x n_t : observations")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--quick", action="store_true", help="the 100² × 10 case only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "space_time_cpu_1thread")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cases = [parse_case(c) for c in (DEFAULT_CASES[:1] if args.quick else args.cases)]
    rows, lines = [], [header(args.threads), ""]
    lines += [
        "| n_s × n_t = N | observations | configuration | −MLL / n | rel. error vs CHOLMOD | first fwd+bwd s "
        "| fwd s | fwd+bwd s | CG its | peak MiB | ∂ noise, mean, outputscale, ℓ, ρ (raw) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, n_t, n in cases:
        N = m * m * n_t
        exact = None
        for name in args.configs:
            label = f"{m}² × {n_t} = {N:,}"
            if N > LIMITS.get(name, math.inf):
                res = {"error": f"skipped above N = {LIMITS[name]:,}"}
            else:
                spec = {"m": m, "n_t": n_t, "n": n, "threads": args.threads, "config": name}
                res = run_case(spec, args.timeout)
            res.update(name=name, N=N, m=m, n_t=n_t, n=n)
            rows.append(res)
            if "error" in res:
                line = f"| {label} | {n:,} | {name} | — | — | — | — | — | — | — | {res['error']} |"
            else:
                if name == "exact-cholmod":
                    exact = res["value"]
                rel = (
                    "—" if exact is None or name == "exact-cholmod" else f"{abs(res['value'] - exact) / abs(exact):.1e}"
                )
                grads = ", ".join(f"{g:.4g}" for g in res["grads"])
                line = (
                    f"| {label} | {n:,} | {name} | {res['value']:.8g} | {rel} | {res['first_s']:.1f} "
                    f"| {res['forward_s']:.1f} | {res['total_s']:.1f} | {res['cg_iterations']} "
                    f"| {res['peak_mib']:.0f} | {grads} |"
                )
            print(line, flush=True)
            lines.append(line)
    lines += ["", f"load average at the end {os.getloadavg()[0]:.2f}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"written {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
