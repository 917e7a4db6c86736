"""Locate where gradients first turn non-finite, in backward order.

Two sources, from cheap to precise:

- :class:`BackwardOrder` records the order in which parameters receive their
  gradients during one backward (post-accumulate-grad hooks on the first step
  only). On a step with non-finite gradients, the non-finite parameter that comes
  first in that order names the module where NaN or Inf entered the backward.
- :class:`GradientProbe` is armed for the step after a non-finite one, when the
  weights are still finite. Module forward hooks record which module's output
  first turns non-finite in forward; tensor hooks on every module's inputs and
  outputs and on every parameter record, in firing order, whether each
  gradient is finite. Together they also find NaN made by parameterless code
  (``torch.where``, ``log``, division) between modules.

Neither runs ``torch.autograd.detect_anomaly``, which re-checks every backward
op and costs a multiple of a step.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.graph import iter_tensors
from gradwatch.handles import HookSet, eager_hook

if TYPE_CHECKING:
    from gradwatch.params import ParamInfo
    from gradwatch.transfer import HostBatch, Pending

__all__ = ["BackwardOrder", "GradientProbe", "Origin", "first_in_backward"]


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a non-finite gradient first appeared in backward order.

    Attributes:
        module: Qualified name of the module to report (``""`` is the root).
        kind: ``"forward"``: the output of ``module`` is already non-finite in
            forward, while the outputs of the modules that ran before it are not;
            ``"param"``: the gradient of ``tensor``, a parameter of ``module``;
            ``"input"``: the gradient of an input of ``module``, so the NaN is made
            inside its forward; ``"output"``: the gradient of the output of
            ``tensor``'s module, made by the code that consumes that output
            inside the forward of ``module``.
        tensor: The parameter or the module whose output it is.
        located_by: ``"backward order"`` or ``"gradient probe"``.
    """

    module: str
    kind: str
    tensor: str
    located_by: str


class BackwardOrder:
    """The order in which parameters received their gradients on recorded steps."""

    def __init__(self) -> None:
        self._hooks = HookSet()
        self._index: dict[int, int] = {}
        self._arrivals: list[int] = []

    @property
    def recording(self) -> bool:
        return len(self._hooks) > 0

    def record(self, infos: Sequence[ParamInfo]) -> None:
        """Hook ``infos`` so the next backward records the order of arrival."""
        self._arrivals = []
        arrivals = self._arrivals
        for info in infos:
            key = id(info.tensor)
            hook = _arrival_hook(arrivals, key)
            self._hooks.add(info.tensor.register_post_accumulate_grad_hook(hook))

    def stop(self) -> None:
        """Remove the hooks and keep the order of the first arrival of each tensor."""
        self._hooks.remove()
        if self._arrivals:
            self._index = self.ranks()
            self._arrivals = []

    def ranks(self) -> dict[int, int]:
        """Return the rank in backward order of each recorded tensor, by id."""
        if not self._arrivals:
            return self._index
        ranks: dict[int, int] = {}
        for key in self._arrivals:
            ranks.setdefault(key, len(ranks))
        return ranks

    def close(self) -> None:
        self._hooks.remove()
        self._index = {}
        self._arrivals = []


def _arrival_hook(arrivals: list[int], key: int) -> Callable[[torch.Tensor], None]:
    return lambda _: arrivals.append(key)


def first_in_backward(
    infos: Sequence[ParamInfo], order: BackwardOrder, model_order: Sequence[ParamInfo]
) -> ParamInfo:
    """Return the member of ``infos`` that received its gradient first.

    Parameters missing from the recorded order (added after it was taken) rank
    after the recorded ones, latest registered first, since backward runs from
    the loss towards the inputs and most models register layers in forward order.
    """
    registered = {id(info.tensor): i for i, info in enumerate(model_order)}
    ranks = order.ranks()

    def rank(info: ParamInfo) -> tuple[int, int]:
        key = id(info.tensor)
        if key in ranks:
            return (0, ranks[key])
        return (1, -registered.get(key, 0))

    return min(infos, key=rank)


@dataclasses.dataclass
class _Tensor:
    """One tensor watched by the probe, and the modules that produced or took it."""

    producers: list[str] = dataclasses.field(default_factory=list)
    consumers: list[str] = dataclasses.field(default_factory=list)
    param: str | None = None
    forward: str | None = None


