"""The fused column kernels (``gpsparse.core.fused``) against the torch operations they replace.

Two levels: each kernel against its torch counterpart on random blocks, and
whole CG runs (``fused=True`` vs ``fused=False``) with the same iteration
count: solutions, the Lanczos coefficients CG records, residuals and
iteration counts agree to rounding.
"""

from __future__ import annotations

import pytest
import torch

from gpsparse.core.columns import column_dot
from gpsparse.core.fused import FUSED_MIN_ENTRIES, FUSED_MIN_ROWS, FusedColumnOps, TorchColumnOps, column_ops
from gpsparse.core.krylov import cg
from gpsparse.core.krylov.cg import _cg
from gpsparse.core.krylov.problem import _Problem
from gpsparse.core.lanczos import _lanczos

DTYPES = [torch.float64, torch.float32]
# (*batch, k) of the blocks; n = 37 rows (not a multiple of the 4 partial sums)
SHAPES = {"vector": ((), 1), "one-column": ((), 1), "block": ((), 5), "batched": ((2,), 3), "batched-1": ((3,), 1)}


def close(dtype: torch.dtype) -> dict:
    """Fused vs torch: rounding only (float64 1e-12 relative; float32 1e-5)."""
    return {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


def _spd(n: int, batch: tuple, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A batch of well-conditioned SPD matrices (condition number ~10)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 10.0, n, dtype=torch.float64)
    return ((q * eig) @ q.mT).to(dtype)


def _blocks(batch: tuple, k: int, dtype: torch.dtype, count: int, n: int = 37) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*batch, n, k, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernels_match_torch(dtype, shape):
    batch, k = shape
    x, p, r, q, z = _blocks(batch, k, dtype, 5)
    alpha = torch.rand(*batch, k, dtype=dtype)
    beta = torch.rand(*batch, k, dtype=dtype)
    fused, plain = FusedColumnOps(column_dot, x), TorchColumnOps(column_dot)
    torch.testing.assert_close(fused.dot(p, q), plain.dot(p, q), **close(dtype))

    r1, r2 = r.clone(), r.clone()
    torch.testing.assert_close(fused.residual(r1, q, alpha), plain.residual(r2, q, alpha), **close(dtype))
    torch.testing.assert_close(r1, r2, **close(dtype))

    x1, p1, x2, p2 = x.clone(), p.clone(), x.clone(), p.clone()
    fused.step(x1, p1, z, alpha, beta)
    plain.step(x2, p2, z, alpha, beta)
    torch.testing.assert_close(x1, x2, **close(dtype))
    torch.testing.assert_close(p1, p2, **close(dtype))


def test_float32_dots_accumulate_in_float64():
    """A long float32 dot: the float64 accumulation is accurate where a float32 running sum drifts."""
    n = 1_000_003
    a = torch.full((n, 1), 0.1, dtype=torch.float32)
    exact = float(a.double().square().sum())
    got = float(FusedColumnOps(column_dot, a).dot(a, a)[0])
    assert abs(got - exact) <= 1e-6 * exact


def test_non_contiguous_operands_fall_back_to_torch():
    x, p, q = _blocks((), 4, torch.float64, 3)
    strided = torch.randn(4, 37, dtype=torch.float64).mT  # (37, 4), not contiguous
    fused, plain = FusedColumnOps(column_dot, x), TorchColumnOps(column_dot)
    torch.testing.assert_close(fused.dot(strided, q), plain.dot(strided, q), **close(torch.float64))
    p1, p2, x1, x2 = p.clone(), p.clone(), x.clone(), x.clone()
    alpha, beta = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    fused.step(x1, p1, strided, alpha, beta)
    plain.step(x2, p2, strided, alpha, beta)
    torch.testing.assert_close(p1, p2, **close(torch.float64))


def test_column_ops_choice():
    block = torch.zeros(FUSED_MIN_ENTRIES // 2, 2)
    assert column_ops(block, column_dot).fused
    assert not column_ops(block, column_dot, fused=False).fused
    assert not column_ops(block[:10], column_dot).fused  # small blocks: torch (less call overhead)
    assert column_ops(block[:10], column_dot, fused=True).fused
    assert not column_ops(block.half(), column_dot).fused
    tall = torch.zeros(FUSED_MIN_ROWS, 1)  # by rows (Lanczos): the same choice for 1 or 16 columns
    assert not column_ops(tall, column_dot).fused and column_ops(tall, column_dot, by_rows=True).fused
    assert not column_ops(tall[:-1].expand(-1, 16).contiguous(), column_dot, by_rows=True).fused
    with pytest.raises(ValueError, match="fused column kernels need"):
        column_ops(block.half(), column_dot, fused=True)


def _run(a, b, fused, *, precondition, x0, max_iters, rtol):
    matvec = lambda v: a.to(v.dtype) @ v  # noqa: E731
    inv_diag = (1.0 / torch.diagonal(a, dim1=-2, dim2=-1)).unsqueeze(-1)
    precond = (lambda v: inv_diag.to(v.dtype) * v) if precondition else None  # noqa: E731
    problem = _Problem(matvec, b, x0, precond, rtol, 0.0, max_iters)
    return _cg(problem, True, fused=fused)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "jacobi"])
