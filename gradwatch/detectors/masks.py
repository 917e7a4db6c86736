"""Masked entries that receive a gradient, or are nonzero when their module runs.

Checks: ``mask_leak`` and ``mask_revived``.

Masks come from ``torch.nn.utils.prune``, from mask buffers beside a parameter,
from ``gw.watch_mask(...)`` and the ``masks`` option, and with ``track_zeros``
from the zeros a parameter holds when the session starts (see
:mod:`gradwatch.masks.discover`). They are re-read at every check, so masks that
grow during training (iterative pruning) are followed.

``mask_leak`` reads the gradient at each step end. Where the mask sits in the
graph (prune, a mask buffer), a masked entry's gradient is exactly zero unless a
path bypasses the mask, so a nonzero one is an error. Where the mask is enforced
by value (entries re-zeroed after each step, and by default the masks of
``watch_mask``), a gradient there is harmless and reported as info.

``mask_revived`` samples masked entries when their module runs forward, in
training and in evaluation alike, so re-applying a mask right after
``optimizer.step()`` stays silent. The sample is a device-side count, judged at
the step end with the session's one host transfer. For a pruned module it reads
the effective tensor in a forward pre-hook that runs before prune's own, so that
a write into that tensor is caught before prune overwrites it. That tensor is
read only if it was written or replaced since the last forward. Other masks are
read in a forward hook, after any pre-hook or in-forward code that re-applies
them.

Limitations:
    Masked entries are sampled only when a module that owns the parameter runs
    forward; a weight read elsewhere (a tied output layer) is sampled at its
    owner's forwards. Forwards after the last step that ends (an evaluation after
    the final ``optimizer.step()``) are never judged. The raw weight under a mask
    buffer is judged only after its gradient leaked, because a mask multiplied
    in forward makes its values irrelevant. A pruning mask dropped by
    ``prune.remove()`` during the session stops being watched. Finding the cause
    of a revival reads the optimizer state once per mask, with a host transfer.
    Overhead: a few device ops per masked parameter at each forward of its
    module and at each step end; models without masks get no hooks.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.handles import eager_hook
from gradwatch.masks import (
    MaskFigures,
    MaskWatch,
    check_mask,
    check_mode,
    discover_masks,
    explicit_watch,
    resolve_param,
    zeros_watches,
)
from gradwatch.masks.messages import diagnose, leak_message, revival_message
from gradwatch.masks.watch import leak_figures

if TYPE_CHECKING:
    from gradwatch.clock import StepClock
    from gradwatch.config import Options
    from gradwatch.handles import HookSet
    from gradwatch.params import ParamInfo, ParamTable
    from gradwatch.transfer import Pending

__all__ = ["MaskDetector"]

logger = logging.getLogger(__name__)

_CHECKS = ("mask_leak", "mask_revived")


@dataclasses.dataclass
class _Queued:
    """The figures of one mask queued for this step's host transfer."""

    watch: MaskWatch
    info: ParamInfo
    masked: torch.Tensor
    count: Pending
    leak: Pending | None
    revived: Pending | None


@dataclasses.dataclass
class _Hooked:
    """A module with masks: those read before prune's pre-hook, and after forward."""

    module: nn.Module
    before: list[MaskWatch]
    after: list[MaskWatch]


