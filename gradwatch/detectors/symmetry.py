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

__all__ = ["SymmetryDetector", "group_units"]

_SHOWN_MEMBERS = 8
# Figures per layer in a summary: distinct, largest, same as before, members.
_SUMMARY = 3 + _SHOWN_MEMBERS
_SEED_WEIGHTS = 0x5EED
_SEED_GRADS = 0x6AD5
_ROUNDING = torch.finfo(torch.float32).eps / 2
# Pieces at most this wide (bias entries) are stacked across layers before they
# are reduced; wider ones are reduced layer by layer.
_STACKED_WIDTH = 16


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
    return group_layers([weights], [grads], tol, directions)[0]


def group_layers(
    weights: list[list[torch.Tensor]],
    grads: list[list[torch.Tensor]],
    tol: float,
    directions: tuple[list[torch.Tensor], list[torch.Tensor]],
    dense: bool | None = None,
) -> torch.Tensor:
    """Run :func:`group_units` on layers of one shape at once.

    Args:
        weights: Per layer, its unit matrices; every layer has the same shapes.
        grads: The gradients, in the same layout.
        tol: Relative tolerance of the equality.
        directions: As for :func:`group_units`.
        dense: Compare every unit with its neighbour (True), or only the pairs
            whose norms and projections allow equality (False). None picks the
            pairs on the CPU, where selecting them costs no device sync.

    Returns:
        A ``(layers, units)`` long tensor of labels.
    """
    norms_w, projection_w = _row_figures(weights, directions[0])
    norms_g, projection_g = _row_figures(grads, directions[1])
    key = _sort_key(projection_w, norms_w) + _sort_key(projection_g, norms_g)
    order = torch.argsort(key, dim=1, stable=True)
    previous = torch.empty_like(order).scatter_(1, order, order.roll(1, dims=1))

    sides = (
        _Side(weights, norms_w, projection_w, previous),
        _Side(grads, norms_g, projection_g, previous),
    )
    if dense is None:
        dense = not key.is_cpu
    equal = _equal_dense(sides, tol) if dense else _equal_sparse(sides, tol)
    return _labels_from(order, equal, norms_w, norms_g)


class _Side:
    """The weights or the gradients of a batch of layers, with their row figures."""

    def __init__(self, layers, norms, projection, previous) -> None:
        self.layers = layers
        self.norms = norms
        self.projection = projection
        self.previous = previous
        self.width = sum(m.shape[1] for m in layers[0])

    def close(self, layer: int, rows: torch.Tensor | None, tol: float):
        """Compare ``rows`` (all when None) of ``layer`` with their neighbours."""
        others = self.previous[layer]
        norms = self.norms[layer]
        if rows is not None:
            others = others[rows]
            norms = norms[rows]
        distance = sum(
            (_take(m, rows) - m[others]).square().sum(dim=1) for m in self.layers[layer]
        )
        neighbour = self.norms[layer][others]
        return distance <= tol * tol * torch.maximum(norms, neighbour)

    def candidates(self, tol: float) -> torch.Tensor:
        """Flag the neighbour pairs that the exact comparison could find equal.

        The distance of two rows bounds the difference of their norms and of
        their projections on a unit direction. So a pair is not equal when its
        norms or projections differ by more than ``tol`` times the larger norm,
        plus a worst-case bound on float32 rounding over the row's width.
        """
        roots = self.norms.sqrt()
        neighbour_roots = roots.gather(1, self.previous)
        larger = torch.maximum(roots, neighbour_roots)
        bound = larger * (tol + 8 * self.width * _ROUNDING)
        spread = self.projection - self.projection.gather(1, self.previous)
        near = ((roots - neighbour_roots).abs() <= bound) & (spread.abs() <= bound)
        return near | ~torch.isfinite(larger)


def _take(matrix: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return matrix if rows is None else matrix[rows]


def _equal_dense(sides: tuple[_Side, _Side], tol: float) -> torch.Tensor:
    count = len(sides[0].layers)
    return torch.stack(
        [
            sides[0].close(i, None, tol) & sides[1].close(i, None, tol)
            for i in range(count)
        ]
    )


def _equal_sparse(sides: tuple[_Side, _Side], tol: float) -> torch.Tensor:
    candidates = sides[0].candidates(tol) & sides[1].candidates(tol)
    equal = torch.zeros_like(candidates)
    for layer in candidates.any(dim=1).nonzero().flatten().tolist():
        rows = candidates[layer].nonzero().flatten()
        same = sides[0].close(layer, rows, tol) & sides[1].close(layer, rows, tol)
        equal[layer, rows] = same
    return equal


def _labels_from(order, equal, norms_w, norms_g) -> torch.Tensor:
    layers, count = order.shape
    index = torch.arange(count, device=order.device).expand(layers, count)
    start = ~equal.gather(1, order)
    start[:, 0] = True
    first = torch.cummax(torch.where(start, index, 0), dim=1).values
    labels = torch.empty_like(order).scatter_(1, order, order.gather(1, first))

    lowest = torch.full_like(labels, count).scatter_reduce(
        1, labels, index, reduce="amin"
    )
    labels = lowest.gather(1, labels)
    # Rows zero in weight and gradient are pruned units unless the whole layer is.
    pruned = (norms_w == 0) & (norms_g == 0)
    return torch.where(pruned & ~pruned.all(dim=1, keepdim=True), index, labels)


def _row_figures(
    layers: list[list[torch.Tensor]], directions: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the squared row norms and the projections, ``(layers, units)`` each.

    Wide matrices are reduced one by one, where they are read once while in
    cache; narrow ones (bias entries) are stacked first.
    """
    norms, projections = [], []
    for piece, direction in enumerate(directions):
        matrices = [layer[piece] for layer in layers]
        if matrices[0].shape[1] <= _STACKED_WIDTH:
            stacked = torch.stack(matrices)
            norms.append(stacked.square().sum(dim=2))
            projections.append(stacked @ direction)
        else:
            roots = [torch.linalg.vector_norm(m, dim=1) for m in matrices]
            norms.append(torch.stack(roots).square())
            projections.append(torch.stack([m @ direction for m in matrices]))
    return _total(norms), _total(projections)


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def _sort_key(projection: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    scale = norms.amax(dim=1, keepdim=True).sqrt()
    return projection / scale.clamp_min(torch.finfo(torch.float32).tiny)


def summarise_groups(labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Return ``[distinct, largest, same_as_previous, members...]`` per layer.

    Args:
        labels: ``(layers, units)`` labels from :func:`group_layers`.
        previous: The labels of the previous check in the same shape, with
            ``-1`` rows for layers that have none.
    """
    layers, count = labels.shape
    index = torch.arange(count, device=labels.device).expand(layers, count)
    sizes = torch.zeros_like(labels).scatter_add_(1, labels, torch.ones_like(labels))
    largest, representative = sizes.max(dim=1)
    members = torch.where(labels == representative.unsqueeze(1), index, count)
    shown = members.sort(dim=1).values[:, :_SHOWN_MEMBERS]
    shown = torch.where(shown == count, -1, shown)
    same = (previous == labels).all(dim=1)
    head = torch.stack([(sizes > 0).sum(dim=1), largest, same.long()], dim=1)
    padding = torch.full(
        (layers, _SHOWN_MEMBERS - shown.shape[1]), -1, device=labels.device
    )
    return torch.cat([head, shown, padding], dim=1)


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
            self._directions_for(weights[0], _SEED_WEIGHTS),
            self._directions_for(grads[0], _SEED_GRADS),
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
            values = queued.values[row * _SUMMARY : (row + 1) * _SUMMARY]
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
