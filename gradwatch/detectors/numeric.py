"""NaN and Inf in gradients, caught at the step where they start.

Check: ``nonfinite_gradient``.

The per-parameter gradient norms that :class:`~gradwatch.stats.GradientNorms`
already reduces and copies to the host every step show the fault: a norm is
NaN or Inf when the gradient is, and also when huge finite values overflow the
sum of squares. Only on such a step does the detector pay for more: one
``isnan``/``isinf`` check of the flagged gradients, which tells overflow of the
norm from a real NaN or Inf, and the location of the origin.

Severity:
    error for NaN or Inf in the gradients of an optimizer step; info when a
    ``torch.amp.GradScaler`` skipped steps because its scaled float16 gradients
    overflowed (expected while it calibrates the scale), unless its scale fell
    below 1, which means the gradients are non-finite even unscaled.

Limitations:
    A step that the training loop itself skips (``if not loss.isfinite():
    continue``, or a GradScaler skip) never ends at the step clock, so its
    gradients are not seen; GradScaler skips are inferred from its scale.
    Location is exact at parameter granularity on the faulty step; finding NaN
    made by parameterless code between modules needs the hooks armed on the
    next step, which only run if the weights are still finite then (most
    optimizers turn them to NaN in the faulty step).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.nonfinite import (
    BackwardOrder,
    GradientProbe,
    Origin,
    first_in_backward,
)
from gradwatch.detectors.scaler import ScalerReport, ScalerWatch

if TYPE_CHECKING:
    from gradwatch.clock import StepClock
    from gradwatch.config import Options
    from gradwatch.handles import HookSet
    from gradwatch.params import ParamInfo, ParamTable

__all__ = ["NonFiniteDetector"]

_LISTED = 4

_FIX = (
    "Common causes: log, sqrt, pow or division at 0 (also in the branch that "
    "torch.where does not select, whose gradient is still computed), exp "
    "overflow, or weights blown up by a too large learning rate. Guard the "
    "op's input (clamp it, add an epsilon, or replace masked entries before the "
    "op) rather than its output."
)


class NonFiniteDetector(Detector):
    """Report NaN and Inf gradients and locate the module where they start."""

    def __init__(self, options: Options, table: ParamTable, clock: StepClock) -> None:
        super().__init__(options)
        self._table = table
        self._clock = clock
        self._model: weakref.ref[nn.Module] | None = None
        self._order = BackwardOrder()
        self._probe = GradientProbe(lambda: not clock.ending_in_forward)
        self._scalers = ScalerWatch()
        self._arm_next = False
        self._suspect_weights: list[ParamInfo] = []
        self._last_origin: str | None = None
        self._reported_skips = 0

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        self._model = weakref.ref(model)
        hooks.add(_Closer(self))
        if self.options.enabled("nonfinite_gradient"):
            self._order.record([info for info in self._table if info.trainable])

    def begin_step(self, step: int) -> None:
        if step > 0 and self._order.recording:
            self._order.stop()
        self._probe.disarm()
        if self._arm_next:
            self._arm_next = False
            model = self._model() if self._model is not None else None
            if model is not None:
                trainable = [info for info in self._table if info.trainable]
                self._probe.arm(model, trainable)
                self._order.record(trainable)

    def close(self) -> None:
        self._order.close()
        self._probe.close()
        self._scalers.close()
        self._suspect_weights = []

    def collect(self, ctx: StepContext) -> None:
        if not self.options.enabled("nonfinite_gradient"):
            return
        if not self._scalers.searched:
            self._scalers.search()
        optimizers = {id(o) for o in self._clock.optimizers}
        if ctx.optimizer is not None:
            optimizers.add(id(ctx.optimizer))
        self._scalers.collect(ctx, optimizers)
        self._probe.collect(ctx.batch)

    def analyse(self, ctx: StepContext) -> None:
        if not self.options.enabled("nonfinite_gradient"):
            return
        reports = self._scalers.analyse()
        self._report_skips(ctx, reports)

        weights_before = self._suspect_weights
        self._suspect_weights = _nonfinite_norms(ctx.judged, ctx.param_norms)
        flagged = _nonfinite_norms(ctx.judged, ctx.grad_norms)
        if not flagged:
            return
        kinds = _nonfinite_kinds([info.tensor.grad for info in flagged])
        bad = [(info, kind) for info, kind in zip(flagged, kinds, strict=True) if kind]
        if not bad:
            return

        if self._skipped_by_scaler(ctx, reports):
            self._alert_skipped_grads(ctx, bad, reports)
            return
        broken = [info for info in weights_before if _holds_nonfinite(info.tensor)]
        if broken:
            self._alert_broken_weights(ctx, bad, broken)
            return
        self._alert_origin(ctx, bad)

    # Decisions

    def _skipped_by_scaler(self, ctx: StepContext, reports: list[ScalerReport]) -> bool:
        """True if the step's gradients are those of an iteration a scaler skipped."""
        if ctx.optimizer is not None:
            return False
        if any(r.found_inf or r.skipped for r in reports):
            return True
        # NOTE: a scaler that skipped every step so far, with update() after each
        # skip, cannot be linked to the model's optimizer. Any such scaler alive
        # in the process is taken to be the one in use.
        return not reports and self._scalers.unbound_in_use

    def _report_skips(self, ctx: StepContext, reports: list[ScalerReport]) -> None:
        skipped = sum(r.total_skipped for r in reports)
        if skipped <= self._reported_skips:
            return
        self._reported_skips = skipped
        scale = min(r.scale for r in reports)
        if scale < 1.0:
            self._alert_scale_collapse(ctx, skipped, scale)
            return
        ctx.alert(
            "nonfinite_gradient",
            f"GradScaler skipped {skipped} optimizer step(s) by step {ctx.step} "
            f"because its scaled gradients held Inf or NaN, and lowered the loss "
            f"scale to {scale:.4g}. Skips are expected while the scaler finds a "
            f"scale that fits float16; if they keep coming, look for an op whose "
            f"output overflows float16 (max 65504) and run it in float32.",
            severity="info",
            data={"skipped_steps": skipped, "scale": scale, "source": "GradScaler"},
        )

    # Alerts

    def _alert_scale_collapse(self, ctx: StepContext, skipped: int, scale: float):
        ctx.alert(
            "nonfinite_gradient",
            f"GradScaler skipped {skipped} optimizer step(s) by step {ctx.step} and "
            f"its loss scale fell to {scale:.3g}, below 1: the gradients are Inf "
            f"or NaN even unscaled, so the model has stopped training. {_FIX}",
            module="",
            severity="error",
            data={"skipped_steps": skipped, "scale": scale, "source": "GradScaler"},
        )

    def _alert_skipped_grads(
        self, ctx: StepContext, bad: list[tuple[ParamInfo, str]], reports
    ) -> None:
        scale = min((r.scale for r in reports), default=float("nan"))
        ctx.alert(
            "nonfinite_gradient",
            f"The gradients left at step {ctx.step} hold {_kind_text(bad)} in "
            f"{len(bad)} parameter tensor(s) ({_names(bad)}), from an iteration "
            f"whose optimizer step a GradScaler skipped (scale now {scale:.4g}). "
            f"This is how the scaler handles float16 overflow; nothing to fix "
            f"unless it keeps skipping.",
            severity="info",
            data={"params": [i.name for i, _ in bad], "scale": scale},
        )

    def _alert_broken_weights(
        self, ctx: StepContext, bad: list[tuple[ParamInfo, str]], broken
    ) -> None:
        if self._last_origin is not None:
            # The weights went non-finite in an earlier reported step: a repeat.
            self._alert_repeat(ctx, self._last_origin)
            return
        first = first_in_backward(broken, self._order, list(self._table))
        self._last_origin = first.module
        ctx.alert(
            "nonfinite_gradient",
            f"At step {ctx.step}, {len(broken)} parameter tensor(s) already hold "
            f"NaN or Inf, first in backward order {first.describe()} in module "
            f"`{first.module or '<root>'}`, so {len(bad)} gradient(s) are "
            f"non-finite too. The weights were loaded or set that way, or an "
            f"optimizer update made them so; check the checkpoint and the "
            f"optimizer's state (Adam's eps, weight decay).",
            module=first.module,
            data={"weights": [i.name for i in broken], "params": _name_list(bad)},
        )

    def _alert_origin(self, ctx: StepContext, bad: list[tuple[ParamInfo, str]]):
        origin = self._probe.origin() if self._probe.active else None
        first = first_in_backward([i for i, _ in bad], self._order, list(self._table))
        if origin is None:
            origin = Origin(first.module, "param", first.name, "backward order")
        repeat = self._last_origin == origin.module
        if repeat:
            self._alert_repeat(ctx, origin.module)
        else:
            ctx.alert(
                "nonfinite_gradient",
                _origin_message(ctx.step, bad, first, origin),
                module=origin.module,
                data={
                    "params": _name_list(bad),
                    "kinds": sorted({kind for _, kind in bad}),
                    "origin": origin.tensor,
                    "origin_kind": origin.kind,
                    "located_by": origin.located_by,
                },
            )
        self._last_origin = origin.module
        # The probe needs the fault to recur on finite weights; it runs once.
        probed = origin.located_by == "gradient probe"
        self._arm_next = not (repeat or probed or self._suspect_weights)

    def _alert_repeat(self, ctx: StepContext, module: str) -> None:
        """Update the alert raised for ``module``: the fault is still there."""
        ctx.alert(
            "nonfinite_gradient",
            f"Gradients are still non-finite at step {ctx.step}.",
            module=module,
            data={"last_nonfinite_step": ctx.step},
        )


