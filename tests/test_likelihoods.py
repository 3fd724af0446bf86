"""gpsparse.likelihoods: closed-form derivatives against autograd, densities against torch, predictive quadrature."""

from __future__ import annotations

import math

import gpytorch
import pytest
import scipy.stats
import torch
from linear_operator.operators import DiagLinearOperator

from gpsparse.likelihoods import BernoulliLikelihood, NegativeBinomialLikelihood, PoissonLikelihood

F64 = torch.float64


def _likelihoods():
    return {
        "poisson": PoissonLikelihood(),
        "logit": BernoulliLikelihood(),
        "probit": BernoulliLikelihood(link="probit"),
        "negbin": NegativeBinomialLikelihood(),
    }


def _targets(kind, n, gen):
    if kind in ("logit", "probit"):
        return torch.randint(0, 2, (n,), generator=gen).to(F64)
    return torch.randint(0, 25, (n,), generator=gen).to(F64)


@pytest.mark.parametrize("kind", ["poisson", "logit", "probit", "negbin"])
def test_closed_forms_match_autograd(kind):
    """ℓ', ℓ'', ℓ''' in closed form against repeated autograd of the closed-form ℓ, over a wide range of f."""
    gen = torch.Generator().manual_seed(0)
    likelihood = _likelihoods()[kind]
    if kind == "negbin":
        likelihood.dispersion = 1.7
    n = 200
    f = torch.linspace(-8, 6, n, dtype=F64)
    y = _targets(kind, n, gen)
    offset = torch.rand(n, generator=gen, dtype=F64) - 0.5
    params = likelihood.laplace_parameters()
    fv = f.clone().requires_grad_(True)
    ell = likelihood.closed_forms(fv, y, params, offset if kind != "logit" else None)[0]
    d1 = torch.autograd.grad(ell.sum(), fv, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), fv, create_graph=True)[0]
    d3 = torch.autograd.grad(d2.sum(), fv)[0]
    _, c1, c2, c3 = likelihood.closed_forms(f, y, params, offset if kind != "logit" else None)
    for closed, auto in ((c1, d1), (c2, d2), (c3, d3)):
        torch.testing.assert_close(closed, auto.detach(), rtol=1e-9, atol=1e-12)
    assert bool((c2 < 0).all())  # log-concave in f


@pytest.mark.parametrize("kind", ["poisson", "logit", "probit", "negbin"])
def test_log_prob_matches_torch_distributions(kind):
    gen = torch.Generator().manual_seed(1)
    likelihood = _likelihoods()[kind].double()
    n = 50
    f = 3 * torch.randn(n, generator=gen, dtype=F64)
    y = _targets(kind, n, gen)
    if kind == "poisson":
        expected = torch.distributions.Poisson(torch.exp(f)).log_prob(y)
    elif kind == "logit":
        expected = torch.distributions.Bernoulli(logits=f).log_prob(y)
    elif kind == "probit":
        expected = torch.tensor(scipy.stats.norm.logcdf(((2 * y - 1) * f).numpy()))  # ndtr rounds to 1 in the tails
    else:
        likelihood.dispersion = 0.6
        expected = torch.tensor(scipy.stats.nbinom.logpmf(y.numpy(), 0.6, 0.6 / (0.6 + torch.exp(f).numpy())))
    torch.testing.assert_close(likelihood.log_prob(f, y), expected, rtol=1e-10, atol=1e-10)
    if kind != "probit":  # the conditional (torch's Bernoulli(probs=Φ(f)) clamps the probabilities)
        torch.testing.assert_close(likelihood(f).log_prob(y), expected, rtol=1e-6, atol=1e-6)


def test_probit_is_stable_far_in_the_tails():
    likelihood = BernoulliLikelihood(link="probit")
    f = torch.tensor([-40.0, -10.0, 10.0, 40.0], dtype=F64)
    d1, d2, d3 = likelihood.log_prob_derivatives(f, torch.ones(4, dtype=F64))
    assert bool(torch.isfinite(torch.stack([d1, d2, d3])).all())
    torch.testing.assert_close(d1[0], torch.tensor(40.0 + 1 / 40, dtype=F64), rtol=1e-3, atol=0)  # λ(z) ≈ −z − 1/z
    assert -1 < float(d2[0]) < 0


def test_dispersion_gradient_by_autograd_on_the_closed_forms():
    likelihood = NegativeBinomialLikelihood()
    likelihood.dispersion = 2.0
    f = torch.linspace(-2, 3, 20, dtype=F64)
    y = torch.arange(20, dtype=F64)
    (r,) = likelihood.laplace_parameters()
    ell = likelihood.closed_forms(f, y, (r,))[0].sum()
    (grad,) = torch.autograd.grad(ell, likelihood.raw_dispersion)
    h = 1e-6
    values = []
    for sign in (1, -1):
        rr = torch.tensor(2.0 * (1 + sign * h), dtype=F64)
        values.append(float(likelihood.closed_forms(f, y, (rr,))[0].sum()))
    dr = (values[0] - values[1]) / (4.0 * h)
    draw = float(torch.sigmoid(likelihood.raw_dispersion.detach().double()))  # softplus'
    torch.testing.assert_close(float(grad), dr * draw, rtol=1e-6, atol=1e-9)


def test_exposure_is_an_offset():
    exposure = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    f = torch.tensor([0.1, -0.3, 1.0], dtype=F64)
    y = torch.tensor([1.0, 0.0, 7.0], dtype=F64)
    with_exposure = PoissonLikelihood(exposure=exposure)
    plain = PoissonLikelihood()
    torch.testing.assert_close(with_exposure.log_prob(f, y), plain.log_prob(f + exposure.log(), y))
    torch.testing.assert_close(with_exposure.log_prob(f, y, exposure=torch.ones(3, dtype=F64)), plain.log_prob(f, y))
    with pytest.raises(ValueError, match="exposure"):
        with_exposure.log_prob(torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64))  # 3 stored, 5 points
    with pytest.raises(ValueError, match="no exposure"):
        BernoulliLikelihood().log_prob(f, torch.ones(3, dtype=F64), exposure=exposure)


