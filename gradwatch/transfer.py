"""One device-to-host transfer per analysed step.

Detectors queue the figures they need as device tensors; :meth:`HostBatch.fetch`
concatenates them and copies them to the host in a single call, so a step costs
one synchronisation however many parameters are watched.
"""

from __future__ import annotations

import torch

__all__ = ["HostBatch", "Pending", "to_host"]


def to_host(values: torch.Tensor) -> list[float]:
    """Copy a flat float tensor to the host: the one synchronising call per step."""
    return values.tolist()


class Pending:
    """A queued tensor; :attr:`values` is filled by :meth:`HostBatch.fetch`."""

    __slots__ = ("numel", "values")

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.values: list[float] = []

    @property
    def value(self) -> float:
        return self.values[0]


class HostBatch:
    """Device tensors waiting to be copied to the host together."""

    def __init__(self) -> None:
        self._queued: list[tuple[torch.Tensor, Pending]] = []

    def add(self, tensor: torch.Tensor) -> Pending:
        """Queue ``tensor`` (any shape; it is flattened and cast to float64)."""
        flat = tensor.detach().reshape(-1)
        pending = Pending(flat.numel())
        self._queued.append((flat, pending))
        return pending

    def fetch(self) -> None:
        """Copy every queued tensor to the host, one transfer per device."""
        queued, self._queued = self._queued, []
        devices = {flat.device for flat, _ in queued}
        for device in devices:
            items = [item for item in queued if item[0].device == device]
            _fetch_together(items)


def _fetch_together(items: list[tuple[torch.Tensor, Pending]]) -> None:
    """Fill the ``Pending`` values of tensors on one device in one transfer."""
    flats = [flat.to(torch.float64) for flat, _ in items]
    values = to_host(flats[0] if len(flats) == 1 else torch.cat(flats))
    offset = 0
    for _, pending in items:
        pending.values = values[offset : offset + pending.numel]
        offset += pending.numel
