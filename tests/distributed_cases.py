"""Cases of the probe-parallel tests (tests/test_distributed.py), run in one process or in each rank of a group.

Each case returns a dict of tensors (estimates, gradients, trained parameters);
``run_all`` runs them in order under ``gpsparse.distributed.probe_parallel``
when a process group is initialised, else plainly (the single-process reference).
"""

from __future__ import annotations

import contextlib
import warnings

import gpytorch
import torch

import gpsparse
from tests.matrices import lattice_precision_5pt, scipy_to_torch

DTYPE = torch.float64


def _lattice(m: int = 20):
    return scipy_to_torch(lattice_precision_5pt(m, kappa=0.3)).coalesce()


def logdet_adjoint():
    A = _lattice()
    values = A.values().clone().requires_grad_(True)
    S = torch.sparse_coo_tensor(A.indices(), values, A.shape, check_invariants=False)
    gen = torch.Generator().manual_seed(3)
    est = gpsparse.logdet(S, num_probes=16, num_lanczos=40, generator=gen, road="krylov")
    (grad,) = torch.autograd.grad(est, values)
    return {"estimate": est.detach(), "grad": grad}


def inv_quad_logdet_hutchinson():
    A = _lattice()
    values = A.values().clone().requires_grad_(True)
    rhs = torch.linspace(-1, 1, A.shape[0] * 5, dtype=DTYPE).reshape(A.shape[0], 5).requires_grad_(True)
    S = torch.sparse_coo_tensor(A.indices(), values, A.shape, check_invariants=False)
    gen = torch.Generator().manual_seed(4)
    quad, est = gpsparse.inv_quad_logdet(
        S,
        rhs,
        reduce_inv_quad=False,
        num_probes=7,
        gradient="hutchinson",
        generator=gen,
        road="krylov",
        preconditioner="ic0",
    )
    loss = est + (quad * torch.arange(1.0, 6.0, dtype=DTYPE)).sum()
    g_values, g_rhs = torch.autograd.grad(loss, (values, rhs))
    return {"quad": quad.detach(), "estimate": est.detach(), "grad_values": g_values, "grad_rhs": g_rhs}


def solve_columns():
    A = _lattice()
    values = A.values().clone().requires_grad_(True)
    rhs = torch.cos(torch.arange(A.shape[0] * 5, dtype=DTYPE)).reshape(A.shape[0], 5).requires_grad_(True)
    S = torch.sparse_coo_tensor(A.indices(), values, A.shape, check_invariants=False)
    x = gpsparse.solve(S, rhs, road="krylov", rtol=1e-10)
    loss = (x * torch.sin(torch.arange(x.numel(), dtype=DTYPE)).reshape(x.shape)).sum()
    g_values, g_rhs = torch.autograd.grad(loss, (values, rhs))
    return {"solution": x.detach(), "grad_values": g_values, "grad_rhs": g_rhs}


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        lattice = gpsparse.kernels.LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], [36, 36], alpha=2)
        self.covar_module = gpytorch.kernels.ScaleKernel(lattice)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def exact_gp_training(steps: int = 3):
    """A stock ExactGP loop on a 36 × 36 lattice (1 296 nodes: the estimator road of log det P − log det Q)."""
    torch.manual_seed(0)  # data and probes: the same on every rank
    x = torch.rand(300, 2, dtype=DTYPE)
    y = torch.sin(4 * x[:, 0]) * torch.cos(3 * x[:, 1]) + 0.1 * torch.randn(300, dtype=DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = _GP(x, y, likelihood).double()
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses, grads = [], []
    with gpsparse.settings.logdet_defaults(num_probes=8, num_lanczos=30), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpsparse.EstimatorAccuracyWarning)  # 8 probes: a noisy estimate, on purpose
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            optimizer.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": torch.stack(losses), "grads": torch.stack(grads), "params": params}


CASES = {
    "logdet_adjoint": logdet_adjoint,
    "inv_quad_logdet_hutchinson": inv_quad_logdet_hutchinson,
    "solve_columns": solve_columns,
    "exact_gp_training": exact_gp_training,
}


def run_all(names=None) -> dict:
    """Every case (or ``names``), under ``probe_parallel`` when a process group exists.

    ``out["split_calls"]`` counts the calls of each split road of ``gpsparse.linalg.parallel`` per case (so a
    test can tell that the work was split, not run whole on every rank).
    """
    from gpsparse.linalg import parallel as split

    parallel = torch.distributed.is_available() and torch.distributed.is_initialized()
    out, calls = {}, {}
    originals = {n: getattr(split, n) for n in ("split_inv_quad_logdet", "split_groups", "split_solve")}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[current][name] = calls[current].get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return wrapper

    try:
        for n in originals:
            setattr(split, n, counting(n))
        with gpsparse.distributed.probe_parallel() if parallel else contextlib.nullcontext():
            for current in names or CASES:
                calls[current] = {}
                out[current] = CASES[current]()
    finally:
        for n, f in originals.items():
            setattr(split, n, f)
    out["split_calls"] = calls
    return out


def error_cases(rank: int) -> dict:
    """Disagreeing ranks: each returns the error message it raised (every rank must raise)."""
    messages = {}
    with gpsparse.distributed.probe_parallel():
        A = _lattice(10 + rank)  # a different pattern on each rank
        try:
            gpsparse.logdet(A, num_probes=4, generator=torch.Generator().manual_seed(0), road="krylov")
        except ValueError as error:
            messages["pattern"] = str(error)
        A = _lattice(10)
        try:  # different probes: generators seeded differently
            gpsparse.logdet(A, num_probes=4, generator=torch.Generator().manual_seed(rank), road="krylov")
        except ValueError as error:
            messages["probes"] = str(error)
        B = torch.sparse_coo_tensor(A.indices(), A.values() * (1 + rank), A.shape, check_invariants=False)
        try:  # different values
            gpsparse.logdet(B, num_probes=4, generator=torch.Generator().manual_seed(0), road="krylov")
        except ValueError as error:
            messages["values"] = str(error)
        try:  # fewer probes than ranks
            gpsparse.logdet(A, num_probes=1, generator=torch.Generator().manual_seed(0), road="krylov")
        except ValueError as error:
            messages["too_few_probes"] = str(error)
    return messages
