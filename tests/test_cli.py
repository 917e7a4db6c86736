"""The gradwatch command: ``report`` on runs written by real sessions, ``demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import gradwatch
from gradwatch.cli import build_parser, main
from gradwatch.cli.report import format_figures
from gradwatch.runs import read_run


class Net(nn.Module):
    """Two layers; ``fault="detach"`` cuts fc1 off, ``"zero-gate"`` zeroes a path."""

    def __init__(self, fault: str = "none") -> None:
        super().__init__()
        self.fault = fault
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)
        self.gate = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.fault == "detach":
            h = h.detach()
        scale = 0.0 if self.fault == "zero-gate" else 1.0
        return self.fc2(h) + scale * self.gate(x)


def write_run(logdir: Path, fault: str = "none", steps: int = 12) -> Path:
    """Train ``Net(fault)`` under a session that writes to ``logdir``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randn(16, 1, generator=generator)
    model = Net(fault)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch(model, logdir=logdir, on_alert="ignore", log_every=5):
        for _ in range(steps):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    return logdir


def event_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("events.out.tfevents.*")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One directory holding a faulty, a clean and a warning-only run."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "detach", "detach")
    write_run(root / "clean")
    write_run(root / "zero-gate", "zero-gate")
    return root


def report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Exit status and text


def test_faulty_run_exits_1(runs, capsys):
    code, out, err = report(capsys, runs / "detach")

    assert code == 1
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"run {runs / 'detach'} (last gradwatch record at step 11)"
    assert lines[1].split() == [
        "check",
        "severity",
        "parameter",
        "first",
        "last",
        "figures",
    ]
    rows = [line.split()[:3] for line in lines[2:5]]
    assert ["unused_parameter", "error", "fc1.bias"] in rows
    assert ["unused_parameter", "error", "fc1.weight"] in rows
    assert ["graph_cut", "error", "<root>"] in rows
    assert "  alerts per check: unused_parameter 2, graph_cut 1" in lines
    assert "orphaned=[fc1.weight,fc1.bias]" in out
    assert lines[-1].endswith("1 of 1 run(s) have alerts of severity error.")


def test_clean_run_exits_0(runs, capsys):
    code, out, err = report(capsys, runs / "clean")

    assert code == 0
    assert err == ""
    assert out.splitlines() == [
        f"run {runs / 'clean'} (last gradwatch record at step 11)",
        "  no alerts",
        "",
        "1 run(s), 0 alert(s) listed; no run has alerts of severity error.",
    ]


def test_warnings_exit_0_unless_fail_on(runs, capsys):
    code, out, _ = report(capsys, runs / "zero-gate")
    strict_code, _, _ = report(capsys, runs / "zero-gate", "--fail-on", "warning")

    assert code == 0
    assert "zero_gradient" in out
    assert strict_code == 1


def test_several_runs_reported_one_by_one(runs, capsys):
    code, out, _ = report(capsys, runs)

    assert code == 1
    headers = [line for line in out.splitlines() if line.startswith("run ")]
    assert headers == [
        f"run {runs / 'clean'} (last gradwatch record at step 11)",
        f"run {runs / 'detach'} (last gradwatch record at step 11)",
        f"run {runs / 'zero-gate'} (last gradwatch record at step 11)",
    ]
    assert out.splitlines()[-1].startswith("3 run(s), ")
    assert "1 of 3 run(s) have alerts" in out


def test_messages_option_prints_fixes(runs, capsys):
    _, plain, _ = report(capsys, runs / "detach")
    _, verbose, _ = report(capsys, runs / "detach", "--messages")

    assert "Keep the computation in torch tensors" not in plain
    assert "Keep the computation in torch tensors" in verbose


def test_single_event_file_accepted(runs, capsys):
    code, out, _ = report(capsys, event_file(runs / "detach"))

    assert code == 1
    assert out.startswith(f"run {runs / 'detach'} ")


def test_reused_logdir_reports_each_session(tmp_path, capsys):
    write_run(tmp_path / "run", "detach")
    write_run(tmp_path / "run")

    code, out, _ = report(capsys, tmp_path)

    assert code == 1
    headers = [line for line in out.splitlines() if line.startswith("run ")]
    assert len(headers) == 2
    assert all("events.out.tfevents." in line for line in headers)
    assert "  no alerts" in out


