"""Differentiable Lanczos and f(A)v against eigh-based references; Lanczos paths of the operator."""

from __future__ import annotations

from unittest.mock import patch

import linear_operator
import pytest
import torch
from matrices import build, lattice_precision_13pt, random_spd, scipy_to_torch

import gpsparse
from gpsparse import SparseLinearOperator

DENSE_F = {
    "sqrt": torch.sqrt,
    "inv_sqrt": torch.rsqrt,
    "log": torch.log,
    "exp": torch.exp,
    "inv": torch.reciprocal,
}


def _eigh_funm(values, indices, shape, v, f):
    dense = torch.sparse_coo_tensor(indices, values, shape).to_dense()
    evals, evecs = torch.linalg.eigh(dense)
    return evecs @ (DENSE_F[f](evals).unsqueeze(-1) * (evecs.mT @ v))


@pytest.mark.parametrize("f", list(DENSE_F))
def test_funm_value_and_gradients_match_eigh(f):
    coo = scipy_to_torch(random_spd(30))
    scale = 0.1 if f == "exp" else 1.0
    idx, n = coo.indices(), coo.shape[0]
    v0 = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values, v = (coo.values() * scale).requires_grad_(True), v0.clone().requires_grad_(True)
    y = gpsparse.funm(torch.sparse_coo_tensor(idx, values, coo.shape), v, f, num_lanczos=n)
    ref_values, ref_v = (coo.values() * scale).requires_grad_(True), v0.clone().requires_grad_(True)
    y_ref = _eigh_funm(ref_values, idx, coo.shape, ref_v, f)
    cot = torch.randn_like(y_ref)
    (y * cot).sum().backward()
    (y_ref * cot).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(v.grad, ref_v.grad, rtol=1e-9, atol=1e-10)
    grad = torch.sparse_coo_tensor(idx, ref_values.grad, coo.shape).to_dense()
    expected = (0.5 * (grad + grad.T))[idx[0], idx[1]]
    torch.testing.assert_close(values.grad, expected, rtol=1e-8, atol=1e-10)


def test_funm_truncated_converges():
    coo = scipy_to_torch(lattice_precision_13pt(20, kappa=0.8, noise=0.5))
    v = torch.randn(coo.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _eigh_funm(coo.values(), coo.indices(), coo.shape, v.unsqueeze(-1), "sqrt").squeeze(-1)
    errors = [float((gpsparse.funm(coo, v, "sqrt", num_lanczos=k) - exact).norm() / exact.norm()) for k in (5, 20, 40)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_public_lanczos_is_differentiable():
    coo = build("random-spd-40")
    values = coo.values().clone().requires_grad_(True)
    v = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    dec = gpsparse.lanczos(torch.sparse_coo_tensor(coo.indices(), values, coo.shape), v, 8)
    assert dec.basis.shape == (1, 40, 3, 8) and dec.alpha.shape == (1, 3, 8) and dec.beta.shape == (1, 3, 7)
    (dec.alpha.sum() + dec.beta.pow(2).sum() + dec.basis.sum()).backward()
    assert values.grad.shape == values.shape and torch.isfinite(values.grad).all()
    assert v.grad.shape == v.shape and torch.isfinite(v.grad).all()


def test_funm_errors():
    with pytest.raises(ValueError, match="unknown matrix function"):
        gpsparse.funm(build("lattice5-6x6"), torch.ones(36, dtype=torch.float64), "cos")
    with pytest.raises(ValueError, match="symmetric"):
        gpsparse.funm(build("nonsym-40"), torch.ones(40, dtype=torch.float64), "sqrt")
    with pytest.raises(gpsparse.NotPositiveDefiniteError):
        gpsparse.funm(build("sym-indefinite-40"), torch.ones(40, dtype=torch.float64), "sqrt", num_lanczos=40)


def _no_dense_cholesky():
    return patch("torch.linalg.cholesky_ex", side_effect=AssertionError("dense Cholesky called"))


def test_operator_lanczos_paths_above_max_cholesky_size():
    """root_decomposition, root_inv_decomposition and samples use gpsparse's Lanczos, never a dense Cholesky."""
    op = SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_13pt(30, kappa=1.0, noise=0.5)))  # n = 900
    x = torch.randn(900, 3, dtype=torch.float64)
    with _no_dense_cholesky(), linear_operator.settings.max_root_decomposition_size(900):
        root = op.root_decomposition().root.to_dense()
        inv_root = op.root_inv_decomposition().root.to_dense()
        samples = op.zero_mean_mvn_samples(4)
    torch.testing.assert_close(root @ (root.T @ x), op @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inv_root @ (inv_root.T @ x), torch.linalg.solve(op.to_dense(), x), rtol=1e-6, atol=1e-6)
    assert samples.shape == (4, 900) and torch.isfinite(samples).all()


def test_samples_are_sqrt_of_operator_times_normals():
    op = SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_13pt(30, kappa=1.0, noise=0.5)))
    torch.manual_seed(3)
    with _no_dense_cholesky():
        samples = op.zero_mean_mvn_samples(5)
    torch.manual_seed(3)
    base = torch.randn(900, 5, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(op.to_dense())
    expected = (evecs @ (evals.sqrt().unsqueeze(-1) * (evecs.T @ base))).T
    torch.testing.assert_close(samples, expected, rtol=1e-6, atol=1e-6)
