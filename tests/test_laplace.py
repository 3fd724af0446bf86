"""The Laplace approximation (issue 14) against an independent dense float64 Laplace approximation.

The reference below is written from the formulas only: Newton on dense matrices for the mode,
``log p(y|x̂) − ½x̂ᵀQx̂ + ½ log det Q − ½ log det(Q + Wᵀ diag(−∂²ℓ) W)`` with ``ℓ`` written here
(torch.distributions for the negative binomial) and its derivatives in ``f`` by autograd, and the
hyperparameter gradient by implicit differentiation done by autograd on the dense formula at the
converged mode: ``dL/dθ = ∂_θ F + (∂_x F)ᵀ dx̂/dθ`` with ``dx̂/dθ = A⁻¹ ∂_θ∇_xΨ`` (``A`` the negative
Hessian of the log joint ``Ψ``), i.e. the θ-gradient of ``F(θ, x̂) + aᵀ∇_xΨ(θ, x̂)`` for the
constant ``a = A⁻¹ ∂_x F``. ``Q``, ``W`` and ``μ`` are read from the model's prior (the model
definition), densely. Precisions: 2-D lattice (CHOLMOD road), 1-D lattice (banded road), graph
Matérn (CHOLMOD), a sum of two lattice fields (block precision), and the dense road forced.
Markov kernels are no longer sparse-precision kernels (the Kalman road), so they are not
Laplace models; intrinsic priors (BYM2, Besag, random walks): ``tests/test_laplace_constrained.py``.
"""

from __future__ import annotations

import dataclasses
import math

import gpytorch
import pytest
import torch
import torch.nn.functional as F

from gpsparse.core.cholmod import cholmod_available
from gpsparse.errors import NonConvergenceError
from gpsparse.kernels import GraphMaternKernel, LatticeMaternKernel
from gpsparse.likelihoods import BernoulliLikelihood, NegativeBinomialLikelihood, PoissonLikelihood
from gpsparse.mlls import LaplaceMarginalLogLikelihood
from gpsparse.models import LaplaceGP

needs_cholmod = pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")


# --------------------------------------------------------------------------------------------------
# The independent dense reference
# --------------------------------------------------------------------------------------------------


def reference_logp(kind, y, offset=None, dispersion=None):
    def logp(f):
        eta = f if offset is None else f + offset
        if kind == "poisson":
            return y * eta - torch.exp(eta) - torch.lgamma(y + 1)
        if kind == "logit":
            return y * eta - F.softplus(eta)
        if kind == "probit":
            return torch.special.log_ndtr((2 * y - 1) * eta)
        if kind == "negbin":
            r = dispersion.reshape(())
            return torch.distributions.NegativeBinomial(total_count=r, logits=eta - torch.log(r)).log_prob(y)
        raise ValueError(kind)

    return logp


def _derivatives(logp, f, create_graph):
    if not f.requires_grad:
        f = f.detach().requires_grad_(True)
    d1 = torch.autograd.grad(logp(f).sum(), f, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), f, create_graph=create_graph)[0]
    return d1, d2


def dense_mode(Q, W, mu, logp, tol=1e-14, max_iters=200):
    """Newton on the dense matrices; backtracking only far from the mode (near it Ψ's rounding dominates)."""
    Q, W, mu = Q.detach(), W.detach(), mu.detach()
    x = torch.zeros(Q.shape[0], dtype=torch.float64)
    previous = math.inf

    def psi(x):
        return (logp(mu + W @ x).sum() - 0.5 * x @ Q @ x).detach()

    for _ in range(max_iters):
        d1, d2 = (d.detach() for d in _derivatives(logp, mu + W @ x, False))
        g = W.T @ d1 - Q @ x
        step = torch.linalg.solve(Q + W.T @ (-d2[:, None] * W), g)
        size = float(step.abs().max())
        scale = 1 + float(x.abs().max())
        if size <= tol * scale or (size < 1e-7 * scale and size > 0.25 * previous):
            return x
        t = 1.0
        if size > 1e-3 * scale:
            while psi(x + t * step) < psi(x) + 1e-4 * t * float(g @ step) and t > 1e-12:
                t /= 2
        x, previous = x + t * step, size
    raise AssertionError("the dense reference Newton did not converge")


