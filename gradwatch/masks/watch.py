"""One watched mask, and the device-side figures the mask checks read.

Mask convention, as in ``torch.nn.utils.prune``: 1 or True keeps an entry
trainable, 0 or False masks it. A mask may have the parameter's shape or any
shape that broadcasts to it (one value per output row, say).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from gradwatch.masks.messages import Diagnosis

__all__ = [
    "MASK_MODES",
    "MaskFigures",
    "MaskMode",
    "MaskWatch",
    "broadcasts",
    "count_revived",
    "leak_figures",
    "masked_entries",
]

MaskMode = Literal["zero", "frozen"]

#: ``"zero"``: masked entries must stay exactly zero (pruning). ``"frozen"``:
#: they must keep the values they had when the mask was registered.
MASK_MODES: tuple[MaskMode, ...] = ("zero", "frozen")

TensorGetter = Callable[[], "torch.Tensor | None"]


@dataclasses.dataclass
class MaskFigures:
    """The figures of one mask at one step, for TensorBoard.

    Attributes:
        sparsity: Fraction of the parameter's entries that the mask masks.
        leaking: Masked entries with a nonzero gradient at this step.
        revived: Masked entries that broke the mask at a forward of this step
            (the maximum over the forwards), or None when the module did not run.
    """

    sparsity: float
    leaking: int
    revived: int | None


def masked_entries(mask: torch.Tensor) -> torch.Tensor:
    """Return a bool tensor that is True where ``mask`` masks the entry (mask == 0)."""
    if mask.dtype == torch.bool:
        return torch.logical_not(mask)
    return mask == 0


def count_revived(
    target: torch.Tensor, masked: torch.Tensor, reference: torch.Tensor | None
) -> torch.Tensor:
    """Count the masked entries of ``target`` that are nonzero or moved.

    With ``reference`` None an entry counts when it is nonzero; otherwise when it
    differs from ``reference``. NaN counts in both cases. Returns an int64 scalar
    on ``target``'s device.
    """
    with torch.no_grad():
        values = target.detach()
        changed = values != 0 if reference is None else values != reference
        return torch.count_nonzero(changed & masked)


def leak_figures(grad: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Return ``[count, max |grad|]`` over the masked entries of ``grad``.

    A sparse COO gradient is coalesced (duplicate indices summed) and only its
    stored values are read, so no dense copy of the gradient is made.
    """
    with torch.no_grad():
        if grad.is_sparse:
            grad = grad.coalesce()
            rows = tuple(grad.indices())
            selected = masked.expand(grad.shape)[rows]
            magnitude = grad.values().abs()
        else:
            selected = masked
            magnitude = grad.detach().abs()
        leaked = torch.where(selected, magnitude, 0).float()
        if leaked.numel() == 0:
            return torch.zeros(2, device=grad.device)
        return torch.stack([torch.count_nonzero(leaked).float(), leaked.amax()])


