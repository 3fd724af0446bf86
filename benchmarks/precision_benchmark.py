"""Marginal likelihood + gradient of a lattice GMRF with Gaussian noise (sparse-precision GP).

Model: N = m² lattice nodes, prior precision Q = τ(κ²I + L)² (+ 1e-6 I), half of the nodes
observed through a selection W with noise σ² — the covariance K_y = W Q⁻¹ Wᵀ + σ²I is never
formed; gpsparse works through P = Q + WᵀW/σ². For each N and configuration the script times
one  −log p(y) = ½(yᵀK_y⁻¹y + logdet K_y + n log 2π)  plus its gradient with respect to κ, τ
and σ², records peak memory (ru_maxrss of a fresh subprocess per case) and the relative error
of the MLL against the exact value from CHOLMOD (gpsparse's exact path) computed in the same
run; at small N also against a dense float64 GPyTorch-style computation.

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
    "slq-adjoint": dict(gradient="adjoint", num_probes=8, num_lanczos=64),
    "slq-hutchinson": dict(gradient="hutchinson", num_probes=8),
    "slq-stale-cholesky": dict(gradient="adjoint", num_probes=8, num_lanczos=8, preconditioner="cholesky"),
}


def worker(spec: dict) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    import gpsparse
    from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    m = spec["m"]
    n = m * m
    path = sp.diags([-np.ones(m - 1), np.r_[1.0, np.full(m - 2, 2.0), 1.0], -np.ones(m - 1)], [-1, 0, 1])
    lap = (sp.kron(path, sp.identity(m)) + sp.kron(sp.identity(m), path)).tocsr()

    def op(matrix):
        coo = matrix.tocoo()
        idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        return SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), coo.shape))

    L, L2 = op(lap), op(lap @ lap)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, n // 2, replace=False))
    W = torch.sparse_coo_tensor(torch.stack([torch.arange(len(rows)), torch.from_numpy(rows)]), torch.ones(len(rows), dtype=torch.float64), (len(rows), n))
    kappa = torch.tensor(spec["kappa"], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(rows), 1, dtype=torch.float64)

    def mll():
        k2 = kappa**2
        Q = ((L2 + L * (2 * k2)).add_diagonal(k2**2) * tau).add_diagonal(torch.tensor(1e-6, dtype=torch.float64))
        Ky = SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)
        quad, logdet = Ky.inv_quad_logdet(y, logdet=True)
        return 0.5 * (quad + logdet + len(rows) * math.log(2 * math.pi))

    config = dict(spec["config"])
    method = config.pop("method", "slq")
    precond = config.pop("preconditioner", False)
    start = time.perf_counter()
    with gpsparse.settings.logdet_defaults(method=method, preconditioner=precond, **config):
        if precond == "cholesky":  # the factor comes from an earlier optimiser step (different κ)
            with torch.no_grad():
                kappa.data += 0.01
                mll()
                kappa.data -= 0.01
            start = time.perf_counter()
        value = mll()
        forward = time.perf_counter() - start
        value.backward()
    total = time.perf_counter() - start
    return {
        "value": float(value),
        "forward_s": forward,
        "total_s": total,
        "grads": [float(kappa.grad), float(tau.grad), float(noise.grad)],
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
        return {"error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import torch

    return (
        f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; threads {threads}; "
        f"load average at start {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; python {platform.python_version()}"
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
    lines += ["| N | configuration | MLL | rel. error vs CHOLMOD | forward s | forward+backward s | peak MiB | ∂κ, ∂τ, ∂σ² |", "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        m = int(round(math.sqrt(size)))
        exact = None
        for name in args.configs:
            spec = {"m": m, "threads": args.threads, "kappa": args.kappa, "config": CONFIGS[name]}
            res = run_case(spec, args.timeout)
            res.update(name=name, N=m * m)
            rows.append(res)
            if "error" in res:
                line = f"| {m*m:,} | {name} | — | — | — | — | — | {res['error']} |"
            else:
                if name == "exact-cholmod":
                    exact = res["value"]
                rel = "—" if exact is None else f"{abs(res['value'] - exact) / abs(exact):.1e}"
                grads = ", ".join(f"{g:.4g}" for g in res["grads"])
                line = f"| {m*m:,} | {name} | {res['value']:.6g} | {rel} | {res['forward_s']:.2f} | {res['total_s']:.2f} | {res['peak_mib']:.0f} | {grads} |"
            print(line, flush=True)
            lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"written {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