class _Closer:
    """Adapter so that the session's hook set also removes the detector's hooks."""

    def __init__(self, detector: NonFiniteDetector) -> None:
        self._detector = weakref.ref(detector)

    def remove(self) -> None:
        detector = self._detector()
        if detector is not None:
            detector.close()


def _nonfinite_norms(infos: list[ParamInfo], norms: dict[int, float]) -> list:
    """Return the members of ``infos`` whose norm in ``norms`` is NaN or Inf."""
    if all(map(math.isfinite, norms.values())):
        return []
    return [
        info for info in infos if not math.isfinite(norms.get(id(info.tensor), 0.0))
    ]


def _nonfinite_kinds(grads: list[torch.Tensor | None]) -> list[str]:
    """Return ``"NaN"``, ``"Inf"`` or ``""`` per gradient, in one host transfer."""
    present = [g for g in grads if g is not None]
    if not present:
        return ["" for _ in grads]
    with torch.no_grad():
        flags = torch.stack(
            [
                torch.stack([_values(g).isnan().any(), _values(g).isinf().any()]).to(
                    present[0].device
                )
                for g in present
            ]
        ).tolist()
    found = iter(flags)
    kinds = []
    for grad in grads:
        if grad is None:
            kinds.append("")
            continue
        has_nan, has_inf = next(found)
        if has_nan:
            kinds.append("NaN")
        elif has_inf:
            kinds.append("Inf")
        else:
            kinds.append("")
    return kinds


