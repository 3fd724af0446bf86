"""SPDE/Matérn fields on a triangulated mesh: mesh, assembly and marginal likelihood + gradient at 10⁵ … 10⁶ vertices.

Domain: a wavy polygon (200 vertices) with a round hole, triangulated by Triangle
(``Mesh.from_points_and_boundary``, minimum angle 25°, a maximum area chosen for the target
vertex count). Model: ``MeshMaternKernel(mesh, alpha=2)`` (R-INLA's
``Q = τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G)``, σ = 1, range ``--range-cells`` (default 10) median edge
lengths, so that the conditioning is comparable across sizes, as a mesh is refined with the range)
observed at ``N/4`` uniform points inside the domain with Gaussian noise, a stock GPyTorch
``ExactGP`` and ``ExactMarginalLogLikelihood``.
Per size and configuration, in a fresh subprocess:

* mesh: Triangle's refinement plus ``Mesh`` validation (orientation, degenerate cells,
  duplicates, edges) — ``triangulate_s`` in total, of which ``validate_s`` is the ``Mesh`` checks;
* assembly: the lumped mass ``C̃`` and stiffness ``G`` (vectorised COO → CSR; ``fem_s``) and the
  precision structure (the pattern of ``Q`` and its fixed vectors, ``structure_s``);
* ``interp_s``: point location and the barycentric ``W`` for the observations;
* one −MLL + gradient with respect to range, σ, noise and mean twice: the first call (one-time
  costs: the union pattern of ``P = Q + WᵀD⁻¹W``, CHOLMOD's symbolic analyses, numba caches)
  and the second (every later optimiser step);
* peak RSS of the worker (``ru_maxrss``).

``log det Q`` comes from the first-order factor ``M = κ²I + C̃^{-1/2}GC̃^{-1/2}`` by CHOLMOD in
every configuration (``gpsparse.mesh.operator``); the configurations differ in the posterior
precision ``P``:

* ``exact-cholmod``: ``logdet_defaults(method="cholesky")`` — CHOLMOD for ``log det P`` and the solves;
* ``slq-hutchinson-ic0``: stochastic Lanczos quadrature, 8 probes, Hutchinson gradients, IC(0).

    python benchmarks/mesh_benchmark.py [--sizes 1e5 1e6] [--configs ...] [--threads 1]

Writes benchmarks/results/mesh_<tag>.md and .json.
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

CONFIGS = {
    "exact-cholmod": dict(method="cholesky"),
    "slq-hutchinson-ic0": dict(gradient="hutchinson", num_probes=8, preconditioner="ic0"),
}
#: vertices per unit area of the domain ≈ AREA_FACTOR / max_area (measured: 1.17·10⁶ vertices at 2e-6)
AREA_FACTOR = 0.78


def domain():
    import numpy as np

    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    radius = 1 + 0.2 * np.cos(5 * t)
    boundary = np.c_[radius * np.cos(t), radius * np.sin(t)]
    hole = 0.25 * np.c_[np.cos(t[::5]), np.sin(t[::5])] + [0.3, 0.2]
    return boundary, hole


def worker(spec: dict) -> dict:
    import gpytorch
    import numpy as np
    import torch

    import gpsparse
    from gpsparse.kernels import MeshMaternKernel
    from gpsparse.mesh import Mesh
    from gpsparse.mesh.polygon import points_in_polygon, signed_area

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    boundary, hole = domain()
    area = abs(signed_area(boundary)) - abs(signed_area(hole))
    out = {}

    start = time.perf_counter()
    mesh = Mesh.from_points_and_boundary(None, boundary, [hole], max_area=AREA_FACTOR * area / spec["N"], min_angle=25)
    out["triangulate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    Mesh(mesh.vertices, mesh.cells)
    out["validate_s"] = time.perf_counter() - start
    out["vertices"], out["triangles"] = mesh.num_vertices, mesh.num_cells

    start = time.perf_counter()
    mesh.lumped_mass()
    mesh.stiffness_matrix()
    out["fem_s"] = time.perf_counter() - start
    kernel = MeshMaternKernel(mesh, alpha=2)
    start = time.perf_counter()
    structure = kernel.structure()
    out["structure_s"] = time.perf_counter() - start
    out["nnz_Q"], out["nnz_M"] = structure.pattern.nnz, structure.factor_pattern.nnz

    rng = np.random.default_rng(0)
    m = mesh.num_vertices // 4
    lo, hi = boundary.min(0), boundary.max(0)
    points = np.zeros((0, 2))
    while len(points) < m:
        p = rng.uniform(lo, hi, (2 * m, 2))
        p = p[points_in_polygon(p, boundary) & ~points_in_polygon(p, hole)]
        points = np.concatenate([points, p])
    x = torch.from_numpy(points[:m])
    y = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]) + 0.3 * torch.randn(m, dtype=torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = kernel

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double()
    out["range"] = spec["range_cells"] * float(np.median(mesh.edge_lengths()))
    kernel.range, kernel.sigma = out["range"], 1.0
    model.likelihood.noise = 0.09
    start = time.perf_counter()
    kernel.interpolation(x)
    out["interp_s"] = time.perf_counter() - start
    out["observations"] = m
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()

    def step():
        model.zero_grad()
        begin = time.perf_counter()
        loss = -mll(model(x), y)
        forward = time.perf_counter() - begin
        loss.backward()
        return float(loss), forward, time.perf_counter() - begin

    config = dict(spec["config"])
    with gpsparse.settings.logdet_defaults(**config):
        _, _, out["first_s"] = step()
        out["loss"], out["forward_s"], out["total_s"] = step()
        out["factor_road"] = kernel.precision().factor_road()
    out["grads"] = [float(p.grad.reshape(-1)[0]) for p in (kernel.raw_range, kernel.raw_sigma)]
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_case(spec: dict, timeout: float) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["killed (out of memory?)"]
        return {"error": lines[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--range-cells", type=float, default=10.0, help="range in median edge lengths")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mesh_cpu_1thread")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    lines = [
        "# SPDE Matérn on a triangulated mesh: mesh, assembly, MLL + gradient",
        "",
        header(args.threads) + f"; range {args.range_cells:g} median edge lengths",
        "",
        "| target N | vertices / triangles | nnz Q / M | configuration | triangulate s (validate) | FEM s "
        "| structure s | W s (m) | −MLL (per obs.) | first fwd+bwd s | fwd s | fwd+bwd s | peak MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        for name in args.configs:
            spec = {"N": int(size), "threads": args.threads, "config": CONFIGS[name], "range_cells": args.range_cells}
            res = run_case(spec, args.timeout)
            res.update(name=name, target=int(size), load=os.getloadavg()[0])
            rows.append(res)
            if "error" in res:
                line = f"| {int(size):,} | — | — | {name} | — | — | — | — | — | — | — | — | — | {res['error']} |"
            else:
                line = (
                    f"| {int(size):,} | {res['vertices']:,} / {res['triangles']:,} "
                    f"| {res['nnz_Q']:,} / {res['nnz_M']:,} "
                    f"| {name} | {res['triangulate_s']:.2f} ({res['validate_s']:.2f}) | {res['fem_s']:.2f} "
                    f"| {res['structure_s']:.2f} | {res['interp_s']:.2f} ({res['observations']:,}) | {res['loss']:.8f} "
                    f"| {res['first_s']:.2f} | {res['forward_s']:.2f} | {res['total_s']:.2f} | {res['peak_mib']:.0f} "
                    f"| {res['load']:.1f} |"
                )
            print(line, flush=True)
            lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"written {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
