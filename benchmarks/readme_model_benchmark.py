"""The README's "model in 15 lines", run as a new user would, at its real size.

20 000 scattered points in the unit square, ``y = sin(6x)·cos(4y) + N(0, 0.1²)``, the README's
``SpatialGP`` (``ScaleKernel(LatticeMaternKernel(grid_size=128))`` on ``[-0.2, 1.2]²``), the
unchanged GPyTorch Adam loop, then ``likelihood(model(x_test))`` for 500 and 10 000 held-out
points. Prints and writes: training time of the first and the median step, the learned noise
variance (truth 0.01), prediction time (mean and exact variances), RMSE of the mean against the
noise-free field, and the coverage of the 95 % predictive intervals of held-out noisy y.

    python benchmarks/readme_model_benchmark.py                        # the README's settings
    python benchmarks/readme_model_benchmark.py --steps 50 --lr 0.05   # the settings of gpsparse 0.1's README
    python benchmarks/readme_model_benchmark.py --n 2000 --grid 64 --steps 60 --test 500   # a quick run

Writes benchmarks/results/readme_model.md and .json (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import gpytorch
import torch

from gpsparse.kernels import LatticeMaternKernel

NOISE_SD = 0.1


def field(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(6 * z[:, 0]) * torch.cos(4 * z[:, 1])


class SpatialGP(gpytorch.models.ExactGP):
    """The README's model."""

    def __init__(self, x, y, likelihood, grid_size):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        lattice = LatticeMaternKernel(bounds=[[-0.2, -0.2], [1.2, 1.2]], grid_size=grid_size)
        self.covar = gpytorch.kernels.ScaleKernel(lattice)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.n, 2, generator=gen)
    y = field(x) + NOISE_SD * torch.randn(args.n, generator=gen)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = SpatialGP(x, y, likelihood, args.grid)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps) if args.schedule == "cosine" else None
    step_s = []
    for step in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        step_s.append(time.perf_counter() - start)
        if args.verbose and (step % 10 == 9 or step == args.steps - 1):
            print(f"step {step + 1}: loss {float(loss):.4f}, noise {float(likelihood.noise):.4g}", flush=True)
    result = {
        "n": args.n,
        "grid": args.grid,
        "steps": args.steps,
        "lr": args.lr,
        "schedule": args.schedule,
        "first_step_s": step_s[0],
        "median_step_s": statistics.median(step_s),
        "train_s": sum(step_s),
        "noise": float(likelihood.noise),
        "noise_rel_error": float(likelihood.noise) / NOISE_SD**2 - 1,
        "predictions": [],
    }
    model.eval()
    likelihood.eval()
    for m in args.test:
        x_test = torch.rand(m, 2, generator=gen)
        y_test = field(x_test) + NOISE_SD * torch.randn(m, generator=gen)
        model.prediction_strategy = None  # cold: every size pays the posterior solve and factorisation
        start = time.perf_counter()
        with torch.no_grad():
            pred = likelihood(model(x_test))
            mean, variance = pred.mean, pred.variance
        seconds = time.perf_counter() - start
        half = 1.959963984540054 * variance.sqrt()
        result["predictions"].append(
            {
                "m": m,
                "predict_s": seconds,
                "rmse_field": float((mean - field(x_test)).pow(2).mean().sqrt()),
                "coverage95": float(((y_test - mean).abs() <= half).double().mean()),
                "variance_range": [float(variance.min()), float(variance.max())],
            }
        )
    return result


def render(result: dict, info: str) -> str:
    lines = [
        f"{info}\n",
        f"n = {result['n']:,} points, grid {result['grid']}², Adam lr = {result['lr']} ({result['schedule']} "
        f"schedule), {result['steps']} steps\n",
        "| first step s | median step s | training s | learned noise (truth 0.01) | rel. error |",
        "|---|---|---|---|---|",
        f"| {result['first_step_s']:.2f} | {result['median_step_s']:.2f} | {result['train_s']:.0f} | "
        f"{result['noise']:.4g} | {result['noise_rel_error']:+.0%} |\n",
        "| test points | prediction s (mean + exact variances, cold caches) | RMSE vs noise-free field "
        "| 95 % coverage | "
        "predictive variance range |",
        "|---|---|---|---|---|",
    ]
    for p in result["predictions"]:
        lines.append(
            f"| {p['m']:,} | {p['predict_s']:.2f} | {p['rmse_field']:.4f} | {p['coverage95']:.3f} | "
            f"{p['variance_range'][0]:.4g} – {p['variance_range'][1]:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (the README's: 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (the README's: 0.1)")
    parser.add_argument("--schedule", choices=("none", "cosine"), default="none", help="learning-rate schedule")
    parser.add_argument("--test", type=int, nargs="+", default=[500, 10_000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "readme_model")
    args = parser.parse_args()
    load = os.getloadavg()
    info = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{args.threads} thread(s); load average at start {load[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    result = run(args)
    text = render(result, info)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"info": info, **result}, indent=1))


if __name__ == "__main__":
    main()