class GradientProbe:
    """Tensor hooks, armed for one step, that find the first non-finite gradient.

    Every hook stores one device flag (``~isfinite(grad).all()``) in firing
    order, so the backward never waits on the host; :meth:`collect` queues the
    flags for the step's single transfer.

    Module forward hooks are only switched off, never removed, while a step ends
    inside a forward (``removal_safe`` returns False then), because torch would
    still call a hook removed from the dict it is iterating.
    """

    def __init__(self, removal_safe: Callable[[], bool]) -> None:
        self._removal_safe = removal_safe
        self._module_hooks = HookSet()
        self._tensor_hooks = HookSet()
        self._names: dict[int, str] = {}
        self._watched: dict[int, _Tensor] = {}
        self._keep: list[torch.Tensor] = []
        self._events: list[tuple[_Tensor, torch.Tensor]] = []
        self._pending: tuple[list[_Tensor], Pending] | None = None
        self._enabled = False

    @property
    def active(self) -> bool:
        return self._enabled

    def arm(self, model: nn.Module, infos: Sequence[ParamInfo]) -> None:
        """Hook ``model``'s modules and the parameters ``infos`` for one step."""
        self.disarm()
        self._enabled = True
        if not len(self._module_hooks):
            self._names = {}
            for name, module in model.named_modules():
                self._names[id(module)] = name
                pre = module.register_forward_pre_hook(eager_hook(self._on_inputs))
                post = module.register_forward_hook(eager_hook(self._on_output))
                self._module_hooks.extend([pre, post])
        for info in infos:
            record = _Tensor(param=info.name)
            hook = self._grad_hook(record)
            self._tensor_hooks.add(info.tensor.register_hook(hook))

    def disarm(self) -> None:
        """Drop this step's records; remove the module hooks when that is safe."""
        self._enabled = False
        self._tensor_hooks.remove()
        self._watched = {}
        self._keep = []
        self._events = []
        self._pending = None
        if self._removal_safe():
            self._module_hooks.remove()

    def close(self) -> None:
        self._enabled = False
        self._tensor_hooks.remove()
        self._module_hooks.remove()
        self._watched = {}
        self._keep = []
        self._events = []
        self._pending = None

    def collect(self, batch: HostBatch) -> None:
        """Queue the flags recorded during this step's backward."""
        if not self._enabled or not self._events:
            return
        records = [record for record, _ in self._events]
        flags = torch.stack(
            [flag.to(self._events[0][1].device) for _, flag in self._events]
        )
        self._pending = (records, batch.add(flags))

    def origin(self) -> Origin | None:
        """Return where the first non-finite gradient of this step appeared."""
        if self._pending is None:
            return None
        records, pending = self._pending
        for record, flag in zip(records, pending.values, strict=True):
            if flag:
                return _origin_of(record)
        return None

    # Hooks

    def _on_inputs(self, module: nn.Module, args: Any) -> None:
        if not self._enabled or not torch.is_grad_enabled():
            return
        name = self._names.get(id(module))
        for tensor in iter_tensors(args):
            if tensor.requires_grad and name is not None:
                self._watch(tensor).consumers.append(name)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._enabled or not torch.is_grad_enabled():
            return
        name = self._names.get(id(module))
        if name is None:
            return
        floats = [t for t in iter_tensors(output) if t.is_floating_point()]
        if floats:
            with torch.no_grad():
                flags = [~torch.isfinite(t).all() for t in floats]
                flag = torch.stack([f.to(flags[0].device) for f in flags]).any()
            self._events.append((_Tensor(forward=name), flag))
        for tensor in floats:
            if tensor.requires_grad:
                self._watch(tensor).producers.append(name)

    def _watch(self, tensor: torch.Tensor) -> _Tensor:
        record = self._watched.get(id(tensor))
        if record is None:
            record = _Tensor()
            self._watched[id(tensor)] = record
            # Holding the tensor keeps its id from being reused within the step.
            self._keep.append(tensor)
            self._tensor_hooks.add(tensor.register_hook(self._grad_hook(record)))
        return record

    def _grad_hook(self, record: _Tensor) -> Callable[[torch.Tensor], None]:
        events = self._events
        probe = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            owner = probe()
            if owner is None or not owner._enabled or grad.is_sparse:
                return
            with torch.no_grad():
                events.append((record, ~torch.isfinite(grad).all()))

        return hook


def _origin_of(record: _Tensor) -> Origin:
    if record.forward is not None:
        return Origin(record.forward, "forward", record.forward, "gradient probe")
    if record.param is not None:
        module = record.param.rpartition(".")[0]
        return Origin(module, "param", record.param, "gradient probe")
    if record.consumers:
        # The innermost module that took the tensor as input made its gradient.
        consumer = max(record.consumers, key=_depth)
        return Origin(consumer, "input", consumer, "gradient probe")
    # No module took the tensor: the code of the producer's parent consumed it.
    producer = min(record.producers, key=_depth)
    parent = producer.rpartition(".")[0]
    module = parent if parent else producer
    return Origin(module, "output", producer, "gradient probe")


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0
