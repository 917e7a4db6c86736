"""The TensorBoard dashboard: custom-scalars layout, gradient-flow image, alert table.

:class:`Dashboard` is driven by the TensorBoard sink. When the session starts it
writes a custom-scalars layout that groups gradwatch's scalars into the
sections Alerts, Gradient flow, Updates, Masks and Symmetry. Every
``log_every`` steps it records each parameter's gradient norm as one column of
the gradient-flow image, written every ``image_every`` steps and at the
session's last step. :func:`alerts_markdown` renders the alerts as the
markdown table of the Text tab. The tags are listed in ``docs/dashboard.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from gradwatch.alerts import CHECKS, SEVERITIES, Alert
from gradwatch.sinks.flow_image import render_flow

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.detectors.base import StepContext

__all__ = ["Dashboard", "alerts_markdown", "scalar_layout"]

FLOW_IMAGE_TAG = "gradwatch/gradient_flow"
FLOW_ROWS_TAG = "gradwatch/gradient_flow_rows"

#: Columns kept in the gradient-flow image; past it, every other column is
#: dropped and the spacing between recorded steps doubles.
MAX_COLUMNS = 240

#: Up to this many parameters, the gradient-flow chart lists each tag in model
#: order; above it one pattern matches them all.
MAX_LISTED_TAGS = 64

_MESSAGE_CHARS = 400


def scalar_layout(param_names: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """Return the custom-scalars layout for ``SummaryWriter.add_custom_scalars``.

    Args:
        param_names: The watched parameters' qualified names, in model order.
    """
    if len(param_names) <= MAX_LISTED_TAGS:
        flow = [f"^gradwatch/grad_norm/{re.escape(name)}$" for name in param_names]
    else:
        flow = ["^gradwatch/grad_norm/(?!global$)"]
    by_severity = {
        severity: [
            f"^gradwatch/alerts/{re.escape(check)}$"
            for check, default in CHECKS.items()
            if default == severity
        ]
        for severity in SEVERITIES
    }
    return {
        "Alerts": {
            f"{severity} checks: alerts so far": ["Multiline", tags]
            for severity, tags in by_severity.items()
            if tags
        },
        "Gradient flow": {
            "gradient norm per parameter (model order)": ["Multiline", flow],
            "gradient norm over all parameters": [
                "Multiline",
                ["^gradwatch/grad_norm/global$"],
            ],
        },
        "Updates": {
            "update norm / weight norm per parameter": [
                "Multiline",
                ["^gradwatch/update_ratio/"],
            ],
        },
        "Masks": {
            "mask sparsity": ["Multiline", ["^gradwatch/masks/.*/sparsity$"]],
            "masked entries that leak": ["Multiline", ["^gradwatch/masks/.*/leaking$"]],
            "masked entries revived": ["Multiline", ["^gradwatch/masks/.*/revived$"]],
        },
        "Symmetry": {
            "distinct units per layer": [
                "Multiline",
                ["^gradwatch/symmetry/.*/distinct_units$"],
            ],
            "dead unit fraction per layer": [
                "Multiline",
                ["^gradwatch/dead_units/.*/fraction$"],
            ],
        },
    }


def alerts_markdown(alerts: Iterable[Alert], step: int) -> str:
    """Return the alerts as a markdown summary line and table, worst first."""
    rank = {severity: index for index, severity in enumerate(SEVERITIES)}
    ordered = sorted(alerts, key=lambda a: (rank[a.severity], a.step, a.check))
    counts = {s: sum(a.severity == s for a in ordered) for s in SEVERITIES}
    summary = ", ".join(f"{counts[s]} {s}" for s in SEVERITIES)
    lines = [f"**{len(ordered)} alert(s)** at step {step}: {summary}.", ""]
    if not ordered:
        return lines[0]
    lines += [
        "| severity | check | where | steps | message |",
        "|---|---|---|---|---|",
    ]
    for alert in ordered:
        lines.append(
            f"| {alert.severity} | `{alert.check}` | `{alert.subject}` "
            f"| {_steps(alert)} | {_cell(alert.message)} |"
        )
    return "\n".join(lines)


def _steps(alert: Alert) -> str:
    if alert.last_step <= alert.step:
        return str(alert.step)
    return f"{alert.step}-{alert.last_step} ({alert.count} times)"


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    if len(text) > _MESSAGE_CHARS:
        text = text[: _MESSAGE_CHARS - 3].rstrip() + "..."
    return text


class Dashboard:
    """Writes the layout once and the gradient-flow image on its schedule."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._rows: dict[str, int] = {}
        self._steps: list[int] = []
        self._columns: list[dict[str, float]] = []
        self._stride = 1
        self._imaged_step: int | None = None

    def write_layout(self, writer: Any, model: nn.Module) -> None:
        """Write the custom-scalars layout; call once, before the first step."""
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        writer.add_custom_scalars(scalar_layout(names))

    def record(self, writer: Any, ctx: StepContext) -> None:
        """Record this step's gradient norms; write the image when it is due."""
        every = self.options.image_every
        if not every:
            return
        if ctx.step % (self.options.log_every * self._stride) == 0 or ctx.final:
            self._add_column(ctx)
        if self._steps and (ctx.step % every == 0 or ctx.final):
            self.write_image(writer, ctx.step)

    def finish(self, writer: Any, step: int) -> None:
        """Write the image once more if columns were recorded since the last one."""
        due = self._steps and self._steps[-1] != self._imaged_step
        if self.options.image_every and due:
            self.write_image(writer, step)

    def _add_column(self, ctx: StepContext) -> None:
        column = {}
        for info in ctx.judged:
            # Every trainable parameter gets a row: one without a gradient shows
            # as a grey row, which is how a disconnected layer looks.
            self._rows.setdefault(info.name, len(self._rows))
            norm = ctx.grad_norms.get(id(info.tensor))
            if norm is not None:
                column[info.name] = norm
        if self._steps and self._steps[-1] == ctx.step:
            self._columns[-1] = column
            return
        self._steps.append(ctx.step)
        self._columns.append(column)
        if len(self._steps) > MAX_COLUMNS:
            self._steps = self._steps[::2]
            self._columns = self._columns[::2]
            self._stride *= 2

    def write_image(self, writer: Any, step: int) -> None:
        """Write the gradient-flow image and its row legend at ``step``."""
        names = list(self._rows)
        norms = [[column.get(name) for column in self._columns] for name in names]
        image = render_flow(names, self._steps, norms)
        self._imaged_step = self._steps[-1] if self._steps else None
        writer.add_image(FLOW_IMAGE_TAG, image, step, dataformats="HWC")
        rows = "\n".join(f"| {i} | `{name}` |" for i, name in enumerate(names))
        legend = (
            "Rows of the gradient-flow image (Images tab), top to bottom:\n\n"
            f"| row | parameter |\n|---|---|\n{rows}"
        )
        writer.add_text(FLOW_ROWS_TAG, legend, step)
