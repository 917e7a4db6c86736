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

from gradwatch.alerts import CHECKS, AlertBook
from gradwatch.detectors.base import Detector, StepContext
from gradwatch.sinks.dashboard import Dashboard, alerts_markdown
from gradwatch.transfer import Pending

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.params import ParamInfo

__all__ = ["TensorBoardSink", "histogram_summary"]

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 64


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


def histogram_summary(tensor: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """Return ``[min, max, numel, sum, sum of squares, counts...]`` on the device.

    The bins split [min, max] evenly; computing them on the device needs no host
    synchronisation, because the values are rescaled to [0, 1] before ``histc``.
    """
    values = tensor.detach().reshape(-1).float()
    if values.numel() == 0:
        return torch.zeros(5 + bins, device=tensor.device)
    low, high = torch.aminmax(values)
    span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    counts = torch.histc((values - low) / span, bins=bins, min=0.0, max=1.0)
    head = torch.stack(
        [
            low,
            high,
            torch.tensor(float(values.numel()), device=values.device),
            values.sum(),
            values.square().sum(),
        ]
    )
    return torch.cat([head, counts])


class TensorBoardSink(Detector):
    """Write the session's figures to ``logdir`` with ``SummaryWriter``."""

    def __init__(self, options: Options, alerts: AlertBook) -> None:
        super().__init__(options)
        assert options.logdir is not None
        self._alerts = alerts
        self._writer: Any = _summary_writer(options.logdir)
        self._failed = False
        self._histograms: list[tuple[str, Pending]] = []
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
        for info in ctx.judged:
            self._queue_histograms(ctx, info)

    def _queue_histograms(self, ctx: StepContext, info: ParamInfo) -> None:
        grad = info.tensor.grad
        if grad is not None and not grad.is_sparse and ctx.arrived(info):
            self._histograms.append(
                (f"gradwatch/grad/{info.name}", ctx.batch.add(histogram_summary(grad)))
            )
        self._histograms.append(
            (
                f"gradwatch/weight/{info.name}",
                ctx.batch.add(histogram_summary(info.tensor)),
            )
        )

    def analyse(self, ctx: StepContext) -> None:
        self._last_step = ctx.step
        histograms, self._histograms = self._histograms, []
        if ctx.step % self.options.log_every == 0 or ctx.final:
            self._write(self._scalars, ctx)
        if histograms:
            self._write(self._write_histograms, ctx.step, histograms)
        for source in self._figure_sources:
            self._write(self._write_figures, ctx.step, source())
        self._write(self._dashboard.record, self._writer, ctx)
        if len(self._alerts) != self._alert_count:
            self._alert_count = len(self._alerts)
            self._write(self._scalars_alerts, ctx.step)
            self._write(self._text, ctx.step)

    def close(self) -> None:
        """Write the final state of the alerts, then flush and close the writer."""
        if self._writer is None:
            return
        self._write(self._scalars_alerts, self._last_step)
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

    def _scalars(self, ctx: StepContext) -> None:
        norms = {info.name: ctx.grad_norms.get(id(info.tensor)) for info in ctx.judged}
        finite = [n for n in norms.values() if n is not None]
        if finite:
            total = math.sqrt(sum(n * n for n in finite))
            self._writer.add_scalar("gradwatch/grad_norm/global", total, ctx.step)
        for name, norm in norms.items():
            if norm is not None:
                self._writer.add_scalar(f"gradwatch/grad_norm/{name}", norm, ctx.step)
        self._scalars_alerts(ctx.step)

    def _scalars_alerts(self, step: int) -> None:
        counts = dict.fromkeys(CHECKS, 0)
        for alert in self._alerts:
            counts[alert.check] = counts.get(alert.check, 0) + 1
        for check, count in counts.items():
            self._writer.add_scalar(f"gradwatch/alerts/{check}", count, step)

    def _write_figures(self, step: int, figures: dict[str, float]) -> None:
        for tag, value in figures.items():
            self._writer.add_scalar(tag, value, step)

    def _write_histograms(self, step: int, queued: list[tuple[str, Pending]]) -> None:
        for tag, pending in queued:
            low, high, num, total, squares, *counts = pending.values
            if num == 0:
                continue
            width = (high - low) / len(counts) if high > low else 1.0
            limits = [low + width * (i + 1) for i in range(len(counts))]
            self._writer.add_histogram_raw(
                tag, low, high, num, total, squares, limits, counts, global_step=step
            )

    def _text(self, step: int) -> None:
        table = alerts_markdown(self._alerts.as_list(), step)
        self._writer.add_text("gradwatch/alerts", table, step)
        records = [dataclasses.asdict(alert) for alert in self._alerts.as_list()]
        self._writer.add_text(
            "gradwatch/alerts_json", json.dumps(records, default=str), step
        )
        self._writer.flush()
