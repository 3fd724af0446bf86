"""Smoke tests: every example runs end to end at a small size and writes its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_image_restoration_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "image_restoration.py"), "--steps", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "relative difference to the exact direct solve" in out.stdout
    rel = float(out.stdout.split("exact direct solve:")[1].split()[0])
    assert rel < 1e-4
    assert (tmp_path / "image_restoration.png").stat().st_size > 10_000


def _run(script: str, *args: str, tmp_path: Path, timeout: int = 600) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args, "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return out.stdout


def test_co2_forecast_runs(tmp_path):
    stdout = _run("co2_forecast.py", "--steps", "10", "--timing-steps", "1", tmp_path=tmp_path)
    rel = float(stdout.split("(relative difference ")[1].split(")")[0])
    assert rel < 1e-8  # the Markov kernel's MLL equals GPyTorch's dense Matérn MLL
    assert (tmp_path / "co2_forecast.png").stat().st_size > 10_000


def test_spatial_regression_runs(tmp_path):
    stdout = _run("spatial_regression.py", "--steps", "3", tmp_path=tmp_path)
    rmse = float(stdout.split("vs the true field: ")[1].split()[0])
    assert rmse < 0.3  # far below the noise σ = 0.3 after 3 steps on 100 000 points
    assert (tmp_path / "spatial_regression.png").stat().st_size > 10_000


def test_graph_regression_runs(tmp_path):
    stdout = _run("graph_regression.py", "--steps", "5", tmp_path=tmp_path)
    assert "held-out RMSE: graph Matérn GP" in stdout
    assert (tmp_path / "graph_regression.png").stat().st_size > 10_000
