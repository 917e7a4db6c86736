"""The digits demo, run in-process for every ``--fault`` it offers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "examples" / "train_digits.py"

#: The check ids each fault must produce; healthy runs must produce none.
EXPECTED = {
    "none": set(),
    "detach": {"unused_parameter", "graph_cut"},
    "no-grad": {"unused_parameter", "graph_cut"},
    "unused": {"unused_parameter"},
    "not-in-optimizer": {"not_in_optimizer"},
    "zero-init": {"symmetric_units"},
    "dead-relu": {"dead_units"},
    "mask-leak": {"mask_leak"},
    "mask-revived": {"mask_revived"},
    "prune-ok": set(),
}


def load_demo():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_fault_has_an_expectation():
    assert set(load_demo().FAULTS) == set(EXPECTED)


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_demo_reports_its_fault(fault, tmp_path, capsys):
    code = load_demo().main(
        ["--fault", fault, "--epochs", "1", "--logdir", str(tmp_path)]
    )
    output = capsys.readouterr().out

    reported = set(re.findall(r"^\[(?:error|warning)\] (\w+) ", output, re.MULTILINE))
    if EXPECTED[fault]:
        assert EXPECTED[fault] <= reported, output
    else:
        assert reported == set(), output
        assert code == 0
    assert f"tensorboard --logdir {tmp_path}" in output
    assert any(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_healthy_demo_learns(tmp_path, capsys):
    load_demo().main(["--fault", "none", "--logdir", str(tmp_path)])
    output = capsys.readouterr().out

    accuracy = float(re.search(r"test accuracy after 20 epochs: ([0-9.]+)", output)[1])
    assert accuracy > 0.93
