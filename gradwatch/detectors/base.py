"""The lifecycle every detector shares, and the context of one analysed step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gradwatch.alerts import CHECKS, Alert, Severity
from gradwatch.transfer import HostBatch

if TYPE_CHECKING:
    import torch

    from gradwatch.config import Options
    from gradwatch.handles import HookSet
    from gradwatch.params import ParamInfo, ParamTable

__all__ = ["Detector", "StepContext"]


@dataclasses.dataclass(eq=False)
class StepContext:
    """What detectors see when a step ends.

    Attributes:
        step: Index of the step that ended (the first step is 0).
        optimizer: The optimizer whose ``step()`` ended it, or None when a forward
            after backward, ``gw.step()`` or the session's exit ended it.
        final: True for the step analysed when the session exits.
        table: The watched parameters.
        judged: The trainable parameters whose gradients are judged at this step:
            those of ``optimizer``, plus those no optimizer steps.
        batch: Queue for device tensors; filled in :meth:`Detector.collect` and
            copied to the host before :meth:`Detector.analyse`.
        grad_norms: Gradient norm of each judged parameter that received a dense
            gradient, keyed by ``id(tensor)``; filled after the transfer.
        param_norms: The norms of those parameters themselves.
        rank: This process's ``torch.distributed`` rank, or None outside a
            process group.
        arrival_ranks: Per tensor id, the ranks its gradient arrived on at this
            step, when the session combines arrivals across ranks; else None.
        world_ranks: Every rank of that process group; empty when arrivals are
            not combined.
    """

    step: int
    optimizer: torch.optim.Optimizer | None
    final: bool
    table: ParamTable
    judged: list[ParamInfo]
    options: Options
    emit: Callable[[Alert], None]
    batch: HostBatch = dataclasses.field(default_factory=HostBatch)
    grad_norms: dict[int, float] = dataclasses.field(default_factory=dict)
    param_norms: dict[int, float] = dataclasses.field(default_factory=dict)
    steps_seen: int = 0
    rank: int | None = None
    arrival_ranks: dict[int, frozenset[int]] | None = None
    world_ranks: tuple[int, ...] = ()

    def arrived(self, info: ParamInfo) -> bool:
        """Return whether ``info`` received a gradient since it was last judged."""
        return id(info.tensor) in self.table.arrived

    def ranks_without(self, info: ParamInfo) -> tuple[int, ...]:
        """Return the ranks ``info`` received no gradient on at this step.

        Outside combined arrivals this is the own rank, or empty outside a
        process group.
        """
        if self.arrival_ranks is None:
            return () if self.rank is None else (self.rank,)
        arrived = self.arrival_ranks.get(id(info.tensor), frozenset())
        return tuple(r for r in self.world_ranks if r not in arrived)

    def alert(
        self,
        check: str,
        message: str,
        *,
        param: ParamInfo | str | None = None,
        module: str | None = None,
        data: dict[str, Any] | None = None,
        severity: Severity | None = None,
        step: int | None = None,
        ranks: tuple[int, ...] | None = None,
    ) -> None:
        """Emit an alert of ``check`` unless the session switched it off.

        ``param`` is the parameter concerned, or the qualified name of a tensor
        that is not a registered parameter; ``module`` defaults to its module.
        ``ranks`` defaults to this process's rank (empty outside a process group).
        """
        if not self.options.enabled(check):
            return
        name = param if isinstance(param, str) or param is None else param.name
        if module is None and name is not None:
            module = name.rpartition(".")[0]
        alert = Alert(
            check=check,
            severity=severity or CHECKS[check],
            step=self.step if step is None else step,
            param=name,
            module=module,
            message=message,
            data=dict(data or {}),
            last_step=self.step,
            ranks=_default_ranks(self.rank) if ranks is None else ranks,
        )
        self.emit(alert)


def _default_ranks(rank: int | None) -> tuple[int, ...]:
    return () if rank is None else (rank,)


class Detector:
    """Base class: every method is a no-op, so a detector overrides what it needs.

    Order of calls: :meth:`attach` when the session starts; per analysed step
    :meth:`collect`, one host transfer, then :meth:`analyse`; :meth:`close` when the
    session exits, exceptions included.
    """

    def __init__(self, options: Options) -> None:
        self.options = options

    def attach(self, model: torch.nn.Module, hooks: HookSet) -> None:
        """Register the hooks this detector needs; ``hooks`` removes them on exit."""

    def begin_step(self, step: int) -> None:
        """Prepare for step ``step`` (called when the previous one has ended)."""

    def collect(self, ctx: StepContext) -> None:
        """Queue the device tensors the analysis of this step needs."""

    def analyse(self, ctx: StepContext) -> None:
        """Judge the step and emit alerts through ``ctx.alert``."""

    def close(self) -> None:
        """Drop references to the model and its tensors."""
