"""Mauna Loa CO₂: a Markov Matérn GP with a trend + seasonal mean, fit in O(n) and forecast.

The data are the weekly CO₂ concentrations measured at Mauna Loa, 1958–2001, as shipped with
statsmodels (``statsmodels.datasets.co2``). The model is a stock GPyTorch ``ExactGP``:

    mean    m(t) = a + b·s + c·s² + Σ_{k=1,2} (α_k sin 2πkt + β_k cos 2πkt),   s = (t − 1980)/20
    kernel  ScaleKernel(MarkovMaternKernel(nu=1.5))        (Matérn 3/2 on the residual)
    noise   GaussianLikelihood

``MarkovMaternKernel`` is the Matérn 3/2 covariance written through its exact sparse
(block-tridiagonal) precision over the state (f, f'); marginal likelihood, gradients and
predictions go through gpsparse's exact banded factorisation, O(n) per step. The same model
with ``gpytorch.kernels.MaternKernel(nu=1.5)`` (dense Cholesky, O(n³)) is the reference: the
script trains the gpsparse model on the data up to the end of 1997, forecasts 1998–2001 with
uncertainty, evaluates the dense GPyTorch model at the learned hyperparameters (same marginal
likelihood to rounding) and times a training step of both.

Default: monthly means (≈ 480 training points), a few seconds. ``--full``: the weekly record
(≈ 2 000 training points).

    python examples/co2_forecast.py [--full] [--steps 150] [--out figures/]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch

from gpsparse.kernels import MarkovMaternKernel

SPLIT_YEAR = 1998.0


def load_co2(full: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decimal years and CO₂ (ppm), missing weeks dropped; monthly means unless ``full``."""
    from statsmodels.datasets import co2

    data = co2.load_pandas().data.dropna()
    if not full:
        data = data.resample("MS").mean().dropna()
    index = data.index
    years = index.year + (index.day_of_year - 1) / np.where(index.is_leap_year, 366.0, 365.0)
    return np.asarray(years, dtype=np.float64), data["co2"].to_numpy(dtype=np.float64, copy=True)


