"""Exact predictive variances at 10⁴ / 10⁵ test points on N = 10⁶ latent nodes (issue 11, item 9).

Stock GPyTorch prediction (``model.eval(); model(x_test).variance`` under ``torch.no_grad()``),
float64, one worker subprocess per case (so that each peak RSS is its own):

* ``lattice``: ``LatticeMaternKernel`` (d = 2, α = 2, 13-point stencil) on an m × m grid
  (N = m²; 1000² = 10⁶), 10⁴ training points, bilinear interpolation; the variances come from
  one CHOLMOD factorisation and supernodal selected inversion of ``P = Q + WᵀD⁻¹W``
  (``variance_defaults(selected_inverse_limit=)`` raised above N: its default, 250 000, would
  send N = 10⁶ to Monte Carlo). The first prediction (10⁴ points) pays the factorisation and the
  selected inversion; the second (10⁵ new points) reuses them (one gather per point).
* ``markov``: ``MarkovMaternKernel(ν = 3/2)``, n training inputs on a jittered grid, the Kalman
  road (filter + RTS smoother over the joint sorted training and test inputs, one pass per
  prediction call: 10⁶ + m steps of a 2-dimensional state).
* ``mc``: at a moderate size (lattice, N ≈ 10⁵) the exact road against the Monte Carlo
  fallback (``variance_defaults(method="stochastic")``: S = 64 samples, K = 64 Lanczos steps,
  two-pass Lanczos in blocks of 8 samples), with the RMS relative error of the Monte Carlo
  variances against the exact ones and the expected √(2/S).

Columns: wall time, peak RSS growth of the worker over its state before the case
(``ru_maxrss``), torch threads (``torch.get_num_threads()``), load average at the start.

    python benchmarks/variance_benchmark.py                       # N = 10⁶ (lattice, markov) + MC at 10⁵
    python benchmarks/variance_benchmark.py --quick               # N = 10⁴: a smoke run, ~1 min

Writes benchmarks/results/variance_1e6.md and .json (``--out`` to change).
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


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(x, y, kernel, noise=0.01):
    import gpytorch

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ZeroMean()
            self.covar = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().double()
    model.likelihood.noise = noise
    model.eval()
    return model


def _between(index, u):
    """Test inputs ``(k + 0.6 + 0.2u)·0.3`` ``(m, 1)``: between training inputs k and k + 1, ≥ 0.03 from both."""
    return ((index + 0.6 + 0.2 * u) * 0.3)[:, None]


def _timed(fn):
    start_rss, start = _rss_mib(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, _rss_mib() - start_rss


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])

    import gpsparse
    from gpsparse.kernels import LatticeMaternKernel, MarkovMaternKernel
    from gpsparse.linalg.variance import monte_carlo_relative_error

    gen = torch.Generator().manual_seed(0)
    out = {"case": spec["case"], "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    big = gpsparse.settings.variance_defaults(selected_inverse_limit=10**9)
    if spec["case"] in ("lattice", "mc"):
        side = spec["side"]
        kernel = LatticeMaternKernel(bounds=[[0.0, 0.0], [1.0, 1.0]], grid_size=side, alpha=2)
        kernel.lengthscale = 8.0 / (side - 1)  # 8 cells per lengthscale
        x = torch.rand(spec["train"], 2, generator=gen, dtype=torch.float64)
        y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(
            len(x), generator=gen, dtype=torch.float64
        )
        model = _model(x, y, kernel)
        out.update(nodes=side * side, train=len(x))
        tests = [torch.rand(m, 2, generator=gen, dtype=torch.float64) for m in spec["tests"]]
    else:
        n = spec["train"]
        t = (torch.arange(n, dtype=torch.float64) + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * 0.3
        y = torch.sin(t / 3) + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
        kernel = MarkovMaternKernel(nu=1.5)
        kernel.lengthscale = 2.0
        model = _model(t[:, None], y, kernel, noise=0.04)
        out.update(train=n)
        tests = [
            _between(torch.randint(0, n, (m,), generator=gen), torch.rand(m, generator=gen, dtype=torch.float64))
            for m in spec["tests"]
        ]
    rows = []
    with torch.no_grad(), big:
        for x_test in tests:
            var, seconds, rss = _timed(lambda x_test=x_test: model(x_test).variance)
            rows.append({"road": "exact", "points": len(x_test), "seconds": seconds, "peak_rss_growth_mib": rss})
            if spec["case"] == "markov":
                rows[-1]["nodes"] = 2 * (spec["train"] + len(x_test))  # state entries of the joint steps
            exact = var
        if spec["case"] == "mc":
            S = gpsparse.settings.current().variance_probes
            K = gpsparse.settings.current().num_lanczos
            with gpsparse.settings.variance_defaults(method="stochastic"):
                torch.manual_seed(1)
                mc, seconds, rss = _timed(lambda: model(tests[-1]).variance)
            rel = ((mc - exact) / exact).pow(2).mean().sqrt().item()
            rows.append(
                {
                    "road": f"Monte Carlo S={S}, K={K}",
                    "points": len(tests[-1]),
                    "seconds": seconds,
                    "peak_rss_growth_mib": rss,
                    "rms_relative_error": rel,
                    "expected_relative_error": monte_carlo_relative_error(S),
                    "stored_basis_gib_before": out["nodes"] * S * K * 8 / 2**30,
                }
            )
    out["rows"] = rows
    out["peak_rss_mib"] = _rss_mib()
    return out


def render(results: list[dict], meta: dict) -> str:
    lines = [
        "# Exact predictive variances (issue 11, item 9)",
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['date']}; torch threads per worker: {meta['threads']}; "
        f"load average at start {meta['load']:.2f}. Stock GPyTorch prediction, float64; time and peak RSS growth "
        "of `model(x_test).variance` (the first call includes building P, its factorisation and selected inversion).",
        "",
        "| case | latent nodes N | training points | test points | road | time s | peak RSS growth MiB "
        "| RMS rel. error (expected) | threads | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['case']} | — | — | — | failed: {res['error']} | | | | | |")
            continue
        for row in res["rows"]:
            err = ""
            if "rms_relative_error" in row:
                err = f"{row['rms_relative_error']:.3f} ({row['expected_relative_error']:.3f})"
            nodes = row.get("nodes", res.get("nodes"))
            road = (
                row["road"]
                if row["road"] != "exact"
                else (
                    "exact: Kalman RTS smoother (joint steps)"
                    if res["case"] == "markov"
                    else "exact: CHOLMOD selected inverse"
                )
            )
            lines.append(
                f"| {res['case']} | {nodes:,} | {res['train']:,} | {row['points']:,} | {road} | {row['seconds']:.2f} | "
                f"{row['peak_rss_growth_mib']:.0f} | {err} | {res['threads']} | {res['load']:.2f} |"
            )
    mc = [row for res in results if "rows" in res for row in res["rows"] if "stored_basis_gib_before" in row]
    if mc:
        lines += [
            "",
            f"The Monte Carlo row's former all-samples Lanczos basis would have held N × 64 × 64 doubles = "
            f"{mc[0]['stored_basis_gib_before']:.1f} GiB; the two-pass blocks keep ~6·N·8 doubles.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10⁴ smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/variance_1e6")
    parser.add_argument("--cases", nargs="*", default=["mc", "markov", "lattice"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        specs = {
            "lattice": {"side": 100, "train": 1000, "tests": [10_000, 100_000]},
            "markov": {"train": 10_000, "tests": [10_000, 100_000]},
            "mc": {"side": 100, "train": 1000, "tests": [10_000]},
        }
    else:
        specs = {
            "lattice": {"side": 1000, "train": 10_000, "tests": [10_000, 100_000]},
            "markov": {"train": 1_000_000, "tests": [10_000, 100_000]},
            "mc": {"side": 316, "train": 10_000, "tests": [10_000]},
        }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for case in args.cases:
        spec = {**specs[case], "case": case, "threads": args.threads}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
        )
        if proc.returncode:
            res = {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}
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
