"""Test helpers: tolerances keyed by dtype and kind, and devices."""

from __future__ import annotations

import torch

_TOLERANCES = {
    # kind -> dtype -> (rtol, atol)
    "direct": {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)},
    "iterative": {torch.float64: (1e-5, 1e-8), torch.float32: (2e-3, 1e-4)},
    "stochastic": {torch.float64: (5e-2, 1e-3), torch.float32: (5e-2, 1e-3)},
}


def tolerance(dtype: torch.dtype, kind: str = "iterative") -> dict:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close`` by dtype and kind."""
    rtol, atol = _TOLERANCES[kind][dtype]
    return {"rtol": rtol, "atol": atol}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
