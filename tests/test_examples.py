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