def dense_laplace(model, x, logp_builder):
    """``(value, mode, gradients of every model parameter)`` of the dense reference (module docstring)."""
    params = list(model.parameters())
    op = model.covar_module(x).evaluate_kernel()
    Q, W, mu = op.Q.to_dense(), op.interp.to_dense(), model.mean_module(x)
    logp = logp_builder()
    xhat = dense_mode(Q, W, mu, logp)
    xv = xhat.clone().requires_grad_(True)
    f = mu + W @ xv
    _, d2 = _derivatives(logp, f, True)
    A = Q + W.T @ (-d2[:, None] * W)
    value = logp(f).sum() - 0.5 * xv @ Q @ xv + 0.5 * torch.logdet(Q) - 0.5 * torch.logdet(A)
    dfdx = torch.autograd.grad(value, xv, retain_graph=True)[0]
    a = torch.linalg.solve(A.detach(), dfdx.detach())
    grad_psi = torch.autograd.grad(logp(f).sum() - 0.5 * xv @ Q @ xv, xv, create_graph=True)[0]
    grads = torch.autograd.grad(value + a @ grad_psi, params, allow_unused=True)
    return value.detach(), xhat, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def grid_graph(side: int) -> torch.Tensor:
    """Edges of a ``side × side`` grid graph with every third horizontal edge removed (irregular degrees)."""
    idx = torch.arange(side * side).reshape(side, side)
    horizontal = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    vertical = torch.stack([idx[:-1].reshape(-1), idx[1:].reshape(-1)])
    keep = torch.arange(horizontal.shape[1]) % 3 != 0
    return torch.cat([horizontal[:, keep], vertical], 1)


BOX = [[-0.2, -0.2], [1.2, 1.2]]


def make_problem(precision: str, kind: str, *, road: str = "auto", seed: int = 0, newton_tol: float = 1e-13):
    gen = torch.Generator().manual_seed(seed)
    m = 40
    if precision == "lattice":
        x = torch.rand(m, 2, generator=gen, dtype=torch.float64)
        kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel(BOX, 9))
        kernel.base_kernel.lengthscale = 0.5
    elif precision == "fractional":  # α = 1.5 in 2-D (ν = 1/2): five GMRF blocks behind one W
        x = torch.rand(m, 2, generator=gen, dtype=torch.float64)
        kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel(BOX, 9, alpha=1.5))
        kernel.base_kernel.lengthscale = 0.5
    elif precision == "lattice1d":
        x = torch.rand(m, 1, generator=gen, dtype=torch.float64)
        kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([-0.2, 1.2], 30))
        kernel.base_kernel.lengthscale = 0.3
    elif precision == "graph":
        x = torch.randint(0, 49, (m, 1), generator=gen).double()  # repeated nodes allowed
        kernel = gpytorch.kernels.ScaleKernel(GraphMaternKernel(grid_graph(7), alpha=2))
        kernel.base_kernel.lengthscale = 2.0
    elif precision == "sum":
        x = torch.rand(m, 2, generator=gen, dtype=torch.float64)
        kernel = LatticeMaternKernel(BOX, 8) + LatticeMaternKernel(BOX, 5)
        kernel.kernels[0].lengthscale = 0.3
        kernel.kernels[1].lengthscale = 0.8
    else:
        raise ValueError(precision)
    coordinate = x[:, 0] / (7.0 if precision == "graph" else 1.0)
    truth = 0.4 + torch.sin(5 * coordinate)
    exposure = 0.5 + torch.rand(m, generator=gen, dtype=torch.float64)
    if kind == "poisson":
        likelihood = PoissonLikelihood(exposure=exposure)
        y = torch.poisson(exposure * torch.exp(truth), generator=gen)
    elif kind in ("logit", "probit"):
        likelihood = BernoulliLikelihood(link=kind)
        y = torch.bernoulli(torch.sigmoid(2 * truth), generator=gen)
    elif kind == "negbin":
        likelihood = NegativeBinomialLikelihood(exposure=exposure)
        likelihood.dispersion = 2.5
        rate = torch.distributions.Gamma(2.0, 2.0).sample((m,)).double() * exposure * torch.exp(truth)
        y = torch.poisson(rate, generator=gen)
    else:
        raise ValueError(kind)
    model = LaplaceGP(x, y, likelihood, covar_module=kernel, road=road, newton_tol=newton_tol).double()
    model.mean_module.constant.data.fill_(0.2)
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        kernel.outputscale = 1.3
    return model, x, y