@dataclasses.dataclass(eq=False)
class MaskWatch:
    """One mask over one parameter, with the state of its checks.

    Attributes:
        key: Identity that keeps the state across rediscovery of the masks.
        source: ``"prune"`` (``torch.nn.utils.prune``), ``"buffer"`` (a mask
            buffer beside the parameter), ``"explicit"`` (``watch_mask`` or the
            ``masks`` option) or ``"zeros"`` (the ``track_zeros`` option).
        param: The parameter whose gradient the leak check reads.
        modules: Modules whose forward the revival check samples.
        label: How messages name the mask, such as ``"buffer `fc1.mask`"``.
        mode: ``"zero"`` or ``"frozen"``, see :data:`MASK_MODES`.
        in_graph: True where the mask multiplies the tensor in forward, so that a
            masked entry's gradient is exactly zero unless a path bypasses it.
        read_mask: Returns the mask as it is now; masks are re-read at each check.
        read_target: Returns the tensor whose masked entries must hold at forward.
        target_name: Qualified name of that tensor where it is not ``param``
            (the effective ``weight`` of a pruned module).
        reference: Values masked entries must keep in ``"frozen"`` mode.
        revived: Device count of broken entries, maximum over this step's forwards.
        forwards: Forwards sampled in this step.
        first_leak_step: First step at which masked entries had a nonzero
            gradient, or None.
        seen_clean: Whether some step's forwards saw every masked entry intact.
        diagnosis: Cause of a revival, found once when it is first reported.
        unusable: Why the mask cannot be checked any longer, or None.
    """

    key: tuple[object, ...]
    source: str
    param: nn.Parameter
    modules: list[nn.Module]
    label: str
    mode: MaskMode
    in_graph: bool
    read_mask: TensorGetter
    read_target: TensorGetter
    target_name: str | None = None
    reference: torch.Tensor | None = None
    revived: torch.Tensor | None = None
    forwards: int = 0
    first_leak_step: int | None = None
    seen_clean: bool = False
    diagnosis: Diagnosis | None = None
    unusable: str | None = None
    _cache: tuple[torch.Tensor, int | None, torch.Tensor, torch.Tensor] | None = None
    _last_masked: torch.Tensor | None = None
    _effective: tuple[torch.Tensor, int | None] | None = None

    @property
    def checks_forward_values(self) -> bool:
        """Whether a forward with broken masked entries is reported.

        For a mask buffer multiplied in forward, the raw weight's masked entries
        may hold anything, because the forward never reads them. They count only
        once a leaking gradient shows that the forward bypasses the mask, and
        only if a forward saw them all zero before: otherwise they never were
        masked, and ``mask_leak`` has said so.
        """
        if self.source != "buffer":
            return True
        return self.first_leak_step is not None and self.seen_clean

    def masked(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the masked entries as a bool tensor and their count.

        The mask is re-read, and the two tensors are recomputed only when it was
        replaced or changed in place. Returns None when there is no mask now.
        """
        mask = self.read_mask()
        if mask is None or self.unusable is not None:
            return None
        version = _version(mask)
        cache = self._cache
        unchanged = cache is not None and cache[0] is mask and cache[1] == version
        if cache is not None and unchanged and version is not None:
            return cache[2], cache[3]
        if not broadcasts(mask.shape, target.shape):
            self.unusable = (
                f"its shape {tuple(mask.shape)} no longer broadcasts to the "
                f"tensor's shape {tuple(target.shape)}"
            )
            return None

        with torch.no_grad():
            masked = masked_entries(mask.detach().to(target.device))
            count = torch.count_nonzero(masked) * (target.numel() // masked.numel())
            self._follow_mask_change(masked, target)
        self._cache = (mask, version, masked, count)
        return masked, count

    def _follow_mask_change(self, masked: torch.Tensor, target: torch.Tensor) -> None:
        """In frozen mode, take the current values of newly masked entries."""
        if self.mode != "frozen":
            return
        current = target.detach()
        if self.reference is None or self._last_masked is None:
            self.reference = current.clone()
        else:
            newly = masked & ~self._last_masked
            self.reference = torch.where(newly, current, self.reference)
        self._last_masked = masked

    def note_effective(self) -> None:
        """Remember the effective tensor a pruned module's forward just used.

        torch.nn.utils.prune computes it before each forward. If the same tensor,
        unwritten, is still there at the next forward, it needs no check: its
        masked entries are those of the mask it was computed with, even if the
        mask buffer was edited in place since.
        """
        target = self.read_target()
        self._effective = None if target is None else (target, _version(target))

    def observe_forward(self) -> None:
        """Queue the count of broken masked entries as the module runs forward."""
        target = self.read_target()
        if target is None or self._unwritten(target):
            return
        found = self.masked(target)
        if found is None:
            return
        count = count_revived(target, found[0], self.reference)
        self.revived = (
            count if self.revived is None else torch.maximum(self.revived, count)
        )
        self.forwards += 1

    def _unwritten(self, target: torch.Tensor) -> bool:
        if self._effective is None:
            return False
        tensor, version = self._effective
        return tensor is target and version is not None and _version(target) == version

    def take_revived(self) -> torch.Tensor | None:
        """Return this step's count of broken entries and start a new step."""
        revived, self.revived, self.forwards = self.revived, None, 0
        return revived


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors track no version
        return None


def broadcasts(mask_shape: torch.Size, shape: torch.Size) -> bool:
    """Return whether a mask of ``mask_shape`` broadcasts to ``shape``."""
    try:
        return torch.broadcast_shapes(mask_shape, shape) == shape
    except RuntimeError:
        return False
