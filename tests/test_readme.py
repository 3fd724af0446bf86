"""The README's "model in 15 lines" runs as written (at a small size), so that it cannot silently rot."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"
#: The only edits made to the snippet: a coarser lattice and fewer steps (the README's run: 20 000 points).
SMALL = {"grid_size=128": "grid_size=24", "range(100)": "range(25)"}


def readme_model_snippet() -> str:
    text = README.read_text()
    section = text.split("## A model in 15 lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's model section has no python code block"
    return match.group(1)


def test_readme_model_snippet_trains_and_predicts():
    code = readme_model_snippet()
    for old, new in SMALL.items():
        assert old in code, f"the README snippet changed: {old!r} not found (update tests/test_readme.py)"
        code = code.replace(old, new)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(600, 2, generator=gen)
    field = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1])
    y = field + 0.1 * torch.randn(600, generator=gen)
    x_test = torch.rand(80, 2, generator=gen)
    namespace = {"x": x, "y": y, "x_test": x_test}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    pred, likelihood = namespace["pred"], namespace["likelihood"]
    truth = torch.sin(6 * x_test[:, 0]) * torch.cos(4 * x_test[:, 1])
    assert pred.mean.shape == (80,) and bool(torch.isfinite(pred.variance).all())
    assert float((pred.mean - truth).pow(2).mean().sqrt()) < 0.2
    assert float(likelihood.noise) < 0.2  # learned from 0.69 towards the true 0.01
    assert bool((pred.variance > 0).all())
