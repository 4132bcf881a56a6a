"""``python -m benchmarks.dask_quick`` runs end to end, at its smallest size.

Nothing here asserts a speed: only that every row and every stopping figure
is there and real (positive, finite), so that the benchmark cannot rot.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_dask_quick_runs_and_reports_every_figure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.dask_quick", "--calls", "4", "--rounds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for row in ("client.submit (no child)", "client.submit, 2 in flight", "fresh child (fork)"):
        assert row in text
    figures = [float(ms) for ms in re.findall(r"\s([0-9.]+|nan) ms$", text, re.M)]
    assert len(figures) >= 7
    assert all(math.isfinite(ms) and ms > 0 for ms in figures), text
