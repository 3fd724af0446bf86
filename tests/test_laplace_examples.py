"""Smoke tests of the Laplace examples (issue 14): each runs end to end and matches its dense reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpsparse.core.cholmod import cholmod_available

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [
    pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed"),
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import libpysal"], capture_output=True).returncode != 0,
        reason="libpysal (the examples' data) not installed",
    ),
]


def _run(script: str, *args: str, tmp_path: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args, "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return out.stdout


def _relative_difference(stdout: str) -> float:
    return float(stdout.split("(relative difference ")[1].split(")")[0].split(",")[0])


def test_lgcp_runs(tmp_path):
    stdout = _run("lgcp.py", "--cell", "50", "--steps", "5", tmp_path=tmp_path)
    assert "392 deaths" in stdout
    assert _relative_difference(stdout) < 1e-10
    assert (tmp_path / "lgcp.png").stat().st_size > 10_000


def test_disease_mapping_runs(tmp_path):
    stdout = _run("disease_mapping.py", "--steps", "10", tmp_path=tmp_path)
    assert "100 counties" in stdout
    assert _relative_difference(stdout) < 1e-10
    assert (tmp_path / "disease_mapping.png").stat().st_size > 10_000