def logp_builder(model, kind, y):
    likelihood = model.likelihood
    offset = None if likelihood.exposure is None else likelihood.exposure.log()
    return lambda: reference_logp(kind, y, offset, likelihood.dispersion if kind == "negbin" else None)


def laplace_value_and_grads(model, x, y):
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    model.zero_grad()
    value = mll(model(x), y)
    value.backward()
    return value.detach(), [p.grad.detach().clone() for p in model.parameters()]


KINDS = ["poisson", "logit", "probit", "negbin"]
PRECISIONS = ["lattice", "lattice1d", "graph", "sum"]


@needs_cholmod
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", [*PRECISIONS, "fractional"])
def test_against_dense_reference(precision, kind):
    model, x, y = make_problem(precision, kind)
    value, grads = laplace_value_and_grads(model, x, y)
    ref_value, ref_mode, ref_grads = dense_laplace(model, x, logp_builder(model, kind, y))
    expected_road = "banded" if precision == "lattice1d" else "cholesky"
    assert model.laplace_state.road == expected_road
    torch.testing.assert_close(model.laplace_state.mode, ref_mode, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) >= 3  # mean, outputscale (or a second lengthscale), lengthscale (+ dispersion)
    for name, mine, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(mine, ref, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_dense_road_against_reference(kind):
    model, x, y = make_problem("lattice", kind, road="dense")
    value, grads = laplace_value_and_grads(model, x, y)
    ref_value, ref_mode, ref_grads = dense_laplace(model, x, logp_builder(model, kind, y))
    torch.testing.assert_close(model.laplace_state.mode, ref_mode, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "precision, kind", [("lattice", "poisson"), ("graph", "negbin"), ("lattice1d", "logit"), ("sum", "probit")]
)
def test_finite_differences_of_the_objective(precision, kind):
    """Central differences of the returned objective (each a fresh, converged Newton run) against its gradient."""
    model, x, y = make_problem(precision, kind)
    _, grads = laplace_value_and_grads(model, x, y)
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    h = 1e-5
    for (name, param), grad in zip(model.named_parameters(), grads):
        flat = param.data.view(-1)
        for i in range(flat.numel()):
            values = []
            for sign in (1.0, -1.0):
                original = float(flat[i])
                flat[i] = original + sign * h
                model.laplace_state.mode = None  # cold start: the value does not depend on the history
                with torch.no_grad():
                    values.append(float(mll(model(x), y)))
                flat[i] = original
            fd = (values[0] - values[1]) / (2 * h)
            assert abs(fd - float(grad.view(-1)[i])) <= 1e-6 * (1 + abs(fd)), (name, fd, float(grad.view(-1)[i]))


def test_krylov_road_is_close_to_exact():
    """The Krylov road: CG solves, Hutchinson log det P − log det Q with common probes (stochastic, stated)."""
    exact, x, y = make_problem("lattice", "poisson")
    value, grads = laplace_value_and_grads(exact, x, y)
    model, _, _ = make_problem("lattice", "poisson", road="krylov")
    model.krylov = dataclasses.replace(model.krylov, num_probes=256, probe_block=32)
    kvalue, kgrads = laplace_value_and_grads(model, x, y)
    assert model.laplace_state.road == "krylov"
    torch.testing.assert_close(model.laplace_state.mode, exact.laplace_state.mode, rtol=0, atol=1e-8)
    # the mode is exact (CG to 1e-10); log det P − log det Q and the gradient's P⁻¹ terms are estimates
    assert abs(float(kvalue - value)) < 0.05 * abs(float(value))
    flat, kflat = torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in kgrads])
    assert float((flat - kflat).norm()) < 0.2 * float(flat.norm())


