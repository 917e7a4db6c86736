"""Follow ``torch.amp.GradScaler`` instances to see the optimizer steps they skip.

A scaler skips ``optimizer.step()`` when the scaled gradients hold Inf or NaN,
then multiplies its scale by ``backoff_factor`` in ``update()``. A skipped step
never reaches the step clock, so the watch reads the scale and the growth
tracker at every step end (through the step's one host transfer) and infers
how many steps were skipped since the previous step end:

    scale_now = scale_before * growth_factor**g * backoff_factor**k

where ``g`` is 1 when the previous successful ``update()`` grew the scale (its
growth tracker reached ``growth_interval``) and ``k`` is the number of skipped
steps.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradwatch.detectors.base import StepContext
    from gradwatch.transfer import Pending

__all__ = ["ScalerReport", "ScalerWatch"]


@dataclasses.dataclass(frozen=True)
class ScalerReport:
    """What one scaler did since the previous step end.

    Attributes:
        skipped: Optimizer steps it skipped since the previous step end.
        total_skipped: Steps it skipped since the session found it.
        scale: Its current loss scale.
        found_inf: True if it found Inf or NaN at its latest ``unscale_`` and
            ``update()`` has not run since.
    """

    skipped: int
    total_skipped: int
    scale: float
    found_inf: bool


@dataclasses.dataclass
class _Tracked:
    scaler: weakref.ref[torch.amp.GradScaler]
    scale: float | None = None
    tracker: int | None = None
    total_skipped: int = 0
    pending: Pending | None = None


class ScalerWatch:
    """The GradScalers that step the watched model's optimizers."""

    def __init__(self) -> None:
        self._candidates: list[weakref.ref[torch.amp.GradScaler]] = []
        self._tracked: dict[int, _Tracked] = {}
        self._searches = 0

    @property
    def unbound_in_use(self) -> bool:
        """True if a used, enabled GradScaler not linked to the model is alive."""
        return any(
            _is_used(ref()) and id(ref()) not in self._tracked
            for ref in self._candidates
        )

    def search(self) -> None:
        """Find the live GradScalers; walks the garbage collector's objects."""
        self._searches += 1
        # type() rather than isinstance(): some module proxies warn or raise when
        # their __class__ is read.
        found = [
            obj
            for obj in gc.get_objects()
            if issubclass(type(obj), torch.amp.GradScaler)
        ]
        self._candidates = [weakref.ref(scaler) for scaler in found]

    @property
    def searched(self) -> int:
        return self._searches

    def collect(self, ctx: StepContext, optimizer_ids: set[int]) -> None:
        """Bind the scalers that step ``optimizer_ids`` and queue their state."""
        for ref in self._candidates:
            scaler = ref()
            if scaler is None or id(scaler) in self._tracked:
                continue
            states = getattr(scaler, "_per_optimizer_states", {})
            if _is_used(scaler) and optimizer_ids & set(states):
                self._tracked[id(scaler)] = _Tracked(ref)
                if ctx.step == 0:
                    # Skips before the first step end started from init_scale.
                    self._tracked[id(scaler)].scale = float(scaler._init_scale)
                    self._tracked[id(scaler)].tracker = -1
        for key, tracked in list(self._tracked.items()):
            scaler = tracked.scaler()
            if scaler is None or not _is_used(scaler):
                del self._tracked[key]
                continue
            state = torch.stack(
                [
                    scaler._scale.double().reshape(()),
                    scaler._growth_tracker.double()
                    .reshape(())
                    .to(scaler._scale.device),
                    _found_inf(scaler).to(scaler._scale.device),
                ]
            )
            tracked.pending = ctx.batch.add(state)

    def analyse(self) -> list[ScalerReport]:
        """Return a report per bound scaler for the step that just ended."""
        reports = []
        for tracked in self._tracked.values():
            scaler = tracked.scaler()
            if tracked.pending is None or scaler is None:
                continue
            scale, tracker, found = tracked.pending.values
            tracked.pending = None
            skipped = _skipped(scaler, tracked, scale)
            tracked.total_skipped += skipped
            tracked.scale, tracked.tracker = scale, int(tracker)
            reports.append(
                ScalerReport(skipped, tracked.total_skipped, scale, bool(found))
            )
        return reports

    def close(self) -> None:
        self._candidates = []
        self._tracked = {}


def _is_used(scaler: torch.amp.GradScaler | None) -> bool:
    return (
        scaler is not None
        and scaler.is_enabled()
        and getattr(scaler, "_scale", None) is not None
        and getattr(scaler, "_growth_tracker", None) is not None
    )


def _found_inf(scaler: torch.amp.GradScaler) -> torch.Tensor:
    flags = [
        flag.double().reshape(()).to(scaler._scale.device)
        for state in scaler._per_optimizer_states.values()
        for flag in state.get("found_inf_per_device", {}).values()
    ]
    if not flags:
        return torch.zeros((), dtype=torch.float64, device=scaler._scale.device)
    return torch.stack(flags).sum()


def _skipped(scaler: torch.amp.GradScaler, tracked: _Tracked, scale: float) -> int:
    if tracked.scale is None or tracked.tracker is None or scale <= 0:
        return 0
    grew = tracked.tracker + 1 >= scaler.get_growth_interval()
    expected = tracked.scale * (scaler.get_growth_factor() if grew else 1.0)
    backoff = scaler.get_backoff_factor()
    if scale >= expected or not 0.0 < backoff < 1.0:
        return 0
    return max(round(math.log(expected / scale) / math.log(1.0 / backoff)), 0)
