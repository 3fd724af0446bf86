"""The Laplace approximation with intrinsic priors (BYM2, Besag, random walks) against a dense constrained reference.

The reference is written from the definition only: with ``V_⊥`` an orthonormal basis of the
constraint subspace ``S = {x : Vᵀx = 0}`` (a full QR of ``V``, a constant), the constrained field is
``x = V_⊥ z`` with the proper prior ``z ~ N(0, (V_⊥ᵀQV_⊥)⁻¹)``, and the approximation is the ordinary
dense Laplace approximation in ``z`` (``tests/test_laplace.py``'s Newton and implicit gradient,
``Q_z = V_⊥ᵀQV_⊥``, ``W_z = W V_⊥``): ``log det Q_z = log det_S Q`` and the mode ``x̂ = V_⊥ ẑ``.
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch

import gpsparse
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.laplace import factorize
from gpsparse.core.laplace_constraints import ConstraintSpace
from gpsparse.errors import NotPositiveDefiniteError
from gpsparse.kernels import BesagKernel, BYM2Kernel, LatticeMaternKernel, RandomWalkKernel
from gpsparse.likelihoods import BernoulliLikelihood, NegativeBinomialLikelihood, PoissonLikelihood
from gpsparse.mlls import LaplaceMarginalLogLikelihood
from gpsparse.models import LaplaceGP
from tests.test_laplace import _derivatives, dense_mode, grid_graph, laplace_value_and_grads, reference_logp

needs_cholmod = pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")


def _complement(V: torch.Tensor) -> torch.Tensor:
    full, _ = torch.linalg.qr(V, mode="complete")
    return full[:, V.shape[1] :]


def dense_constrained_laplace(model, x, logp):
    """``(value, mode, gradients)`` of the constrained dense reference (module docstring)."""
    params = list(model.parameters())
    op = model.covar_module(x).evaluate_kernel()
    V = op.constraints.basis(torch.float64)
    B = _complement(V)
    Q, W, mu = op.Q.to_dense(), op.interp.to_dense(), model.mean_module(x)
    Qz, Wz = B.T @ Q @ B, W @ B
    zhat = dense_mode(Qz, Wz, mu, logp)
    zv = zhat.clone().requires_grad_(True)
    f = mu + Wz @ zv
    _, d2 = _derivatives(logp, f, True)
    A = Qz + Wz.T @ (-d2[:, None] * Wz)
    value = logp(f).sum() - 0.5 * zv @ Qz @ zv + 0.5 * torch.logdet(Qz) - 0.5 * torch.logdet(A)
    dfdz = torch.autograd.grad(value, zv, retain_graph=True)[0]
    a = torch.linalg.solve(A.detach(), dfdz.detach())
    grad_psi = torch.autograd.grad(logp(f).sum() - 0.5 * zv @ Qz @ zv, zv, create_graph=True)[0]
    grads = torch.autograd.grad(value + a @ grad_psi, params, allow_unused=True)
    return value.detach(), B @ zhat, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def two_component_graph() -> tuple[torch.Tensor, int]:
    """A 5 × 5 grid (irregular degrees) and a 6-node path: two components, 31 nodes."""
    grid = grid_graph(5)
    path = torch.stack([torch.arange(25, 30), torch.arange(26, 31)])
    return torch.cat([grid, path], 1), 31


def make_model(prior: str, kind: str, *, road: str = "auto", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = 45
    if prior in ("bym2", "besag"):
        graph, n = two_component_graph() if prior == "besag" else (grid_graph(6), 36)
        x = torch.randint(0, n, (m, 1), generator=gen).double()  # repeated areas, some unobserved
        coordinate = x[:, 0] / n
        if prior == "bym2":
            kernel = BYM2Kernel(graph, n)
            kernel.phi, kernel.precision = 0.6, 1.7
        else:
            kernel = gpytorch.kernels.ScaleKernel(BesagKernel(graph, n))
            kernel.outputscale = 0.8
    elif prior in ("rw1", "rw2"):
        knots = torch.sort(torch.rand(20, generator=gen, dtype=torch.float64)).values
        x = knots[0] + (knots[-1] - knots[0]) * torch.rand(m, 1, generator=gen, dtype=torch.float64)
        coordinate = x[:, 0]
        kernel = gpytorch.kernels.ScaleKernel(RandomWalkKernel(knots, order=int(prior[-1])))
        kernel.outputscale = 0.5
    elif prior == "bym2+lattice":  # an intrinsic area effect plus a lattice field (column 1)
        n = 36
        ids = torch.randint(0, n, (m, 1), generator=gen).double()
        x = torch.cat([ids, torch.rand(m, 1, generator=gen, dtype=torch.float64)], -1)
        coordinate = x[:, 1]
        kernel = BYM2Kernel(grid_graph(6), n, active_dims=[0]) + gpytorch.kernels.ScaleKernel(
            LatticeMaternKernel([-0.2, 1.2], 20, active_dims=[1])
        )
        kernel.kernels[1].base_kernel.lengthscale = 0.3
    else:
        raise ValueError(prior)
    truth = 0.3 + torch.sin(5 * coordinate)
    exposure = 0.5 + torch.rand(m, generator=gen, dtype=torch.float64)
    if kind == "poisson":
        likelihood = PoissonLikelihood(exposure=exposure)
        y = torch.poisson(exposure * torch.exp(truth), generator=gen)
    elif kind in ("logit", "probit"):
        likelihood = BernoulliLikelihood(link=kind)
        y = torch.bernoulli(torch.sigmoid(2 * truth), generator=gen)
    else:
        likelihood = NegativeBinomialLikelihood(exposure=exposure)
        likelihood.dispersion = 3.0
        y = torch.poisson(exposure * torch.exp(truth), generator=gen)
    model = LaplaceGP(x, y, likelihood, covar_module=kernel, road=road, newton_tol=1e-13).double()
    model.mean_module.constant.data.fill_(0.1)
    return model, x, y


def logp_of(model, kind, y):
    likelihood = model.likelihood
    offset = None if likelihood.exposure is None else likelihood.exposure.log()
    return reference_logp(kind, y, offset, likelihood.dispersion if kind == "negbin" else None)


def _check_against_reference(model, x, y, kind):
    value, grads = laplace_value_and_grads(model, x, y)
    ref_value, ref_mode, ref_grads = dense_constrained_laplace(model, x, logp_of(model, kind, y))
    torch.testing.assert_close(model.laplace_state.mode, ref_mode, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    for name, mine, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(mine, ref, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    V = model.covar_module(x).evaluate_kernel().constraints.basis(torch.float64)
    assert float((V.T @ model.laplace_state.mode).abs().max()) < 1e-10  # the mode satisfies the constraints


KINDS = ["poisson", "logit", "probit", "negbin"]


@needs_cholmod
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prior", ["bym2", "besag", "rw1", "rw2", "bym2+lattice"])
def test_against_dense_constrained_reference(prior, kind):
    model, x, y = make_model(prior, kind)
    _check_against_reference(model, x, y, kind)
    assert model.laplace_state.road in ("cholesky", "banded")


@pytest.mark.parametrize("prior, kind", [("bym2", "poisson"), ("besag", "logit"), ("rw2", "negbin")])
def test_dense_road_against_reference(prior, kind):
    model, x, y = make_model(prior, kind, road="dense")
    _check_against_reference(model, x, y, kind)
    assert model.laplace_state.road == "dense"


def test_banded_road_for_a_random_walk():
    model, x, y = make_model("rw1", "poisson", road="banded")
    _check_against_reference(model, x, y, "poisson")
    assert model.laplace_state.road == "banded"


@pytest.mark.parametrize("prior, kind", [("bym2", "poisson"), ("rw2", "logit")])
def test_finite_differences_of_the_objective(prior, kind):
    model, x, y = make_model(prior, kind, road="dense")
    _, grads = laplace_value_and_grads(model, x, y)
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    # The objective is smooth to ~1e-9 only: Newton stops at the rounding floor of the solve (the "stalled"
    # rule of NewtonOptions), and on RW2 (condition ~1e10) that floor leaves mode errors that move the
    # objective by ~1e-9 where a ±h step changes the iteration count (measured: h = 1e-5 off by 5e-4 in
    # d/dconstant, 2e-3 in d/doutputscale at h = 1e-4, while h = 1e-3 agrees to 1e-8).
    h = 1e-3
    for (name, param), grad in zip(model.named_parameters(), grads):
        flat = param.data.view(-1)
        for i in range(flat.numel()):
            values = []
            for sign in (1.0, -1.0):
                original = float(flat[i])
                flat[i] = original + sign * h
                model.laplace_state.mode = None
                with torch.no_grad():
                    values.append(float(mll(model(x), y)))
                flat[i] = original
            fd = (values[0] - values[1]) / (2 * h)
            assert abs(fd - float(grad.view(-1)[i])) <= 1e-6 * (1 + abs(fd)), (name, fd, float(grad.view(-1)[i]))


def test_prediction_against_dense():
    """``N(μ* + W*x̂, W* Σ_P W*ᵀ)`` with ``Σ_P = V_⊥(V_⊥ᵀPV_⊥)⁻¹V_⊥ᵀ`` formed densely."""
    model, x, y = make_model("bym2", "poisson", road="dense")
    logp = logp_of(model, "poisson", y)
    _, mode, _ = dense_constrained_laplace(model, x, logp)
    op = model.covar_module(x).evaluate_kernel()
    Q, W, mu = op.Q.to_dense(), op.interp.to_dense(), model.mean_module(x).detach()
    _, d2 = _derivatives(logp, mu + W @ mode, False)
    P = Q.detach() + W.T @ (-d2[:, None] * W)
    B = _complement(op.constraints.basis(torch.float64))
    sigma = B @ torch.linalg.solve(B.T @ P @ B, B.T)
    x_test = torch.arange(36.0, dtype=torch.float64).unsqueeze(-1)
    W_test = model.covar_module(x_test, x).evaluate_kernel().interp.to_dense()
    model.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-13):  # the operator's solves (CG at this size)
        pred = model(x_test)
        mean, variance = pred.mean, pred.variance
        covariance = pred.covariance_matrix
    torch.testing.assert_close(mean, model.mean_module(x_test).detach() + W_test @ mode, rtol=0, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(W_test @ sigma @ W_test.T), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(covariance, W_test @ sigma @ W_test.T, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        rates = model.likelihood(model(x_test), exposure=torch.ones(36, dtype=torch.float64)).mean  # Gauss–Hermite
    assert rates.shape == (36,) and bool((rates > 0).all())


def test_training_loop_keeps_the_constraints_and_increases_the_objective():
    model, x, y = make_model("bym2", "poisson")
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    values = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        values.append(-float(loss))
    assert values[-1] > values[0]
    assert model.laplace_state.history[-1] <= 4  # warm starts
    V = model.covar_module.constraints.basis(torch.float64)
    assert float((V.T @ model.laplace_state.mode).abs().max()) < 1e-10


def test_an_unobserved_component_stays_proper():
    """No observation on the path component: ``P = Q`` there (singular), still positive definite on ``S``."""
    graph, n = two_component_graph()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 25, (30, 1), generator=gen).double()  # only the grid component is observed
    y = torch.poisson(torch.full((30,), 2.0, dtype=torch.float64), generator=gen)
    model = LaplaceGP(x, y, PoissonLikelihood(), covar_module=BesagKernel(graph, n), road="dense").double()
    value, _ = laplace_value_and_grads(model, x, y)
    ref_value, ref_mode, _ = dense_constrained_laplace(model, x, logp_of(model, "poisson", y))
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(model.laplace_state.mode[25:], torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constraints_need_an_exact_road():
    model, x, y = make_model("bym2", "poisson", road="krylov")
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(NotImplementedError, match="exact roads"):
        mll(model(x), y)


def test_a_null_space_beyond_the_constraints_is_refused():
    """A Besag field on two components with only one sum-to-zero constraint: improper, a clear error."""
    n = 6
    path = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5]])  # components {0,1,2} and {3,4,5}
    kernel = BesagKernel(path, n)
    q = kernel.precision(torch.float64)
    space = ConstraintSpace(torch.full((n, 1), 1 / math.sqrt(n), dtype=torch.float64), torch.tensor([0]))
    for road in ("dense", "cholesky") if cholmod_available() else ("dense",):
        with pytest.raises(NotPositiveDefiniteError, match="constraint subspace"):
            factorize(q.values.detach(), q.pattern, road, constraints=space)