def _mvn(mean, variance):
    return gpytorch.distributions.MultivariateNormal(mean, DiagLinearOperator(variance))


def test_poisson_predictive_moments_and_quantiles():
    mean = torch.tensor([-1.0, 0.0, 1.5, 3.0], dtype=F64)
    variance = torch.tensor([0.1, 0.5, 0.3, 0.05], dtype=F64)
    predictive = PoissonLikelihood()(_mvn(mean, variance))
    rate_mean = torch.exp(mean + variance / 2)
    rate_var = (torch.exp(variance) - 1) * torch.exp(2 * mean + variance)
    torch.testing.assert_close(predictive.mean, rate_mean, rtol=1e-10, atol=0)
    torch.testing.assert_close(predictive.variance, rate_mean + rate_var, rtol=1e-7, atol=0)
    k = torch.arange(0, 200, dtype=F64).unsqueeze(-1)
    pmf = predictive.log_prob(k).exp()  # (200, 4)
    torch.testing.assert_close(pmf.sum(0), torch.ones(4, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(predictive.cdf(torch.tensor(5.0, dtype=F64)), pmf[:6].sum(0), rtol=1e-10, atol=1e-12)
    for level in (0.05, 0.5, 0.95):
        q = predictive.icdf(torch.tensor(level, dtype=F64))
        assert bool((predictive.cdf(q) >= level).all())
        assert bool((predictive.cdf(q - 1) < level).all())


def test_negative_binomial_predictive_cdf():
    likelihood = NegativeBinomialLikelihood()
    likelihood.dispersion = 1.5
    mean = torch.tensor([0.0, 2.0], dtype=F64)
    predictive = likelihood(_mvn(mean, torch.tensor([1e-12, 1e-12], dtype=F64)))  # a point mass in f
    mu = torch.exp(mean).numpy()
    for k in (0.0, 3.0, 10.0):
        expected = scipy.stats.nbinom.cdf(k, 1.5, 1.5 / (1.5 + mu))
        torch.testing.assert_close(
            predictive.cdf(torch.tensor(k, dtype=F64)), torch.tensor(expected), rtol=1e-8, atol=0
        )
    torch.testing.assert_close(predictive.mean, torch.exp(mean), rtol=1e-8, atol=0)


def test_bernoulli_predictive():
    mean = torch.tensor([-2.0, 0.0, 1.0], dtype=F64)
    variance = torch.tensor([0.5, 2.0, 0.1], dtype=F64)
    probit = BernoulliLikelihood(link="probit")(_mvn(mean, variance))
    torch.testing.assert_close(probit.probs, torch.special.ndtr(mean / torch.sqrt(1 + variance)))
    logit = BernoulliLikelihood(num_locs=60)(_mvn(mean, variance))
    grid = torch.linspace(-12, 12, 20001, dtype=F64).unsqueeze(-1)
    density = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    expected = (torch.sigmoid(mean + variance.sqrt() * grid) * density).sum(0) * float(grid[1] - grid[0])
    torch.testing.assert_close(logit.probs, expected, rtol=1e-8, atol=0)
    assert float(logit.probs[1]) == pytest.approx(0.5, abs=1e-14)


def test_expected_log_prob_and_log_marginal_by_quadrature():
    likelihood = PoissonLikelihood()
    mean = torch.tensor([0.5, 1.0], dtype=F64)
    variance = torch.tensor([0.2, 0.4], dtype=F64)
    y = torch.tensor([2.0, 0.0], dtype=F64)
    expected = y * mean - torch.exp(mean + variance / 2) - torch.lgamma(y + 1)
    torch.testing.assert_close(likelihood.expected_log_prob(y, _mvn(mean, variance)), expected, rtol=1e-10, atol=0)
    log_marginal = likelihood.log_marginal(y, _mvn(mean, variance))
    assert bool((log_marginal > expected).all())  # Jensen


@pytest.mark.parametrize(
    "likelihood, bad, match",
    [
        (PoissonLikelihood(), -3.0, "non-negative"),
        (PoissonLikelihood(), 2.5, "integers"),
        (NegativeBinomialLikelihood(), -1.0, "non-negative"),
        (NegativeBinomialLikelihood(), 0.25, "integers"),
        (BernoulliLikelihood(), 0.5, "0 or 1"),
        (BernoulliLikelihood(link="probit"), 3.0, "0 or 1"),
        (PoissonLikelihood(), math.inf, "finite"),
        (BernoulliLikelihood(), math.nan, "finite"),
        (NegativeBinomialLikelihood(), -math.inf, "finite"),
    ],
)
def test_bad_targets(likelihood, bad, match):
    y = torch.tensor([0.0, 1.0, bad], dtype=F64)
    with pytest.raises(ValueError, match=match):
        likelihood.log_prob(torch.zeros(3, dtype=F64), y)
    with pytest.raises(ValueError, match=match):
        likelihood.log_prob_derivatives(torch.zeros(3, dtype=F64), y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="link"):
        BernoulliLikelihood(link="cauchit")
    with pytest.raises(ValueError, match="positive"):
        PoissonLikelihood(exposure=torch.tensor([1.0, 0.0]))
    predictive = PoissonLikelihood()(_mvn(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        predictive.icdf(torch.tensor(1.0, dtype=F64))
