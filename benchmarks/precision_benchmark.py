"""Marginal likelihood + gradient of a lattice GMRF with Gaussian noise (sparse-precision GP).

Model: N = m² lattice nodes, prior precision Q = τ(κ²I + L)² (the SPDE/Matérn ν = 1 precision of
``gpsparse.kernels.spde.MaternPrecision``, whose log det Q is exact and O(N) from the Neumann
Laplacian's eigenvalues), half of the nodes observed through a selection W with noise σ² — the
covariance K_y = W Q⁻¹ Wᵀ + σ²I is never formed; gpsparse works through P = Q + WᵀW/σ². For each N
and configuration the script times one −log p(y) = ½(yᵀK_y⁻¹y + logdet K_y + n log 2π) plus its
gradient with respect to κ, τ and σ² twice in a fresh subprocess: the first call (one-time costs:
pattern merges, numba kernels loaded from the cache, lazy imports) and the second (the cost of
every later optimiser step). It records peak memory (ru_maxrss) and the relative error of the MLL
against the exact value from CHOLMOD computed in the same run (at N = 10⁶ the exact case computes
the value only: the selected inverse for its gradient takes longer than the time limit).
``dense-gpytorch`` is GPyTorch's own dense path (a MultivariateNormal on the dense K_y, Cholesky),
run where the dense matrices fit.

    python benchmarks/precision_benchmark.py [--sizes 1e4 1e5 1e6] [--threads 1] [--quick]

Writes benchmarks/results/precision_<tag>.md and .json.
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

CONFIGS = {
    "exact-cholmod": dict(method="cholesky"),
    "slq-adjoint": dict(gradient="adjoint", num_probes=8, num_lanczos=64, preconditioner="jacobi"),
    "slq-hutchinson-jacobi": dict(gradient="hutchinson", num_probes=8, preconditioner="jacobi"),
    "slq-hutchinson-ic0": dict(gradient="hutchinson", num_probes=4, preconditioner="ic0"),
    "slq-stale-cholesky": dict(gradient="adjoint", num_probes=8, num_lanczos=8, preconditioner="cholesky"),
    "dense-gpytorch": dict(method="dense"),
}
#: largest N per configuration (beyond it the case is reported as skipped)
LIMITS = {"dense-gpytorch": 10_000, "slq-adjoint": 200_000, "slq-stale-cholesky": 200_000}
#: above this N the exact case computes the MLL value only
EXACT_GRADIENT_LIMIT = 200_000


def lattice(m: int):
    import numpy as np
    import scipy.sparse as sp

    path = sp.diags([-np.ones(m - 1), np.r_[1.0, np.full(m - 2, 2.0), 1.0], -np.ones(m - 1)], [-1, 0, 1])
    lap = (sp.kron(path, sp.identity(m)) + sp.kron(sp.identity(m), path)).tocsr()
    eig1 = 2 - 2 * np.cos(np.pi * np.arange(m) / m)
    return lap, np.add.outer(eig1, eig1).reshape(-1)


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    import gpsparse
    from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
    from gpsparse.kernels.spde import MaternPrecision

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    m = spec["m"]
    n = m * m
    lap, eigenvalues = lattice(m)
    structure = MaternPrecision(lap, 2, eigenvalues=eigenvalues)
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(np.sort(rng.choice(n, n // 2, replace=False)))
    ones = torch.ones(len(rows), dtype=torch.float64)
    W = torch.sparse_coo_tensor(torch.stack([torch.arange(len(rows)), rows]), ones, (len(rows), n))
    W = SparseLinearOperator.from_tensor(W, symmetric=False)  # converted once, as a kernel caches it
    kappa = torch.tensor(spec["kappa"], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(rows), 1, dtype=torch.float64)
    config = dict(spec["config"])
    method = config.pop("method", "slq")
    precond = config.pop("preconditioner", False)
    value_only = method == "cholesky" and n > EXACT_GRADIENT_LIMIT

    def mll():
        Q = structure.operator(kappa**2, tau)
        if method == "dense":
            return dense_mll(Q, rows, noise, y)
        Ky = SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)
        quad, logdet = Ky.inv_quad_logdet(y, logdet=True)
        return 0.5 * (quad + logdet + len(rows) * math.log(2 * math.pi))

    def step():
        for p in (kappa, tau, noise):
            p.grad = None
        start = time.perf_counter()
        if value_only:
            with torch.no_grad():
                value = mll()
            return value, time.perf_counter() - start, float("nan")
        value = mll()
        forward = time.perf_counter() - start
        value.backward()
        return value, forward, time.perf_counter() - start

    settings = dict(method="slq" if method == "dense" else method, preconditioner=precond, **config)
    with gpsparse.settings.logdet_defaults(**settings):
        if precond == "cholesky":  # the factor comes from an earlier optimiser step (different κ)
            with torch.no_grad():
                kappa.data += 0.01
                mll()
                kappa.data -= 0.01
        _, _, first = step()
        value, forward, total = step()
    return {
        "value": float(value),
        "first_s": first,
        "forward_s": forward,
        "total_s": total,
        "grads": [float("nan") if p.grad is None else float(p.grad) for p in (kappa, tau, noise)],
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def dense_mll(Q, rows, noise, y):
    """GPyTorch's dense path: K_y = (Q⁻¹)[rows, rows] + σ²I as a MultivariateNormal, Cholesky log_prob."""
    import gpytorch
    import torch

    import gpsparse

    with gpsparse.settings.max_dense_size(Q.shape[-1] ** 2):
        factor = torch.linalg.cholesky(Q.to_dense())  # Q = C Cᵀ, so (Q⁻¹)[rows, rows] = XᵀX, X = C⁻¹ E_rows
    selection = torch.zeros(Q.shape[-1], len(rows), dtype=Q.dtype)
    selection[rows, torch.arange(len(rows))] = 1.0
    x = torch.linalg.solve_triangular(factor, selection, upper=False)
    cov = x.mT @ x
    cov = cov + noise * torch.eye(len(rows), dtype=Q.dtype)
    with gpytorch.settings.max_cholesky_size(10**9):
        dist = gpytorch.distributions.MultivariateNormal(torch.zeros(len(rows), dtype=Q.dtype), cov)
        return -dist.log_prob(y.squeeze(-1))


