"""Update size: ||w_after - w_before|| / ||w_before|| of each parameter per step.

Healthy training with SGD or Adam usually moves each weight by about 1e-3 of
its norm per step. Far larger updates make training unstable, and far smaller
ones mean the layer hardly learns. The ratio is computed on the ``log_every``
schedule only: before such a step the optimizer's parameters are copied with
one ``torch._foreach_mul`` (one extra copy of those weights until the step
ends), and after it the differences and norms are reduced with foreach ops
and join the step's single host transfer.

The figures are TensorBoard scalars ``gradwatch/update_ratio/<param>``. With
``update_ratio_bounds=(low, high)`` a parameter whose ratio stays outside the
bounds for ``patience`` consecutive measurements is reported, as
``exploding_gradient`` when above ``high`` and ``vanishing_gradient`` when
below ``low``.

Limitations:
    A parameter whose norm is zero before the step (a zero-initialised LoRA B)
    has no ratio. The copy doubles the memory of the optimizer's weights for
    the duration of a measured step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.stats import foreach_norms

if TYPE_CHECKING:
    from gradwatch.clock import StepClock
    from gradwatch.config import Options
    from gradwatch.handles import HookSet
    from gradwatch.params import ParamInfo, ParamTable
    from gradwatch.transfer import Pending

__all__ = ["UpdateSizeDetector"]

_STATE = "update_ratio.streak"


class UpdateSizeDetector(Detector):
    """Measure each parameter's update relative to its weight, on a schedule."""

    def __init__(self, options: Options, table: ParamTable, clock: StepClock) -> None:
        super().__init__(options)
        self._table = table
        self._clock = clock
        self._step = 0
        self._before: tuple[int, list[ParamInfo], list[torch.Tensor]] | None = None
        self._pending: tuple[list[ParamInfo], Pending] | None = None
        self.ratios: dict[str, float] = {}

    def attach(self, model: torch.nn.Module, hooks: HookSet) -> None:
        self._clock.on_before_step(self._snapshot)

    def begin_step(self, step: int) -> None:
        self._step = step
        self._before = None
        self._pending = None

    def close(self) -> None:
        self._before = None
        self._pending = None

    def figures(self) -> dict[str, float]:
        """Return this step's ratios as TensorBoard scalars, by tag."""
        return {f"gradwatch/update_ratio/{n}": r for n, r in self.ratios.items()}

    def _scheduled(self) -> bool:
        # Without TensorBoard and bounds nothing reads the ratios: copy nothing.
        requested = self.options.logdir is not None or self.options.update_ratio_bounds
        return bool(requested) and self._step % self.options.log_every == 0

    def _snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._scheduled():
            return
        infos = []
        for group in optimizer.param_groups:
            for tensor in group["params"]:
                info = self._table.get(tensor)
                if info is not None and info.trainable:
                    infos.append(info)
        if not infos:
            return
        with torch.no_grad():
            copies = list(torch._foreach_mul([i.tensor.detach() for i in infos], 1.0))
        self._before = (id(optimizer), infos, copies)

    def collect(self, ctx: StepContext) -> None:
        self.ratios = {}
        before, self._before = self._before, None
        if before is None or ctx.optimizer is None or before[0] != id(ctx.optimizer):
            return
        _, infos, copies = before
        with torch.no_grad():
            after = [info.tensor.detach() for info in infos]
            weights = foreach_norms(copies)
            # The copies become the updates in place (their sign does not change
            # the norm), so no second copy of the weights is allocated.
            torch._foreach_sub_(copies, after)
            norms = torch.cat([foreach_norms(copies), weights])
        self._pending = (infos, ctx.batch.add(norms))

    def analyse(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        infos, values = pending[0], pending[1].values
        count = len(infos)
        for index, info in enumerate(infos):
            delta, weight = values[index], values[count + index]
            if weight > 0 and math.isfinite(delta) and math.isfinite(weight):
                self.ratios[info.name] = delta / weight
        bounds = self.options.update_ratio_bounds
        if bounds is not None:
            for info in infos:
                if info.name in self.ratios:
                    self._judge(ctx, info, self.ratios[info.name], bounds)

    def _judge(
        self,
        ctx: StepContext,
        info: ParamInfo,
        ratio: float,
        bounds: tuple[float, float],
    ) -> None:
        low, high = bounds
        streak = info.state.get(_STATE, 0)
        assert isinstance(streak, int)
        if low <= ratio <= high:
            info.state[_STATE] = 0
            return
        streak += 1
        info.state[_STATE] = streak
        if streak < self.options.patience:
            return
        check = "exploding_gradient" if ratio > high else "vanishing_gradient"
        size = "large" if ratio > high else "small"
        first = ctx.step - (streak - 1) * self.options.log_every
        ctx.alert(
            check,
            f"Update of {info.describe()} in module `{info.module or '<root>'}` "
            f"is {ratio:.2e} of its norm at step {ctx.step}, outside "
            f"update_ratio_bounds ({low:g}, {high:g}) for {streak} measurements "
            f"in a row since step {first}. Updates this {size} "
            f"{'destabilise training' if ratio > high else 'barely change the layer'}"
            f"; adjust the learning rate of its param group "
            f"(about 1e-3 of the weight norm per step is usual).",
            param=info,
            step=first,
            data={"update_ratio": ratio, "bounds": [low, high], "kind": "update"},
        )