@pytest.mark.parametrize("max_iters", [5, 60], ids=["5-its", "converged"])
def test_cg_fused_matches_torch(dtype, shape, precondition, max_iters):
    batch, k = shape
    n = 37
    a = _spd(n, batch, dtype)
    a = a + torch.diag_embed(torch.linspace(0.0, 5.0, n, dtype=torch.float64))  # Jacobi has work to do
    b = _blocks(batch, k, dtype, 1, n)[0]
    if shape == SHAPES["vector"]:
        b = b.squeeze(-1)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    x_f, info_f = _run(a, b, True, precondition=precondition, x0=None, max_iters=max_iters, rtol=rtol)
    x_t, info_t = _run(a, b, False, precondition=precondition, x0=None, max_iters=max_iters, rtol=rtol)
    assert x_f.shape == b.shape
    torch.testing.assert_close(x_f, x_t, **close(dtype))
    if max_iters < 60:  # converged residuals are at the rounding level: compared through `converged`
        torch.testing.assert_close(info_f.residual_norm, info_t.residual_norm, **close(dtype))
    if max_iters < 60 or dtype == torch.float64:  # the same steps (a float32 stopping test may differ by one)
        assert torch.equal(info_f.iterations_per_column, info_t.iterations_per_column)
        for fused_part, torch_part in zip(info_f.tridiag, info_t.tridiag):
            torch.testing.assert_close(fused_part, torch_part, **close(dtype))
    if max_iters == 60:
        assert bool(info_f.converged.all())