def test_warm_start_and_iteration_record():
    model, x, y = make_problem("lattice", "poisson")
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    first = mll(model(x), y)
    cold = mll.newton_iterations
    assert cold >= 3
    again = mll(model(x), y)
    assert mll.newton_iterations == 0  # the stored mode is already the mode
    torch.testing.assert_close(again, first, rtol=1e-13, atol=1e-12)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        assert mll.newton_iterations < cold
    assert model.laplace_state.history[:2] == [cold, 0]


def test_training_loop_increases_the_objective():
    model, x, y = make_problem("graph", "negbin")
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    values = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        values.append(-float(loss.detach()))
    assert values[-1] > values[0]


def test_newton_failure_names_the_iteration_and_gradient_norm():
    model, x, y = make_problem("lattice", "poisson")
    model.newton = type(model.newton)(tol=1e-13, max_iters=1)
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(NonConvergenceError, match=r"iteration 1 .*gradient norm"):
        mll(model(x), y)


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


@needs_cholmod
@pytest.mark.parametrize("precision", ["lattice", "graph", "lattice1d", "fractional"])
def test_prediction_against_dense(precision):
    model, x, y = make_problem(precision, "poisson")
    if precision == "graph":
        x_test = torch.arange(49.0, dtype=torch.float64).unsqueeze(-1)
    elif precision == "lattice1d":
        x_test = torch.linspace(0, 1, 37, dtype=torch.float64).unsqueeze(-1)
    else:
        x_test = torch.rand(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        out = model(x_test)
        mean, variance = out.mean, out.variance
        train_out = model(x)
        op = model.covar_module(x).evaluate_kernel()
        Q, W = op.Q.to_dense(), op.interp.to_dense()
        mu = model.mean_module(x)
        w_test = model.covar_module(x_test, x).evaluate_kernel().interp.to_dense()
    xhat = dense_mode(Q, W, mu, logp_builder(model, "poisson", y)())  # autograd derivatives in f
    d2 = -torch.exp(mu + W @ xhat + model.likelihood.exposure.log())
    cov = torch.linalg.inv(Q + W.T @ (-d2[:, None] * W))
    torch.testing.assert_close(mean, model.mean_module(x_test).detach() + w_test @ xhat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(w_test @ cov @ w_test.T), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(train_out.variance, torch.diagonal(W @ cov @ W.T), rtol=1e-9, atol=1e-12)
    # the predictive distribution: Poisson means E[E e^f] = E e^{m + v/2} by quadrature (exposure 1 here)
    predictive = model.likelihood(out, exposure=torch.ones(len(x_test), dtype=torch.float64))
    torch.testing.assert_close(predictive.mean, torch.exp(mean + variance / 2), rtol=1e-9, atol=0)
    q = predictive.icdf(torch.tensor(0.9, dtype=torch.float64))
    assert bool((predictive.cdf(q) >= 0.9).all()) and bool((predictive.cdf(q - 1) < 0.9).all())


def test_prediction_cache_follows_the_parameters():
    model, x, y = make_problem("lattice", "logit")
    model.eval()
    with torch.no_grad():
        first = model(x[:5]).mean
        assert model.posterior() is model.posterior()  # cached
        model.covar_module.outputscale = 2.0
        second = model(x[:5]).mean
    assert not torch.allclose(first, second)
    model.train()
    assert model._posterior_cache is None


def test_float32_models_compute_in_float64_inside():
    """A float32 model: Newton, log-determinants and gradients run in float64 and are returned in float32."""
    model, x, y = make_problem("lattice", "negbin")
    value64, grads64 = laplace_value_and_grads(model, x, y)
    model32, _, _ = make_problem("lattice", "negbin")
    model32 = model32.float()
    value32, grads32 = laplace_value_and_grads(model32, x.float(), y.float())
    assert value32.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads32)
    torch.testing.assert_close(value32.double(), value64, rtol=1e-5, atol=1e-4)
    for g32, g64 in zip(grads32, grads64):
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4)
    model32.eval()
    with torch.no_grad():
        out = model32(x.float()[:5])
    assert out.mean.dtype == torch.float32 and bool((out.variance > 0).all())


