"""Units that no longer take part in training: dead ReLUs and saturated units.

Check: ``dead_units``.

Two signals, both judged on check steps (see :func:`~.units.is_check_step`):

- gradient: a unit of a Linear or conv layer whose gradient row (weight row and
  bias entry) is exactly zero while its weights are not all zero;
- activation (``activations=True``): a unit whose output from an activation
  module (``nn.ReLU``, ``nn.Sigmoid``, ``nn.Tanh``, ...) is the same value, 0
  for a dead ReLU, for every sample of the batch, in every call of the step.

A unit is dead once a signal held at ``patience`` consecutive checks, and a layer
is reported when at least ``dead_fraction`` of its units are dead. When an
activation follows a layer that is also reported by gradient, only the
activation is reported.

Limitations:
    The unit axis of an activation's output comes from the layer that produced
    its input: the last axis after Linear and LayerNorm, axis 1 after conv and
    batch norm. When no hooked layer produced it, 2-D and 4-D or wider outputs
    use axis 1 and 3-D outputs the last axis. That guess is wrong for a Conv1d
    feature map that reaches the activation through a functional op.
    Functional activations (``F.relu``) are seen only through the gradient
    signal. Rows whose weights are all zero before the optimizer step are taken
    for pruned and not counted. Activation hooks run only on check steps, where
    each call costs two reductions over the output.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.units import (
    LayoutCache,
    UnitLayout,
    group_by_shape,
    is_check_step,
)
from gradwatch.handles import CloseOnRemove, HookSet, eager_hook
from gradwatch.transfer import Pending

if TYPE_CHECKING:
    from gradwatch.clock import StepClock
    from gradwatch.config import Options

__all__ = ["DeadUnitsDetector"]

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Mish,
    nn.Threshold,
)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAST_AXIS = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
# Pieces at most this wide (bias entries) are stacked across layers before they
# are reduced; wider ones are reduced layer by layer.
_STACKED_WIDTH = 16
_AXIS_ONE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class _Probe:
    """Per-unit flags of one activation module, over the calls of one check step."""

    def __init__(self, constant: torch.Tensor, zero: torch.Tensor, after: str | None):
        self.constant = constant
        self.zero = zero
        self.after = after


class DeadUnitsDetector(Detector):
    """Report layers where a large fraction of the units is dead."""

    def __init__(self, options: Options, clock: StepClock | None = None) -> None:
        super().__init__(options)
        self._clock = clock
        self._step = 0
        self._weighted: dict[str, torch.Tensor] = {}
        self._model: weakref.ref[nn.Module] | None = None
        self._hooks = HookSet()
        self._producers: dict[int, tuple[Any, str, int]] = {}
        self._probes: dict[tuple[str, int], _Probe] = {}
        self._streaks: dict[tuple, torch.Tensor] = {}
        self._layouts = LayoutCache({})
        self._check_steps: list[int] = []
        self._pending: list[tuple[str, Any, Pending, int]] = []
        self.figures: dict[str, float] = {}

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        self._model = weakref.ref(model)
        hooks.add(CloseOnRemove(self))
        if self._clock is not None:
            self._clock.on_before_step(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record which rows have nonzero weights as the forward saw them.

        A pruning mask applied after ``optimizer.step()`` zeroes rows again that
        momentum moved; judged after the step, those rows would look alive.
        """
        model = self._model() if self._model is not None else None
        if model is None or not is_check_step(self._step, self.options.symmetry_every):
            return
        names, layers = [], []
        for name, module in model.named_modules():
            if isinstance(module, _LAYERS):
                names.append(name)
                layers.append(_weight_matrices(module))
        with torch.no_grad():
            for indices in group_by_shape(layers).values():
                weighted = rows_with_nonzero([layers[i] for i in indices])
                for row, index in enumerate(indices):
                    self._weighted[names[index]] = weighted[row]

    def begin_step(self, step: int) -> None:
        self._step = step
        self._weighted = {}
        self._producers = {}
        self._probes = {}
        check = is_check_step(step, self.options.symmetry_every)
        if check and self.options.activations and not len(self._hooks):
            self._install()
        elif not check:
            self._hooks.remove()

    def close(self) -> None:
        self._hooks.remove()
        self._producers = {}
        self._probes = {}
        self._streaks = {}
        self._pending = []
        self._layouts.clear()

    # Activation probes

    def _install(self) -> None:
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for name, module in model.named_modules():
            if isinstance(module, _ACTIVATIONS):
                hook = self._activation_hook(name)
            elif isinstance(module, _LAST_AXIS + _AXIS_ONE):
                hook = self._producer_hook(
                    name, -1 if isinstance(module, _LAST_AXIS) else 1
                )
            else:
                continue
            self._hooks.add(module.register_forward_hook(eager_hook(hook)))

    def _producer_hook(self, name: str, axis: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._producers[id(output)] = (weakref.ref(output), name, axis)

        return hook

    def _activation_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            if output.dim() < 2 or not output.is_floating_point():
                return
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            after, axis = self._producer_of(source, output.dim())
            self._record(name, output.detach(), axis, after)

        return hook

    def _producer_of(self, source: torch.Tensor | None, dim: int) -> tuple:
        entry = self._producers.get(id(source)) if source is not None else None
        if entry is not None and entry[0]() is source:
            return entry[1], entry[2]
        return None, -1 if dim == 3 else 1

    def _record(self, name: str, output: torch.Tensor, axis: int, after: str | None):
        units = output.shape[axis]
        others = [d for d in range(output.dim()) if d != axis % output.dim()]
        if output.numel() // units < 2:
            return
        with torch.no_grad():
            high = output.amax(dim=others)
            low = output.amin(dim=others)
            constant = high == low
            zero = constant & (high == 0)
        key = (name, units)
        probe = self._probes.get(key)
        if probe is None:
            self._probes[key] = _Probe(constant, zero, after)
        else:
            probe.constant &= constant
            probe.zero &= zero

    # Analysis

    def collect(self, ctx: StepContext) -> None:
        self._pending = []
        if not is_check_step(ctx.step, self.options.symmetry_every):
            return
        self._check_steps = [*self._check_steps, ctx.step][-self.options.patience :]
        for key in [
            k for k in self._streaks if k[0] == "act" and k[1:] not in self._probes
        ]:
            del self._streaks[key]
        with torch.no_grad():
            self._collect_activations(ctx)
        self._probes = {}
        model = self._model() if self._model is not None else None
        if model is None:
            return
        with torch.no_grad():
            self._collect_gradients(ctx, model)

    def _collect_activations(self, ctx: StepContext) -> None:
        probes = list(self._probes.items())
        groups: dict[tuple, list[int]] = {}
        for index, (_, probe) in enumerate(probes):
            key = (probe.constant.shape, probe.constant.device)
            groups.setdefault(key, []).append(index)
        entries = []
        for indices in groups.values():
            keys = [("act", *probes[i][0]) for i in indices]
            constant = torch.stack([probes[i][1].constant for i in indices])
            zero = torch.stack([probes[i][1].zero for i in indices])
            counts = self._advance(keys, constant)
            zeros = zero.sum(dim=1, keepdim=True).to(counts.dtype)
            queued = ctx.batch.add(torch.cat([counts, zeros], dim=1))
            entries += [
                (i, ("act", probes[i], queued, row)) for row, i in enumerate(indices)
            ]
        self._pending += [entry for _, entry in sorted(entries, key=lambda e: e[0])]

    def _collect_gradients(self, ctx: StepContext, model: nn.Module) -> None:
        judged = {id(info.tensor) for info in ctx.judged}
        layouts, grads = [], []
        for layout in self._layouts.get(model, ctx.table):
            if layout.kind != "rows":
                continue
            if not all(
                id(i.tensor) in judged and ctx.arrived(i) for i in layout.params
            ):
                continue
            matrices = layout.matrices(grads=True)
            if matrices is not None:
                layouts.append(layout)
                grads.append(matrices)
        entries = []
        for indices in group_by_shape(grads).values():
            batch = [layouts[i] for i in indices]
            moving = rows_with_nonzero([grads[i] for i in indices])
            dead = ~moving & self._weighted_rows(batch, moving)
            keys = [("grad", layout.module, layout.count) for layout in batch]
            queued = ctx.batch.add(self._advance(keys, dead))
            entries += [
                (i, ("grad", layouts[i], queued, row)) for row, i in enumerate(indices)
            ]
        self._pending += [entry for _, entry in sorted(entries, key=lambda e: e[0])]

    def _weighted_rows(self, layouts: list[UnitLayout], like: torch.Tensor):
        """Flag rows whose weights are not all zero, as the forward saw them.

        Layers the optimizer pre-hook did not record (no optimizer, or a layer
        added since) are read now.
        """
        rows = []
        for layout in layouts:
            recorded = self._weighted.get(layout.module)
            fits = recorded is not None and recorded.shape == like.shape[1:]
            rows.append(recorded if fits else None)
        if any(row is None for row in rows):
            weights = [layout.matrices(grads=False) for layout in layouts]
            now = rows_with_nonzero(weights)  # type: ignore[arg-type]
            rows = [now[i] if row is None else row for i, row in enumerate(rows)]
        return torch.stack(rows)  # type: ignore[arg-type]

    def _advance(self, keys: list[tuple], dead: torch.Tensor) -> torch.Tensor:
        """Update the per-unit streaks of a ``(layers, units)`` stack of flags.

        Returns ``[dead now, dead for patience]`` per layer.
        """
        zeros = torch.zeros(dead.shape[1:], dtype=torch.int32, device=dead.device)
        previous = []
        for key in keys:
            streak = self._streaks.get(key)
            same = streak is not None and streak.shape == zeros.shape
            previous.append(streak if same else zeros)
        streaks = (torch.stack(previous) + 1) * dead
        for key, streak in zip(keys, streaks.unbind(), strict=True):
            self._streaks[key] = streak
        persistent = streaks >= self.options.patience
        return torch.stack([dead.sum(dim=1), persistent.sum(dim=1)], dim=1)

    def analyse(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, []
        self.figures = {}
        covered: set[str] = set()
        for source, subject, queued, row in sorted(pending, key=lambda p: p[0]):
            if source == "act":
                (name, units), probe = subject
                values = queued.values[3 * row : 3 * row + 3]
                now, persistent, zeros = (int(v) for v in values)
                self.figures[f"gradwatch/dead_units/{name}/fraction"] = now / units
                if persistent >= self.options.dead_fraction * units:
                    covered.add(probe.after or "")
                    self._alert_activation(ctx, name, units, persistent, zeros, probe)
                continue
            layout: UnitLayout = subject
            now, persistent = (int(v) for v in queued.values[2 * row : 2 * row + 2])
            tag = f"gradwatch/dead_units/{layout.module}/fraction"
            self.figures.setdefault(tag, now / layout.count)
            if layout.module in covered:
                continue
            if persistent >= self.options.dead_fraction * layout.count:
                self._alert_gradient(ctx, layout, persistent)

    def _alert_activation(
        self,
        ctx: StepContext,
        name: str,
        units: int,
        dead: int,
        zeros: int,
        probe: _Probe,
    ) -> None:
        after = f" (the output of `{probe.after}`)" if probe.after else ""
        value = "0" if zeros == dead else "the same value (0 or a saturated value)"
        whole = "Every unit is dead: the layer passes no signal and no gradient. "
        message = (
            f"{dead} of {units} units of activation `{name}`{after} output {value} "
            f"for every sample of the batch at {self.options.patience} checks in a "
            f"row up to step {ctx.step}, so they pass no gradient back and cannot "
            f"recover. {whole if dead == units else ''}{_CAUSES}"
        )
        ctx.alert(
            "dead_units",
            message,
            module=name,
            step=self._check_steps[0],
            data={
                "dead_units": dead,
                "units": units,
                "fraction": dead / units,
                "layer": probe.after,
                "signal": "activation",
            },
        )

    def _alert_gradient(self, ctx: StepContext, layout: UnitLayout, dead: int) -> None:
        whole = dead == layout.count
        scope = (
            "Every unit of the layer is dead: nothing upstream of it learns through "
            "it (a ReLU or clamp on an output that is negative for all samples kills "
            "a whole layer). "
            if whole
            else ""
        )
        message = (
            f"{dead} of {layout.count} units of {layout.module_type} "
            f"`{layout.module}` ({layout.param.describe()}) received an exactly zero "
            f"gradient at {self.options.patience} checks in a row up to step "
            f"{ctx.step}, while their weights are not zero. {scope}{_CAUSES}"
        )
        ctx.alert(
            "dead_units",
            message,
            param=layout.param,
            module=layout.module,
            step=self._check_steps[0],
            data={
                "dead_units": dead,
                "units": layout.count,
                "fraction": dead / layout.count,
                "signal": "gradient",
            },
        )


_CAUSES = (
    "Dying ReLUs follow a learning rate too large for the input scale (scale the "
    "inputs, lower the learning rate, add warm-up) or a large negative bias; "
    "saturated sigmoid or tanh units follow large pre-activations. Use LeakyReLU "
    "or GELU, normalise the layer's input, or re-initialise the dead units."
)


def _weight_matrices(module: nn.Module) -> list[torch.Tensor]:
    """Return a layer's unit matrices: its weight rows and its bias entries."""
    matrices = [module.weight.detach().flatten(1)]
    if module.bias is not None:
        matrices.append(module.bias.detach().unsqueeze(1))
    return matrices


def rows_with_nonzero(layers: list[list[torch.Tensor]]) -> torch.Tensor:
    """Flag the rows with an entry that is not zero (NaN counts), per layer.

    Args:
        layers: Per layer, its unit matrices; every layer has the same shapes.

    Returns:
        A ``(layers, units)`` bool tensor.
    """
    flags = None
    for piece in range(len(layers[0])):
        matrices = [layer[piece] for layer in layers]
        if matrices[0].shape[1] <= _STACKED_WIDTH:
            piece_flags = torch.stack(matrices).any(dim=2)
        else:
            # abs().amax() is several times faster than any() on float rows
            # (torch 2.13, CPU), and a NaN entry still flags its row.
            largest = torch.stack([m.abs().amax(dim=1) for m in matrices])
            piece_flags = largest != 0
        flags = piece_flags if flags is None else flags | piece_flags
    assert flags is not None
    return flags
