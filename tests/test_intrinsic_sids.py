"""BYM2 on a real areal data set: North Carolina SIDS counties (``libpysal``'s bundled ``sids2``), Gaussian log-rates.

Needs ``libpysal`` (the ``test`` extra); skipped without it. The data ship inside the
libpysal wheel (``libpysal/examples/sids2``), so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gpytorch
import numpy as np
import pytest
import torch

import gpsparse

libpysal = pytest.importorskip("libpysal")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "disease_mapping_gaussian.py"


def _scaled_besag(edges, n) -> torch.Tensor:
    """``Q*⁺``: the Besag pseudo-inverse scaled to unit generalised variance (a connected graph), dense."""
    A = np.zeros((n, n))
    A[edges[0].numpy(), edges[1].numpy()] = 1.0
    A = np.maximum(A, A.T)
    pinv = np.linalg.pinv(np.diag(A.sum(1)) - A, hermitian=True)
    return torch.tensor(pinv / np.exp(np.log(np.diag(pinv)).mean()))


def _dense_bym2(edges, n, phi, tau):
    """(1/τ)((1 − φ) I + φ Q*⁺)."""
    return ((1.0 - phi) * torch.eye(n, dtype=torch.float64) + phi * _scaled_besag(edges, n)) / tau


def _example():
    spec = importlib.util.spec_from_file_location("disease_mapping_gaussian", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sids2_is_bundled_and_connected():
    from libpysal import examples

    path = Path(examples.get_path("sids2.gal"))
    assert path.is_file() and path.with_suffix(".dbf").is_file() and path.with_suffix(".shp").is_file()
    edges, y, names, _ = _example().sids_data()
    assert y.shape == (100,) and len(names) == 100 and bool(torch.isfinite(y).all())
    assert edges.shape[0] == 2 and edges.shape[1] == 2 * 231  # 231 county borders, both directions


def test_bym2_trains_on_sids_and_its_structured_part_sums_to_zero():
    example = _example()
    model, losses, latent, structured, structured_var, unstructured, _, _ = example.fit(steps=40)
    assert losses[-1] < losses[0] - 0.1  # the loss decreases
    for value in (model.covar.phi, model.covar.precision, model.likelihood.noise, model.mean.constant):
        assert bool(torch.isfinite(value).all())
    assert 0.0 < float(model.covar.phi) < 1.0 and float(model.covar.precision) > 0.0
    assert model.covar.graph.num_components == 1 and model.covar.isolated.numel() == 0
    n = 100
    # the latent structured block (and its contribution at the 100 counties) sums to zero
    assert abs(float(latent[n:].sum())) < 1e-10
    assert abs(float(structured.sum())) < 1e-10
    assert bool((structured_var > 0).all())
    # the total posterior mean equals the dense GP formula at the learned hyperparameters
    # the posterior mean equals the dense GP formula at the learned hyperparameters (to the CG tolerance, 1e-6)
    edges, y, _, _ = example.sids_data()
    x = torch.arange(n, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        prior = _dense_bym2(edges, n, float(model.covar.phi), float(model.covar.precision))
        K = prior + model.likelihood.noise * torch.eye(n, dtype=torch.float64)
        mean = model.mean.constant + prior @ torch.linalg.solve(K, y - model.mean.constant)
        pred = model(x[:50])
    torch.testing.assert_close(pred.mean, mean[:50], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(structured + unstructured + model.mean.constant.detach(), mean, rtol=1e-5, atol=1e-6)


def test_sids_marginal_likelihood_matches_dense_with_cholmod_or_cg():
    edges, y, _, _ = _example().sids_data()
    n = 100
    x = torch.arange(n, dtype=torch.float64).unsqueeze(-1)
    model = _example().AreaModel(x, y, gpytorch.likelihoods.GaussianLikelihood(), edges, n).double()
    model.covar.phi, model.covar.precision, model.likelihood.noise = 0.7, 3.0, 0.1
    model.mean.constant.data.fill_(0.7)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        loss = -mll(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    prior = _dense_bym2(edges, n, model.covar.phi, model.covar.precision)  # differentiable in φ and τ
    K = prior + model.likelihood.noise * torch.eye(n, dtype=torch.float64)
    dense = -torch.distributions.MultivariateNormal(model.mean(x), covariance_matrix=K).log_prob(y) / n
    dense.backward()
    torch.testing.assert_close(loss.detach(), dense.detach(), rtol=1e-8, atol=1e-10)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-7, atol=1e-9)
    # the scaled Besag part: unit generalised variance (geometric mean of the marginal variances)
    besag = model.covar.graph.structure
    assert model.covar.scale_method == "dense" and besag.num_nodes == n


def test_disease_mapping_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "20", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "structured component: sum of its posterior mean" in out.stdout
    total = float(out.stdout.split("sum of its posterior mean ")[1].split()[0])
    assert abs(total) < 1e-10
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "disease_mapping_gaussian.png").stat().st_size > 10_000
