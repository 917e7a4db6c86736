"""Group the equal units of layers: random projections, sorted neighbours, exact checks.

Two units are equal when their weight rows, and their gradient rows, differ by at
most a tolerance relative to the row norms. Sorting the units by a random
projection puts equal units next to each other, so each unit is compared with its
neighbour only, and a run of equal neighbours is a group.
"""

from __future__ import annotations

import torch

__all__ = [
    "SEED_GRADS",
    "SEED_WEIGHTS",
    "SUMMARY_WIDTH",
    "group_layers",
    "group_units",
    "summarise_groups",
]

_SHOWN_MEMBERS = 8
# Figures per layer in a summary: distinct, largest, same as before, members.
SUMMARY_WIDTH = 3 + _SHOWN_MEMBERS
SEED_WEIGHTS = 0x5EED
SEED_GRADS = 0x6AD5
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
    exactly with its neighbour in that order. A run of equal neighbours is a
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
    listed = members.sort(dim=1).values[:, :_SHOWN_MEMBERS]
    listed = torch.where(listed == count, -1, listed)
    same = (previous == labels).all(dim=1)
    head = torch.stack([(sizes > 0).sum(dim=1), largest, same.long()], dim=1)
    padding = torch.full(
        (layers, _SHOWN_MEMBERS - listed.shape[1]), -1, device=labels.device
    )
    return torch.cat([head, listed, padding], dim=1)