def test_training_mode_requires_the_training_inputs():
    model, x, y = make_problem("lattice", "poisson")
    with pytest.raises(RuntimeError, match="training inputs"):
        model(x[:10])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "likelihood, bad, match",
    [
        (PoissonLikelihood(), -1.0, "non-negative"),
        (PoissonLikelihood(), 1.5, "integers"),
        (NegativeBinomialLikelihood(), -2.0, "non-negative"),
        (NegativeBinomialLikelihood(), 0.5, "integers"),
        (BernoulliLikelihood(), 2.0, "0 or 1"),
        (BernoulliLikelihood(), -1.0, "0 or 1"),
        (PoissonLikelihood(), math.nan, "finite"),
        (BernoulliLikelihood(), math.inf, "finite"),
        (NegativeBinomialLikelihood(), math.nan, "finite"),
    ],
)
def test_bad_targets_are_refused(likelihood, bad, match):
    x = torch.rand(10, 2, dtype=torch.float64)
    y = torch.ones(10, dtype=torch.float64)
    y[3] = bad
    kernel = LatticeMaternKernel(BOX, 6)
    with pytest.raises(ValueError, match=match):
        LaplaceGP(x, y, likelihood, covar_module=kernel)
    good = LaplaceGP(x, torch.ones(10, dtype=torch.float64), likelihood, covar_module=kernel).double()
    mll = LaplaceMarginalLogLikelihood(likelihood, good)
    with pytest.raises(ValueError, match=match):
        mll(good(x), y)


def test_model_and_mll_refuse_what_they_cannot_do():
    x = torch.rand(10, 2, dtype=torch.float64)
    y = torch.ones(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="sparse-precision"):
        LaplaceGP(x, y, PoissonLikelihood(), covar_module=gpytorch.kernels.RBFKernel())
    with pytest.raises(TypeError, match="gpsparse.likelihoods"):
        LaplaceGP(x, y, gpytorch.likelihoods.PoissonLikelihood(), covar_module=LatticeMaternKernel(BOX, 6))
    with pytest.raises(ValueError, match="road"):
        LaplaceGP(x, y, PoissonLikelihood(), covar_module=LatticeMaternKernel(BOX, 6), road="magic")
    model = LaplaceGP(x, y, PoissonLikelihood(), covar_module=LatticeMaternKernel(BOX, 6))
    with pytest.raises(ValueError, match="model's"):
        LaplaceMarginalLogLikelihood(PoissonLikelihood(), model)
    with pytest.raises(ValueError, match="exposure"):
        PoissonLikelihood(exposure=torch.tensor([1.0, -1.0]))


