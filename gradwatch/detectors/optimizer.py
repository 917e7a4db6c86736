"""Parameters that receive gradients while no optimizer updates them.

Check: ``not_in_optimizer``.

Limitations:
    Optimizers are discovered when they first step, so a parameter is flagged only
    after it went without an owner for ``patience`` consecutive steps; a second
    optimizer that steps less often than that (a generator updated once per five
    critic steps) looks absent. Where no optimizer steps at all, nothing is
    flagged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch.detectors.base import Detector, StepContext

if TYPE_CHECKING:
    from gradwatch.clock import StepClock
    from gradwatch.config import Options
    from gradwatch.params import ParamInfo

__all__ = ["OptimizerDetector"]


class OptimizerDetector(Detector):
    """Flag trainable parameters with gradients that no watched optimizer holds."""

    def __init__(self, options: Options, clock: StepClock) -> None:
        super().__init__(options)
        self._clock = clock
        self._all_owned: tuple[object, object] = (None, None)
        self._unowned: set[int] = set()

    def analyse(self, ctx: StepContext) -> None:
        if ctx.optimizer is None:
            return
        owned = self._clock.owned_by_any()
        if not self._unowned and self._owns_all(ctx.judged, owned):
            return
        for info in ctx.judged:
            key = id(info.tensor)
            streak = info.state.get("unowned", 0)
            assert isinstance(streak, int)
            if key in owned:
                info.state["unowned"] = 0
                self._unowned.discard(key)
                continue
            # A step that brought this tensor no gradient, such as a step of
            # another optimizer in a GAN, neither extends nor ends its streak.
            if not ctx.arrived(info):
                continue
            if streak == 0:
                info.state["unowned_since"] = ctx.step
            info.state["unowned"] = streak + 1
            self._unowned.add(key)
            if streak + 1 >= self.options.patience:
                first = info.state["unowned_since"]
                assert isinstance(first, int)
                self._alert(ctx, info, first)

    def _owns_all(self, judged: list[ParamInfo], owned: frozenset[int]) -> bool:
        """Return whether ``owned`` contains every judged tensor, cached by identity."""
        if self._all_owned[0] is judged and self._all_owned[1] is owned:
            return True
        if any(id(info.tensor) not in owned for info in judged):
            return False
        # The session and the clock keep these objects while they are unchanged.
        self._all_owned = (judged, owned)
        return True

    def _alert(self, ctx: StepContext, info: ParamInfo, first: int) -> None:
        stale = self._stale_tensors(ctx)
        names = sorted({type(o).__name__ for o in self._clock.optimizers})
        message = (
            f"Parameter {info.describe()} in module `{info.module or '<root>'}` "
            f"receives gradients, but none of the optimizers that step the model "
            f"({', '.join(names)}) holds it, so it has not changed since step "
            f"{first}. It was added, replaced or unfrozen after the "
            f"optimizer was built, or left out of its param groups: rebuild the "
            f"optimizer from model.parameters() or call "
            f"optimizer.add_param_group(...)."
        )
        if stale:
            message += (
                f" The optimizers still hold {stale} tensor(s) that are no longer "
                f"parameters of the model (layers replaced after the optimizer was "
                f"built)."
            )
        data = {"stale_tensors": stale, "optimizers": names}
        ctx.alert("not_in_optimizer", message, param=info, step=first, data=data)

    def _stale_tensors(self, ctx: StepContext) -> int:
        current = {id(info.tensor) for info in ctx.table}
        return len(self._clock.owned_by_any() - current)
