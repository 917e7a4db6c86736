"""The end-of-run summary of a session's alerts, as text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from gradwatch.alerts import SEVERITIES, Alert

__all__ = ["format_report"]


def format_report(alerts: Sequence[Alert], steps: int, watched: int) -> str:
    """Return a readable summary: counts per severity, then one block per alert."""
    header = f"gradwatch: {steps} step(s), {watched} parameter tensor(s) watched"
    if not alerts:
        return f"{header}, no alerts."

    counts = Counter(a.severity for a in alerts)
    summary = ", ".join(f"{counts[s]} {s}" for s in SEVERITIES if counts[s])
    lines = [f"{header}, {len(alerts)} alert(s): {summary}."]
    for alert in sorted(alerts, key=lambda a: (SEVERITIES.index(a.severity), a.step)):
        span = f"step {alert.step}"
        if alert.last_step > alert.step:
            span = f"steps {alert.step}-{alert.last_step}"
        lines.append("")
        lines.append(f"[{alert.severity}] {alert.check} `{alert.subject}` ({span})")
        lines.append(f"    {alert.message}")
    return "\n".join(lines)