class TrendSeasonalMean(gpytorch.means.Mean):
    """Quadratic trend plus two annual harmonics, all coefficients learnable."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        coef = torch.linalg.lstsq(self.design(x), y.unsqueeze(-1)).solution.squeeze(-1)  # least-squares start
        self.register_parameter("coef", torch.nn.Parameter(coef))

    @staticmethod
    def design(x: torch.Tensor) -> torch.Tensor:
        """``(n, 7)``: 1, s, s², sin 2πt, cos 2πt, sin 4πt, cos 4πt."""
        t = x[..., 0]
        s = (t - 1980.0) / 20.0
        angle = 2 * math.pi * t
        columns = [torch.ones_like(s), s, s * s, angle.sin(), angle.cos(), (2 * angle).sin(), (2 * angle).cos()]
        return torch.stack(columns, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.design(x) @ self.coef


class CO2Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, base_kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = TrendSeasonalMean(x, y)
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_model(x, y, dense: bool) -> CO2Model:
    base = gpytorch.kernels.MaternKernel(nu=1.5) if dense else MarkovMaternKernel(nu=1.5)
    model = CO2Model(x, y, gpytorch.likelihoods.GaussianLikelihood(), base).double()
    model.covar_module.base_kernel.lengthscale = 1.0
    model.covar_module.outputscale = 1.0
    model.likelihood.noise = 0.1
    return model


def train(model: CO2Model, steps: int, progress: bool = True) -> float:
    """Adam on −MLL/n (an unchanged GPyTorch loop); returns seconds per step."""
    from tqdm.auto import tqdm

    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = model.train_inputs[0], model.train_targets
    bar = tqdm(range(steps), desc="Adam", disable=not progress)
    start = time.perf_counter()
    for _ in bar:
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        bar.set_postfix(
            loss=f"{loss.item():.4f}", lengthscale=f"{model.covar_module.base_kernel.lengthscale.item():.3f}"
        )
    return (time.perf_counter() - start) / steps


def marginal_loglik(model: CO2Model) -> float:
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with torch.no_grad():
        return float(mll(model(model.train_inputs[0]), model.train_targets))


def forecast(model: CO2Model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Predictive mean and standard deviation of y (noise included)."""
    model.eval()
    with torch.no_grad():
        pred = model.likelihood(model(x))
        return pred.mean.numpy(), pred.variance.sqrt().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the weekly record instead of monthly means")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps")
    parser.add_argument("--timing-steps", type=int, default=5, help="steps timed for each model in the comparison")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNG figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    years, co2 = load_co2(args.full)
    train_mask = years < SPLIT_YEAR
    x = torch.from_numpy(years).unsqueeze(-1)
    y = torch.from_numpy(co2)
    x_train, y_train, x_test = x[train_mask], y[train_mask], x[~train_mask]
    print(
        f"Mauna Loa CO₂ ({'weekly' if args.full else 'monthly means'}): {len(x_train)} training points "
        f"({years[0]:.1f}–{SPLIT_YEAR:.0f}), {len(x_test)} held out ({SPLIT_YEAR:.0f}–{years[-1]:.1f})"
    )

    torch.manual_seed(0)
    model = make_model(x_train, y_train, dense=False)
    seconds = train(model, args.steps)
    kernel = model.covar_module
    print(
        f"learned: lengthscale {kernel.base_kernel.lengthscale.item():.3f} years, "
        f"outputscale {kernel.outputscale.item():.4f} ppm², noise {model.likelihood.noise.item():.4f} ppm², "
        f"trend slope {model.mean_module.coef[1].item() / 20:.3f} ppm/year at 1980"
    )

    mean, std = forecast(model, x)
    test_rmse = float(np.sqrt(np.mean((mean[~train_mask] - co2[~train_mask]) ** 2)))
    coverage = float(np.mean(np.abs(mean[~train_mask] - co2[~train_mask]) <= 2 * std[~train_mask]))
    print(
        f"forecast {SPLIT_YEAR:.0f}–{years[-1]:.0f}: RMSE {test_rmse:.3f} ppm, "
        f"{coverage:.0%} of held-out points inside ±2σ"
    )

    # Reference: the same model with GPyTorch's dense Matérn kernel, at the learned hyperparameters.
    dense = make_model(x_train, y_train, dense=True)
    dense.load_state_dict(model.state_dict())
    sparse_mll, dense_mll = marginal_loglik(model), marginal_loglik(dense)
    dense_mean, _ = forecast(dense, x_test)
    print(
        f"marginal log-likelihood / n: gpsparse {sparse_mll:.10f}, dense GPyTorch {dense_mll:.10f} "
        f"(relative difference {abs(sparse_mll - dense_mll) / abs(dense_mll):.1e}); "
        f"forecast means differ by at most {np.abs(dense_mean - mean[~train_mask]).max():.1e} ppm"
    )
    sparse_step = train(make_model(x_train, y_train, dense=False), args.timing_steps, progress=False)
    dense_step = train(dense, args.timing_steps, progress=False)
    print(
        f"one training step (MLL + gradient): gpsparse {1e3 * sparse_step:.1f} ms, dense GPyTorch "
        f"{1e3 * dense_step:.1f} ms ({dense_step / sparse_step:.1f}×, {torch.get_num_threads()} torch threads); "
        f"training took {seconds * args.steps:.1f} s"
    )

    save_figure(args.out, years, co2, train_mask, mean, std)


def save_figure(folder: Path, years, co2, train_mask, mean, std) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for ax, window in zip(axes, [(years[0], years[-1]), (1994.0, years[-1])]):
        keep = (years >= window[0]) & (years <= window[1])
        t = years[keep]
        ax.fill_between(t, (mean - 2 * std)[keep], (mean + 2 * std)[keep], color="tab:blue", alpha=0.25, label="±2σ")
        ax.plot(t, mean[keep], color="tab:blue", lw=1, label="GP mean")
        ax.plot(years[keep & train_mask], co2[keep & train_mask], ".", ms=2, color="k", label="training data")
        ax.plot(years[keep & ~train_mask], co2[keep & ~train_mask], ".", ms=3, color="tab:red", label="held out")
        ax.axvline(SPLIT_YEAR, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("year")
        ax.set_ylabel("CO₂ (ppm)")
    axes[0].set_title("Mauna Loa CO₂ — Markov Matérn 3/2 + trend/seasonal mean")
    axes[1].set_title("forecast 1998–2001")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = folder / "co2_forecast.png"
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
