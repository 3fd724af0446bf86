"""A spatial field on an irregular domain with a hole: SPDE Matérn on a triangulated mesh of Georgia (USA).

Data that ship with an installed package (libpysal's bundled ``georgia`` example, Fotheringham,
Brunsdon & Charlton 2002): the 159 counties of Georgia (polygons, UTM coordinates in metres) and,
per county, the share of adults with a bachelor's degree in 1990 (``PctBach``), observed at the
county centroids. The domain is the state's outline (the union of the counties, simplified to
~2 km). No bundled data set has a natural hole, so the example cuts one: an ellipse of 20 × 15 km
semi-axes around the Okefenokee Swamp (30.85°N, 82.33°W; the centre is mapped into the data's
coordinates by a least-squares affine fit of the counties' longitude/latitude to their UTM
centroids; the outline is an approximation, not surveyed data). The field is not meshed there and
correlation does not pass through it (natural boundary conditions on its edge).

Model (R-INLA's SPDE with its parameterisation), a stock GPyTorch ``ExactGP``:

    y_i = μ + u(s_i) + ε_i,   y = log(PctBach),   ε ~ N(0, σ_ε²)
    u ~ MeshMaternKernel(mesh, alpha=2):  Q = τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G),  ν = 1,
        range ρ = √8/κ and marginal sd σ learned (penalised-complexity priors: P(ρ < 50 km) = 0.05,
        P(σ > 1) = 0.05)

The mesh (``Mesh.from_points_and_boundary``, Triangle: minimum angle 25°) covers the state with
triangles of at most ~100 km² (edges ~15 km) and an extension ring of 100 km with coarser ones,
so that the artificial outer boundary is about one range away from the data. The hyperparameters
are fitted by Adam (``--steps``) on the exact marginal likelihood (CHOLMOD when scikit-sparse is
installed, else stochastic Lanczos quadrature); the posterior mean and sd are computed at the
mesh vertices and drawn on the triangles inside the state. The script ends by comparing the
marginal likelihood and the posterior mean with a dense float64 computation of the same model.

Default: ~4 000 vertices, ~20 s on 2 cores. ``--fine``: triangles of at most 25 km² (~15 000 vertices).

    python examples/mesh_spatial.py [--fine] [--steps 60] [--out figures/]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch

import gpsparse
from gpsparse.core.cholmod import cholmod_available
from gpsparse.kernels import MeshMaternKernel, PCMaternRangePrior, PCMaternSigmaPrior
from gpsparse.mesh import Mesh
from gpsparse.mesh.polygon import points_in_polygon

KM = 1000.0
UNIT = 100.0  # the model works in units of 100 km (hyperparameters of order 1 for Adam)
SWAMP_LONLAT, SWAMP_AXES_KM = (-82.33, 30.85), (15.0, 20.0)  # east-west, north-south semi-axes


def load_georgia():
    """Outline (simplified ~2 km), county centroids (m) and log(PctBach), and the lon/lat → UTM affine map."""
    import importlib.util

    import geopandas

    # The bundled files only: the path of libpysal's examples without importing libpysal (~10 s).
    package = importlib.util.find_spec("libpysal").submodule_search_locations[0]
    folder = os.path.join(package, "examples", "georgia")
    counties = geopandas.read_file(os.path.join(folder, "G_utm.shp"))
    union = counties.geometry.union_all()
    mainland = max(getattr(union, "geoms", [union]), key=lambda p: p.area)  # drops a 0.2 km² sliver
    outline = np.asarray(mainland.exterior.simplify(2 * KM).coords)[:-1]
    xy = counties[["X", "Y"]].to_numpy(dtype=np.float64)
    lonlat = counties[["Longitud", "Latitude"]].to_numpy(dtype=np.float64)
    design = np.c_[lonlat, np.ones(len(lonlat))]
    affine, *_ = np.linalg.lstsq(design, xy, rcond=None)  # (3, 2): [lon, lat, 1] @ affine ≈ (X, Y)
    values = np.log(counties["PctBach"].to_numpy(dtype=np.float64))
    return outline, xy, values, affine


def ellipse(centre, axes, num=24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, num, endpoint=False)
    return np.c_[centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)]


class MeshGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, mesh):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = MeshMaternKernel(
            mesh,
            alpha=2,
            range_prior=PCMaternRangePrior(0.5, probability=0.05),  # 50 km, in units of 100 km
            sigma_prior=PCMaternSigmaPrior(1.0, probability=0.05),
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def dense_check(model, x, y, x_test) -> tuple[float, float]:
    """Relative differences of the MLL (without priors) and the posterior mean against dense float64."""
    import scipy.sparse as sp

    kernel, likelihood = model.covar_module, model.likelihood
    mesh = kernel.mesh
    kappa, tau = float(kernel.kappa()), float(kernel.tau())
    c = mesh.lumped_mass()
    K1 = sp.diags(kappa**2 * c) + mesh.stiffness_matrix()  # Q = τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G), from SciPy's FEM
    Q = torch.from_numpy((tau**2 * (K1 @ sp.diags(1 / c) @ K1)).toarray())
    factor = torch.linalg.cholesky(Q)
    W, Ws = kernel.interpolation(x).to_dense(), kernel.interpolation(x_test).to_dense()
    half = torch.linalg.solve_triangular(factor, torch.cat([W, Ws]).T, upper=False)  # L⁻¹ [Wᵀ W*ᵀ]
    cross = half.T @ half[:, : len(x)]  # [W; W*] Q⁻¹ Wᵀ
    Ky = cross[: len(x)] + likelihood.noise * torch.eye(len(x), dtype=torch.float64)
    mu = model.mean_module.constant.detach()
    with torch.no_grad():
        dense_mll = torch.distributions.MultivariateNormal(mu.expand(len(x)), Ky).log_prob(y) / len(x)
        dense_mean = mu + cross[len(x) :] @ torch.linalg.solve(Ky, y - mu)
    model.train()
    with torch.no_grad():
        output = model(x)
        sparse_mll = likelihood(output).log_prob(y) / len(x)
    model.eval()
    with torch.no_grad():
        sparse_mean = model(x_test).mean
    mll_error = abs(float(sparse_mll - dense_mll)) / abs(float(dense_mll))
    mean_error = float((sparse_mean - dense_mean).abs().max() / dense_mean.abs().max())
    return mll_error, mean_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fine", action="store_true", help="triangles of at most 10 km² (~13 000 vertices)")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNG figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    outline, xy, values, affine = load_georgia()
    outline, xy = outline / KM, xy / KM  # work in km
    swamp_centre = np.r_[SWAMP_LONLAT, 1.0] @ affine / KM
    hole = ellipse(swamp_centre, SWAMP_AXES_KM)
    if not points_in_polygon(hole, outline).all():
        raise RuntimeError("the hole must lie inside the state's outline")
    keep = ~points_in_polygon(xy, hole)  # county centroids inside the hole are dropped
    xy, values = xy[keep], values[keep]
    max_area = (10.0 if args.fine else 60.0) / UNIT**2  # km² → (100 km)²
    mesh = Mesh.from_points_and_boundary(
        None, outline / UNIT, [hole / UNIT], extension=1.0, max_area=(max_area, 16 * max_area), min_angle=25
    )
    edges = mesh.edge_lengths() * UNIT
    print(
        f"Georgia: {len(values)} counties ({int((~keep).sum())} centroid(s) in the hole dropped); mesh "
        f"{mesh.num_vertices:,} vertices, {mesh.num_cells:,} triangles (edges {edges.min():.1f}–{edges.max():.1f} km, "
        f"median {np.median(edges):.1f} km) in {time.perf_counter() - start:.1f} s"
    )

    x = torch.from_numpy(xy / UNIT)
    y = torch.from_numpy(values)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = MeshGP(x, y, likelihood, mesh).double()
    model.mean_module.constant.data.fill_(float(y.mean()))
    model.covar_module.range, model.covar_module.sigma = 1.0, 0.3
    likelihood.noise = 0.05
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    method = "cholesky" if cholmod_available() else "slq"
    fit_start = time.perf_counter()
    with gpsparse.settings.logdet_defaults(method=method):
        model.train()
        for _ in range(args.steps):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            optimizer.step()
        kernel = model.covar_module
        print(
            f"training: {args.steps} Adam steps in {time.perf_counter() - fit_start:.1f} s ({method}); range "
            f"{float(kernel.range) * UNIT:.0f} km, σ {float(kernel.sigma):.3f}, "
            f"noise sd {float(likelihood.noise.sqrt()):.3f}, mean {float(model.mean_module.constant):.3f}; "
            f"−MLL per county {float(loss):.4f}"
        )
        model.eval()
        vertices = torch.from_numpy(mesh.vertices)
        pred_start = time.perf_counter()
        with torch.no_grad():
            posterior = model(vertices)
            mean, sd = posterior.mean.numpy(), posterior.variance.clamp_min(0).sqrt().numpy()
        print(f"posterior mean and sd at {mesh.num_vertices:,} vertices: {time.perf_counter() - pred_start:.1f} s")
        mll_error, mean_error = dense_check(model, x, y, vertices[:: max(1, mesh.num_vertices // 500)])
    print(
        f"against dense float64 (the same W Q⁻¹ Wᵀ + σ²I formed densely): MLL relative difference {mll_error:.1e}, "
        f"posterior mean relative difference {mean_error:.1e}"
    )
    inside = mesh.regions == 0
    print(
        f"inside the state: posterior mean of PctBach {math.exp(mean[mesh.cells[inside]].mean()):.1f}% (geometric), "
        f"sd of log(PctBach) {sd[mesh.cells[inside]].min():.3f}–{sd[mesh.cells[inside]].max():.3f}"
    )
    figure = plot(mesh, UNIT, outline, hole, xy, values, mean, sd, args.out)
    print(f"figure: {figure}; total {time.perf_counter() - start:.1f} s")


def plot(mesh, unit, outline, hole, xy, values, mean, sd, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.tri import Triangulation

    inside = mesh.regions == 0
    v = mesh.vertices * unit  # km
    tri = Triangulation(v[:, 0], v[:, 1], mesh.cells[inside])
    fig, axes = plt.subplots(1, 3, figsize=(15, 6), constrained_layout=True)
    ax = axes[0]
    ax.triplot(Triangulation(v[:, 0], v[:, 1], mesh.cells), lw=0.2, color="0.6")
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=np.exp(values), s=14, cmap="viridis", zorder=3)
    fig.colorbar(dots, ax=ax, shrink=0.7, label="PctBach (%)")
    ax.set_title(f"mesh ({mesh.num_vertices:,} vertices) and county data")
    colour_range = (float(np.exp(values).min()), float(np.exp(values).max()))
    for ax, field, title, label, cmap in (
        (axes[1], np.exp(mean), "posterior mean (exp)", "PctBach (%)", "viridis"),
        (axes[2], sd, "posterior sd of log(PctBach)", "sd", "magma"),
    ):
        shading = ax.tripcolor(
            tri,
            field,
            shading="gouraud",
            cmap=cmap,
            **({"vmin": colour_range[0], "vmax": colour_range[1]} if cmap == "viridis" else {}),
        )
        fig.colorbar(shading, ax=ax, shrink=0.7, label=label)
        ax.scatter(xy[:, 0], xy[:, 1], s=3, c="white", edgecolors="k", linewidths=0.3)
        ax.set_title(title)
    for ax in axes:
        ax.plot(*np.r_[outline, outline[:1]].T, color="k", lw=0.8)
        ax.fill(*hole.T, color="lightblue", ec="k", lw=0.8)
        ax.set_aspect("equal")
        ax.set_xlabel("UTM x (km)")
    axes[0].set_ylabel("UTM y (km)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mesh_spatial.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
