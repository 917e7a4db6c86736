"""The session: ``with gradwatch(model) as gw:`` around an unchanged training loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from gradwatch.alerts import Alert, AlertBook
from gradwatch.clock import StepClock
from gradwatch.config import Options, as_pairs, as_tuple
from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.collapse import CollapseDetector
from gradwatch.detectors.dead_units import DeadUnitsDetector
from gradwatch.detectors.disconnect import DisconnectDetector
from gradwatch.detectors.forward_trace import ForwardTrace
from gradwatch.detectors.masks import MaskDetector
from gradwatch.detectors.norms import GradientScaleDetector
from gradwatch.detectors.numeric import NonFiniteDetector
from gradwatch.detectors.optimizer import OptimizerDetector
from gradwatch.detectors.symmetry import SymmetryDetector
from gradwatch.detectors.updates import UpdateSizeDetector
from gradwatch.dispatch import dispatch
from gradwatch.distributed import (
    RankGraphDetector,
    current_rank,
    find_rank_group,
    is_sharded,
    sharded_options,
    unwrap_ddp,
)
from gradwatch.handles import HookSet
from gradwatch.params import ParamInfo, ParamTable
from gradwatch.report import format_report
from gradwatch.stats import GradientNorms
from gradwatch.validation import check_complex, check_model, check_module_names

__all__ = ["Session", "StepIndex", "gradwatch"]


AlertCallback = Callable[[Alert], None]


def gradwatch(
    model: nn.Module,
    *,
    logdir: str | Path | None = None,
    on_alert: str | AlertCallback = "warn",
    patience: int = 3,
    ignore: Sequence[str] = (),
    checks: Sequence[str] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    track_zeros: bool = False,
    zero_tol: float = 1e-6,
    stop_confidence: float = 1e-4,
    graph_walk_steps: int = 2,
    log_every: int = 10,
    histogram_every: int = 100,
    symmetry_every: int = 100,
    symmetry_tol: float = 1e-4,
    activations: bool = True,
    dead_fraction: float = 0.5,
    watch_outputs: Sequence[str] = (),
    unit_groups: Mapping[str, str] | None = None,
    explode_factor: float = 100.0,
    vanish_factor: float = 1e-3,
    norm_window: int = 50,
    update_ratio_bounds: tuple[float, float] | None = None,
    image_every: int = 100,
    distributed: bool | None = None,
    log_all_ranks: bool = False,
) -> Session:
    """Watch the gradients of ``model`` while a training loop runs.

    Use it as a context manager around the loop; the loop itself stays unchanged::

        with gradwatch(model, logdir="runs/exp1") as gw:
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        print(gw.report())

    Args:
        model: The module whose trainable parameters are watched.
        logdir: Directory for TensorBoard event files, or None to write none.
        on_alert: ``"warn"`` (a :class:`GradwatchWarning` and a log record per new
            alert), ``"raise"`` (raise :class:`GradwatchError` at the step of the
            first error-severity alert), ``"ignore"`` (only collect them), or a
            callable ``on_alert(alert: Alert) -> None``.
        patience: Steps a finding must persist before it is reported.
        ignore: Glob patterns of parameter or module qualified names not to watch.
        checks: The check ids to run (all when None).
        masks: Parameter qualified name to mask, for masks that live outside
            the model; each is watched as ``gw.watch_mask(name, mask)`` would.
            Masks of ``torch.nn.utils.prune`` and mask buffers beside a
            parameter are found without it.
        track_zeros: Take the exact zeros each parameter holds when the
            session starts as its mask (one-shot pruning through ``.data``):
            ``mask_revived`` then reports them turning nonzero.
        zero_tol: A gradient whose norm is below ``zero_tol`` times both the median
            gradient norm of the model and the parameter's own norm counts as zero.
        stop_confidence: Expected number of gaps as long as the current one over
            the steps so far, under the parameter's own arrival rate. When the
            expected number falls below it, ``gradient_stopped`` fires.
        graph_walk_steps: Number of first steps whose forward is traced to locate
            graph cuts and unregistered parameters.
        log_every: Steps between TensorBoard scalar records.
        histogram_every: Steps between TensorBoard histograms; 0 writes none.
        symmetry_every: Steps between the unit checks (``symmetric_units``,
            ``dead_units``, ``representation_collapse``); the first 10 steps are
            always checked.
        symmetry_tol: Two units are equal when their weight rows, and their
            gradient rows, differ by at most this fraction of the row norm.
        activations: Hook activation modules (``nn.ReLU``, ``nn.Sigmoid``, ...)
            on check steps to find units whose output is constant over the batch.
        dead_fraction: Fraction of a layer's units that must be dead before
            ``dead_units`` reports the layer.
        watch_outputs: Qualified names (or glob patterns) of modules whose output
            ``representation_collapse`` watches, besides the model's output.
        unit_groups: Module name (or glob pattern) to unit kind; ``"children"``
            checks the module's children, such as a mixture's experts, as units
            for ``symmetric_units``.
        explode_factor: ``exploding_gradient`` fires when a weight's gradient
            norm exceeds this many times its median over ``norm_window`` steps.
        vanish_factor: ``vanishing_gradient`` fires when a weight's gradient (RMS
            per element) stays below this fraction of the model's median layer.
        norm_window: Steps of gradient norm history behind both medians.
        update_ratio_bounds: ``(low, high)`` bounds of ``||update|| / ||weight||``
            per step; a parameter outside them for ``patience`` measurements in a
            row is reported. None (the default) only records the ratio.
        image_every: Steps between gradient-flow images in TensorBoard; 0
            writes none.
        distributed: Combine gradient arrivals across ``torch.distributed`` ranks
            with one all-reduce per step. None (the default) does so when the
            process group has more than one rank and the model is wrapped in
            DDP; True does so for any model (every rank must run a session);
            False never does.
        log_all_ranks: Write TensorBoard event files on every rank, each under
            ``logdir/rank<N>``; by default only rank 0 writes them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or has a trainable complex
            parameter that ``ignore`` does not skip.
        ValueError: An option is invalid (the message lists the valid values),
            or names a module the model does not have.
        RuntimeError: ``distributed=True`` without an initialised process group.
    """
    options = Options(
        logdir=Path(logdir) if isinstance(logdir, str) else logdir,
        on_alert=on_alert,
        patience=patience,
        ignore=as_tuple(ignore),
        checks=as_tuple(checks) if checks is not None else None,
        masks=as_pairs(masks),
        track_zeros=track_zeros,
        zero_tol=zero_tol,
        stop_confidence=stop_confidence,
        graph_walk_steps=graph_walk_steps,
        log_every=log_every,
        histogram_every=histogram_every,
        symmetry_every=symmetry_every,
        symmetry_tol=symmetry_tol,
        activations=activations,
        dead_fraction=dead_fraction,
        watch_outputs=as_tuple(watch_outputs),
        unit_groups={} if unit_groups is None else unit_groups,
        explode_factor=explode_factor,
        vanish_factor=vanish_factor,
        norm_window=norm_window,
        update_ratio_bounds=tuple(update_ratio_bounds)
        if isinstance(update_ratio_bounds, list)
        else update_ratio_bounds,
        image_every=image_every,
        distributed=distributed,
        log_all_ranks=log_all_ranks,
    )
    return Session(model, options)


class StepIndex(int):
    """The index of the current step; calling it ends that step.

    ``gw.step`` compares and prints as an int; ``gw.step()`` ends the step for loops
    where no optimizer steps and the model is not called again.
    """

    _end: Callable[[], None]

    def __new__(cls, value: int, end: Callable[[], None]) -> StepIndex:
        index = super().__new__(cls, value)
        index._end = end
        return index

    def __call__(self) -> None:
        self._end()


class Session:
    """A running watch over one model; build it with :func:`gradwatch`."""

    def __init__(self, model: nn.Module, options: Options) -> None:
        check_model(model)
        model, wrapper = unwrap_ddp(model)
        check_module_names(model, options)
        self._sharded = is_sharded(model)
        if self._sharded:
            options = sharded_options(options)
        self.options = options
        self._ranks = find_rank_group(
            model, wrapper, options.distributed, self._sharded
        )
        self._rank = current_rank()
        self._model: nn.Module | None = model
        self._book = AlertBook()
        self._hooks = HookSet()
        self._table = ParamTable(model, options.ignore)
        check_complex(model, self._table)
        self._clock = StepClock(self._table, self._end_step)
        self._trace = ForwardTrace(
            options, self._table, lambda: not self._clock.ending_in_forward
        )
        self._masks = MaskDetector(options, self._table, self._clock)
        for name, mask in options.masks:
            self._masks.watch(model, name, mask, label="the masks option")
        self._detectors = self._build_detectors()
        self._entered = False
        self._closed = False
        self._watched = 0
        self._judged_key: tuple[object, ...] = (None, None, None)
        self._judged_list: list[ParamInfo] = []
        self._judged_ids: frozenset[int] = frozenset()

    def _build_detectors(self) -> list[Detector]:
        if self._sharded:
            return self._build_sharded_detectors()
        options = self.options
        detectors: list[Detector] = [
            GradientNorms(options),
            self._trace,
            DisconnectDetector(options, self._trace),
            OptimizerDetector(options, self._clock),
            self._masks,
            NonFiniteDetector(options, self._table, self._clock),
            GradientScaleDetector(options),
        ]
        updates = UpdateSizeDetector(options, self._table, self._clock)
        detectors.append(updates)
        units = [
            SymmetryDetector(options),
            DeadUnitsDetector(options, self._clock),
            CollapseDetector(options),
        ]
        detectors.extend(units)
        if self._ranks is not None:
            detectors.append(RankGraphDetector(options, self._ranks))
        logdir = self._rank_logdir()
        if logdir is not None:
            sink = _tensorboard_sink(
                dataclasses.replace(options, logdir=logdir), self._book
            )
            for detector in units[:2]:
                sink.add_figure_source(lambda d=detector: d.figures)
            sink.add_figure_source(self._masks.scalars)
            sink.add_figure_source(updates.figures)
            detectors.append(sink)
        return detectors

    def _build_sharded_detectors(self) -> list[Detector]:
        """Build the checks that work on FSDP2 shards (``SHARDED_CHECKS``)."""
        options = self.options
        detectors: list[Detector] = [
            GradientNorms(options),
            self._trace,
            DisconnectDetector(options, self._trace),
            OptimizerDetector(options, self._clock),
        ]
        if self._ranks is not None:
            detectors.append(RankGraphDetector(options, self._ranks))
        logdir = self._rank_logdir()
        if logdir is not None:
            sink_options = dataclasses.replace(options, logdir=logdir)
            detectors.append(_tensorboard_sink(sink_options, self._book))
        return detectors

    def _rank_logdir(self) -> Path | None:
        """Return where this rank writes event files: rank 0 only, by default."""
        logdir = self.options.logdir
        if logdir is None or self._rank is None:
            return logdir
        if self.options.log_all_ranks:
            return logdir / f"rank{self._rank}"
        return logdir if self._rank == 0 else None

    # Public API

    @property
    def alerts(self) -> list[Alert]:
        """The alerts so far, in the order of the step they were first seen."""
        return self._book.as_list()

    @property
    def closed(self) -> bool:
        """True once the session has ended (its ``with`` block has exited)."""
        return self._closed

    @property
    def step(self) -> StepIndex:
        """The index of the current step (0 until the first step ends)."""
        return StepIndex(self._clock.step, self._end_step_explicitly)

    def report(self) -> str:
        """Return a readable summary of every alert: what, where, when, the fix."""
        watched = self._watched if self._closed else len(self._table)
        return format_report(self.alerts, self._clock.step, watched)

    def watch_mask(
        self,
        param: nn.Parameter | str,
        mask: torch.Tensor,
        mode: str = "zero",
        *,
        in_graph: bool = False,
    ) -> None:
        """Watch a mask that lives outside the model; callable at any time.

        Mask convention as in ``torch.nn.utils.prune``: 1 or True keeps an entry
        trainable, 0 or False masks it. Registering a new mask for the same
        parameter replaces the old one; changing ``mask`` in place is followed.

        Example::

            keep = weight.abs() > threshold
            with torch.no_grad():
                weight.mul_(keep)
            gw.watch_mask(weight, keep)

        Args:
            param: A parameter of the watched model, or its qualified name.
            mask: Bool, or 0/1 values, of the parameter's shape or broadcasting
                to it.
            mode: ``"zero"``: masked entries must be exactly zero at every
                forward (pruning). ``"frozen"``: they must keep the values they
                hold now (partial fine-tuning, rows retired from training).
            in_graph: True if the training code multiplies by ``mask`` in
                forward; then a gradient on masked entries is an error. By
                default the mask is taken to be enforced by value (entries reset
                after each step), where such a gradient is only info.

        Raises:
            TypeError: ``param`` or ``mask`` is not a tensor (or a name).
            ValueError: ``param`` is not a parameter of the model, ``mask`` does
                not fit it or contains values other than 0 and 1, or ``mode``
                is invalid.
            RuntimeError: The session has ended.
        """
        if self._closed or self._model is None:
            msg = "watch_mask() works only until the `with gradwatch(...)` block ends"
            raise RuntimeError(msg)
        if self._sharded:
            msg = "watch_mask() does not support FSDP2 (fully_shard) models yet"
            raise NotImplementedError(msg)
        self._masks.watch(self._model, param, mask, mode, in_graph=in_graph)

    # Context manager

    def __enter__(self) -> Session:
        if self._entered:
            msg = "a gradwatch session can be entered only once; build a new one"
            raise RuntimeError(msg)
        self._entered = True
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._clock.pending:
                self._clock.end_step(None, final=True)
        finally:
            self._detach()

    def _attach(self) -> None:
        model = self._model
        assert model is not None
        self._table.scan()
        self._hooks.add(register_module_module_registration_hook(self._on_register))
        self._hooks.add(register_module_parameter_registration_hook(self._on_register))
        self._clock.attach(model, self._hooks)
        for detector in self._detectors:
            detector.attach(model, self._hooks)
        for detector in self._detectors:
            detector.begin_step(0)

    def _detach(self) -> None:
        self._watched = len(self._table)
        try:
            self._hooks.remove()
            for detector in self._detectors:
                detector.close()
        finally:
            self._table.close()
            self._model = None
            self._closed = True

    def _on_register(self, module: nn.Module, name: str, value: Any) -> None:
        if self._table.contains_module(module):
            self._table.watch_registered(value)

    # Steps

    def _end_step_explicitly(self) -> None:
        if self._closed or not self._entered:
            msg = "gw.step() can end a step only inside the `with gradwatch(...)` block"
            raise RuntimeError(msg)
        self._clock.end_step(None)

    def _end_step(self, optimizer: torch.optim.Optimizer | None, final: bool) -> None:
        if self._table.dirty:
            self._table.scan()
        arrival_ranks = None
        if self._ranks is not None and not final:
            arrival_ranks = self._ranks.combine(self._table)

        ctx = StepContext(
            step=self._clock.step,
            optimizer=optimizer,
            final=final,
            table=self._table,
            judged=self._judged(optimizer),
            options=self.options,
            emit=self._emit,
            steps_seen=self._clock.step + 1,
            rank=self._rank,
            arrival_ranks=arrival_ranks,
            world_ranks=self._ranks.ranks if arrival_ranks is not None else (),
        )
        try:
            for detector in self._detectors:
                detector.collect(ctx)
            ctx.batch.fetch()
            for detector in self._detectors:
                detector.analyse(ctx)
        finally:
            self._table.arrived -= self._judged_ids
            for detector in self._detectors:
                detector.begin_step(ctx.step + 1)

    def _judged(self, optimizer: torch.optim.Optimizer | None) -> list[ParamInfo]:
        """Return the parameters judged at this step; see ``StepContext.judged``.

        The result is cached while the trainable parameters and the optimizers'
        param groups stay the same, which is every step of a usual loop.
        """
        trainable = self._table.trainable()
        mine = anyone = None
        # With one optimizer, every trainable tensor is either its own or no
        # optimizer's, so all are judged.
        if optimizer is not None and not self._clock.is_sole(optimizer):
            mine = self._clock.owned(optimizer)
            anyone = self._clock.owned_by_any()
        # The key keeps references to the objects, so their ids cannot be reused.
        key = (trainable, mine, anyone)
        if not all(a is b for a, b in zip(key, self._judged_key, strict=True)):
            judged = trainable
            if mine is not None and anyone is not None:
                judged = [
                    info
                    for info in trainable
                    if id(info.tensor) in mine or id(info.tensor) not in anyone
                ]
            self._judged_key = key
            self._judged_list = judged
            self._judged_ids = frozenset(id(info.tensor) for info in judged)
        return self._judged_list

    # Alerts

    def _emit(self, alert: Alert) -> None:
        if self._book.record(alert):
            dispatch(alert, self.options.on_alert)


def _tensorboard_sink(options: Options, book: AlertBook) -> Detector:
    """Build the TensorBoard sink, importing tensorboard only when it is used."""
    from gradwatch.sinks.tensorboard import TensorBoardSink

    return TensorBoardSink(options, book)
