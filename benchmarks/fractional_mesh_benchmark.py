"""Fractional smoothness on meshes (issue 15, item 5): covariance against the continuum Matérn, and the cost.

*Accuracy.* ``MeshMaternKernel``'s fractional precision (``gpsparse.mesh.fractional``, order ``m``) on a
regular mesh of ``[−4ρ, 4ρ]²`` (alternating diagonals, mesh size ``h``), ``ρ = 1``, ``σ = 1``: the
covariance between the centre vertex and every vertex within ``1.5ρ`` (a sparse LU solve of the
block precision, exact up to rounding), against the continuum Matérn covariance with ``ν = α − 1``
(``scipy.special.kv``): the variance at the centre and the largest error at ``r ≥ ρ/4`` and overall.

*Cost.* One stock GPyTorch step ``-ExactMarginalLogLikelihood(model(x), y).backward()`` (second call)
with ``ScaleKernel(MeshMaternKernel)`` on a regular mesh of the unit square, ``n`` observations, for
α = 1.5 (m = 4) against α = 1 and α = 2 — same data, same thread count.

    python benchmarks/fractional_mesh_benchmark.py [--side 151] [--n 20000] [--threads 1] [--quick]

Writes benchmarks/results/fractional_mesh_cpu_1thread.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu
from scipy.special import gamma, kv


def matern(r: np.ndarray, nu: float, kappa: float) -> np.ndarray:
    s = kappa * np.maximum(r, 1e-300)
    return np.where(r > 0, 2 ** (1 - nu) / gamma(nu) * s**nu * kv(nu, s), 1.0)


def accuracy_row(alpha: float, order: int, m: int, half_width: float = 4.0) -> dict:
    import torch

    from gpsparse.mesh import Mesh
    from gpsparse.mesh.fractional import FractionalMeshPrecision
    from gpsparse.mesh.spde import matern_tau

    mesh = Mesh.regular_grid([[-half_width, -half_width], [half_width, half_width]], m, diagonal="alternate")
    structure = FractionalMeshPrecision(mesh, alpha, order=order)
    kappa = torch.tensor(math.sqrt(8 * (alpha - 1)), dtype=torch.float64)
    Q = structure.operator(kappa**2, matern_tau(kappa, torch.tensor(1.0, dtype=torch.float64), alpha, 2))
    p = Q.pattern
    matrix = sp.csc_matrix(sp.csr_matrix((Q.values.numpy(), p.col.numpy(), p.crow.numpy()), shape=p.size))
    n, centre, blocks = mesh.num_vertices, mesh.num_vertices // 2, structure.num_blocks
    rhs = np.zeros(blocks * n)
    rhs[np.arange(blocks) * n + centre] = 1.0
    column = splu(matrix).solve(rhs).reshape(blocks, n).sum(0)
    r = np.linalg.norm(mesh.vertices - mesh.vertices[centre], axis=1)
    error = np.abs(column - matern(r, alpha - 1, float(kappa)))
    near = r <= 1.5
    return dict(
        alpha=alpha,
        nu=alpha - 1,
        order=order,
        h=2 * half_width / (m - 1),
        vertices=n,
        fit_error=structure.rational.error,
        variance=float(column[centre]),
        max_error=float(error[near].max()),
        max_error_far=float(error[near & (r >= 0.25)].max()),
    )


def cost_row(alpha: float, side: int, n: int) -> dict:
    import gpytorch
    import torch

    from gpsparse.kernels import MeshMaternKernel
    from gpsparse.mesh import Mesh

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    kernel = MeshMaternKernel(Mesh.regular_grid([[0.0, 0.0], [1.0, 1.0]], side), alpha=alpha)

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().double()
    kernel.range = 0.3
    kernel.raw_sigma.requires_grad_(False)
    model.likelihood.noise = 0.01
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    times = []
    for _ in range(2):
        model.zero_grad()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        loss.backward()
        times.append(time.perf_counter() - start)
    return dict(alpha=alpha, side=side, n=n, latent=kernel.num_latent, first_s=times[0], step_s=times[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=151)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fractional_mesh_cpu_1thread")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.side, args.n = 41, 2000
    sizes = (33, 65) if args.quick else (33, 65, 129)
    load = os.getloadavg()[0]
    accuracy = []
    for alpha, order in ((1.5, 3), (1.5, 4), (1.5, 6), (1.8, 4)):
        for m in sizes:
            row = accuracy_row(alpha, order, m)
            accuracy.append(row)
            print(json.dumps(row), flush=True)
    cost = []
    for alpha in (1, 1.5, 2):
        row = cost_row(alpha, args.side, args.n)
        cost.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# Fractional smoothness on meshes",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; "
        f"load average at start {load:.2f}; command: python benchmarks/fractional_mesh_benchmark.py"
        + (" --quick" if args.quick else f" --side {args.side} --n {args.n}"),
        "",
        "Covariance with the centre of a regular mesh of [−4ρ, 4ρ]² (alternating diagonals, ρ = σ = 1) against "
        "the continuum Matérn, within 1.5ρ of the centre:",
        "",
        "| α | ν | m | h/ρ | vertices | fit error | variance at the centre | max error | max error r ≥ ρ/4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in accuracy:
        lines.append(
            f"| {r['alpha']} | {r['nu']:g} | {r['order']} | {r['h']:g} | {r['vertices']} | {r['fit_error']:.1e} "
            f"| {r['variance']:.4f} | {r['max_error']:.4f} | {r['max_error_far']:.4f} |"
        )
    base = next(r["step_s"] for r in cost if r["alpha"] == 2)
    lines += [
        "",
        f"One MLL + backward step (second call), regular {args.side}² mesh of the unit square, {args.n} observations:",
        "",
        "| α | latent values | first call s | step s | step / α = 2 |",
        "|---|---|---|---|---|",
    ]
    for r in cost:
        lines.append(
            f"| {r['alpha']} | {r['latent']} | {r['first_s']:.2f} | {r['step_s']:.2f} | {r['step_s'] / base:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"accuracy": accuracy, "cost": cost}, indent=1))


if __name__ == "__main__":
    main()
