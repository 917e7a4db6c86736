"""The overhead benchmark still runs: a few steps, no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_overhead_only_times_the_chosen_variants():
    command = [sys.executable, str(SCRIPT), "--quick", "--no-memory"]
    command += ["--workloads", "W5-10", "--only", "naive norm().item() hooks"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "| naive norm().item() hooks |" in done.stdout
    assert "| gradwatch default |" not in done.stdout
    assert "wandb" not in done.stdout


def test_anomaly_variant_stays_inside_its_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from variants import VARIANTS
    from workloads import WORKLOADS

    workload = WORKLOADS["W5-10"](0)
    step = workload.step
    seen = []

    def spy() -> None:
        seen.append(torch.is_anomaly_enabled())
        step()

    workload.step = spy
    enter, _ = VARIANTS["detect_anomaly"]
    with enter(workload, tmp_path):
        assert not torch.is_anomaly_enabled()
        workload.step()
        assert not torch.is_anomaly_enabled()

    assert seen == [True]
    assert workload.step is spy
