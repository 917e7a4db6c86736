"""Alerts: one finding each, kept once per check and subject, updated as steps pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

__all__ = ["CHECKS", "SEVERITIES", "Alert", "AlertBook", "Severity"]

Severity = Literal["error", "warning", "info"]

SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

#: Every check id gradwatch can raise, with its default severity.
CHECKS: dict[str, Severity] = {
    "unused_parameter": "error",
    "gradient_stopped": "warning",
    "graph_cut": "error",
    "not_in_optimizer": "error",
    "unregistered_parameter": "error",
    "zero_gradient": "warning",
    "dead_units": "warning",
    "mask_leak": "error",
    "mask_revived": "error",
    "symmetric_units": "error",
    "representation_collapse": "error",
    "nonfinite_gradient": "error",
    "exploding_gradient": "warning",
    "vanishing_gradient": "warning",
}


@dataclasses.dataclass(frozen=True)
class Alert:
    """One finding of one check about one parameter or module.

    Attributes:
        check: The check id, a key of :data:`CHECKS`.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        step: The step at which the finding was first made.
        param: Qualified name of the parameter concerned, or None.
        module: Qualified name of the module concerned (``""`` is the root), or None.
        message: What happened, where, when and how to fix it.
        data: Figures behind the finding (counts, norms, names).
        last_step: The latest step at which the finding still held.
        count: How many analysed steps the finding held at.
        ranks: The ``torch.distributed`` ranks the finding concerns; empty
            outside a process group.
    """

    check: str
    severity: Severity
    step: int
    param: str | None
    module: str | None
    message: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_step: int = -1
    count: int = 1
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.last_step < self.step:
            object.__setattr__(self, "last_step", self.step)

    @property
    def subject(self) -> str:
        """The parameter or module name this alert is about."""
        if self.param is not None:
            return self.param
        if self.module is not None:
            return self.module or "<root>"
        return "<model>"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check} at step {self.step}: {self.message}"


class _Entry:
    """A known alert and its running figures, turned into an Alert on request."""

    __slots__ = ("alert", "count", "data", "last_step", "ranks", "_current")

    def __init__(self, alert: Alert) -> None:
        self.alert = alert
        self.last_step = alert.last_step
        self.count = alert.count
        self.data = dict(alert.data)
        self.ranks = set(alert.ranks)
        self._current: Alert | None = alert

    def update(self, alert: Alert) -> None:
        self.last_step = max(self.last_step, alert.last_step)
        self.count += 1
        self.data.update(alert.data)
        self.ranks.update(alert.ranks)
        self._current = None

    def current(self) -> Alert:
        if self._current is None:
            self._current = dataclasses.replace(
                self.alert,
                last_step=self.last_step,
                count=self.count,
                data=dict(self.data),
                ranks=tuple(sorted(self.ranks)),
            )
        return self._current


class AlertBook:
    """The alerts of one session, one per ``(check, subject)``.

    :meth:`record` returns True for a new alert, and for a known one whose
    severity rises (an info that turns into an error takes the new message); any
    other repeat only updates ``last_step``, ``count`` and the figures. Repeats
    are cheap: the updated Alert is built only when it is read.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str | None, str | None], _Entry] = {}

    def record(self, alert: Alert) -> bool:
        key = (alert.check, alert.param, alert.module)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(alert)
            return True

        escalates = SEVERITIES.index(alert.severity) < SEVERITIES.index(
            entry.alert.severity
        )
        if escalates:
            entry.alert = dataclasses.replace(
                entry.alert, severity=alert.severity, message=alert.message
            )
        entry.update(alert)
        return escalates

    def get(self, check: str, param: str | None = None, module: str | None = None):
        """Return the alert of ``check`` about ``param``/``module``, or None."""
        entry = self._entries.get((check, param, module))
        return entry.current() if entry is not None else None

    def __iter__(self) -> Iterator[Alert]:
        return (entry.current() for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def as_list(self) -> list[Alert]:
        return sorted(self, key=lambda a: (a.step, a.check, a.subject))
