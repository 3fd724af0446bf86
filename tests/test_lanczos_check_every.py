"""Lanczos with host synchronisations every ``check_every`` steps (issue 16, item 1): same results, same errors.

The batched check may run up to ``check_every − 1`` steps after every column
has stopped; those only repeat the padding (``α = 1``, ``β = 0``, zero basis
vectors), so the decomposition is the same for any value, and a non-finite
coefficient is reported at the step where it occurred.
"""

from __future__ import annotations

import pytest
import torch

from gpsparse.core import lanczos as module
from gpsparse.core.lanczos import lanczos
from gpsparse.errors import SolverBreakdownError

F64 = torch.float64
EVERY = (1, 2, 3, 8, 100)


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * torch.linspace(1.0, 50.0, n, dtype=F64)) @ q.T


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same(a, b) -> None:
    for name in ("alpha", "beta", "basis", "norm", "residual"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    assert torch.equal(a.steps, b.steps)


CASES = {
    "three-columns": (
        lambda: _spd(30),
        lambda: torch.randn(30, 3, generator=torch.Generator().manual_seed(1), dtype=F64),
        12,
    ),
    "invariant-subspace": (
        lambda: torch.diag(torch.arange(1.0, 41.0, dtype=F64)),
        lambda: torch.stack(
            [
                torch.zeros(40, dtype=F64).index_fill(0, torch.tensor([2, 7, 30]), 1.0),
                torch.linspace(1.0, 2.0, 40, dtype=F64),
            ],
            -1,
        ),
        8,
    ),
    "all-stop-early": (
        lambda: torch.diag(torch.arange(1.0, 41.0, dtype=F64)),
        lambda: torch.zeros(40, 2, dtype=F64).index_fill(0, torch.tensor([3, 9]), 1.0),
        12,
    ),
    "more-steps-than-rows": (lambda: _spd(6, 2), lambda: torch.ones(6, 2, dtype=F64), 10),
}


@pytest.mark.parametrize("reorthogonalize", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_results_do_not_depend_on_check_every(case, reorthogonalize):
    make_a, make_v, K = CASES[case]
    A, v = make_a(), make_v()
    runs = [lanczos(lambda x: A @ x, v, K, reorthogonalize=reorthogonalize, check_every=c) for c in EVERY]
    for other in runs[1:]:
        _same(runs[0], other)


def test_a_non_finite_step_is_reported_where_it_occurred():
    A = _spd(20)
    v = torch.ones(20, 2, dtype=F64)
    messages = []
    for c in EVERY:
        calls: list[int] = []

        def matvec(x, calls=calls):
            calls.append(1)
            y = A @ x
            if len(calls) == 4:
                y[3, 1] = float("nan")
            return y

        with pytest.raises(SolverBreakdownError, match="at step 4") as err:
            lanczos(matvec, v, 10, check_every=c)
        messages.append(str(err.value))
        assert len(calls) <= 4 + c  # at most check_every − 1 steps past the bad one
    assert len(set(messages)) == 1


def test_synchronisations_are_batched(monkeypatch):
    calls = []
    original = module._look
    monkeypatch.setattr(module, "_look", lambda window: calls.append(len(window)) or original(window))
    A = _spd(30)
    v = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    lanczos(lambda x: A @ x, v, 10, check_every=4)
    assert calls == [4, 4, 2]
    calls.clear()
    lanczos(lambda x: A @ x, v, 10)  # CPU default: every step
    assert calls == [1] * 10


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_bad_check_every_raises(bad):
    with pytest.raises(ValueError, match="check_every"):
        lanczos(lambda x: x, torch.ones(4, 1, dtype=F64), 3, check_every=bad)
