"""Tests of the Krylov cores (``gpsparse.core.krylov``) against dense float64 ``torch.linalg``."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpsparse.core.krylov import SolverInfo, bicgstab, cg, default_max_iters, minres
from gpsparse.errors import NotPositiveDefiniteError, SolverBreakdownError

SOLVERS = {"cg": cg, "minres": minres, "bicgstab": bicgstab}
DTYPES = [torch.float64, torch.float32]
SHAPES = {"vector": (), "block": (3,), "batched": (2, 3, 4)}  # (*batch, k): rhs (n,), (n, 3), (2, 3, n, 4)


def tol(dtype: torch.dtype) -> dict:
    """All tolerances of this file, keyed by dtype.

    ``rtol``: the solvers' stopping tolerance. ``close``: ``assert_close``
    tolerances for solutions of the well-conditioned test systems (condition
    number ≤ ~100) against dense float64 solves. ``drift``: allowed gap,
    relative to ``‖b‖``, between the recursively updated residual a solver
    reports and the true residual ``b − A x``. ``exact``: identities that hold
    up to rounding (Lanczos exactness, Gauss quadrature, agreement with
    linear_operator). ``roundoff``: a few units in the last place.
    """
    if dtype == torch.float64:
        return {
            "rtol": 1e-10,
            "close": {"rtol": 1e-7, "atol": 1e-9},
            "drift": 1e-9,
            "exact": {"rtol": 1e-8, "atol": 1e-12},
            "roundoff": 1e-12,
        }
    return {
        "rtol": 1e-5,
        "close": {"rtol": 2e-3, "atol": 2e-4},
        "drift": 5e-4,
        "exact": {"rtol": 1e-4, "atol": 1e-6},
        "roundoff": 1e-5,
    }


F64 = tol(torch.float64)


# --------------------------------------------------------------------------------------------------
# test matrices (dense float64, known spectra)
# --------------------------------------------------------------------------------------------------


def _orthogonal(n: int, generator: torch.Generator, batch=()) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64, generator=generator))
    return q


def spd(n: int, batch=(), cond: float = 50.0, seed: int = 0) -> torch.Tensor:
    """SPD with eigenvalues log-spaced in [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    q = _orthogonal(n, g, batch)
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return (q * eig) @ q.mT


def indefinite(n: int, batch=(), seed: int = 1) -> torch.Tensor:
    """Symmetric, eigenvalues ±[1, 20] alternating in sign."""
    g = torch.Generator().manual_seed(seed)
    q = _orthogonal(n, g, batch)
    eig = torch.linspace(1, 20, n, dtype=torch.float64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    return (q * eig.to(torch.float64)) @ q.mT


def nonsymmetric(n: int, batch=(), seed: int = 2) -> torch.Tensor:
    """Non-symmetric, diagonally dominant (convection–diffusion-like)."""
    g = torch.Generator().manual_seed(seed)
    a = 0.5 * torch.randn(*batch, n, n, dtype=torch.float64, generator=g) / math.sqrt(n)
    conv = torch.diag(torch.full((n - 1,), -1.3, dtype=torch.float64), -1) + torch.diag(
        torch.full((n - 1,), 0.7, dtype=torch.float64), 1
    )
    return a + conv + 4.0 * torch.eye(n, dtype=torch.float64)


def badly_scaled_spd(n: int, seed: int = 3) -> torch.Tensor:
    """``D A D`` with ``A`` well conditioned and ``D`` spanning 3 decades: Jacobi fixes it."""
    d = torch.logspace(0, 3, n, dtype=torch.float64)
    return d[:, None] * spd(n, cond=10.0, seed=seed) * d[None, :]


MATRICES = {"spd": spd, "indefinite": indefinite, "nonsymmetric": nonsymmetric}
CASES = [("cg", "spd"), ("minres", "spd"), ("minres", "indefinite"), ("bicgstab", "nonsymmetric")]


def rhs_for(shape_id: str, n: int, dtype, seed: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    extra = SHAPES[shape_id]
    shape = (n,) if not extra else (*extra[:-1], n, extra[-1])
    return torch.randn(shape, dtype=torch.float64, generator=g).to(dtype)


def dense_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = torch.linalg.solve(a.double(), (b.unsqueeze(-1) if b.dim() == 1 else b).double())
    return x.squeeze(-1) if b.dim() == 1 else x


def true_relative_residual(a: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x2, b2 = (x.unsqueeze(-1), b.unsqueeze(-1)) if b.dim() == 1 else (x, b)
    r = b2.double() - a.double() @ x2.double()
    bn = torch.linalg.vector_norm(b2.double(), dim=-2)
    return torch.where(bn > 0, torch.linalg.vector_norm(r, dim=-2) / bn, 0.0)


def dense_matvec(a: torch.Tensor):
    return lambda v: a @ v


# --------------------------------------------------------------------------------------------------
# accuracy against dense solves
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("method,matrix", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_matches_dense_solve(method, matrix, shape_id, dtype):
    n = 40
    batch = SHAPES[shape_id][:-1]
    a = MATRICES[matrix](n, batch)
    b = rhs_for(shape_id, n, dtype)
    seen = []

    def matvec(v):
        seen.append(tuple(v.shape))
        return a.to(dtype) @ v

    t = tol(dtype)
    x, info = SOLVERS[method](matvec, b, rtol=t["rtol"])

    assert x.shape == b.shape and x.dtype == dtype
    torch.testing.assert_close(x.double(), dense_solve(a, b), **t["close"])
    cols = (*batch, SHAPES[shape_id][-1] if SHAPES[shape_id] else 1)
    assert info.converged.shape == info.residual_norm.shape == info.iterations_per_column.shape == cols
    assert info.converged.all() and info.all_converged
    assert info.iterations_per_column.dtype == torch.int64 and info.converged.dtype == torch.bool
    assert isinstance(info.iterations, int) and info.iterations == int(info.iterations_per_column.max())
    assert info.tridiag is None
    assert (info.residual_norm <= t["rtol"]).all()
    assert (true_relative_residual(a, x, b) <= t["rtol"] + t["drift"]).all()
    # the matvec contract: always (*batch, n, k), at least 2-D
    assert set(seen) == {(*batch, n, cols[-1])}


@pytest.mark.parametrize("method,matrix", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_jacobi_preconditioned_matches_dense(method, matrix):
    n, dtype = 50, torch.float64
    a = MATRICES[matrix](n)
    diag = torch.diagonal(a).abs().unsqueeze(-1)
    b = rhs_for("block", n, dtype)
    x, info = SOLVERS[method](dense_matvec(a), b, preconditioner=lambda r: r / diag, rtol=tol(dtype)["rtol"])
    assert info.all_converged
    torch.testing.assert_close(x, dense_solve(a, b), **tol(dtype)["close"])
    # the reported (recursive) residual is the 2-norm residual also with a preconditioner
    torch.testing.assert_close(info.residual_norm, true_relative_residual(a, x, b), rtol=0.05, atol=tol(dtype)["drift"])


@pytest.mark.parametrize("method", list(SOLVERS))
def test_jacobi_reduces_iterations_on_badly_scaled_matrix(method):
    n = 60
    a = badly_scaled_spd(n)
    diag = torch.diagonal(a).unsqueeze(-1)
    b = rhs_for("block", n, torch.float64)
    # unpreconditioned: 400–1400 iterations (capped here at 150); Jacobi: 20–35
    _, plain = SOLVERS[method](dense_matvec(a), b, rtol=F64["rtol"], max_iters=150)
    x_pre, pre = SOLVERS[method](dense_matvec(a), b, preconditioner=lambda r: r / diag, rtol=F64["rtol"], max_iters=150)
    assert pre.all_converged and not plain.converged.any()
    assert pre.iterations < plain.iterations / 2
    torch.testing.assert_close(x_pre, dense_solve(a, b), **F64["close"])


def test_works_on_device(device):
    a = spd(30).to(device)
    b = rhs_for("block", 30, torch.float64).to(device)
    for solver in SOLVERS.values():
        x, info = solver(dense_matvec(a), b, rtol=F64["rtol"])
        assert x.device == b.device and info.converged.device == b.device
        torch.testing.assert_close(x, dense_solve(a, b).to(device), **tol(torch.float64)["close"])


# --------------------------------------------------------------------------------------------------
# per-column convergence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(SOLVERS))
def test_columns_converge_independently(method):
    n = 40
    a = spd(n, cond=1000.0)
    eigvals, eigvecs = torch.linalg.eigh(a)
    b = torch.stack([torch.zeros(n, dtype=torch.float64), eigvecs[:, 5], rhs_for("vector", n, torch.float64)], dim=-1)
    x, info = SOLVERS[method](dense_matvec(a), b, rtol=F64["rtol"])

    assert info.converged.tolist() == [True, True, True]
    its = info.iterations_per_column.tolist()
    assert its[0] == 0 and its[1] == 1 and its[2] > 5
    assert info.iterations == its[2]
    assert torch.equal(x[:, 0], torch.zeros(n, dtype=torch.float64)) and info.residual_norm[0] == 0
    torch.testing.assert_close(x[:, 1], eigvecs[:, 5] / eigvals[5], **F64["exact"])
    torch.testing.assert_close(x, dense_solve(a, b), **tol(torch.float64)["close"])

    # a converged column stops changing: more iterations leave it bit-for-bit unchanged
    x_short, short = SOLVERS[method](dense_matvec(a), b, rtol=F64["rtol"], max_iters=3)
    assert short.converged.tolist() == [True, True, False]
    assert torch.equal(x_short[:, :2], x[:, :2])


@pytest.mark.parametrize("method", list(SOLVERS))
def test_zero_rhs_returns_zero_without_iterating(method):
    a = spd(10)
    b = torch.zeros(10, 2, dtype=torch.float64)
    x0 = torch.ones(10, 2, dtype=torch.float64)
    for kwargs in ({}, {"x0": x0}, {"atol": 0.0, "rtol": 0.0}):
        x, info = SOLVERS[method](dense_matvec(a), b, **kwargs)
        assert torch.equal(x, torch.zeros_like(b))
        assert info.iterations == 0 and info.all_converged
        assert torch.equal(info.residual_norm, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("method", list(SOLVERS))
def test_empty_rhs(method):
    x, info = SOLVERS[method](lambda v: v, torch.zeros(5, 0))
    assert x.shape == (5, 0) and info.converged.shape == (0,) and info.iterations == 0


# --------------------------------------------------------------------------------------------------
# warm start, non-convergence, in-place safety
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,matrix", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_warm_start(method, matrix):
    n = 40
    a = MATRICES[matrix](n)
    b = rhs_for("block", n, torch.float64)
    exact = dense_solve(a, b)
    solver = SOLVERS[method]

    x, info = solver(dense_matvec(a), b, x0=exact, rtol=F64["rtol"])
    assert info.iterations == 0 and info.all_converged and torch.equal(x, exact)

    cold = solver(dense_matvec(a), b, rtol=F64["rtol"])[1]
    x, warm = solver(dense_matvec(a), b, x0=exact + 1e-6 * torch.randn_like(exact), rtol=F64["rtol"])
    assert warm.all_converged and warm.iterations < cold.iterations
    torch.testing.assert_close(x, exact, **tol(torch.float64)["close"])


@pytest.mark.parametrize("method,matrix", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_non_convergence_is_reported_not_raised(method, matrix):
    n = 40
    a = MATRICES[matrix](n)
    b = rhs_for("block", n, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = SOLVERS[method](dense_matvec(a), b, rtol=F64["rtol"], max_iters=2)
    assert info.iterations == 2 and info.iterations_per_column.tolist() == [2, 2, 2]
    assert not info.converged.any() and not info.all_converged
    assert (info.residual_norm > F64["rtol"]).all()
    torch.testing.assert_close(info.residual_norm, true_relative_residual(a, x, b), **F64["exact"])


@pytest.mark.parametrize("method", list(SOLVERS))
def test_inputs_not_modified(method):
    n = 30
    a = spd(n)
    b = rhs_for("batched", n, torch.float64)
    x0 = torch.randn_like(b)
    b_copy, x0_copy = b.clone(), x0.clone()

    def matvec(v):
        before = v.clone()
        out = a @ v
        assert torch.equal(v, before)
        return out

    x, _ = SOLVERS[method](matvec, b, x0=x0, preconditioner=lambda r: 0.5 * r, rtol=F64["rtol"])
    assert torch.equal(b, b_copy) and torch.equal(x0, x0_copy)
    assert x.data_ptr() not in (b.data_ptr(), x0.data_ptr())


@pytest.mark.parametrize("method,matrix", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_matvec_may_reuse_its_output_buffer(method, matrix):
    n = 40
    a = MATRICES[matrix](n)
    b = rhs_for("block", n, torch.float64)
    out = torch.empty_like(b)
    pre_out = torch.empty_like(b)
    diag = torch.diagonal(a).abs().unsqueeze(-1)

    def matvec(v):
        return torch.matmul(a, v, out=out)

    def preconditioner(r):
        return torch.div(r, diag, out=pre_out)

    x, info = SOLVERS[method](matvec, b, preconditioner=preconditioner, rtol=F64["rtol"])
    assert info.all_converged
    torch.testing.assert_close(x, dense_solve(a, b), **tol(torch.float64)["close"])


def test_runs_with_grad_enabled_and_returns_detached():
    a = spd(20).requires_grad_()
    b = rhs_for("block", 20, torch.float64).requires_grad_()
    for solver in SOLVERS.values():
        x, _ = solver(lambda v: a @ v, b, rtol=F64["rtol"])
        assert not x.requires_grad
        torch.testing.assert_close(x, dense_solve(a.detach(), b.detach()), **tol(torch.float64)["close"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_tiny_and_huge_rhs(dtype, magnitude):
    # ‖b‖² would under/overflow in float32; the cores normalise each column first
    n = 30
    a = spd(n).to(dtype)
    b = rhs_for("block", n, torch.float64)
    b_scaled = (b * magnitude).to(dtype)
    for solver in SOLVERS.values():
        x, info = solver(dense_matvec(a), b_scaled, rtol=tol(dtype)["rtol"])
        assert info.all_converged and info.iterations > 1
        torch.testing.assert_close(x.double() / magnitude, dense_solve(a, b), **tol(dtype)["close"])


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_zero_tolerance_stops_when_residual_underflows(method):
    a = spd(10, cond=10.0)
    b = rhs_for("block", 10, torch.float64)
    x, info = SOLVERS[method](dense_matvec(a), b, rtol=0.0, atol=0.0, max_iters=5000)
    assert info.all_converged and info.iterations < 5000
    assert (info.residual_norm <= math.sqrt(torch.finfo(torch.float64).tiny)).all()
    torch.testing.assert_close(x, dense_solve(a, b), **F64["exact"])


def test_default_max_iters():
    assert default_max_iters(5) == 50 and default_max_iters(10**6) == 10_000 and default_max_iters(0) == 1
    a = spd(8, cond=1e12)
    _, info = cg(dense_matvec(a), rhs_for("vector", 8, torch.float64), rtol=0.0)
    assert info.iterations <= 80


def test_solver_info_is_frozen():
    _, info = cg(lambda v: 2 * v, torch.ones(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.iterations = 5  # type: ignore[misc]
    assert isinstance(info, SolverInfo)


# --------------------------------------------------------------------------------------------------
# breakdowns
# --------------------------------------------------------------------------------------------------


def test_cg_on_indefinite_matrix_raises():
    a = indefinite(20)
    with pytest.raises(
        NotPositiveDefiniteError, match=r"matrix is not positive definite: pᵀAp = -?[\d.e+-]+ at iteration \d+"
    ):
        cg(dense_matvec(a), rhs_for("block", 20, torch.float64))


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_indefinite_preconditioner_raises(method):
    a = spd(20)
    with pytest.raises(NotPositiveDefiniteError, match=r"preconditioner is not positive definite: rᵀM⁻¹r = "):
        SOLVERS[method](dense_matvec(a), rhs_for("vector", 20, torch.float64), preconditioner=lambda r: -r)


def test_minres_singular_inconsistent_raises():
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(SolverBreakdownError, match="minres broke down: γ"):
        minres(dense_matvec(a), torch.ones(3, dtype=torch.float64))


def test_bicgstab_breakdown_raises():
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # r̂ᵀA r̂ = 0
    with pytest.raises(SolverBreakdownError, match="bicgstab broke down: r̂ᵀv = 0 at iteration 1"):
        bicgstab(dense_matvec(rotation), torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("method", list(SOLVERS))
def test_nan_raises(method):
    a = spd(10)
    b = rhs_for("vector", 10, torch.float64)
    with pytest.raises(SolverBreakdownError, match="NaN or Inf in the iterates at iteration 1"):
        SOLVERS[method](lambda v: a @ v * float("nan"), b)
    with pytest.raises(SolverBreakdownError, match="NaN or Inf in the iterates at iteration 0"):
        SOLVERS[method](dense_matvec(a), torch.where(torch.arange(10) == 3, float("inf"), b))


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------

INVALID = [
    (dict(rhs=torch.ones(4, dtype=torch.int64)), TypeError, "real floating dtype"),
    (dict(rhs=torch.tensor(1.0)), ValueError, "0-d tensor"),
    (dict(rhs=[1.0, 2.0]), TypeError, "rhs must be a torch.Tensor"),
    (dict(matvec=None), TypeError, "matvec must be callable"),
    (dict(matvec=lambda v: v[..., :-1, :]), ValueError, r"input shape \(4, 1\) and output shape \(3, 1\)"),
    (dict(matvec=lambda v: v.float()), ValueError, "input's dtype and device"),
    (dict(preconditioner=lambda r: r.sum(-1)), ValueError, r"preconditioner must return .* shape"),
    (dict(preconditioner=3), TypeError, "preconditioner must be None or callable"),
    (dict(x0=torch.zeros(5, dtype=torch.float64)), ValueError, r"x0 must have rhs's shape \(4,\), got \(5,\)"),
    (dict(x0=torch.zeros(4)), ValueError, "x0 must have rhs's dtype"),
    (dict(rtol=-1e-3), ValueError, "rtol must be a finite number ≥ 0"),
    (dict(atol=float("nan")), ValueError, "atol must be a finite number ≥ 0"),
    (dict(max_iters=0), ValueError, "max_iters must be a positive integer"),
    (dict(max_iters=2.5), ValueError, "max_iters must be a positive integer"),
]


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.parametrize(
    "change,error,message", INVALID, ids=[f"{list(c)[0]}-{i}" for i, (c, _, _) in enumerate(INVALID)]
)
def test_invalid_inputs(method, change, error, message):
    args = dict(matvec=lambda v: 2 * v, rhs=torch.ones(4, dtype=torch.float64))
    args.update(change)
    kwargs = {k: v for k, v in args.items() if k not in ("matvec", "rhs")}
    with pytest.raises(error, match=message):
        SOLVERS[method](args["matvec"], args["rhs"], **kwargs)


# --------------------------------------------------------------------------------------------------
# Lanczos tridiagonals from CG
# --------------------------------------------------------------------------------------------------


def tridiag_dense(diag: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def test_tridiag_full_depth_recovers_spectrum_and_log_quadrature():
    n = 30
    g = torch.Generator().manual_seed(4)
    q = _orthogonal(n, g)
    eig = torch.linspace(1.0, 10.0, n, dtype=torch.float64)
    a = (q * eig) @ q.mT
    b = torch.randn(n, dtype=torch.float64, generator=g)
    x, info = cg(dense_matvec(a), b, rtol=0.0, max_iters=n, return_tridiag=True)

    diag, off = info.tridiag
    assert diag.shape == (1, n) and off.shape == (1, n - 1)
    t = tridiag_dense(diag[0], off[0])
    torch.testing.assert_close(torch.linalg.eigvalsh(t), eig, **F64["exact"])
    # Gauss quadrature with n nodes is exact: ‖b‖² e₁ᵀ log(T) e₁ = bᵀ log(A) b
    theta, s = torch.linalg.eigh(t)
    quad = b.dot(b) * (s[0] ** 2 * theta.log()).sum()
    exact = b @ ((q * eig.log()) @ q.mT) @ b
    torch.testing.assert_close(quad, exact, **F64["exact"])


def test_tridiag_partial_depth_is_cg_gauss_quadrature():
    # after m steps, bᵀx_m = ‖b‖² e₁ᵀ T_m⁻¹ e₁ exactly (CG is Gauss quadrature for bᵀA⁻¹b)
    n, m = 60, 8
    a = spd(n, cond=100.0)
    b = rhs_for("block", n, torch.float64)
    x, info = cg(dense_matvec(a), b, rtol=0.0, max_iters=m, return_tridiag=True)
    t = tridiag_dense(*info.tridiag)
    assert t.shape == (3, m, m)
    e1 = torch.zeros(m, dtype=torch.float64)
    e1[0] = 1.0
    quad = (b * b).sum(0) * torch.linalg.solve(t, e1.expand(3, m))[:, 0]
    torch.testing.assert_close(quad, (b * x).sum(0), **F64["exact"])


def test_tridiag_padding_for_early_columns_and_batches():
    n = 40
    a = spd(n, batch=(2,), cond=1000.0)
    eigvals, eigvecs = torch.linalg.eigh(a)
    b = torch.stack(
        [torch.zeros(2, n, dtype=torch.float64), eigvecs[..., :, 3], rhs_for("batched", n, torch.float64)[:, 0, :, 0]],
        dim=-1,
    )
    x, info = cg(dense_matvec(a), b, rtol=F64["rtol"], return_tridiag=True)
    diag, off = info.tridiag
    m = info.iterations
    assert diag.shape == (2, 3, m) and off.shape == (2, 3, m - 1)
    assert info.iterations_per_column[:, :2].tolist() == [[0, 1], [0, 1]]
    # zero columns: pure padding; eigenvector columns: T = [λ] ⊕ I
    assert torch.equal(diag[:, 0], torch.ones(2, m, dtype=torch.float64)) and not off[:, :2].any()
    torch.testing.assert_close(diag[:, 1, 0], eigvals[:, 3], **F64["exact"])
    assert torch.equal(diag[:, 1, 1:], torch.ones(2, m - 1, dtype=torch.float64))
    # padding is decoupled: e₁ᵀ T⁻¹ e₁ of the padded matrix equals that of the leading block
    t = tridiag_dense(diag, off)
    inv = torch.linalg.inv(t)[..., 0, 0]
    torch.testing.assert_close(inv[:, 1], 1.0 / eigvals[:, 3], **F64["exact"])
    torch.testing.assert_close((b * b).sum(-2)[:, 2] * inv[:, 2], (b * x).sum(-2)[:, 2], **F64["exact"])


def test_tridiag_preconditioned_spectrum():
    # A = D S D with M = D²: T is the Lanczos matrix of M^{-1/2} A M^{-1/2} = S, eigenvalues known
    n = 25
    g = torch.Generator().manual_seed(5)
    q = _orthogonal(n, g)
    eig = torch.linspace(1.0, 10.0, n, dtype=torch.float64)
    d = torch.logspace(0, 2, n, dtype=torch.float64)
    a = d[:, None] * ((q * eig) @ q.mT) * d[None, :]
    b = rhs_for("vector", n, torch.float64)
    m2 = (d * d).unsqueeze(-1)
    _, info = cg(dense_matvec(a), b, preconditioner=lambda r: r / m2, rtol=0.0, max_iters=n, return_tridiag=True)
    t = tridiag_dense(info.tridiag[0][0], info.tridiag[1][0])
    torch.testing.assert_close(torch.linalg.eigvalsh(t), eig, **F64["exact"])


def test_tridiag_matches_linear_operator_mbcg():
    linear_cg = pytest.importorskip("linear_operator.utils.linear_cg").linear_cg
    n, m = 40, 12
    a = spd(n, cond=30.0)
    b = rhs_for("block", n, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # linear_cg warns that it stopped above its tolerance
        x_lo, t_lo = linear_cg(
            dense_matvec(a), b, n_tridiag=3, tolerance=1e-14, eps=1e-300, max_iter=m, max_tridiag_iter=m
        )
    x, info = cg(dense_matvec(a), b, rtol=0.0, max_iters=m, return_tridiag=True)
    torch.testing.assert_close(tridiag_dense(*info.tridiag), t_lo, **F64["exact"])
    torch.testing.assert_close(x, x_lo, **F64["exact"])


def test_return_type_does_not_change_with_flags():
    a = spd(10)
    b = rhs_for("vector", 10, torch.float64)
    for kwargs in ({}, {"return_tridiag": False}, {"return_tridiag": True}):
        out = cg(dense_matvec(a), b, **kwargs)
        assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolverInfo)
        assert (out[1].tridiag is not None) == bool(kwargs.get("return_tridiag"))


# --------------------------------------------------------------------------------------------------
# property: the reported residual satisfies the stopping rule
# --------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(list(SOLVERS)),
    n=st.integers(2, 12),
    k=st.integers(1, 3),
    log_cond=st.floats(0.0, 4.0),
    rtol=st.sampled_from([1e-12, 1e-8, 1e-4, 1e-2, 0.5]),
    atol=st.sampled_from([0.0, 1e-8, 1e-3]),
    seed=st.integers(0, 2**16),
)
def test_converged_columns_satisfy_stopping_rule(method, n, k, log_cond, rtol, atol, seed):
    a = spd(n, cond=10.0**log_cond, seed=seed)
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, k, dtype=torch.float64, generator=g) * torch.logspace(-3, 3, k, dtype=torch.float64)
    x, info = SOLVERS[method](dense_matvec(a), b, rtol=rtol, atol=atol)
    bnorm = torch.linalg.vector_norm(b, dim=0)
    bound = torch.clamp(rtol * bnorm, min=atol)
    reported = info.residual_norm * bnorm
    ok = info.converged
    assert (reported[ok] <= bound[ok] * (1 + F64["roundoff"])).all()  # up to rounding of the internal ‖b‖ normalisation
    assert (~ok).sum() == 0 or info.iterations == default_max_iters(n)
    # the true residual differs from the recursive one only by rounding drift
    true = torch.linalg.vector_norm(b - a @ x, dim=0)
    drift = F64["drift"] * (torch.linalg.matrix_norm(a, ord=2) * torch.linalg.vector_norm(x, dim=0) + bnorm)
    assert (true[ok] <= bound[ok] + drift[ok] * 10.0**log_cond).all()


# --------------------------------------------------------------------------------------------------
# package layout and docstring examples
# --------------------------------------------------------------------------------------------------


def test_package_attributes_are_the_solvers():
    """``getattr(krylov, method)`` (the solver's lookup) gives the functions, not the submodules."""
    import gpsparse.core.krylov as krylov

    for name in ("cg", "minres", "bicgstab"):
        assert callable(getattr(krylov, name)) and getattr(krylov, name).__name__ == name


KRYLOV_MODULES = ["cg", "minres", "bicgstab", "problem"]


@pytest.mark.parametrize("module", [f"gpsparse.core.krylov.{m}" for m in KRYLOV_MODULES] + ["gpsparse.core.columns"])
def test_docstring_examples(module):
    import doctest
    import sys

    failures, _ = doctest.testmod(sys.modules[module], verbose=False)
    assert failures == 0


@pytest.mark.parametrize("shape", [(50, 1), (50, 3), (2, 50, 1), (2, 50, 40), (50, 40)])
def test_column_dot_matches_sum(shape):
    from gpsparse.core.columns import column_dot

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    expected = (a * b).sum(-2)
    torch.testing.assert_close(column_dot(a, b), expected)
    torch.testing.assert_close(column_dot(a, b, buffer=torch.empty(shape, dtype=torch.float64)), expected)
