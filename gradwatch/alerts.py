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
    "rank_dependent_graph": "warning",
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


class AlertBook:
    """The alerts of one session, one per ``(check, subject)``.

    :meth:`record` returns True for a new alert, and for a known one whose
    severity rises (an info that turns into an error takes the new message); any
    other repeat only updates ``last_step``, ``count`` and the figures.
    """

    def __init__(self) -> None:
        self._alerts: dict[tuple[str, str | None, str | None], Alert] = {}

    def record(self, alert: Alert) -> bool:
        key = (alert.check, alert.param, alert.module)
        known = self._alerts.get(key)
        if known is None:
            self._alerts[key] = alert
            return True

        escalates = SEVERITIES.index(alert.severity) < SEVERITIES.index(known.severity)
        self._alerts[key] = dataclasses.replace(
            known,
            severity=alert.severity if escalates else known.severity,
            message=alert.message if escalates else known.message,
            last_step=max(known.last_step, alert.last_step),
            count=known.count + 1,
            data={**known.data, **alert.data},
            ranks=tuple(sorted({*known.ranks, *alert.ranks})),
        )
        return escalates

    def get(self, check: str, param: str | None = None, module: str | None = None):
        """Return the alert of ``check`` about ``param``/``module``, or None."""
        return self._alerts.get((check, param, module))

    def __iter__(self) -> Iterator[Alert]:
        return iter(self._alerts.values())

    def __len__(self) -> int:
        return len(self._alerts)

    def as_list(self) -> list[Alert]:
        return sorted(self._alerts.values(), key=lambda a: (a.step, a.check, a.subject))