def test_cg_fused_with_x0_and_zero_column():
    a = _spd(30, (), torch.float64)
    b = _blocks((), 3, torch.float64, 1, 30)[0]
    b[:, 1] = 0.0
    x0 = torch.randn(30, 3, dtype=torch.float64).mT.contiguous().mT  # a strided initial guess
    x_f, info_f = _run(a, b, True, precondition=False, x0=x0, max_iters=100, rtol=1e-12)
    x_t, info_t = _run(a, b, False, precondition=False, x0=x0, max_iters=100, rtol=1e-12)
    torch.testing.assert_close(x_f, x_t, **close(torch.float64))
    assert torch.equal(x_f[:, 1], torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(a @ x_f, b, rtol=0, atol=1e-10)


def test_public_cg_uses_the_fused_kernels_on_cpu(monkeypatch):
    calls = []
    original = FusedColumnOps.step

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(FusedColumnOps, "step", spy)
    n = FUSED_MIN_ENTRIES
    d = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64).repeat(n // 3 + 1)[:n]  # 3 eigenvalues: 3 steps
    b = torch.ones(n, dtype=torch.float64)
    x, info = cg(lambda v: d.unsqueeze(-1) * v, b, rtol=1e-10)
    assert calls and len(calls) == info.iterations == 3
    torch.testing.assert_close(x, 1.0 / d, **close(torch.float64))


# ------------------------------------------------------------------ Lanczos
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lanczos_kernels_match_torch(dtype, shape):
    batch, k = shape
    w, q_prev, q, r = _blocks(batch, k, dtype, 4)
    beta, scale = torch.rand(*batch, k, dtype=dtype), torch.rand(*batch, k, dtype=dtype)
    fused, plain = FusedColumnOps(column_dot, w), TorchColumnOps(column_dot)
    for previous in (None, q_prev):
        r1, r2 = torch.empty_like(r), torch.empty_like(r)
        a1 = fused.lanczos_alpha(w, previous, beta, q, r1)
        a2 = plain.lanczos_alpha(w, previous, beta, q, r2)
        torch.testing.assert_close(a1, a2, **close(dtype))
        torch.testing.assert_close(r1, r2, **close(dtype))
    K, n = 4, r.shape[-2]
    stores = [torch.zeros(*batch, k, K, n, dtype=dtype) for _ in range(2)]
    news = [torch.empty_like(r) for _ in range(2)]
    fused.lanczos_next(r, scale, news[0], stores[0], 2)
    plain.lanczos_next(r, scale, news[1], stores[1], 2)
    torch.testing.assert_close(news[0], news[1], **close(dtype))
    torch.testing.assert_close(stores[0], stores[1], **close(dtype))
    torch.testing.assert_close(stores[0][..., 2, :], news[0].mT, rtol=0, atol=0)
    assert not stores[0][..., [0, 1, 3], :].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reorthogonalize", [False, True])
def test_lanczos_fused_matches_torch(dtype, shape, reorthogonalize):
    """Whole runs, fused vs torch column work, and against the differentiable (out-of-place) oracle."""
    batch, k = shape
    A = _spd(37, batch, dtype)
    (v,) = _blocks(batch, k, dtype, 1)

    # Without re-orthogonalisation rounding differences grow with the steps (lost orthogonality): 6 steps in float32.
    steps = 12 if reorthogonalize or dtype == torch.float64 else 6

    def run(fused, differentiable=False):
        return _lanczos(lambda x: A @ x, v, steps, reorthogonalize, 1e-10, differentiable=differentiable, fused=fused)

    one, two, oracle = run(True), run(False), run(None, differentiable=True)
    for other in (two, oracle):
        for name in ("alpha", "beta", "basis", "residual"):
            torch.testing.assert_close(getattr(one, name), getattr(other, name), **close(dtype), msg=name)
        assert torch.equal(one.steps, other.steps)


def test_lanczos_fused_stops_at_an_invariant_subspace():
    """A start vector in a 3-dimensional invariant subspace: β₃ = 0, the rest is padding on both paths."""
    A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    v = torch.zeros(40, 2, dtype=torch.float64)
    v[[2, 7, 30], 0] = 1.0
    v[:, 1] = torch.linspace(1.0, 2.0, 40, dtype=torch.float64)
    one = _lanczos(lambda x: A @ x, v, 8, True, 1e-10, differentiable=False, fused=True)
    two = _lanczos(lambda x: A @ x, v, 8, True, 1e-10, differentiable=False, fused=False)
    assert one.steps.tolist() == two.steps.tolist() == [3, 8]
    for name in ("alpha", "beta", "basis", "residual"):
        torch.testing.assert_close(getattr(one, name), getattr(two, name), rtol=1e-12, atol=1e-14, msg=name)
    assert not one.basis[:, 0, 3:].any()


def test_public_lanczos_uses_the_fused_kernels_on_large_cpu_blocks(monkeypatch):
    from gpsparse.core import fused as module
    from gpsparse.core.lanczos import lanczos

    calls = []
    original = module._lanczos_next_kernel
    monkeypatch.setattr(module, "_lanczos_next_kernel", lambda *a: calls.append(1) or original(*a))
    n = FUSED_MIN_ENTRIES // 4 + 1
    A = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    lanczos(lambda x: A.unsqueeze(-1) * x, torch.ones(n, 4, dtype=torch.float64), 5, reorthogonalize=False)
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reorthogonalize", [False, True])
def test_fused_lanczos_columns_do_not_depend_on_their_neighbours(dtype, reorthogonalize):
    """Each column's coefficients are the same bits alone or with others (probe-parallel runs split the columns)."""
    (v,) = _blocks((), 5, dtype, 1, n=41)

    def matvec(x):  # tridiagonal (3, −1): elementwise, so itself the same bits for any number of columns
        y = 3.0 * x
        y[1:] -= x[:-1]
        y[:-1] -= x[1:]
        return y

    def run(block):
        return _lanczos(matvec, block, 10, reorthogonalize, 1e-10, differentiable=False, fused=True)

    together = run(v)
    for c in range(5):
        alone = run(v[:, c : c + 1].contiguous())
        torch.testing.assert_close(alone.alpha[0], together.alpha[c], rtol=0, atol=0)
        torch.testing.assert_close(alone.beta[0], together.beta[c], rtol=0, atol=0)
    pair = run(v[:, 1:3].contiguous())
    torch.testing.assert_close(pair.alpha, together.alpha[1:3], rtol=0, atol=0)
