"""The one dispatcher (``gpsparse.linalg.dispatch``): every entry point takes the same road."""

from __future__ import annotations

import subprocess
import sys
from unittest.mock import patch

import linear_operator
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from matrices import build, lattice_precision_5pt, scipy_to_torch

import gpsparse
from gpsparse import SparseLinearOperator
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.config import RoadConfig
from gpsparse.linalg import dispatch

requires_cholmod = pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")


def tridiagonal(n: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A random SPD tridiagonal matrix and its exact log-determinant (pivot recurrence in float64)."""
    rng = np.random.default_rng(seed)
    off = rng.uniform(-1.0, 1.0, n - 1)
    main = 2.5 + rng.uniform(0.0, 1.0, n)
    pivot, logdet = main[0], np.log(main[0])
    for k in range(1, n):  # d_k = a_k − b_{k−1}² / d_{k−1}, log det = Σ log d_k
        pivot = main[k] - off[k - 1] ** 2 / pivot
        logdet += np.log(pivot)
    return scipy_to_torch(sp.diags([off, main, off], [-1, 0, 1], format="csr")), float(logdet)


def _no_slq():
    return patch("gpsparse.linalg.dispatch._slq_inv_quad_logdet", side_effect=AssertionError("SLQ used"))


def _count_slq(calls: list):
    """Count the Krylov-road log-determinants while still computing them."""
    real = dispatch._slq_inv_quad_logdet

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    return patch("gpsparse.linalg.dispatch._slq_inv_quad_logdet", side_effect=spy)


def test_logdet_of_a_tridiagonal_matrix_is_exact_and_banded():
    A, exact = tridiagonal(100_000)
    op = SparseLinearOperator.from_tensor(A)
    assert op.road() == "banded"
    with _no_slq():
        value = gpsparse.logdet(A)
        op_value = op.logdet()
    assert abs(float(value) - exact) <= 1e-10 * abs(exact)
    assert float(value) == float(op_value)  # the functional API and the operator take the same road


def test_logdet_of_a_lattice_takes_the_krylov_road():
    A = scipy_to_torch(lattice_precision_5pt(12))
    op = SparseLinearOperator.from_tensor(A)
    assert op.road(logdet=False) == "krylov"
    with linear_operator.settings.max_cholesky_size(0):
        assert op.road() == "krylov"
    calls = []
    with _count_slq(calls):
        estimate = gpsparse.logdet(A, generator=torch.Generator().manual_seed(0))
    assert calls == [1]
    exact = torch.linalg.slogdet(A.to_dense())[1]
    assert abs(float(estimate - exact)) < 0.05 * abs(float(exact))


def test_explicit_probes_or_road_select_the_estimator():
    A, exact = tridiagonal(50)
    n = A.shape[0]
    probes = torch.eye(n, dtype=torch.float64) * n**0.5
    calls = []
    with _count_slq(calls):
        with_probes = gpsparse.logdet(A, probes=probes, num_lanczos=n)  # exact SLQ: K = n, probes √n·I
        forced = gpsparse.logdet(A, road="krylov", generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2
    assert abs(float(with_probes) - exact) < 1e-8 * abs(exact)
    assert abs(float(forced) - exact) < 0.05 * abs(exact)


def test_solve_takes_the_exact_road_from_both_entry_points():
    A, _ = tridiagonal(2_000, seed=3)
    B = torch.randn(2_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = SparseLinearOperator.from_tensor(A)
    with patch("gpsparse.linalg.dispatch.SparseSolve.apply", side_effect=AssertionError("Krylov used")):
        x = gpsparse.solve(A, B)
        x_op = op.solve(B)
    assert torch.equal(x, x_op)
    torch.testing.assert_close(x, torch.linalg.solve(A.to_dense(), B), rtol=1e-12, atol=1e-12)
    # Krylov arguments select the iterative road (a warm start only exists there)
    x_cg = gpsparse.solve(A, B, x0=torch.zeros_like(B), rtol=1e-12)
    torch.testing.assert_close(x_cg, x, rtol=1e-9, atol=1e-10)


def test_inv_quad_logdet_function_matches_dense_values_and_gradients():
    A = scipy_to_torch(lattice_precision_5pt(4, kappa=0.7))  # n = 16, half-bandwidth 4: banded road
    values = A.values().clone().requires_grad_(True)
    matrix = torch.sparse_coo_tensor(A.indices(), values, A.shape)
    y = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    quad, logdet = gpsparse.inv_quad_logdet(matrix, y)
    (quad + logdet).backward()
    dense_values = A.values().clone().requires_grad_(True)
    dense = torch.sparse_coo_tensor(A.indices(), dense_values, A.shape).to_dense()
    expected = (y * torch.linalg.solve(dense, y)).sum() + torch.logdet(dense)
    expected.backward()
    torch.testing.assert_close(quad + logdet, expected.detach(), rtol=1e-12, atol=1e-12)
    # symmetric gradient convention: the dense gradient symmetrised on the pattern equals ours
    torch.testing.assert_close(values.grad, dense_values.grad, rtol=1e-10, atol=1e-12)


def test_dense_road_for_small_operator_log_determinants():
    A = scipy_to_torch(lattice_precision_5pt(10))  # n = 100, half-bandwidth 10: not banded
    values = A.values().clone().requires_grad_(True)
    op = SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(A.indices(), values, A.shape))
    assert op.road() == "dense"  # below linear_operator's max_cholesky_size
    with _no_slq():
        logdet = op.logdet()
    logdet.backward()
    dense_values = A.values().clone().requires_grad_(True)
    expected = torch.logdet(torch.sparse_coo_tensor(A.indices(), dense_values, A.shape).to_dense())
    expected.backward()
    torch.testing.assert_close(logdet, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values.grad, dense_values.grad, rtol=1e-10, atol=1e-12)
    assert gpsparse.logdet(A, road="dense").item() == pytest.approx(expected.item(), rel=1e-12)


@requires_cholmod
def test_cholesky_setting_applies_to_functions_and_operators():
    A = scipy_to_torch(lattice_precision_5pt(30))
    op = SparseLinearOperator.from_tensor(A)
    exact = torch.linalg.slogdet(A.to_dense())[1]
    with gpsparse.settings.logdet_defaults(method="cholesky"), _no_slq():
        assert op.road() == "cholesky"
        value, op_value = gpsparse.logdet(A), op.logdet()
    torch.testing.assert_close(value, exact, rtol=1e-12, atol=0.0)
    assert float(value) == float(op_value)


def test_forced_roads_and_bad_road_names():
    lattice = build("lattice5-6x6")
    with pytest.raises(ValueError, match="road='banded' needs a half-bandwidth"):
        gpsparse.logdet(scipy_to_torch(lattice_precision_5pt(20)), road="banded")
    with pytest.raises(ValueError, match="needs a symmetric matrix"):
        gpsparse.solve(build("nonsym-40"), torch.ones(40, dtype=torch.float64))
    with pytest.raises(ValueError, match="symmetric positive definite"):
        dispatch.solve(
            *gpsparse.linalg.matrix_parts(build("nonsym-40")),
            torch.ones(40, dtype=torch.float64),
            RoadConfig(road="banded"),
        )
    with pytest.raises(ValueError, match="serves log-determinants only"):
        gpsparse.solve(lattice, torch.ones(36, dtype=torch.float64), road="dense")
    with pytest.raises(ValueError, match="unknown road"):
        gpsparse.logdet(lattice, road="magic")
    with gpsparse.settings.solver_defaults(max_banded_bandwidth=0):
        assert SparseLinearOperator.from_tensor(tridiagonal(100)[0]).road(logdet=False) == "krylov"


def test_import_gpsparse_loads_the_kernels():
    code = "import gpsparse; print(gpsparse.kernels.LatticeMaternKernel.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LatticeMaternKernel"