def test_other_event_files_skipped(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    write_run(tmp_path / "run")
    with SummaryWriter(tmp_path / "run") as writer:
        writer.add_scalar("loss", 1.0, 0)

    code, out, _ = report(capsys, tmp_path)

    assert code == 0
    headers = [line for line in out.splitlines() if line.startswith("run ")]
    assert headers == [f"run {tmp_path / 'run'} (last gradwatch record at step 11)"]


# JSON


def test_json_matches_text(runs, capsys):
    code, out, _ = report(capsys, runs, "--json")
    document = json.loads(out)

    assert code == 1
    assert document["failed"] is True
    assert document["fail_on"] == "error"
    by_run = {Path(run["run"]).name: run for run in document["runs"]}
    assert set(by_run) == {"clean", "detach", "zero-gate"}
    detach = by_run["detach"]
    assert detach["failed"] is True
    assert detach["last_step"] == 11
    assert detach["alerts_per_check"] == {"unused_parameter": 2, "graph_cut": 1}
    assert detach["alerts_per_severity"] == {"error": 3, "warning": 0, "info": 0}
    first = detach["alerts"][0]
    assert set(first) == {
        "check",
        "severity",
        "step",
        "last_step",
        "count",
        "param",
        "module",
        "message",
        "data",
        "ranks",
    }
    assert by_run["clean"]["alerts"] == []
    assert by_run["clean"]["failed"] is False


def test_json_clean_exit_0(runs, capsys):
    code, out, _ = report(capsys, runs / "clean", "--json")

    assert code == 0
    assert json.loads(out)["failed"] is False


# Unreadable input


def test_missing_directory_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, out, err = report(capsys, missing)

    assert code == 2
    assert out == ""
    assert err == f"gradwatch report: error: {missing}: no such file or directory\n"


def test_empty_directory_exits_2(tmp_path, capsys):
    code, out, err = report(capsys, tmp_path)

    assert code == 2
    assert out == ""
    assert f"error: {tmp_path}: no TensorBoard event files" in err


def test_non_event_files_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("loss went down\n")
    (tmp_path / "config.json").write_text("{}\n")

    code, _, err = report(capsys, tmp_path)

    assert code == 2
    assert f"error: {tmp_path}: no TensorBoard event files" in err


def test_garbage_event_file_exits_2(tmp_path, capsys):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"\x07" * 300)

    code, _, err = report(capsys, tmp_path)

    assert code == 2
    assert f"{tmp_path}: none of the 1 event file(s) holds gradwatch records" in err


def test_truncated_file_read_with_warning(tmp_path, capsys):
    path = event_file(write_run(tmp_path / "run", "detach"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])

    code, out, err = report(capsys, tmp_path)

    assert code == 1
    assert "unused_parameter" in out
    assert f"warning: {path}: the file is truncated or damaged at byte" in err


def test_alerts_only_counted_still_fail(tmp_path, capsys):
    # Cut the file right after the first alert-count scalars that are not zero,
    # before the alert list of that step: the counts alone must fail the run.
    path = event_file(write_run(tmp_path / "run", "detach", steps=3))
    run = read_run(path)
    assert run.alerts, "the faulty run must list alerts"

    data = path.read_bytes()
    marker = data.find(b"gradwatch/alerts_json")
    cut = data.rfind(b"gradwatch/alerts/unused_parameter", 0, marker)
    end = _record_end(data, cut)
    path.write_bytes(data[:end])

    code, out, err = report(capsys, tmp_path)

    assert code == 1
    assert "alerts per check: unused_parameter 2" in out
    assert "the scalars count alerts the last alert list does not hold" in err


def _record_end(data: bytes, position: int) -> int:
    """Return the offset just past the TFRecord that contains ``position``."""
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 8], "little")
        end = offset + 12 + length + 4
        if offset <= position < end:
            return end
        offset = end
    raise AssertionError("position is past the last record")


# Parsing and help


def test_format_figures_cuts_long_text():
    figures = format_figures({"norm": 0.000123456, "names": ["a", "b"], "n": 3})

    assert figures == "norm=0.0001235, names=[a,b], n=3"
    assert format_figures({"names": ["x" * 100]}, width=20) == "names=[xxxxxxxxxx..."


@pytest.mark.parametrize("command", ["report", "demo"])
def test_help_lists_commands(capsys, command):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])

    assert exited.value.code == 0
    assert command in capsys.readouterr().out


def test_report_help_says_units(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out

    assert "--json" in text
    assert "--fail-on {error,warning,info}" in text
    assert "lowest alert severity that sets exit status 1" in text
    assert "2 if RUN_DIR is missing" in text


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])

    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_parser_defaults():
    options = build_parser().parse_args(["report", "runs"])

    assert options.run_dir == Path("runs")
    assert options.fail_on == "error"
    assert options.json is False


@pytest.mark.slow
def test_python_dash_m_matches_command(runs):
    for command in (["gradwatch"], [sys.executable, "-m", "gradwatch"]):
        result = subprocess.run(
            [*command, "report", str(runs / "detach")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert "graph_cut" in result.stdout


# The demo

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_digits.py"


def test_example_script_shares_fault_registry():
    import importlib.util

    from gradwatch import demo

    spec = importlib.util.spec_from_file_location("train_digits_example", EXAMPLE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    assert script.FAULTS is demo.FAULTS
    assert script.main is demo.main
    assert script.load_data is demo.load_data
    assert {"none", "detach", "no-grad", "unused", "not-in-optimizer"} <= set(
        demo.FAULTS
    )


def test_demo_help_says_units(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--help"])
    text = capsys.readouterr().out

    assert exited.value.code == 0
    assert text.startswith("usage: gradwatch demo ")
    assert "number of passes over the training data (default: 20)" in text
    assert "number of samples per optimizer step (default: 64)" in text


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "status"), [("detach", 1), ("none", 0)])
def test_demo_run_then_report(tmp_path, capsys, fault, status):
    logdir = tmp_path / fault
    demo = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--fault", fault]
        + ["--epochs", "1", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == status, demo.stdout + demo.stderr
    assert f"fault: {fault}; test accuracy after 1 epochs" in demo.stdout

    code, out, err = report(capsys, logdir)

    assert code == status
    assert err == ""
    if fault == "detach":
        assert "graph_cut" in out
        assert "unused_parameter" in out
    else:
        assert "  no alerts" in out


@pytest.mark.slow
def test_example_script_runs_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fault", "detach", "--epochs", "1"]
        + ["--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    assert "fault: detach; test accuracy after 1 epochs" in result.stdout
    assert "[error] graph_cut" in result.stdout
