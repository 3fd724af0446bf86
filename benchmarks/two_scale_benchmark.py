"""Two-scale lattice model (issue 13, item 1): cost per training step against the one-scale model, and prediction.

Model: ``SparsePrecisionAdditiveKernel(ScaleKernel(LatticeMaternKernel(m × m)),
ScaleKernel(LatticeMaternKernel(m × m)))``
— two Matérn fields (α = 2) on the unit square, a long range (12 cells) and a short one (3 cells), so
``N = 2m²`` latent nodes in all — with a Gaussian likelihood and ``n`` observations at uniform random
points; the one-scale model is the first term alone (``m²`` nodes). For each model the script runs, in
a fresh subprocess with 1 torch thread, the stock GPyTorch step ``-ExactMarginalLogLikelihood(model(x),
y).backward()`` twice (the first call pays the patterns and kernels' one-time costs; the second is every
later optimiser step) with gpsparse's defaults, then ``model.eval(); likelihood(model(x_test))`` at
``n_test`` points: mean and variance (exact variances from the selected inverse of ``P`` when CHOLMOD
is installed — the road is reported), and for the two-scale model also each component's posterior mean
and variance (``gpsparse.kernels.component_predictions``). Peak memory is the worker's own ``VmHWM``.

    python benchmarks/two_scale_benchmark.py [--m 316] [--n 100000] [--n-test 10000] [--quick]

Writes benchmarks/results/two_scale_cpu_1thread.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def worker(spec: dict) -> dict:
    import gpytorch
    import torch

    import gpsparse
    from gpsparse.core.cholmod import cholmod_available
    from gpsparse.kernels import LatticeMaternKernel, SparsePrecisionAdditiveKernel, component_predictions

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    m, n, n_test, scales = spec["m"], spec["n"], spec["n_test"], spec["scales"]
    x = torch.rand(n, 2, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.3 * torch.sin(25 * x[:, 0] + 17 * x[:, 1])
    y = y + 0.1 * torch.randn(n, dtype=torch.float64)
    x_test = torch.rand(n_test, 2, dtype=torch.float64)

    def field(cells: float):
        kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], m))
        kernel.base_kernel.lengthscale = torch.tensor(cells / (m - 1), dtype=torch.float64)
        return kernel

    covar = field(12.0) if scales == 1 else SparsePrecisionAdditiveKernel(field(12.0), field(3.0))

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covar = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().double()
    model.likelihood.noise = torch.tensor(0.01, dtype=torch.float64)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

    def step():
        model.zero_grad()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        forward = time.perf_counter() - start
        loss.backward()
        return float(loss.detach()), forward, time.perf_counter() - start

    _, _, first = step()
    value, forward, total = step()
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        prediction = model.likelihood(model(x_test))
        mean, variance = prediction.mean, prediction.variance
    predict_s = time.perf_counter() - start
    out = {
        "value": value,
        "first_s": first,
        "forward_s": forward,
        "total_s": total,
        "predict_s": predict_s,
        "variance_min": float(variance.min()),
        "variance_road": "exact (CHOLMOD selected inverse)" if cholmod_available() else "gpsparse default (stochastic)",
        "finite": bool(torch.isfinite(mean).all() and torch.isfinite(variance).all()),
    }
    if scales == 2:
        start = time.perf_counter()
        with torch.no_grad():
            parts = component_predictions(model, x_test)
        out["components_s"] = time.perf_counter() - start
        total_mean = sum(part[0] if isinstance(part, tuple) else part.mean for part in parts)
        out["component_sum_error"] = float((total_mean + model.mean(x_test) - mean).abs().max())
    out["peak_mib"] = peak_mib()
    out["torch"] = torch.__version__
    out["gpsparse"] = getattr(gpsparse, "__version__", "?")
    return out


def run_case(spec: dict, timeout: float) -> dict:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=316, help="lattice side per field (316: 2 × 99 856 nodes)")
    parser.add_argument("--n", type=int, default=100_000, help="observations")
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--quick", action="store_true", help="m = 60, n = 5 000, 1 000 test points")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "two_scale_cpu_1thread")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.m, args.n, args.n_test = 60, 5_000, 1_000
    load = os.getloadavg()[0]
    rows = []
    for scales in (1, 2):
        spec = {"m": args.m, "n": args.n, "n_test": args.n_test, "scales": scales, "threads": args.threads}
        result = run_case(spec, args.timeout)
        result.update(spec, nodes=scales * args.m**2, load=os.getloadavg()[0])
        rows.append(result)
        print(json.dumps(result), flush=True)
    one, two = rows
    ratio = two["total_s"] / one["total_s"] if "total_s" in one and "total_s" in two else None
    header = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; load average at start "
        f"{load:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; python {platform.python_version()}\n\n"
        "| model | latent nodes | observations | −MLL / n | first fwd+bwd s | fwd s | fwd+bwd s | "
        "predict s (test points) | components s | peak MiB | load |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['scales']}-scale | {row['nodes']:,} | {row['n']:,} | {row['error']} |||||||\n")
            continue
        lines.append(
            f"| {row['scales']}-scale | {row['nodes']:,} | {row['n']:,} | {row['value']:.6f} | {row['first_s']:.1f} | "
            f"{row['forward_s']:.1f} | {row['total_s']:.1f} | {row['predict_s']:.1f} ({row['n_test']:,}) | "
            f"{row.get('components_s', float('nan')):.1f} | {row['peak_mib']:.0f} | {row['load']:.2f} |\n"
        )
    footer = ""
    if ratio is not None:
        footer = (
            f"\ntwo-scale / one-scale cost per step: {ratio:.2f}; variances: {two['variance_road']}; "
            f"component means sum to the total to {two.get('component_sum_error', float('nan')):.1e}\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = "# Two-scale lattice model vs one-scale\n\n"
    args.out.with_suffix(".md").write_text(title + header + "".join(lines) + footer)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(header + "".join(lines) + footer)


if __name__ == "__main__":
    main()