def _holds_nonfinite(tensor: torch.Tensor) -> bool:
    return not bool(torch.isfinite(tensor.detach()).all())


def _values(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._values() if tensor.is_sparse else tensor


def _kind_text(bad: list[tuple[ParamInfo, str]]) -> str:
    kinds = sorted({kind for _, kind in bad})
    return " and ".join(kinds)


def _name_list(bad: list[tuple[ParamInfo, str]]) -> list[str]:
    return [info.name for info, _ in bad]


def _names(bad: list[tuple[ParamInfo, str]]) -> str:
    names = [f"`{info.name}`" for info, _ in bad[:_LISTED]]
    more = len(bad) - _LISTED
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _origin_message(
    step: int, bad: list[tuple[ParamInfo, str]], first: ParamInfo, origin: Origin
) -> str:
    where = _origin_text(origin, first)
    return (
        f"Gradient holds {_kind_text(bad)} at step {step} in {len(bad)} parameter "
        f"tensor(s): {_names(bad)}. {where} {_FIX}"
    )


def _origin_text(origin: Origin, first: ParamInfo) -> str:
    module = f"`{origin.module or '<root>'}`"
    if origin.kind == "param" and origin.located_by == "backward order":
        return (
            f"In backward order the first of them is {first.describe()}, so the "
            f"NaN or Inf enters the backward in module {module} or in the code "
            f"that consumes its output."
        )
    if origin.kind == "forward":
        return (
            f"Hooks on the next step found the forward output of module {module} "
            f"to be the first non-finite one: the op that makes it is inside its "
            f"forward, and the gradients inherit it."
        )
    if origin.kind == "param":
        return (
            f"Hooks on the next step found the gradient of `{origin.tensor}` to be "
            f"the first non-finite one in backward order: the NaN or Inf is made "
            f"in the backward of module {module}."
        )
    if origin.kind == "input":
        return (
            f"Hooks on the next step found the gradient of an input of module "
            f"{module} to be the first non-finite one in backward order, while its "
            f"outputs' gradients were finite: the op that makes it is inside the "
            f"forward of {module}."
        )
    if origin.tensor == "":
        return (
            "Hooks on the next step found the gradient of the model's output to be "
            "the first non-finite one in backward order: the loss computation "
            "makes it."
        )
    return (
        f"Hooks on the next step found the gradient of the output of "
        f"`{origin.tensor}` to be the first non-finite one in backward order: the "
        f"code that consumes that output makes it (in the forward of "
        f"`{origin.tensor.rpartition('.')[0] or '<root>'}`)."
    )
