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
O(n log n + n d) per layer and stays on the tensor's device. The grouping itself
lives in :mod:`gradwatch.detectors.unit_groups`.

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
from gradwatch.detectors.unit_groups import (
    SEED_GRADS,
    SEED_WEIGHTS,
    SUMMARY_WIDTH,
    group_layers,
    summarise_groups,
)
from gradwatch.detectors.units import (
    LayoutCache,
    UnitLayout,
    group_by_shape,
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

__all__ = ["SymmetryDetector"]


class SymmetryDetector(Detector):
    """Report layers whose units stay equal in weight and gradient."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self._model: weakref.ref[nn.Module] | None = None
        self._table: Any = None
        self._hooks = HookSet()
        self._output_layers: set[str] = set()
        self._recent: dict[int, tuple[Any, str]] = {}
        self._layouts = LayoutCache(options.unit_groups)
        self._pending: list[tuple[UnitLayout, torch.Tensor, Pending, int]] = []
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
        self._layouts.clear()

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
        with torch.no_grad():
            layouts, weights, grads = self._checked_layers(model, ctx)
            for indices in group_by_shape(weights).values():
                batch = [layouts[i] for i in indices]
                labels = self._labels_of(
                    [weights[i] for i in indices], [grads[i] for i in indices]
                )
                previous = self._previous_labels(batch, labels)
                queued = ctx.batch.add(summarise_groups(labels, previous))
                for row, layout in enumerate(batch):
                    self._pending.append((layout, labels[row], queued, row))
        order = {id(layout): i for i, layout in enumerate(layouts)}
        self._pending.sort(key=lambda entry: order[id(entry[0])])

    def _checked_layers(self, model: nn.Module, ctx: StepContext):
        """Return the layouts checked at this step, with their unit matrices."""
        judged = {id(info.tensor) for info in ctx.judged}
        layouts, weights, grads = [], [], []
        for layout in self._layouts.get(model, ctx.table):
            if layout.kind == "rows" and layout.module in self._output_layers:
                continue
            if layout.count < 2 or not all(
                id(i.tensor) in judged and ctx.arrived(i) for i in layout.params
            ):
                continue
            layout_weights = layout.matrices(grads=False)
            layout_grads = layout.matrices(grads=True)
            if layout_weights is None or layout_grads is None:
                continue
            layouts.append(layout)
            weights.append(layout_weights)
            grads.append(layout_grads)
        return layouts, weights, grads

    def _labels_of(self, weights, grads) -> torch.Tensor:
        directions = (
            self._directions_for(weights[0], SEED_WEIGHTS),
            self._directions_for(grads[0], SEED_GRADS),
        )
        return group_layers(weights, grads, self.options.symmetry_tol, directions)

    def _previous_labels(self, layouts, labels: torch.Tensor) -> torch.Tensor:
        missing = torch.full_like(labels[0], -1)
        rows = []
        for layout in layouts:
            previous = self._labels.get(layout.module)
            same_shape = previous is not None and previous.shape == missing.shape
            rows.append(previous if same_shape else missing)
        return torch.stack(rows)

    def _directions_for(
        self, matrices: list[torch.Tensor], seed: int
    ) -> list[torch.Tensor]:
        device = matrices[0].device
        sizes = tuple(m.shape[1] for m in matrices)
        key = (seed, sizes, device)
        if key not in self._directions:
            generator = torch.Generator().manual_seed(seed + sum(sizes))
            vectors = [torch.randn(size, generator=generator) for size in sizes]
            total = torch.cat(vectors).norm().clamp_min(1e-12)
            self._directions[key] = [(v / total).to(device) for v in vectors]
        return self._directions[key]

    def analyse(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, []
        self.figures = {}
        for layout, labels, queued, row in pending:
            values = queued.values[row * SUMMARY_WIDTH : (row + 1) * SUMMARY_WIDTH]
            distinct, largest, same, *members = (int(v) for v in values)
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
