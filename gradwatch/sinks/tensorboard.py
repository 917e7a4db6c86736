"""Stream figures, histograms and alerts to TensorBoard event files.

Tags, all under ``gradwatch/``:

==================================  ===============================================
``gradwatch/alerts/<check>``        number of alerts of that check so far (scalar)
``gradwatch/grad_norm/global``      L2 norm over all judged gradients (scalar)
``gradwatch/grad_norm/<param>``     gradient norm of one parameter (scalar)
``gradwatch/grad/<param>``          gradient values (histogram)
``gradwatch/weight/<param>``        parameter values (histogram)
``gradwatch/alerts``                table of the alerts, in markdown (text)
``gradwatch/alerts_json``           the same alerts as a JSON list (text), for tools
``gradwatch/symmetry/<layer>/``     distinct units of a layer, by weight and
``distinct_units``                  gradient (scalar, on unit check steps)
``gradwatch/dead_units/<layer>/``   fraction of a layer's units dead at this check
``fraction``                        (scalar, on unit check steps)
==================================  ===============================================

:mod:`gradwatch.sinks.dashboard` adds the custom-scalars layout and the
gradient-flow image; ``docs/dashboard.md`` lists every tag.

Scalars are written every ``log_every`` steps, histograms every
``histogram_every`` steps (0 switches them off), the alert table whenever the
alerts change. A failure to write (a full disk, a directory made read-only) is
logged once; the session goes on and keeps its alerts in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tensorboard.compat.proto.summary_pb2 import Summary

from gradwatch.alerts import CHECKS, AlertBook
from gradwatch.detectors.base import Detector, StepContext
from gradwatch.sinks.dashboard import Dashboard, alerts_markdown
from gradwatch.sinks.histograms import (
    histogram_proto,
    histogram_summaries,
    histogram_summary,
)
from gradwatch.sinks.records import use_fast_checksums
from gradwatch.transfer import Pending

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.params import ParamInfo

__all__ = ["TensorBoardSink", "histogram_summary"]

logger = logging.getLogger(__name__)


def _summary_writer(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        msg = (
            "gradwatch needs the tensorboard package to write event files for "
            "logdir=...; install it with `pip install tensorboard`, or pass "
            "logdir=None"
        )
        raise ImportError(msg) from err
    try:
        return SummaryWriter(log_dir=str(logdir))
    except OSError as err:
        msg = (
            f"cannot create logdir {str(logdir)!r}: {err.strerror or err}; pass a "
            f"directory you can write to, or logdir=None"
        )
        raise ValueError(msg) from err


class TensorBoardSink(Detector):
    """Write the session's figures to ``logdir`` with ``SummaryWriter``."""

    def __init__(self, options: Options, alerts: AlertBook) -> None:
        super().__init__(options)
        assert options.logdir is not None
        self._alerts = alerts
        self._writer: Any = _summary_writer(options.logdir)
        use_fast_checksums(self._writer)
        self._failed = False
        self._histograms: list[tuple[list[str], Pending]] = []
        self._alert_count = 0
        self._last_step = 0
        self._figure_sources: list[Callable[[], dict[str, float]]] = []
        self._dashboard = Dashboard(options)

    def attach(self, model: torch.nn.Module, hooks: Any) -> None:
        """Write the dashboard layout, before any step or alert."""
        self._write(self._dashboard.write_layout, self._writer, model)

    def add_figure_source(self, source: Callable[[], dict[str, float]]) -> None:
        """Write the scalars ``source()`` returns (tag to value) after each step.

        Detectors that judge only some steps return an empty dict on the others.
        """
        self._figure_sources.append(source)

    def collect(self, ctx: StepContext) -> None:
        every = self.options.histogram_every
        if not every or ctx.step % every:
            return
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for info in ctx.judged:
            for tag, tensor in self._histogram_sources(ctx, info):
                by_device.setdefault(tensor.device, []).append((tag, tensor))
        for sources in by_device.values():
            tags = [tag for tag, _ in sources]
            rows = histogram_summaries([tensor for _, tensor in sources])
            self._histograms.append((tags, ctx.batch.add(rows)))

    def _histogram_sources(
        self, ctx: StepContext, info: ParamInfo
    ) -> list[tuple[str, torch.Tensor]]:
        sources = []
        grad = info.tensor.grad
        if grad is not None and not grad.is_sparse and ctx.arrived(info):
            sources.append((f"gradwatch/grad/{info.name}", grad))
        sources.append((f"gradwatch/weight/{info.name}", info.tensor))
        return sources

    def analyse(self, ctx: StepContext) -> None:
        self._last_step = ctx.step
        histograms, self._histograms = self._histograms, []
        logged = ctx.step % self.options.log_every == 0 or ctx.final
        alerts_changed = len(self._alerts) != self._alert_count
        self._alert_count = len(self._alerts)
        figures: dict[str, float] = {}
        for source in self._figure_sources:
            figures.update(source())
        self._write(self._write_step, ctx, logged, alerts_changed, figures, histograms)
        self._write(self._dashboard.record, self._writer, ctx)
        if alerts_changed:
            self._write(self._text, ctx.step)

    def close(self) -> None:
        """Write the final state of the alerts, then flush and close the writer."""
        if self._writer is None:
            return
        self._write(self._write_values, self._last_step, self._alert_values())
        if len(self._alerts):
            self._write(self._text, self._last_step)
        self._write(self._dashboard.finish, self._writer, self._last_step)
        writer, self._writer = self._writer, None
        try:
            writer.flush()
            writer.close()
        except Exception as err:  # noqa: BLE001 - see _write
            self._log_failure(err)

    # Writing

    def _write(self, method: Any, *args: Any) -> None:
        if self._writer is None or self._failed:
            return
        try:
            method(*args)
        except Exception as err:  # noqa: BLE001
            # The writer's background thread re-raises its own failure here, as an
            # OSError or one of tensorboard's file errors; neither may stop training.
            self._log_failure(err)

    def _log_failure(self, err: Exception) -> None:
        if not self._failed:
            logger.error(
                "gradwatch stopped writing TensorBoard events to %s: %s; training "
                "goes on and alerts are still collected in memory",
                self.options.logdir,
                err,
            )
        self._failed = True

    def _write_step(
        self,
        ctx: StepContext,
        logged: bool,
        alerts_changed: bool,
        figures: dict[str, float],
        histograms: list[tuple[list[str], Pending]],
    ) -> None:
        """Write all scalars and histograms of a step as one event.

        One event with many values costs far less to write than one event per
        value, and TensorBoard reads each value as if it had its own event.
        """
        values = []
        if logged:
            values += self._norm_values(ctx)
        if logged or alerts_changed:
            values += self._alert_values()
        values += [_scalar_value(tag, value) for tag, value in figures.items()]
        values += _histogram_values(histograms)
        self._write_values(ctx.step, values)

    def _write_values(self, step: int, values: list[Summary.Value]) -> None:
        if values:
            self._writer._get_file_writer().add_summary(Summary(value=values), step)

    def _norm_values(self, ctx: StepContext) -> list[Summary.Value]:
        norms = {info.name: ctx.grad_norms.get(id(info.tensor)) for info in ctx.judged}
        finite = [n for n in norms.values() if n is not None]
        values = []
        if finite:
            total = math.sqrt(sum(n * n for n in finite))
            values.append(_scalar_value("gradwatch/grad_norm/global", total))
        for name, norm in norms.items():
            if norm is not None:
                values.append(_scalar_value(f"gradwatch/grad_norm/{name}", norm))
        return values

    def _alert_values(self) -> list[Summary.Value]:
        counts = dict.fromkeys(CHECKS, 0)
        for alert in self._alerts:
            counts[alert.check] = counts.get(alert.check, 0) + 1
        return [
            _scalar_value(f"gradwatch/alerts/{check}", count)
            for check, count in counts.items()
        ]

    def _text(self, step: int) -> None:
        table = alerts_markdown(self._alerts.as_list(), step)
        self._writer.add_text("gradwatch/alerts", table, step)
        records = [dataclasses.asdict(alert) for alert in self._alerts.as_list()]
        self._writer.add_text(
            "gradwatch/alerts_json", json.dumps(records, default=str), step
        )
        self._writer.flush()


def _scalar_value(tag: str, value: float) -> Summary.Value:
    return Summary.Value(tag=tag, simple_value=float(value))


def _histogram_values(
    histograms: list[tuple[list[str], Pending]],
) -> list[Summary.Value]:
    values = []
    for tags, pending in histograms:
        width = len(pending.values) // max(len(tags), 1)
        for i, tag in enumerate(tags):
            proto = histogram_proto(pending.values[i * width : (i + 1) * width])
            if proto is not None:
                values.append(Summary.Value(tag=tag, histo=proto))
    return values
