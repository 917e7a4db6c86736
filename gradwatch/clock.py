"""The step clock: where one training step ends and the next begins.

A step is one ``optimizer.step()`` of an optimizer that contains (or contained) a
parameter of the model, seen through torch's global optimizer step hooks, so the
user need not pass the optimizer. Where no such optimizer ever steps, a forward of
the root module after a backward ends the step; ``gw.step()`` ends it explicitly.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gradwatch.handles import HookSet, eager_hook
from gradwatch.params import ParamTable

__all__ = ["StepClock"]

StepEndCallback = Callable[["torch.optim.Optimizer | None", bool], None]


class StepClock:
    """Counts steps and remembers the optimizers that step the model."""

    def __init__(self, table: ParamTable, on_step_end: StepEndCallback) -> None:
        self._table = table
        self._on_step_end = on_step_end
        self._optimizers: dict[int, weakref.ref[torch.optim.Optimizer]] = {}
        self._foreign: dict[int, tuple[weakref.ref, tuple]] = {}
        self._owned: dict[int, tuple[tuple[int, ...], frozenset[int]]] = {}
        self._union: tuple[tuple, frozenset[int]] = ((), frozenset())
        self._before_step: list[Callable[[torch.optim.Optimizer], None]] = []
        self.step = 0
        self.ending_in_forward = False
        self._carried: frozenset[int] = frozenset()
        self._searched = False

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        hooks.add(register_optimizer_step_pre_hook(self._pre_hook))
        hooks.add(register_optimizer_step_post_hook(self._post_hook))
        hooks.add(model.register_forward_pre_hook(eager_hook(self._root_forward)))

    def on_before_step(self, callback: Callable[[torch.optim.Optimizer], None]):
        """Call ``callback(optimizer)`` before each step of a watched optimizer."""
        self._before_step.append(callback)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The live optimizers that have stepped the model, oldest first."""
        live = (ref() for ref in self._optimizers.values())
        return [opt for opt in live if opt is not None]

    def is_sole(self, optimizer: torch.optim.Optimizer) -> bool:
        """Return whether ``optimizer`` is the only optimizer that steps the model."""
        if len(self._optimizers) != 1:
            return False
        ref = self._optimizers.get(id(optimizer))
        return ref is not None and ref() is optimizer

    def owned(self, optimizer: torch.optim.Optimizer) -> frozenset[int]:
        """Return the ids of the tensors in ``optimizer``'s param groups."""
        signature = _signature(optimizer)
        cached = self._owned.get(id(optimizer))
        if cached is not None and cached[0] == signature:
            return cached[1]
        ids = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
        self._owned[id(optimizer)] = (signature, ids)
        return ids

    def owned_by_any(self) -> frozenset[int]:
        """Return the ids of the tensors held by any watched optimizer."""
        optimizers = self.optimizers
        key = tuple((id(o), _signature(o)) for o in optimizers)
        if key != self._union[0]:
            owned: frozenset[int] = frozenset()
            for optimizer in optimizers:
                owned |= self.owned(optimizer)
            self._union = (key, owned)
        return self._union[1]

    @property
    def pending(self) -> bool:
        """True if a gradient arrived since the current step began."""
        return not self._table.arrived <= self._carried

    def end_step(
        self, optimizer: torch.optim.Optimizer | None = None, final: bool = False
    ) -> None:
        """End the current step; ``optimizer`` is the one that stepped, if any.

        ``final`` marks the step that the session's exit ends.
        """
        try:
            self._on_step_end(optimizer, final)
        finally:
            self.step += 1
            self._carried = frozenset(self._table.arrived)

    # Hooks

    def _watches(self, optimizer: torch.optim.Optimizer) -> bool:
        known = self._optimizers.get(id(optimizer))
        if known is not None and known() is optimizer:
            return True
        # An optimizer of another model is looked at again only when its param
        # groups or the model's parameters change, so its steps cost no pass
        # over its parameters.
        key = (_signature(optimizer), self._table.generation)
        foreign = self._foreign.get(id(optimizer))
        if foreign is not None and foreign[0]() is optimizer and foreign[1] == key:
            return False
        watched = any(
            self._table.was_parameter(p)
            for group in optimizer.param_groups
            for p in group["params"]
        )
        if watched:
            self._optimizers[id(optimizer)] = weakref.ref(optimizer)
            self._foreign.pop(id(optimizer), None)
        else:
            self._foreign[id(optimizer)] = (weakref.ref(optimizer), key)
        return watched

    def _pre_hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._watches(optimizer):
            for callback in self._before_step:
                callback(optimizer)

    def _post_hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._watches(optimizer):
            self.end_step(optimizer)

    def _root_forward(self, module: nn.Module, args: Any) -> None:
        # Parameters unfrozen since the last forward get their arrival hook now,
        # before the backward of this step.
        self._table.watch_arrivals()
        if not self.pending or self.optimizers or self._find_optimizers():
            return
        self.ending_in_forward = True
        try:
            self.end_step(None)
        finally:
            self.ending_in_forward = False

    def _find_optimizers(self) -> bool:
        """Look once for optimizers that hold the model but have not stepped yet.

        Without this, gradient accumulation before the first ``optimizer.step()``
        would look like a loop without an optimizer, where every forward after a
        backward ends a step. The search walks the garbage collector's objects
        once per session.
        """
        if self._searched:
            return False
        self._searched = True
        for candidate in gc.get_objects():
            if issubclass(type(candidate), torch.optim.Optimizer):
                self._watches(candidate)
        return bool(self.optimizers)


def _signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """Identify the param groups' contents cheaply: list ids and lengths.

    NOTE: a tensor swapped in place inside a group's list keeps the signature,
    so the owned set goes stale and the new tensor is reported not_in_optimizer.
    """
    return tuple(
        x for g in optimizer.param_groups for x in (id(g["params"]), len(g["params"]))
    )
