"""The overhead benchmark still runs: a few steps, no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "overhead.py"


@pytest.mark.slow
def test_overhead_quick_mode_prints_a_table():
    command = [sys.executable, str(SCRIPT), "--quick", "--no-memory"]
    command += ["--workloads", "W5-10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "## W5-10 (bare step" in done.stdout
    assert "| gradwatch default |" in done.stdout
    assert "| gradwatch everything |" in done.stdout
    assert "µs per parameter tensor per step" in done.stdout
