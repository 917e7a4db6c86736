"""The ``gradwatch`` command: ``gradwatch report RUN_DIR`` and ``gradwatch demo``.

``python -m gradwatch`` runs the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch.alerts import SEVERITIES

__all__ = ["build_parser", "main"]

_DESCRIPTION = "Find the parts of a PyTorch model that learn nothing."


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``gradwatch`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="gradwatch", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    report = commands.add_parser(
        "report",
        help="print the alerts of runs written with logdir=...; exit 1 on errors",
        description=(
            "Print the alerts that gradwatch wrote to the TensorBoard event files "
            "under RUN_DIR, one table per run, and a count per check. Exit "
            "status: 0 if no run has an alert of the --fail-on severity, 1 if "
            "one has, 2 if RUN_DIR is missing, unreadable or contains no gradwatch "
            "run."
        ),
    )
    report.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        type=Path,
        help="logdir of a run, a directory holding several runs, or one event file",
    )
    report.add_argument(
        "--json",
        action="store_true",
        help="print the runs, alerts and counts as one JSON object",
    )
    report.add_argument(
        "--fail-on",
        choices=SEVERITIES,
        default="error",
        help="lowest alert severity that sets exit status 1 (default: error)",
    )
    report.add_argument(
        "--messages",
        action="store_true",
        help="also print each alert's message: what happened and how to fix it",
    )

    commands.add_parser(
        "demo",
        help="train the digits demo, healthy or with a planted fault",
        description="Run the digits demo; `gradwatch demo --help` lists its options.",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradwatch`` command; return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        return _demo(args[1:])

    options = build_parser().parse_args(args)
    if options.command == "report":
        from gradwatch.cli.report import run_report

        return run_report(
            options.run_dir,
            as_json=options.json,
            fail_on=options.fail_on,
            messages=options.messages,
        )
    raise AssertionError(f"unhandled command {options.command!r}")


def _demo(argv: list[str]) -> int:
    from gradwatch import demo

    try:
        return demo.main(argv, prog="gradwatch demo")
    except ImportError as err:
        sys.stderr.write(f"gradwatch demo: error: {err}\n")
        return 2
