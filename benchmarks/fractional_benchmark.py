"""Fractional smoothness on the lattice (issue 15, item 5): covariance error against the continuum and the cost.

*Accuracy.* For each ``(d, α, m)`` a ``LatticeMaternKernel(alpha=α, rational_order=m)`` on ``[−1, 1]^d``
with ``ℓ/h`` cells per lengthscale; its covariance between the centre and node offsets along an axis
and a diagonal up to ``1.5ℓ`` (``[W ⋯ W] blockdiag(Q_j)⁻¹ [W ⋯ W]ᵀ``, sparse LU of the block
precision, so exact up to rounding) is compared with

* the exact fractional lattice covariance ``(κ²I + L)^{−α}`` of the infinite lattice (an FFT on a
  periodic lattice of ``2^{20/d}`` nodes per side, normalised to unit variance): the rational error;
* the continuum Matérn correlation with ``ν = α − d/2`` (``scipy.special.kv``): the total error;
* the exact lattice covariance against the same continuum: the discretisation error alone.

*Cost.* One stock GPyTorch step ``-ExactMarginalLogLikelihood(model(x), y).backward()`` (second call,
patterns cached) on an ``s × s`` lattice with ``n`` observations for α = 1.5 (m = 4) against α = 2
(the integer neighbour, one field of the same degree) and α = 1 — same data, same thread count.

    python benchmarks/fractional_benchmark.py [--cells 24] [--side 200] [--n 20000] [--quick]

Writes benchmarks/results/fractional_cpu_1thread.md and .json.
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


def exact_lattice_correlation(alpha: float, kappa2: float, h: float, d: int, offsets: np.ndarray) -> np.ndarray:
    """Interior correlation of ``(κ²I + L)^{−α}`` at integer ``offsets`` (k, d): FFT on a large periodic lattice."""
    size = int(round(2 ** (20 / d)))
    freq = 2 - 2 * np.cos(2 * np.pi * np.arange(size) / size)
    grids = np.meshgrid(*([freq] * d), indexing="ij", sparse=True)
    spectrum = (kappa2 + sum(g for g in grids) / h**2) ** -alpha
    column = np.fft.ifftn(spectrum).real
    return column[tuple(offsets.T % size)] / column.flat[0]


def matern_correlation(r: np.ndarray, nu: float, kappa: float) -> np.ndarray:
    x = kappa * r
    positive = np.where(x > 0, x, 1.0)
    return np.where(x > 0, 2 ** (1 - nu) / gamma(nu) * positive**nu * kv(nu, positive), 1.0)


def accuracy_row(d: int, alpha: float, order: int, cells: int) -> dict:
    import torch

    from gpsparse.kernels import LatticeMaternKernel

    ell = 0.3
    h = ell / cells
    m = 2 * int(round(1.0 / h)) + 1
    k = LatticeMaternKernel([[-1.0] * d, [1.0] * d], m, alpha=alpha, rational_order=order).double()
    k.lengthscale = torch.tensor(ell, dtype=torch.float64)
    h = 2.0 / (m - 1)
    j = np.arange(int(1.5 * ell / h) + 1)
    jd = np.arange(int(1.5 * ell / h / math.sqrt(d)) + 1)
    offsets = np.vstack([np.stack([j] + [0 * j] * (d - 1), 1), np.repeat(jd[:, None], d, 1)])
    start = time.perf_counter()
    with torch.no_grad():
        Q = k.precision().to_sparse_csr()
        A = sp.csr_matrix((Q.values().numpy(), Q.col_indices().numpy(), Q.crow_indices().numpy()), shape=Q.shape)
        W0 = k.latent_interpolation(torch.zeros(1, d, dtype=torch.float64)).to_dense()[0].numpy()
        Wp = k.latent_interpolation(torch.tensor(offsets * h, dtype=torch.float64)).to_dense().numpy()
    column = Wp @ splu(A.tocsc()).solve(W0)
    seconds = time.perf_counter() - start
    nu = alpha - d / 2
    kappa = math.sqrt(8 * nu) / ell
    exact = exact_lattice_correlation(alpha, kappa**2, h, d, offsets)
    continuum = matern_correlation(np.linalg.norm(offsets * h, axis=1), nu, kappa)
    return dict(
        d=d,
        alpha=alpha,
        nu=nu,
        order=order,
        cells=cells,
        nodes=k.num_nodes,
        latent=k.num_latent,
        fit_error=k._precision_structure().rational.error,
        variance=float(column[0]),
        vs_exact_lattice=float(np.abs(column - exact).max()),
        vs_continuum=float(np.abs(column - continuum).max()),
        lattice_vs_continuum=float(np.abs(exact - continuum).max()),
        seconds=seconds,
    )


def cost_row(alpha: float, side: int, n: int) -> dict:
    import gpytorch
    import torch

    from gpsparse.kernels import LatticeMaternKernel

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], side, alpha=alpha))

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().double()
    model.covar.base_kernel.lengthscale = 0.15
    model.likelihood.noise = 0.01
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    times = []
    for _ in range(2):
        model.zero_grad()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        loss.backward()
        times.append(time.perf_counter() - start)
    kernel = model.covar.base_kernel
    return dict(alpha=alpha, side=side, n=n, latent=kernel.num_latent, first_s=times[0], step_s=times[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=24)
    parser.add_argument("--side", type=int, default=200)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fractional_cpu_1thread")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.cells, args.side, args.n = 8, 60, 2000
    load = os.getloadavg()[0]
    cases = [(2, 1.5, 3), (2, 1.5, 4), (2, 1.5, 6), (2, 1.8, 4), (1, 0.8, 4), (1, 1.3, 4)]
    accuracy = []
    for d, alpha, order in cases:
        row = accuracy_row(d, alpha, order, args.cells if d == 2 else 4 * args.cells)
        accuracy.append(row)
        print(json.dumps(row), flush=True)
    cost = []
    for alpha in (1, 1.5, 2):
        row = cost_row(alpha, args.side, args.n)
        cost.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# Fractional smoothness on the lattice",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; "
        f"load average at start {load:.2f}; command: python benchmarks/fractional_benchmark.py"
        + (" --quick" if args.quick else f" --cells {args.cells} --side {args.side} --n {args.n}"),
        "",
        "Largest deviation of the interior correlation (centre to axis and diagonal offsets ≤ 1.5ℓ):",
        "",
        "| d | α | ν | m | ℓ/h | fit error | variance | vs exact lattice | vs continuum Matérn "
        "| exact lattice vs continuum |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in accuracy:
        lines.append(
            f"| {r['d']} | {r['alpha']} | {r['nu']:g} | {r['order']} | {r['cells']} | {r['fit_error']:.1e} "
            f"| {r['variance']:.6f} | {r['vs_exact_lattice']:.1e} | {r['vs_continuum']:.1e} "
            f"| {r['lattice_vs_continuum']:.1e} |"
        )
    base = next(r["step_s"] for r in cost if r["alpha"] == 2)
    lines += [
        "",
        f"One MLL + backward step (second call), {args.side}² lattice, {args.n} observations:",
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