class MaskDetector(Detector):
    """Watch masked entries of parameters for gradients and for revival."""

    def __init__(self, options: Options, table: ParamTable, clock: StepClock) -> None:
        super().__init__(options)
        self._table = table
        self._clock = clock
        self._enabled = any(options.enabled(check) for check in _CHECKS)
        self._model: nn.Module | None = None
        self._hooks: HookSet | None = None
        self._discovered: dict[tuple[object, ...], MaskWatch] = {}
        self._given: dict[tuple[object, ...], MaskWatch] = {}
        self._active: list[MaskWatch] = []
        self._hooked: dict[int, _Hooked] = {}
        self._announced: set[tuple[object, ...]] = set()
        self._queued: list[_Queued] = []
        self._stale = False
        self._step = 0
        self.figures: dict[str, MaskFigures] = {}

    # Registration

    def watch(
        self,
        model: nn.Module,
        param: nn.Parameter | str,
        mask: torch.Tensor,
        mode: str = "zero",
        *,
        in_graph: bool = False,
        label: str = "the mask passed to watch_mask",
    ) -> None:
        """Validate and watch ``mask`` over ``param``, replacing an earlier one.

        Raises:
            TypeError: ``param`` or ``mask`` has the wrong type.
            ValueError: ``param`` is not in ``model``, ``mask`` does not fit it, or
                ``mode`` is not ``"zero"`` or ``"frozen"``.
        """
        checked_mode = check_mode(mode)
        if not isinstance(in_graph, bool):
            msg = f"in_graph must be True or False, got {in_graph!r}"
            raise TypeError(msg)
        name, tensor = resolve_param(model, param)
        checked = check_mask(mask, tensor, name)
        modules = _owner_modules(model, tensor)
        watch = explicit_watch(
            name, tensor, modules, checked, checked_mode, in_graph=in_graph, label=label
        )
        self._given.pop(("zeros", id(tensor)), None)
        self._given[watch.key] = watch
        self._announced.discard(watch.key)
        if self._model is not None:
            self._sync()

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        if not self._enabled:
            return
        self._model = model
        self._hooks = hooks
        hooks.add(register_module_buffer_registration_hook(self._on_register))
        hooks.add(register_module_parameter_registration_hook(self._on_register))
        hooks.add(register_module_module_registration_hook(self._on_register))
        self._discover()
        if self.options.track_zeros:
            self._track_zeros(model)
        self._sync()

    def _on_register(self, module: nn.Module, name: str, value: Any) -> None:
        if self._table.contains_module(module):
            self._stale = True

    def _discover(self) -> None:
        assert self._model is not None
        found = {watch.key: watch for watch in discover_masks(self._model)}
        self._discovered = {
            key: self._discovered.get(key, watch) for key, watch in found.items()
        }

    def _track_zeros(self, model: nn.Module) -> None:
        covered = {
            id(w.param) for w in [*self._discovered.values(), *self._given.values()]
        }
        candidates = [
            (name, param, _owner_modules(model, param))
            for name, param in model.named_parameters()
            if id(param) not in covered and not self._ignored(param)
        ]
        for watch in zeros_watches(candidates):
            self._given[watch.key] = watch

    def _ignored(self, param: nn.Parameter) -> bool:
        info = self._table.get(param)
        return info is not None and info.ignored

    def _sync(self) -> None:
        """Rebuild the list of active masks and the module hooks that sample them."""
        watches = [*self._discovered.values(), *self._given.values()]
        self._active = [w for w in watches if not self._ignored(w.param)]
        self._announce()
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        hooks = self._hooks
        assert hooks is not None
        hooked: dict[int, _Hooked] = {}
        for watch in self._active:
            for module in watch.modules:
                entry = hooked.setdefault(id(module), _Hooked(module, [], []))
                (entry.before if watch.source == "prune" else entry.after).append(watch)

        for key, entry in hooked.items():
            if entry.before and ("masks-before", key) not in hooks:
                handle = entry.module.register_forward_pre_hook(
                    eager_hook(self._before_forward), prepend=True
                )
                hooks.add(handle, ("masks-before", key))
            if (entry.before or entry.after) and ("masks-after", key) not in hooks:
                handle = entry.module.register_forward_hook(
                    eager_hook(self._after_forward)
                )
                hooks.add(handle, ("masks-after", key))
        for key in self._hooked:
            kept = hooked.get(key)
            if kept is None or not kept.before:
                hooks.discard(("masks-before", key))
            if kept is None or not (kept.before or kept.after):
                hooks.discard(("masks-after", key))
        self._hooked = hooked

    def _announce(self) -> None:
        new = [w for w in self._active if w.key not in self._announced]
        if not new:
            return
        self._announced.update(w.key for w in new)
        names = {id(info.tensor): info.name for info in self._table}
        lines = [_describe(w, names.get(id(w.param), "?")) for w in new]
        logger.info("gradwatch watches %d mask(s): %s", len(lines), "; ".join(lines))

    # Forward sampling

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        entry = self._hooked.get(id(module))
        if entry is not None:
            for watch in entry.before:
                watch.observe_forward()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        entry = self._hooked.get(id(module))
        if entry is not None:
            for watch in entry.after:
                watch.observe_forward()
            for watch in entry.before:
                watch.note_effective()

    # Step end

    def collect(self, ctx: StepContext) -> None:
        if self._model is None:
            return
        if self._stale:
            self._stale = False
            self._discover()
            self._sync()
        if not self._active:
            return
        judged = {id(info.tensor) for info in ctx.judged}
        for watch in self._active:
            revived = watch.take_revived()
            info = self._table.get(watch.param)
            found = watch.masked(watch.param) if info is not None else None
            if info is None or found is None:
                continue
            masked, count = found
            grad = watch.param.grad
            leak = None
            fresh = id(watch.param) in judged and ctx.arrived(info)
            if fresh and grad is not None and _readable(grad):
                leak = ctx.batch.add(leak_figures(grad, masked))
            queued = _Queued(
                watch=watch,
                info=info,
                masked=masked,
                count=ctx.batch.add(count),
                leak=leak,
                revived=ctx.batch.add(revived) if revived is not None else None,
            )
            self._queued.append(queued)

    def analyse(self, ctx: StepContext) -> None:
        queued, self._queued = self._queued, []
        figures = {}
        for item in queued:
            masked = int(item.count.value)
            leaking = self._judge_leak(ctx, item, masked)
            revived = int(item.revived.value) if item.revived is not None else None
            if revived and item.watch.checks_forward_values:
                self._report_revival(ctx, item, revived, masked)
            item.watch.seen_clean |= revived == 0
            numel = max(item.watch.param.numel(), 1)
            figures[item.info.name] = MaskFigures(masked / numel, leaking, revived)
        self.figures = figures
        self._step = ctx.step

    def _judge_leak(self, ctx: StepContext, item: _Queued, masked: int) -> int:
        if item.leak is None:
            return 0
        count, peak = int(item.leak.values[0]), item.leak.values[1]
        if not count:
            return 0
        watch = item.watch
        if watch.first_leak_step is None:
            watch.first_leak_step = ctx.step
        message = leak_message(watch, item.info, count, masked, peak, ctx.step)
        data = {
            "count": count,
            "fraction": count / max(masked, 1),
            "max_abs_grad": peak,
            "masked": masked,
            "mask": watch.label,
        }
        severity = None if watch.in_graph else "info"
        ctx.alert("mask_leak", message, param=item.info, data=data, severity=severity)
        return count

    def _report_revival(
        self, ctx: StepContext, item: _Queued, count: int, masked: int
    ) -> None:
        watch = item.watch
        if watch.diagnosis is None:
            optimizers = self._clock.optimizers
            watch.diagnosis = diagnose(watch, item.info, optimizers, item.masked)
        diagnosis = watch.diagnosis
        message = revival_message(watch, item.info, count, masked, ctx.step, diagnosis)
        data = {
            "count": count,
            "fraction": count / max(masked, 1),
            "masked": masked,
            "mode": watch.mode,
            "mask": watch.label,
            "causes": list(diagnosis.causes),
        }
        ctx.alert("mask_revived", message, param=item.info, data=data)

    def scalars(self) -> dict[str, float]:
        """Return TensorBoard scalars of this step's masks, by tag.

        Tags are ``gradwatch/masks/<param>/sparsity``, ``.../leaking`` and
        ``.../revived``. They are returned every ``log_every`` steps, and at every
        step where some mask leaked or broke; otherwise the dict is empty.
        """
        busy = any(f.leaking or f.revived for f in self.figures.values())
        if not busy and self._step % self.options.log_every:
            return {}
        scalars = {}
        for name, figures in self.figures.items():
            scalars[f"gradwatch/masks/{name}/sparsity"] = figures.sparsity
            scalars[f"gradwatch/masks/{name}/leaking"] = float(figures.leaking)
            if figures.revived is not None:
                scalars[f"gradwatch/masks/{name}/revived"] = float(figures.revived)
        return scalars

    def close(self) -> None:
        self._model = None
        self._hooks = None
        self._discovered.clear()
        self._given.clear()
        self._active = []
        self._hooked.clear()
        self._queued = []


def _owner_modules(model: nn.Module, tensor: torch.Tensor) -> list[nn.Module]:
    """Return the modules that hold ``tensor`` directly, under any of its names."""
    owners: dict[int, nn.Module] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is tensor:
            module = model.get_submodule(name.rpartition(".")[0])
            owners[id(module)] = module
    return list(owners.values())


def _readable(grad: torch.Tensor) -> bool:
    """Return whether the leak check can read ``grad`` (dense, or sparse COO)."""
    return grad.layout == torch.strided or grad.is_sparse


def _describe(watch: MaskWatch, name: str) -> str:
    masked = watch.masked(watch.param)
    share = ""
    if masked is not None:
        share = f", {int(masked[1]) / max(watch.param.numel(), 1):.1%} masked"
    how = "in forward" if watch.in_graph else "by value"
    return f"`{name}` by {watch.label} ({how}, mode {watch.mode!r}{share})"