# --------------------------------------------------------------------------------------------------
# Recovery at N = 10⁴ (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_cholmod
def test_recovery_of_range_and_variance():
    """Simulated Poisson counts on a 100 × 100 lattice field (N = 10⁴ nodes, 10⁴ observations).

    Judged by the Laplace-approximate posterior of the hyperparameters: after maximising the
    approximate log marginal ``L`` in ``u = (log ℓ, log σ², c)`` (L-BFGS on the exact gradient),
    the curvature ``H = −∂²L/∂u²`` (central differences of the exact gradient) gives posterior
    standard deviations ``√diag(H⁻¹)``; the true ``log ℓ`` and ``log σ²`` must lie within 3 of
    them of the fit.
    """
    from sksparse import cholmod

    torch.manual_seed(0)
    grid = 100
    kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], grid))
    true_ell, true_var, true_c = 0.15, 0.8, 1.0
    kernel.base_kernel.lengthscale = true_ell
    kernel.outputscale = true_var
    kernel = kernel.double()
    nodes = kernel.base_kernel.grid_points()
    with torch.no_grad():
        Q = kernel(nodes[:2]).evaluate_kernel().Q
        A = Q.to_sparse_csr().to_sparse_coo()
    import scipy.sparse as sp

    i, v = A.indices().numpy(), A.values().numpy()
    factor = cholmod.cholesky(sp.csc_matrix((v, (i[0], i[1])), shape=A.shape))
    z = torch.randn(grid * grid, dtype=torch.float64).numpy()
    field = factor.apply_Pt(factor.solve_Lt(z, use_LDLt_decomposition=False))
    x = torch.rand(grid * grid, 2, dtype=torch.float64)
    w = kernel.base_kernel.interpolation(x)
    f = true_c + w._matmul(torch.as_tensor(field).unsqueeze(-1)).squeeze(-1)
    y = torch.poisson(torch.exp(f))
    model = LaplaceGP(x, y, PoissonLikelihood(), covar_module=kernel).double()
    mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    ell_p, var_p, c_p = model.covar_module.base_kernel, model.covar_module, model.mean_module

    def set_u(u):
        ell_p.lengthscale = math.exp(u[0])
        var_p.outputscale = math.exp(u[1])
        c_p.constant.data.fill_(u[2])

    def value_and_grad(u):
        """``L`` and ``dL/du``: the raw (softplus) parameters' gradients times ``d raw/du = val/σ(raw)``."""
        set_u(u.tolist())
        model.zero_grad()
        value = mll(model(x), y)
        value.backward()
        grads = []
        for raw in (ell_p.raw_lengthscale, var_p.raw_outputscale):
            r = raw.detach().reshape(())
            grads.append(float(raw.grad.reshape(())) * float(F.softplus(r) / torch.sigmoid(r)))
        grads.append(float(c_p.raw_constant.grad.reshape(())))
        return float(value), torch.tensor(grads, dtype=torch.float64)

    u = torch.tensor([math.log(0.3), math.log(0.3), 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value, grad = value_and_grad(u.detach())
        u.grad = -grad
        return torch.tensor(-value)

    optimizer.step(closure)
    u_hat = u.detach()
    hessian = torch.zeros(3, 3, dtype=torch.float64)
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = 1e-3
        hessian[k] = -(value_and_grad(u_hat + e)[1] - value_and_grad(u_hat - e)[1]) / 2e-3
    sd = torch.linalg.inv(0.5 * (hessian + hessian.T)).diagonal().sqrt()
    truth = torch.tensor([math.log(true_ell), math.log(true_var), true_c], dtype=torch.float64)
    z_scores = (u_hat - truth) / sd
    print(
        f"fitted ℓ, σ², c = {u_hat[0].exp():.4f}, {u_hat[1].exp():.4f}, {u_hat[2]:.4f}; sd (log ℓ, log σ², c) = "
        f"{sd.tolist()}; z-scores {z_scores.tolist()}"
    )
    assert bool((z_scores[:2].abs() <= 3).all()), (u_hat.exp()[:2], sd, z_scores)
