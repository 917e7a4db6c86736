"""``gradwatch report``: print the alerts of finished runs and gate CI on them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gradwatch.alerts import SEVERITIES, Alert
from gradwatch.runs import Run, RunsError, read_runs

__all__ = ["EXIT_ALERTS", "EXIT_CLEAN", "EXIT_UNREADABLE", "run_report"]

EXIT_CLEAN = 0
EXIT_ALERTS = 1
EXIT_UNREADABLE = 2

_COLUMNS = ("check", "severity", "parameter", "first", "last", "figures")
_FIGURES_WIDTH = 60


def run_report(
    root: Path,
    *,
    as_json: bool = False,
    fail_on: str = "error",
    messages: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the alerts of every run under ``root``; return the exit status.

    Returns:
        1 if any run has an alert of ``fail_on`` or a more serious severity,
        2 if ``root`` is missing, unreadable or contains no gradwatch run, else 0.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        runs, others = read_runs(root)
    except RunsError as error:
        err.write(f"gradwatch report: error: {error}\n")
        return EXIT_UNREADABLE
    if not runs:
        err.write(
            f"gradwatch report: error: {root}: none of the {len(others)} event "
            f"file(s) holds gradwatch records; pass the logdir given to "
            f"gradwatch(model, logdir=...)\n"
        )
        return EXIT_UNREADABLE

    for run in runs:
        for note in run.notes:
            err.write(f"gradwatch report: warning: {note}\n")
    failing = [run for run in runs if _fails(run, fail_on)]
    if as_json:
        json.dump(_as_json(runs, failing, fail_on), out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(_as_text(runs, failing, fail_on, messages))
    return EXIT_ALERTS if failing else EXIT_CLEAN


def _fails(run: Run, fail_on: str) -> bool:
    limit = SEVERITIES.index(fail_on)
    counts = run.severity_counts()
    return any(counts[s] for s in SEVERITIES[: limit + 1])


# Text


def _as_text(runs: list[Run], failing: list[Run], fail_on: str, messages: bool) -> str:
    blocks = [_run_text(run, messages) for run in runs]
    total = sum(len(run.alerts) for run in runs)
    severity = fail_on if fail_on == "error" else f"{fail_on} or more serious"
    if failing:
        verdict = f"{len(failing)} of {len(runs)} run(s) have alerts of severity"
    else:
        verdict = "no run has alerts of severity"
    verdict = f"{verdict} {severity}"
    blocks.append(f"{len(runs)} run(s), {total} alert(s) listed; {verdict}.\n")
    return "\n".join(blocks)


def _run_text(run: Run, messages: bool) -> str:
    lines = [f"run {run.label} (last gradwatch record at step {run.last_step})"]
    if not run.alerts and not run.check_counts():
        lines.append("  no alerts")
        return "\n".join(lines) + "\n"

    if run.alerts:
        lines.extend("  " + row for row in _table(run.alerts))
    counts = ", ".join(f"{check} {n}" for check, n in run.check_counts().items())
    lines.append(f"  alerts per check: {counts}")
    if messages:
        for alert in run.alerts:
            lines.append(f"  [{alert.severity}] {alert.check} `{alert.subject}`:")
            lines.append(f"      {alert.message}")
    return "\n".join(lines) + "\n"


def _table(alerts: list[Alert]) -> list[str]:
    ordered = sorted(alerts, key=lambda a: (SEVERITIES.index(a.severity), a.step))
    rows = [_COLUMNS] + [
        (
            a.check,
            a.severity,
            a.subject,
            str(a.step),
            str(a.last_step),
            format_figures(a.data),
        )
        for a in ordered
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in ("first", "last") else cell.ljust(width)
            for cell, width, column in zip(row, widths, _COLUMNS, strict=False)
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def format_figures(data: dict[str, Any], width: int = _FIGURES_WIDTH) -> str:
    """Return ``data`` as ``key=value`` pairs, cut to ``width`` characters."""
    text = ", ".join(f"{key}={_figure(value)}" for key, value in data.items())
    if len(text) > width:
        text = text[: width - 3] + "..."
    return text


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_figure(v) for v in value) + "]"
    return str(value)


# JSON


def _as_json(runs: list[Run], failing: list[Run], fail_on: str) -> dict[str, Any]:
    return {
        "fail_on": fail_on,
        "failed": bool(failing),
        "runs": [
            {
                "run": run.label,
                "path": str(run.path),
                "last_step": run.last_step,
                "failed": run in failing,
                "alerts": [dataclasses.asdict(alert) for alert in run.alerts],
                "alerts_per_check": run.check_counts(),
                "alerts_per_severity": run.severity_counts(),
                "warnings": run.notes,
            }
            for run in runs
        ],
    }
