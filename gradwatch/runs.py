"""Read the alerts of finished runs back from the event files gradwatch wrote.

A session with ``logdir`` writes one event file through one ``SummaryWriter``.
The file contains the alert list as JSON text (tag ``gradwatch/alerts_json``),
rewritten whenever the alerts change, and the number of alerts per check as
scalars (``gradwatch/alerts/<check>``). The last JSON value is the final state.
Each event file is read as one run, because a directory reused by several
sessions contains one file per session.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

from gradwatch.alerts import CHECKS, SEVERITIES, Alert

__all__ = ["Run", "RunsError", "find_event_files", "read_run", "read_runs"]

_JSON_TAGS = ("gradwatch/alerts_json", "gradwatch/alerts_json/text_summary")
_COUNT_PREFIX = "gradwatch/alerts/"
_ALERT_FIELDS = {f.name for f in dataclasses.fields(Alert)}

# A TFRecord is a little-endian uint64 length, a 4-byte CRC of the length, the
# data, and a 4-byte CRC of the data.
_RECORD_HEADER = 12
_RECORD_FOOTER = 4


class RunsError(Exception):
    """A path cannot be read as gradwatch runs; the message names the path."""


@dataclasses.dataclass
class Run:
    """The alerts of one session, read from one event file.

    Attributes:
        path: The event file.
        label: The run's name for display: its directory, plus the file name
            where a directory contains several gradwatch runs.
        alerts: The last alert list the session wrote.
        counts: The last number of alerts per check, from the scalars.
        last_step: The highest step of any gradwatch record, or None.
        notes: Problems met while reading, such as a truncated file.
        found: Whether the file contains any gradwatch record.
    """

    path: Path
    label: str = ""
    alerts: list[Alert] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    last_step: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    found: bool = False

    def unlisted_counts(self) -> dict[str, int]:
        """Return, per check, the alerts counted in the scalars but not listed.

        A file cut off after the last scalars but before the last alert list
        has more counted alerts than listed ones.
        """
        listed: dict[str, int] = {}
        for alert in self.alerts:
            listed[alert.check] = listed.get(alert.check, 0) + 1
        return {
            check: count - listed.get(check, 0)
            for check, count in self.counts.items()
            if count > listed.get(check, 0)
        }

    def severity_counts(self) -> dict[str, int]:
        """Return the number of alerts per severity, unlisted ones included.

        An alert that is only counted takes its check's default severity.
        """
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in self.alerts:
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
        for check, count in self.unlisted_counts().items():
            severity = CHECKS.get(check, "error")
            counts[severity] += count
        return counts

    def check_counts(self) -> dict[str, int]:
        """Return the number of alerts per check, unlisted ones included."""
        counts: dict[str, int] = {}
        for alert in self.alerts:
            counts[alert.check] = counts.get(alert.check, 0) + 1
        for check, count in self.unlisted_counts().items():
            counts[check] = counts.get(check, 0) + count
        return counts


def find_event_files(root: Path) -> list[Path]:
    """Return the TensorBoard event files at or under ``root``, sorted by path.

    Raises:
        RunsError: ``root`` does not exist, cannot be listed, or contains no
            event file.
    """
    if not root.exists():
        raise RunsError(f"{root}: no such file or directory")
    if root.is_file():
        return [root]
    try:
        files = sorted(p for p in root.rglob("*tfevents*") if p.is_file())
    except OSError as err:
        raise RunsError(f"{root}: cannot be read: {err}") from err
    if not files:
        msg = (
            f"{root}: no TensorBoard event files (events.out.tfevents.*) found; "
            f"pass the logdir of a run made with gradwatch(model, logdir=...)"
        )
        raise RunsError(msg)
    return files


def read_run(path: Path) -> Run:
    """Read the gradwatch records of one event file.

    A truncated or damaged file is read up to the damage, with a note in
    ``run.notes``.
    ``run.found`` is False when the file contains no gradwatch record.

    Raises:
        RunsError: The file cannot be opened.
    """
    from tensorboard.backend.event_processing.event_file_loader import (
        EventFileLoader,
    )

    run = Run(path)
    try:
        damage = _first_damaged_byte(path)
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                _read_value(run, event.step, value)
    except OSError as err:
        raise RunsError(f"{path}: cannot be read: {err}") from err

    if damage is not None:
        run.notes.append(
            f"{path}: the file is truncated or damaged at byte {damage}; read the "
            f"records before it (a run still writing, or killed, leaves such files)"
        )
    unlisted = run.unlisted_counts()
    if unlisted:
        counted = ", ".join(f"{check} {n}" for check, n in unlisted.items())
        run.notes.append(
            f"{path}: the scalars count alerts the last alert list does not hold "
            f"({counted}); they are counted with their check's default severity"
        )
    return run


def read_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """Read every event file under ``root``.

    Returns:
        The runs that hold gradwatch records, labelled relative to ``root``,
        and the event files that hold none.

    Raises:
        RunsError: ``root`` cannot be read or contains no event file.
    """
    runs: list[Run] = []
    others: list[Path] = []
    for path in find_event_files(root):
        run = read_run(path)
        if run.found:
            runs.append(run)
        else:
            others.append(path)
    _label(runs)
    return runs, others


def _label(runs: list[Run]) -> None:
    per_directory: dict[Path, int] = {}
    for run in runs:
        per_directory[run.path.parent] = per_directory.get(run.path.parent, 0) + 1
    for run in runs:
        label = str(run.path.parent)
        if per_directory[run.path.parent] > 1:
            label = f"{label} ({run.path.name})"
        run.label = label


def _read_value(run: Run, step: int, value: Any) -> None:
    tag = value.tag
    if tag in _JSON_TAGS:
        run.found = True
        run.alerts = _parse_alerts(value, run.path, step, run.notes)
    elif tag.startswith(_COUNT_PREFIX) and tag[len(_COUNT_PREFIX) :] in CHECKS:
        run.found = True
        run.counts[tag[len(_COUNT_PREFIX) :]] = int(_scalar(value))
    else:
        return
    run.last_step = step if run.last_step is None else max(run.last_step, step)


def _scalar(value: Any) -> float:
    from tensorboard.util import tensor_util

    if value.HasField("tensor"):
        return float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
    return float(value.simple_value)


def _parse_alerts(value: Any, path: Path, step: int, notes: list[str]) -> list[Alert]:
    try:
        records = json.loads(value.tensor.string_val[0])
        return [_alert(record) for record in records]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        notes.append(f"{path}: the alert list at step {step} is not valid: {err}")
        return []


def _alert(record: dict[str, Any]) -> Alert:
    fields = {k: v for k, v in record.items() if k in _ALERT_FIELDS}
    if fields.get("severity") not in SEVERITIES:
        msg = f"alert {fields.get('check')!r} has severity {fields.get('severity')!r}"
        raise ValueError(msg)
    return Alert(**fields)


def _first_damaged_byte(path: Path) -> int | None:
    """Return the offset of the first incomplete record, or None if all are whole.

    Only the record lengths are checked, not the CRCs; the reader checks those.
    """
    size = path.stat().st_size
    offset = 0
    with path.open("rb") as file:
        while offset < size:
            if offset + _RECORD_HEADER > size:
                return offset
            file.seek(offset)
            (length,) = struct.unpack("<Q", file.read(8))
            end = offset + _RECORD_HEADER + length + _RECORD_FOOTER
            if end > size:
                return offset
            offset = end
    return None
