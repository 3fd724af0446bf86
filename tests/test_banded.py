"""gpsparse.core.banded and gpsparse.autograd.banded against dense float64 torch.linalg, gradcheck and closed forms."""

from __future__ import annotations

import gc
import math
import tracemalloc
import weakref

import numpy as np
import pytest
import torch
from helpers import tolerance

import gpsparse.core.banded as banded
from gpsparse.autograd.banded import banded_logdet, banded_solve
from gpsparse.core.banded import banded_inverse_band, bandwidth
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import symmetrize_values_grad
from gpsparse.errors import NotPositiveDefiniteError

BANDWIDTHS = [1, 2, 4]


# ---------------------------------------------------------------------------
# Test matrices
# ---------------------------------------------------------------------------


def band_pattern(n: int, b: int) -> tuple[SparsityPattern, torch.Tensor, torch.Tensor]:
    """Full symmetric band pattern of half-bandwidth ``b``; returns ``(pattern, row, col)`` in CSR order."""
    i = torch.arange(n)
    rows, cols = [i], [i]
    for d in range(1, b + 1):
        rows += [i[d:], i[:-d]]
        cols += [i[:-d], i[d:]]
    pattern, order = SparsityPattern.from_indices(torch.cat(rows), torch.cat(cols), (n, n), symmetric=True)
    return pattern, torch.cat(rows)[order], torch.cat(cols)[order]