def run_case(spec: dict, timeout: float) -> dict:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import torch

    return (
        f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; threads {threads}; "
        f"load average at start {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kappa", type=float, default=0.3, help="κ (range ≈ √8/κ cells)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="N = 10⁴ only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "precision_cpu_1thread")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [1e4] if args.quick else args.sizes
    rows, lines = [], [header(args.threads), ""]
    lines += [
        "| N | configuration | MLL | rel. error vs CHOLMOD | first fwd+bwd s | fwd s | fwd+bwd s | peak MiB "
        "| ∂κ, ∂τ, ∂σ² |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        m = int(round(math.sqrt(size)))
        exact = None
        for name in args.configs:
            spec = {"m": m, "threads": args.threads, "kappa": args.kappa, "config": CONFIGS[name]}
            if m * m > LIMITS.get(name, math.inf):
                res = {"error": f"skipped above N = {LIMITS[name]:,}"}
            else:
                res = run_case(spec, args.timeout)
            res.update(name=name, N=m * m)
            rows.append(res)
            if "error" in res:
                line = f"| {m * m:,} | {name} | — | — | — | — | — | — | {res['error']} |"
            else:
                if name == "exact-cholmod":
                    exact = res["value"]
                rel = "—" if exact is None else f"{abs(res['value'] - exact) / abs(exact):.1e}"
                grads = ", ".join(f"{g:.4g}" for g in res["grads"])
                line = (
                    f"| {m * m:,} | {name} | {res['value']:.10g} | {rel} | {res['first_s']:.2f} "
                    f"| {res['forward_s']:.2f} "
                    f"| {res['total_s']:.2f} | {res['peak_mib']:.0f} | {grads} |"
                )
            print(line, flush=True)
            lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"written {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
