"""Walk autograd graphs: which leaf tensors can a tensor's backward reach?"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["GraphReach", "iter_tensors", "walk", "walk_nodes"]

_MAX_DEPTH = 8


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Yield the tensors in ``obj``: nested tuples, lists, dicts and dataclasses.

    Strings, None and other objects yield nothing. Nesting deeper than a few levels
    is not followed, so a self-referencing container cannot loop.
    """
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth >= _MAX_DEPTH or isinstance(obj, str | bytes):
        return
    if isinstance(obj, dict):
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple | set | frozenset):
        children = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = (getattr(obj, f.name, None) for f in dataclasses.fields(obj))
    elif hasattr(obj, "to_tuple"):  # transformers' ModelOutput
        children = obj.to_tuple()
    else:
        return
    for child in children:
        yield from iter_tensors(child, depth + 1)


@dataclasses.dataclass
class GraphReach:
    """Result of a walk: the leaves found and the graph nodes visited, by id.

    ``leaves`` maps ``id(tensor)`` to the leaf tensor itself, so that callers can
    check the identity of a leaf before trusting an id.
    """

    leaves: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    nodes: set[int] = dataclasses.field(default_factory=set)

    def update(self, other: GraphReach) -> None:
        self.leaves.update(other.leaves)
        self.nodes |= other.nodes

    def reaches(self, tensor: torch.Tensor) -> bool:
        return self.leaves.get(id(tensor)) is tensor


def walk(roots: Iterable[torch.Tensor]) -> GraphReach:
    """Return the leaves that backward from ``roots`` would accumulate into."""
    nodes = []
    leaves = {}
    for root in roots:
        if root.grad_fn is not None:
            nodes.append(root.grad_fn)
        elif root.requires_grad:
            leaves[id(root)] = root
    reach = walk_nodes(nodes)
    reach.leaves.update(leaves)
    return reach


def walk_nodes(nodes: Iterable[Any]) -> GraphReach:
    """Return the leaves reachable from the autograd nodes ``nodes``.

    The walk follows ``next_functions`` iteratively and visits each node once, so
    its cost is linear in the size of the graph. It needs no saved tensors, so it
    also works after backward has freed them.
    """
    reach = GraphReach()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in reach.nodes:
            continue
        reach.nodes.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            reach.leaves[id(variable)] = variable
        stack.extend(c for c, _ in node.next_functions if c is not None)
    return reach