def random_banded_spd(n: int, b: int, *, seed: int = 0, dtype=torch.float64):
    """A random banded SPD matrix: ``(dense, pattern, values)``, values in CSR order."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n, n, dtype=torch.float64)
    for d in range(1, b + 1):
        dense += torch.diag(torch.randn(n - d, generator=gen, dtype=torch.float64), -d)
    dense = dense + dense.T
    dense += torch.diag(dense.abs().sum(1) + torch.rand(n, generator=gen, dtype=torch.float64) + 0.1)
    pattern, row, col = band_pattern(n, b)
    return dense.to(dtype), pattern, dense[row, col].to(dtype)


def ou_precision(n: int, rho: float) -> tuple[SparsityPattern, torch.Tensor]:
    """Precision of a unit-variance OU process on a regular grid, ``corr = rho^|i-j|`` (tridiagonal)."""
    pattern, row, col = band_pattern(n, 1)
    diag = torch.full((n,), 1.0 + rho**2, dtype=torch.float64)
    diag[[0, -1]] = 1.0
    values = torch.where(row == col, diag[row], torch.tensor(-rho, dtype=torch.float64))
    return pattern, values / (1.0 - rho**2)


def at_entries(matrix: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    return matrix[..., pattern.row, pattern.col_long]


def symmetrised(grad: torch.Tensor) -> torch.Tensor:
    return 0.5 * (grad + grad.transpose(-1, -2))


# ---------------------------------------------------------------------------
# bandwidth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("b", [0, *BANDWIDTHS])
def test_bandwidth(b):
    pattern, _, _ = band_pattern(7, b)
    assert bandwidth(pattern) == b


def test_bandwidth_of_nonsymmetric_pattern():
    pattern, _ = SparsityPattern.from_indices(torch.tensor([0, 1, 3]), torch.tensor([0, 3, 0]), (4, 4))
    assert bandwidth(pattern) == 3


def test_layout_and_bandwidth_cached_on_the_pattern_and_released():
    def missing():
        raise AssertionError("nothing cached on the pattern")

    pattern, _, _ = band_pattern(20, 2)
    layout = banded._layout(pattern)
    assert banded._layout(pattern) is layout
    assert pattern.derived("banded.layout", missing) is layout
    assert pattern.derived("bandwidth", missing) == 2 == bandwidth(pattern)
    released = weakref.ref(layout)
    del pattern, layout
    gc.collect()
    assert released() is None  # the cache lives on the pattern: the layout goes with it


# ---------------------------------------------------------------------------
# log-determinant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("b", BANDWIDTHS)
def test_logdet_matches_dense(b):
    dense, pattern, values = random_banded_spd(50, b, seed=b)
    values.requires_grad_(True)
    out = banded_logdet(values, pattern)
    out.backward()
    reference = dense.clone().requires_grad_(True)
    expected = torch.logdet(reference)
    expected.backward()
    tol = tolerance(torch.float64, "direct")
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(values.grad, at_entries(symmetrised(reference.grad), pattern), **tol)


def test_logdet_batched_and_float32():
    mats = [random_banded_spd(40, 2, seed=s) for s in range(6)]
    pattern = mats[0][1]
    values = torch.stack([v for _, _, v in mats]).reshape(2, 3, -1)
    dense = torch.stack([d for d, _, _ in mats]).reshape(2, 3, 40, 40)
    for dtype in (torch.float64, torch.float32):
        leaf = values.to(dtype).clone().requires_grad_(True)
        out = banded_logdet(leaf, pattern)
        (out * torch.arange(1.0, 7.0, dtype=dtype).reshape(2, 3)).sum().backward()
        reference = dense.clone().requires_grad_(True)
        expected = torch.logdet(reference)
        (expected * torch.arange(1.0, 7.0, dtype=torch.float64).reshape(2, 3)).sum().backward()
        tol = tolerance(dtype, "direct")
        assert out.shape == (2, 3) and out.dtype == dtype and leaf.grad.dtype == dtype
        torch.testing.assert_close(out.double(), expected, **tol)
        torch.testing.assert_close(leaf.grad.double(), at_entries(symmetrised(reference.grad), pattern), **tol)


def test_logdet_uses_symmetric_part_of_unsymmetric_values():
    dense, pattern, values = random_banded_spd(20, 2, seed=7)
    noise = 0.1 * torch.randn(values.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    raw = values + noise  # no longer symmetric values
    full = torch.zeros_like(dense)
    full[pattern.row, pattern.col_long] = raw
    torch.testing.assert_close(
        banded_logdet(raw, pattern), torch.logdet(symmetrised(full)), **tolerance(torch.float64, "direct")
    )


def test_logdet_gradient_is_symmetric():
    _, pattern, values = random_banded_spd(30, 3, seed=2)
    values.requires_grad_(True)
    banded_logdet(values, pattern).backward()
    torch.testing.assert_close(values.grad, symmetrize_values_grad(values.grad, pattern), rtol=0, atol=0)


def test_logdet_diagonal_matrix():
    pattern, _, _ = band_pattern(5, 0)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    out = banded_logdet(values, pattern)
    out.backward()
    torch.testing.assert_close(out, torch.tensor(math.log(120.0), dtype=torch.float64))
    torch.testing.assert_close(values.grad, 1.0 / values.detach())


# ---------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("b", BANDWIDTHS)
def test_solve_matches_dense(b):
    dense, pattern, values = random_banded_spd(50, b, seed=10 + b)
    gen = torch.Generator().manual_seed(b)
    rhs = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    weights = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    values.requires_grad_(True)
    rhs_leaf = rhs.clone().requires_grad_(True)
    x = banded_solve(values, pattern, rhs_leaf)
    (x * weights).sum().backward()
    reference = dense.clone().requires_grad_(True)
    rhs_ref = rhs.clone().requires_grad_(True)
    expected = torch.linalg.solve(reference, rhs_ref)
    (expected * weights).sum().backward()
    tol = tolerance(torch.float64, "direct")
    torch.testing.assert_close(x, expected, **tol)
    torch.testing.assert_close(rhs_leaf.grad, rhs_ref.grad, **tol)
    torch.testing.assert_close(values.grad, at_entries(symmetrised(reference.grad), pattern), **tol)


def test_solve_value_gradient_is_symmetrised_sampled_product():
    dense, pattern, values = random_banded_spd(30, 2, seed=3)
    gen = torch.Generator().manual_seed(0)
    rhs, upstream = torch.randn(2, 30, 4, generator=gen, dtype=torch.float64)
    values.requires_grad_(True)
    x = banded_solve(values, pattern, rhs)
    (x * upstream).sum().backward()
    grad_rhs = torch.linalg.solve(dense, upstream)
    unsym = -(grad_rhs[pattern.row] * x.detach()[pattern.col_long]).sum(-1)
    torch.testing.assert_close(
        values.grad, symmetrize_values_grad(unsym, pattern), **tolerance(torch.float64, "direct")
    )


@pytest.mark.parametrize(
    ("values_batch", "rhs_shape"),
    [((), (30,)), ((), (2, 3, 30, 2)), ((2,), (30, 3)), ((2,), (3, 1, 30, 2)), ((3, 2), (2, 30, 1))],
    ids=["vector", "one-matrix-batched-rhs", "batched-values", "broadcast", "broadcast-2d"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_solve_batching(values_batch, rhs_shape, dtype):
    count = int(np.prod(values_batch)) if values_batch else 1
    mats = [random_banded_spd(30, 2, seed=20 + s) for s in range(count)]
    pattern = mats[0][1]
    values = torch.stack([v for _, _, v in mats]).reshape(*values_batch, -1)
    dense = torch.stack([d for d, _, _ in mats]).reshape(*values_batch, 30, 30)
    rhs = torch.randn(rhs_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaf_v = values.to(dtype).clone().requires_grad_(True)
    leaf_r = rhs.to(dtype).clone().requires_grad_(True)
    x = banded_solve(leaf_v, pattern, leaf_r)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (x * weights.to(dtype)).sum().backward()

    ref_v = dense.clone().requires_grad_(True)
    ref_r = rhs.clone().requires_grad_(True)
    expected = torch.linalg.solve(ref_v, ref_r.unsqueeze(-1)).squeeze(-1) if rhs.dim() == 1 else None
    if expected is None:
        expected = torch.linalg.solve(ref_v, ref_r)
    (expected * weights).sum().backward()
    tol = tolerance(dtype, "direct")
    assert x.shape == expected.shape and x.dtype == dtype
    torch.testing.assert_close(x.double(), expected, **tol)
    torch.testing.assert_close(leaf_r.grad.double(), ref_r.grad, **tol)
    torch.testing.assert_close(leaf_v.grad.double(), at_entries(symmetrised(ref_v.grad), pattern), **tol)


# ---------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------


def _tiny_parameterisation():
    """Values of a 6 × 6 band-2 SPD matrix as a function of its lower band ``theta``."""
    _, pattern, values = random_banded_spd(6, 2, seed=4)
    lower = (pattern.row >= pattern.col_long).nonzero().squeeze(-1)
    partner, _ = pattern.positions(pattern.col_long, pattern.row)
    source = torch.where(pattern.row >= pattern.col_long, pattern.keys, pattern.keys[partner])
    index = torch.searchsorted(pattern.keys[lower], source)  # entry e -> its lower-triangle parameter
    theta = values[lower].clone().requires_grad_(True)
    return pattern, theta, index


def test_gradcheck_logdet_and_solve():
    pattern, theta, index = _tiny_parameterisation()
    rhs = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: banded_logdet(t[index], pattern), (theta,))
    assert torch.autograd.gradcheck(lambda t, r: banded_solve(t[index], pattern, r), (theta, rhs))


def test_gradcheck_raw_values():
    # The forward uses (A + Aᵀ)/2, so the symmetrised gradient is the exact gradient for any values.
    _, pattern, values = random_banded_spd(6, 2, seed=5)
    values = (values + 0.05 * torch.randn(values.shape, dtype=torch.float64)).requires_grad_(True)
    rhs = torch.randn(2, 6, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: banded_logdet(v, pattern), (values,))
    assert torch.autograd.gradcheck(lambda v, r: banded_solve(v, pattern, r), (values, rhs))


# ---------------------------------------------------------------------------
# band of the inverse (selected inversion)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("b", [0, *BANDWIDTHS, 8])
def test_inverse_band_matches_dense_inverse(b):
    dense, pattern, values = random_banded_spd(40, b, seed=30 + b)
    expected = at_entries(torch.linalg.inv(dense), pattern)
    torch.testing.assert_close(banded_inverse_band(values, pattern), expected, **tolerance(torch.float64, "direct"))
    out32 = banded_inverse_band(values.float(), pattern)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, **tolerance(torch.float32, "direct"))


def test_inverse_band_pure_python_fallback(monkeypatch):
    dense, pattern, values = random_banded_spd(25, 3, seed=9)
    with_numba = banded_inverse_band(values, pattern)
    monkeypatch.setattr(banded, "_jit_kernel", lambda: None)
    values.requires_grad_(True)
    without = banded_inverse_band(values, pattern)
    banded_logdet(values, pattern).backward()
    tol = tolerance(torch.float64, "direct")
    torch.testing.assert_close(without, with_numba, **tol)
    torch.testing.assert_close(values.grad, at_entries(torch.linalg.inv(dense), pattern), **tol)


# ---------------------------------------------------------------------------
# Large N: O(N·b) memory, closed forms
# ---------------------------------------------------------------------------


def test_ou_precision_million_points_closed_form():
    n, rho = 1_000_000, math.exp(-0.01)  # spacing 0.01 × lengthscale: Q is ill-conditioned
    pattern, values = ou_precision(n, rho)
    values.requires_grad_(True)
    tracemalloc.start()
    try:
        out = banded_logdet(values, pattern)
        out.backward()
        _, peak = tracemalloc.get_traced_memory()  # numpy buffers (band, factor, band of Q⁻¹, gathers)
    finally:
        tracemalloc.stop()
    # log det Q = −log det K = −(N − 1) log(1 − ρ²) for corr(i, j) = ρ^|i−j|.
    torch.testing.assert_close(
        out, torch.tensor(-(n - 1) * math.log1p(-(rho**2)), dtype=torch.float64), rtol=1e-10, atol=0
    )
    # ∂ log det Q / ∂q[e] = K[i_e, j_e]: 1 on the diagonal, ρ next to it.
    expected = torch.where(pattern.row == pattern.col_long, 1.0, rho).to(torch.float64)
    torch.testing.assert_close(values.grad, expected, rtol=1e-8, atol=1e-8)
    assert peak < 64 * n * (bandwidth(pattern) + 1), f"numpy peak {peak / 2**20:.0f} MiB is not O(N·b)"

    # Solve: Q x = Q·x_true recovers x_true.
    x_true = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rhs = pattern.to_sparse_csr(values.detach()) @ x_true
    torch.testing.assert_close(banded_solve(values.detach(), pattern, rhs), x_true, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def test_device_roundtrip(device):
    dense, pattern, values = random_banded_spd(20, 2, seed=11)
    pattern, values = pattern.to(device), values.to(device).requires_grad_(True)
    rhs = torch.randn(20, 2, dtype=torch.float64, device=device)
    out = banded_logdet(values, pattern) + banded_solve(values, pattern, rhs).sum()
    out.backward()
    assert out.device.type == device.type and values.grad.device.type == device.type
    torch.testing.assert_close(
        out.cpu(),
        torch.logdet(dense) + torch.linalg.solve(dense, rhs.cpu()).sum(),
        **tolerance(torch.float64, "direct"),
    )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_error_nonsymmetric_pattern():
    _, pattern, values = random_banded_spd(10, 1)
    plain = pattern.with_symmetric(False)
    with pytest.raises(ValueError, match="symmetric pattern"):
        banded_logdet(values, plain)
    with pytest.raises(ValueError, match="symmetric pattern"):
        banded_solve(values, plain, torch.ones(10, dtype=torch.float64))


def test_error_declared_symmetric_but_not():
    pattern = SparsityPattern(torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]), (2, 2), symmetric=True)
    with pytest.raises(ValueError, match="not symmetric"):
        banded_logdet(torch.ones(3, dtype=torch.float64), pattern)


def test_error_not_positive_definite_names_leading_minor():
    _, pattern, good = random_banded_spd(10, 1)
    values = good.clone()
    values[pattern.diagonal_positions[3]] = -1.0
    with pytest.raises(NotPositiveDefiniteError, match="leading minor of order 4"):
        banded_logdet(values, pattern)
    with pytest.raises(NotPositiveDefiniteError, match=r"flattened batch element 1\).*order 4"):
        banded_solve(torch.stack([good, values]), pattern, torch.ones(2, 10, 1, dtype=torch.float64))


def test_error_missing_diagonal_is_not_positive_definite():
    pattern, _ = SparsityPattern.from_indices(
        torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 2, 1]), (3, 3), symmetric=True
    )
    with pytest.raises(NotPositiveDefiniteError, match="order 1"):
        banded_logdet(torch.ones(4, dtype=torch.float64), pattern)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_error_nonfinite_values(bad):
    _, pattern, values = random_banded_spd(10, 2)
    values = values.clone()
    values[4] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        banded_logdet(values, pattern)
    with pytest.raises(ValueError, match="NaN or infinity"):
        banded_inverse_band(values, pattern)


def test_error_shapes_and_dtypes():
    _, pattern, values = random_banded_spd(10, 1)
    with pytest.raises(ValueError, match=r"values must have shape \(\*batch, 28\)"):
        banded_logdet(values[:-1], pattern)
    with pytest.raises(TypeError, match="float32 or float64"):
        banded_logdet(values.half(), pattern)
    with pytest.raises(ValueError, match=r"rhs must have shape \(\*batch, 10, k\)"):
        banded_solve(values, pattern, torch.ones(9, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        banded_solve(values, pattern, torch.ones(10, 1, dtype=torch.long))
