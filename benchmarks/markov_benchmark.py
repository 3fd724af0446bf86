"""One training step (−MLL + backward) of a 1-D GP: MarkovMaternKernel (Kalman filter), the banded precision, dense.

Three kernels in the same run: ``MarkovMaternKernel`` (the state-space road: covariance-form Kalman
filter and its adjoint, gpsparse.core.kalman), ``banded`` — the previous road, the same covariance as
``W Q⁻¹ Wᵀ`` with the block-tridiagonal precision of ``matern_precision`` on the distinct sorted
inputs and gpsparse's exact banded Cholesky (a benchmark-local kernel, ``_BandedMatern``) — and
GPyTorch's dense ``MaternKernel``.

Model: stock GPyTorch ExactGP, ConstantMean, ScaleKernel(kernel), GaussianLikelihood, float64;
inputs a shuffled jittered grid t_i = (i + U/2)·0.3 (smallest gap 0.15, so λ·Δ ≥ 0.17 for
ℓ = 2 and no CloseInputsWarning), y = sin(t/3) + 0.2 ε. For every n and ν the script times
``loss = −ExactMarginalLogLikelihood(model(x), y); loss.backward()`` (gradients w.r.t.
lengthscale, outputscale, noise and mean) in a fresh subprocess: the first call (which also
sorts the inputs and builds the patterns, band layouts and union structures) and the median
of the following ``--repeats`` calls (a training loop's steady state; the dense model caches
nothing, so it is timed once), with the peak RSS of the subprocess. The dense reference is
gpytorch.kernels.MaternKernel under exact Cholesky (max_cholesky_size = ∞) at the sizes it can
hold; the accuracy column is |MLL − MLL_dense| / |MLL_dense| for the same data. Subnormal
floats are flushed to zero (torch.set_flush_denormal) in both: the far-apart entries of the
dense matrix otherwise slow its Cholesky ~8×.

    python benchmarks/markov_benchmark.py [--sizes 1e4 1e5 1e6] [--dense-sizes 1e4] [--threads 1]

Writes benchmarks/results/markov_cpu_1thread.md and .json (the tag follows --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

NUS = (0.5, 1.5, 2.5)


def _peer_filter():
    """A straightforward value-only numba Kalman filter (the floor of issue 12): −log p(y) of y = z₀ + e."""
    import numba
    import numpy as np

    @numba.njit(cache=True)
    def filter_value(A, S, P0, y, noise):
        n, s = y.shape[0], P0.shape[0]
        m = np.zeros(s)
        P = P0.copy()
        total = 0.0
        for k in range(n):
            if k > 0:
                m = A[k - 1] @ m
                P = A[k - 1] @ P @ A[k - 1].T + S[k - 1]
            Sk = P[0, 0] + noise
            v = y[k] - m[0]
            gain = P[:, 0] / Sk
            m = m + gain * v
            P = P - np.outer(gain, P[0, :])
            total += 0.5 * (v * v / Sk + np.log(2 * np.pi * Sk))
        return total

    return filter_value


def peer_worker(spec: dict) -> dict:
    """Time the value-only peer on the benchmark's data (A, Σ precomputed outside the timing)."""
    import torch

    from gpsparse.autograd.markov import matern_transition_and_noise
    from gpsparse.core.markov import matern_state_space

    n, nu = spec["n"], spec["nu"]
    gen = torch.Generator().manual_seed(0)
    t = (torch.arange(n, dtype=torch.float64) + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * 0.3
    x = t[torch.randperm(n, generator=gen)]
    y = torch.sin(x / 3) + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
    order = torch.argsort(x)
    xs, ys = x[order], y[order]  # the models' constant mean starts at 0
    start = time.perf_counter()
    with torch.no_grad():
        A, S = matern_transition_and_noise((2 * nu) ** 0.5 / 2.0 * (xs[1:] - xs[:-1]), nu)  # ℓ = 2
    blocks_s = time.perf_counter() - start
    scale = 1.5
    A, S = A.numpy().copy(), (scale * S).numpy().copy()
    P0 = scale * matern_state_space(nu).stationary.numpy().copy()
    import gpytorch

    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.05
    noise = float(likelihood.noise.detach())  # 0.05000000074505807: the constraint's float32 lower bound
    filter_value = _peer_filter()
    filter_value(A[:10], S[:10], P0, ys.numpy()[:11].copy(), noise)  # compile / load the cache
    times = []
    for _ in range(max(spec["repeats"], 1)):
        start = time.perf_counter()
        value = filter_value(A, S, P0, ys.numpy(), noise)
        times.append(time.perf_counter() - start)
    return {
        "mll": -value / n,  # per datum, as ExactMarginalLogLikelihood
        "first_s": times[0],
        "steady_s": statistics.median(times),
        "blocks_s": blocks_s,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "grads": [],
    }


def worker(spec: dict) -> dict:
    if spec["kernel"] == "peer":
        return peer_worker(spec)
    import gpytorch
    import torch

    from gpsparse.kernels.markov import MarkovMaternKernel

    torch.set_num_threads(spec["threads"])
    # Far-apart inputs give kernel entries e^{−λ|t − t'|} in the subnormal range; without flush-to-zero
    # the dense Cholesky and triangular solves run ~8× slower on them (measured at n = 2000).
    torch.set_flush_denormal(True)
    n, nu = spec["n"], spec["nu"]
    gen = torch.Generator().manual_seed(0)
    t = (torch.arange(n, dtype=torch.float64) + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * 0.3
    x = t[torch.randperm(n, generator=gen)][:, None]
    y = torch.sin(x[:, 0] / 3) + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, kernel):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    if spec["kernel"] == "markov":
        kernel = MarkovMaternKernel(nu=nu)
    elif spec["kernel"] == "banded":
        kernel = _banded_kernel(nu)
    else:
        kernel = gpytorch.kernels.MaternKernel(nu=nu)
    model = Model(kernel).double()
    model.covar_module.base_kernel.lengthscale = 2.0
    model.covar_module.outputscale = 1.5
    model.likelihood.noise = 0.05
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

    def step() -> tuple[float, float]:
        model.zero_grad()
        start = time.perf_counter()
        with gpytorch.settings.max_cholesky_size(10**9):
            loss = -mll(model(x), y)
        loss.backward()
        return time.perf_counter() - start, float(loss)

    first, value = step()
    steady = [step()[0] for _ in range(spec["repeats"])]
    grads = [float(p.grad.reshape(-1)[0]) for p in model.parameters()]
    return {
        "mll": -value,
        "first_s": first,
        "steady_s": statistics.median(steady) if steady else None,
        "grads": grads,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _banded_kernel(nu: float):
    """The precision road: ``SparsePrecisionLinearOperator(matern_precision(nodes), W)`` (exact banded Cholesky)."""
    import math

    import gpytorch
    import torch

    from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
    from gpsparse.core.markov import precision_pattern
    from gpsparse.core.pattern import SparsityPattern
    from gpsparse.kernels.markov import matern_precision
    from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy

    class _BandedMatern(gpytorch.kernels.Kernel):
        has_lengthscale = True

        def __init__(self):
            super().__init__()
            self.cache = None

        def forward(self, x1, x2, diag=False, **params):
            if self.cache is None or self.cache[0] is not x1:
                unique, node = torch.unique(x1[:, 0].detach(), sorted=True, return_inverse=True)
                s = int(nu + 0.5)
                rows = SparsityPattern(torch.arange(node.numel() + 1), node * s, (node.numel(), unique.numel() * s))
                self.cache = (x1, unique, rows, precision_pattern(unique.numel(), s))
            _, unique, rows, pattern = self.cache
            rate = math.sqrt(2 * nu) / self.lengthscale[..., 0, 0]
            Q = matern_precision(unique, rate, nu, pattern=pattern)
            W = SparseLinearOperator(torch.ones(rows.nnz, dtype=Q.dtype), pattern=rows)
            return SparsePrecisionLinearOperator(Q, interp=W)

        def prediction_strategy(self, *args):
            return SparsePrecisionPredictionStrategy(*args)

    return _BandedMatern()


def run_case(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(spec["threads"])
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": (lines[-1] if lines else f"exit code {out.returncode}")[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"threads {threads} (torch, BLAS, numba); subnormals flushed to zero; "
        f"load average at start {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--dense-sizes", type=float, nargs="*", default=[2e3])
    parser.add_argument("--nus", type=float, nargs="+", default=list(NUS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    out = args.out or Path(__file__).parent / "results" / f"markov_cpu_{args.threads}thread"
    sizes = sorted({int(s) for s in args.sizes} | {int(s) for s in args.dense_sizes})
    dense_sizes = {int(s) for s in args.dense_sizes}
    lines = [header(args.threads), ""]
    lines += [
        "| n | kernel | ν | −MLL / n | rel. diff vs dense | first call s | steady s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for n in sizes:
        for nu in args.nus:
            dense = None
            kinds = (["dense"] if n in dense_sizes else []) + (
                ["markov", "banded", "peer"] if n in {int(s) for s in args.sizes} else []
            )
            for kind in kinds:
                repeats = 0 if kind == "dense" else args.repeats  # dense: nothing is cached between calls
                spec = {"n": n, "nu": nu, "kernel": kind, "threads": args.threads, "repeats": repeats}
                res = run_case(spec, args.timeout)
                res.update(n=n, nu=nu, kernel=kind)
                rows.append(res)
                name = {
                    "markov": "MarkovMaternKernel (Kalman)",
                    "banded": "precision W Q⁻¹ Wᵀ (banded Cholesky)",
                    "dense": "gpytorch MaternKernel (dense)",
                    "peer": "value-only numba Kalman filter (peer, A/Σ given)",
                }[kind]
                if "error" in res:
                    line = f"| {n:,} | {name} | {nu} | — | — | — | — | {res['error']} |"
                else:
                    if kind == "dense":
                        dense = res["mll"]
                    rel = "—" if dense is None or kind == "dense" else f"{abs(res['mll'] - dense) / abs(dense):.1e}"
                    steady = "—" if res["steady_s"] is None else f"{res['steady_s']:.2f}"
                    line = (
                        f"| {n:,} | {name} | {nu} | {-res['mll']:.10g} | {rel} | {res['first_s']:.2f} | {steady} | "
                        f"{res['peak_mib']:.0f} |"
                    )
                print(line, flush=True)
                lines.append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"written {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
