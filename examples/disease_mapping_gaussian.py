"""Disease mapping with a BYM2 area effect: sudden infant deaths in the 100 North Carolina counties.

The data are real and ship with ``libpysal`` (``pip install "libpysal>=4.10,<5"``, the ``sids2``
example: SIDS deaths ``SID79`` and live births ``BIR79`` per county, 1979–84, and the county
contiguity graph ``sids2.gal``; Cressie 1993). The Gaussian version models the log-rate per
1 000 births,

    y_i = log((SID79_i + 0.5) / BIR79_i · 1000) = μ + b_i + ε_i,
    b   = (1/√τ) (√(1−φ) v + √φ u*)         (BYM2: scaled Besag u*, i.i.d. v; Riebler et al. 2016)

with a stock GPyTorch ``ExactGP`` (``ConstantMean``, ``BYM2Kernel`` over county ids,
``GaussianLikelihood``) trained by Adam on ``ExactMarginalLogLikelihood``. The structured
component is constrained to sum to zero, so the mean ``μ`` is the state-wide level; the script
reports the learned ``φ`` (the share of the area effect that is spatially structured), ``τ`` and
the noise, checks that the posterior mean of the structured part sums to zero, and draws the
posterior area effect as a map (matplotlib, from the shapefile). The Poisson version of this
model needs a Laplace approximation (``gpsparse.likelihoods``).

    python examples/disease_mapping_gaussian.py [--steps 150] [--out figures/]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch

from gpsparse.kernels import BYM2Kernel


def sids_data() -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """Edge index ``(2, E)``, log-rates ``(100,)``, county names, and the shapefile path."""
    import libpysal
    from libpysal import examples

    weights = libpysal.io.open(examples.get_path("sids2.gal")).read()
    table = libpysal.io.open(examples.get_path("sids2.dbf"))
    fips = [str(f) for f in table.by_col("FIPSNO")]
    index = {f: i for i, f in enumerate(fips)}  # the .gal ids are FIPS codes; rows follow the .dbf
    edges = [(index[a], index[b]) for a, neighbours in weights.neighbors.items() for b in neighbours]
    deaths = np.asarray(table.by_col("SID79"), dtype=np.float64)
    births = np.asarray(table.by_col("BIR79"), dtype=np.float64)
    y = torch.tensor(np.log((deaths + 0.5) / births * 1000.0))
    return torch.tensor(edges).T, y, list(table.by_col("NAME")), examples.get_path("sids2.shp")


class AreaModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, edges, num_nodes):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = BYM2Kernel(edges, num_nodes)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def fit(steps: int, lr: float = 0.05):
    edges, y, names, shapefile = sids_data()
    n = len(y)
    x = torch.arange(n, dtype=torch.float64).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = AreaModel(x, y, likelihood, edges, n).double()
    model.mean.constant.data.fill_(float(y.mean()))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        model(x[:1])  # builds the prediction strategy (the posterior of the latent field)
        strategy = model.prediction_strategy
        latent = strategy.latent_mean()
        (unstructured, _), (structured, structured_var) = strategy.component_predictions(model.covar(x, x))
    return model, losses, latent, structured, structured_var, unstructured, names, shapefile


def draw(shapefile: str, values: np.ndarray, path: Path) -> None:
    import libpysal
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon

    shapes = libpysal.io.open(shapefile)
    patches, colours = [], []
    for shape, value in zip(shapes, values):
        for part in shape.parts:
            patches.append(Polygon(np.asarray(part), closed=True))
            colours.append(value)
    fig, ax = plt.subplots(figsize=(10, 4))
    collection = PatchCollection(patches, cmap="RdBu_r", edgecolor="grey", linewidth=0.3)
    collection.set_array(np.asarray(colours))
    limit = float(np.abs(values).max())
    collection.set_clim(-limit, limit)
    ax.add_collection(collection)
    ax.autoscale_view()
    ax.set_aspect("equal")
    ax.axis("off")
    fig.colorbar(collection, ax=ax, shrink=0.7, label="posterior mean of the BYM2 area effect (log-rate)")
    ax.set_title("North Carolina SIDS 1979–84: area effect b = structured + unstructured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNG figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, losses, latent, structured, _, unstructured, names, shapefile = fit(args.steps)
    elapsed = time.perf_counter() - start
    n = len(structured)
    phi, tau = float(model.covar.phi.detach()), float(model.covar.precision.detach())
    noise, mu = float(model.likelihood.noise.detach()), float(model.mean.constant.detach())
    print(f"{args.steps} Adam steps in {elapsed:.1f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"learned: mu = {mu:.3f}, phi = {phi:.3f}, tau = {tau:.3f}, noise = {noise:.4f}")
    print(f"structured component: sum of its posterior mean {float(latent[n:].sum()):.2e} (constraint: 0)")
    effect = (structured + unstructured).numpy()
    order = np.argsort(effect)
    print("highest area effects:", ", ".join(f"{names[i]} {effect[i]:+.2f}" for i in order[::-1][:3]))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        draw(shapefile, effect, args.out / "disease_mapping_gaussian.png")
        print(f"figure: {args.out / 'disease_mapping_gaussian.png'}")
    except ImportError as error:  # matplotlib is optional
        print(f"no figure ({error})")


if __name__ == "__main__":
    main()
