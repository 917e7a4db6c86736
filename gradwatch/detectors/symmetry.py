"""Units that stay identical: equal weights and equal gradients.

Check: ``symmetric_units``.

Units that start equal and receive equal gradients stay equal under any
element-wise optimizer (SGD, Adam, RMSprop), so the layer works as if it had one
unit per group. Equal weights alone are no fault: a zero-initialised output layer,
LoRA B matrix or residual branch has equal rows at step 0, but their gradients
differ and break the tie at the first step.

Groups are found without a pairwise matrix: every unit is projected onto one
random direction for its weights and one for its gradient (drawn once from a
fixed-seed generator of our own), the units are sorted by the sum of the two
projections, and each unit is compared exactly with its neighbour in that order.
Equal units have equal projections, so they sit next to each other. Work is
O(n log n + n d) per layer and stays on the tensor's device.

Limitations:
    A group must keep the same members for ``patience`` consecutive checks, so
    the rows of absent classes in a zero-initialised classifier (equal until each
    class appears in a batch) are not reported while the group shrinks. Layers
    whose output is the model's output are skipped, because their rows can stay
    equal for good reasons (classes or tokens never seen in the targets). A unit
    whose projection falls between those of a group's members, within rounding
    noise, splits the group in two, so the distinct count can be one too high.
    Rows that are zero in both weight and gradient while other rows of the layer
    are not are pruned units, not a group. ``ConvTranspose`` layers are not
    covered.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.units import (
    UnitLayout,
    find_layouts,
    is_check_step,
    resolve_modules,
    schedule_hooks,
)
from gradwatch.graph import iter_tensors
from gradwatch.handles import CloseOnRemove, HookSet, eager_hook

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.handles import HookSet as Hooks
    from gradwatch.transfer import Pending

__all__ = ["SymmetryDetector", "group_units"]

_SHOWN_MEMBERS = 8
_SEED_WEIGHTS = 0x5EED
_SEED_GRADS = 0x6AD5


def group_units(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    tol: float,
    directions: tuple[list[torch.Tensor], list[torch.Tensor]],
) -> torch.Tensor:
    """Label each unit with the lowest index of its group of equal units.

    Two units are equal when the distance between their weight rows is at most
    ``tol`` times the larger row norm, and the same holds for their gradient rows.
    Units are sorted by a random projection of both, and each unit is compared
    exactly with its neighbour in that order; a run of equal neighbours is a
    group.

    Args:
        weights: Matrices with one row per unit; a unit's weights are its rows
            across the matrices.
        grads: The gradients, in the same layout.
        tol: Relative tolerance of the equality.
        directions: Random directions of unit norm, one vector per matrix, for
            the weights and for the gradients.

    Returns:
        A long tensor of unit indices on the matrices' device; a unit in no group
        is labelled with its own index.
    """
    count = weights[0].shape[0]
    index = torch.arange(count, device=weights[0].device)
    norms_w = _squared_norms(weights)
    norms_g = _squared_norms(grads)
    key = _sort_key(weights, directions[0], norms_w) + _sort_key(
        grads, directions[1], norms_g
    )
    order = torch.argsort(key, stable=True)
    previous = torch.empty_like(order)
    previous[order] = order.roll(1)
    equal = _close(weights, previous, norms_w, tol) & _close(
        grads, previous, norms_g, tol
    )
    start = ~equal[order]
    start[0] = True
    first = torch.cummax(torch.where(start, index, 0), dim=0).values
    labels = torch.empty_like(order)
    labels[order] = order[first]

    lowest = torch.full_like(index, count).scatter_reduce(
        0, labels, index, reduce="amin"
    )
    labels = lowest[labels]
    # Rows zero in weight and gradient are pruned units unless the whole layer is.
    pruned = (norms_w == 0) & (norms_g == 0)
    return torch.where(pruned & ~pruned.all(), index, labels)


def _squared_norms(matrices: list[torch.Tensor]) -> torch.Tensor:
    return sum(m.square().sum(dim=1) for m in matrices)  # type: ignore[return-value]


def _sort_key(
    matrices: list[torch.Tensor], directions: list[torch.Tensor], norms: torch.Tensor
) -> torch.Tensor:
    projection = sum(m @ d for m, d in zip(matrices, directions, strict=True))
    scale = norms.max().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return projection / scale  # type: ignore[operator]


def _close(
    matrices: list[torch.Tensor],
    other: torch.Tensor,
    norms: torch.Tensor,
    tol: float,
) -> torch.Tensor:
    distance = _squared_norms([m - m[other] for m in matrices])
    return distance <= tol * tol * torch.maximum(norms, norms[other])


def summarise_groups(labels: torch.Tensor, previous: torch.Tensor | None):
    """Return ``[distinct, largest, same_as_previous, members...]`` on the device."""
    count = labels.shape[0]
    index = torch.arange(count, device=labels.device)
    sizes = torch.bincount(labels, minlength=count)
    largest, representative = sizes.max(dim=0)
    members = torch.where(labels == representative, index, -1)
    members = torch.where(members < 0, count, members)
    shown = members.sort().values[:_SHOWN_MEMBERS]
    shown = torch.where(shown == count, -1, shown)
    same = torch.tensor(False, device=labels.device)
    if previous is not None and previous.shape == labels.shape:
        same = (
            torch.equal(previous, labels)
            if labels.is_cpu
            else (previous == labels).all()
        )
    head = torch.stack(
        [(sizes > 0).sum(), largest, torch.as_tensor(same, device=labels.device)]
    )
    padding = torch.full((_SHOWN_MEMBERS - shown.numel(),), -1, device=labels.device)
    return torch.cat([head.long(), shown, padding])


class SymmetryDetector(Detector):
    """Report layers whose units stay equal in weight and gradient."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self._model: weakref.ref[nn.Module] | None = None
        self._table: Any = None
        self._hooks = HookSet()
        self._output_layers: set[str] = set()
        self._recent: dict[int, tuple[Any, str]] = {}
        self._pending: list[tuple[UnitLayout, torch.Tensor, Pending]] = []
        self._labels: dict[str, torch.Tensor] = {}
        self._streaks: dict[str, tuple[int, int]] = {}
        self._directions: dict[tuple, list[torch.Tensor]] = {}
        self.figures: dict[str, float] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        resolve_modules(model, tuple(self.options.unit_groups))
        self._model = weakref.ref(model)
        hooks.add(CloseOnRemove(self))

    def begin_step(self, step: int) -> None:
        self._recent = {}
        schedule_hooks(self._hooks, step, self.options.symmetry_every, self._install)

    def close(self) -> None:
        self._hooks.remove()
        self._recent = {}
        self._pending = []
        self._labels = {}
        self._directions = {}

    # Which layers produce the model's output

    def _install(self) -> None:
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                hook = eager_hook(self._layer_hook(name))
                self._hooks.add(module.register_forward_hook(hook))
        self._hooks.add(model.register_forward_hook(eager_hook(self._root_hook)))

    def _layer_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._recent[id(output)] = (weakref.ref(output), name)

        return hook

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        for tensor in iter_tensors(output):
            entry = self._recent.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                self._output_layers.add(entry[1])
        self._recent = {}

    # Analysis

    def collect(self, ctx: StepContext) -> None:
        self._pending = []
        if not is_check_step(ctx.step, self.options.symmetry_every):
            return
        model = self._model() if self._model is not None else None
        if model is None:
            return
        judged = {id(info.tensor) for info in ctx.judged}
        layouts = find_layouts(model, ctx.table, self.options.unit_groups)
        with torch.no_grad():
            for layout in layouts:
                if layout.kind == "rows" and layout.module in self._output_layers:
                    continue
                if not all(
                    id(i.tensor) in judged and ctx.arrived(i) for i in layout.params
                ):
                    continue
                labels = self._labels_of(layout)
                if labels is None:
                    continue
                summary = summarise_groups(labels, self._labels.get(layout.module))
                self._pending.append((layout, labels, ctx.batch.add(summary)))

    def _labels_of(self, layout: UnitLayout) -> torch.Tensor | None:
        weights = layout.matrices(grads=False)
        grads = layout.matrices(grads=True)
        if weights is None or grads is None or layout.count < 2:
            return None
        directions = (
            self._directions_for(layout, weights, _SEED_WEIGHTS),
            self._directions_for(layout, grads, _SEED_GRADS),
        )
        return group_units(weights, grads, self.options.symmetry_tol, directions)

    def _directions_for(
        self, layout: UnitLayout, matrices: list[torch.Tensor], seed: int
    ) -> list[torch.Tensor]:
        device = matrices[0].device
        sizes = tuple(m.shape[1] for m in matrices)
        key = (layout.module, seed, sizes, device)
        if key not in self._directions:
            generator = torch.Generator().manual_seed(seed + sum(sizes))
            vectors = [torch.randn(size, generator=generator) for size in sizes]
            total = torch.cat(vectors).norm().clamp_min(1e-12)
            self._directions[key] = [(v / total).to(device) for v in vectors]
        return self._directions[key]

    def analyse(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, []
        self.figures = {}
        for layout, labels, queued in pending:
            distinct, largest, same, *members = (int(v) for v in queued.values)
            self._labels[layout.module] = labels
            tag = f"gradwatch/symmetry/{layout.module or 'root'}/distinct_units"
            self.figures[tag] = float(distinct)
            since, streak = self._streaks.get(layout.module, (ctx.step, 0))
            if distinct == layout.count:
                streak = 0
            elif same and streak:
                streak += 1
            else:
                since, streak = ctx.step, 1
            self._streaks[layout.module] = (since, streak)
            if streak >= self.options.patience:
                shown = [m for m in members if m >= 0]
                self._alert(ctx, layout, distinct, largest, shown, since, streak)

    def _alert(
        self,
        ctx: StepContext,
        layout: UnitLayout,
        distinct: int,
        largest: int,
        members: list[int],
        since: int,
        streak: int,
    ) -> None:
        word = layout.unit_word
        listed = ", ".join(str(m) for m in members)
        if largest > len(members):
            listed += ", ..."
        message = (
            f"{layout.module_type} `{layout.module or '<root>'}` has {distinct} "
            f"distinct {word}(s) out of {layout.count}: the largest group, "
            f"{largest} {word}s [{listed}], has equal weights and equal gradients "
            f"at {streak} checks in a row from step {since} to {ctx.step}. Units "
            f"that are equal and receive equal gradients stay equal under any "
            f"element-wise optimizer, so the layer works as if it had {distinct} "
            f"{word}(s). {_FIXES[layout.kind]}"
        )
        ctx.alert(
            "symmetric_units",
            message,
            param=layout.param,
            module=layout.module,
            step=since,
            data={
                "distinct_units": distinct,
                "units": layout.count,
                "largest_group": largest,
                "group_members": members,
                "gradients_equal": True,
                "unit": word,
            },
        )


_FIXES = {
    "rows": (
        "A zero or constant initialisation of this hidden layer "
        "(nn.init.zeros_, nn.init.constant_) causes this; initialise it randomly "
        "(the layer's reset_parameters(), nn.init.kaiming_uniform_) and zero-init "
        "only the last layer of a branch."
    ),
    "heads": (
        "The heads were initialised with the same values (one head's weights "
        "copied into the others, or a constant init); initialise each head "
        "independently."
    ),
    "children": (
        "The children were built as copies of one module (copy.deepcopy of an "
        "initialised expert) and receive the same gradients; initialise each "
        "one separately."
    ),
}
