"""What a unit is in each kind of layer, and when the unit checks run.

A unit is one slice of a layer that the rest of the network cannot tell apart from
its siblings when their weights are equal: an output row of ``nn.Linear`` (with
its bias entry), an output channel of ``nn.Conv1d/2d/3d``, an attention head
(its query, key and value rows, their bias entries, and the output projection's
columns that read the head), or a child of a module named in ``unit_groups``
(a mixture's experts). Embedding rows are tokens, never units.

Each :class:`UnitLayout` turns the layer's tensors, or their gradients, into
matrices with one row per unit, as views where the memory layout allows.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from gradwatch.handles import HookSet
from gradwatch.params import ParamInfo, ParamTable

__all__ = [
    "FIRST_CHECK_STEPS",
    "LayoutCache",
    "UnitLayout",
    "find_layouts",
    "group_by_shape",
    "is_check_step",
    "resolve_modules",
    "schedule_hooks",
]

#: Every step below this index is a check step, because the faults these checks
#: look for (zero or constant init, dead units after the first large updates)
#: show in the first steps.
FIRST_CHECK_STEPS = 10

_HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head")
_QKV_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
)
_OUT_NAMES = ("out_proj", "o_proj", "o", "proj_out")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# A piece maps "gradients?" to a matrix with one row per unit, or None when a
# gradient is missing.
Piece = Callable[[bool], torch.Tensor | None]


def is_check_step(step: int, every: int) -> bool:
    """Return whether the unit checks run at ``step``."""
    return step < FIRST_CHECK_STEPS or step % every == 0


def schedule_hooks(
    hooks: HookSet, step: int, every: int, install: Callable[[], None]
) -> None:
    """Install a detector's hooks for a check step, and remove them otherwise."""
    if is_check_step(step, every):
        if not len(hooks):
            install()
    else:
        hooks.remove()


@dataclasses.dataclass(eq=False)
class UnitLayout:
    """The units of one layer, attention module or module group.

    Attributes:
        kind: ``"rows"`` (Linear rows, conv channels), ``"heads"`` or
            ``"children"``.
        module: Qualified name of the layer or group.
        module_type: Class name of that module, for messages.
        param: The parameter alerts name (the layer's weight).
        params: Every parameter the units are made of.
        count: Number of units.
        pieces: Callables returning one ``(count, d)`` matrix each; a unit is
            the concatenation of its rows across pieces.
    """

    kind: str
    module: str
    module_type: str
    param: ParamInfo
    params: list[ParamInfo]
    count: int
    pieces: list[Piece]

    def matrices(self, grads: bool) -> list[torch.Tensor] | None:
        """Return the float32 unit matrices of the values or of the gradients."""
        out = []
        for piece in self.pieces:
            matrix = piece(grads)
            if matrix is None:
                return None
            out.append(matrix.float())
        return out

    @property
    def unit_word(self) -> str:
        return {"rows": "unit", "heads": "head", "children": "child"}[self.kind]


def group_by_shape(
    layers: list[list[torch.Tensor]],
) -> dict[tuple, list[int]]:
    """Group layers whose unit matrices have the same shapes, dtypes and device.

    Args:
        layers: Per layer, its unit matrices (one per piece).

    Returns:
        The indices into ``layers`` of each group, in their original order, so
        that each group can be reduced with stacked tensor ops.
    """
    groups: dict[tuple, list[int]] = {}
    for index, matrices in enumerate(layers):
        first = matrices[0]
        shapes = tuple((m.shape[1], m.dtype) for m in matrices)
        key = (first.shape[0], first.device, shapes)
        groups.setdefault(key, []).append(index)
    return groups


class LayoutCache:
    """The unit layouts of a model, found again only when its structure changes.

    The structure is the model's named modules and the watched parameters with
    their trainable flags and classes (a lazy parameter changes class when it is
    materialised). Layouts read their tensors when called, so cached layouts
    see new values and gradients.
    """

    def __init__(self, unit_groups: Mapping[str, str]) -> None:
        self._unit_groups = unit_groups
        self._fingerprint: tuple | None = None
        self._layouts: list[UnitLayout] = []

    def get(self, model: nn.Module, table: ParamTable) -> list[UnitLayout]:
        """Return the layouts of ``model``, from the cache when it is current."""
        fingerprint = _fingerprint(model, table)
        if fingerprint != self._fingerprint:
            self._layouts = find_layouts(model, table, self._unit_groups)
            self._fingerprint = fingerprint
        return self._layouts

    def clear(self) -> None:
        self._fingerprint = None
        self._layouts = []


def _fingerprint(model: nn.Module, table: ParamTable) -> tuple:
    modules = tuple((name, id(m)) for name, m in model.named_modules())
    params = tuple(
        (id(info), id(info.tensor), type(info.tensor), info.trainable) for info in table
    )
    return modules, params


def _source(info: ParamInfo, grads: bool) -> torch.Tensor | None:
    tensor = info.tensor.grad if grads else info.tensor.detach()
    if tensor is None or tensor.is_sparse:
        return None
    return tensor


def _piece(info: ParamInfo, view: Callable[[torch.Tensor], torch.Tensor]) -> Piece:
    def matrix(grads: bool) -> torch.Tensor | None:
        tensor = _source(info, grads)
        return None if tensor is None else view(tensor)

    return matrix


def resolve_modules(model: nn.Module, patterns: Mapping[str, object] | tuple) -> dict:
    """Map each name or glob pattern to the modules it matches.

    Raises:
        ValueError: A pattern matches no module; the message lists some names.
    """
    names = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {n: m for n, m in names.items() if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            shown = ", ".join(repr(n) for n in list(names)[1:9]) or "none"
            msg = (
                f"no module of the model is named {pattern!r}; pass qualified names "
                f"from model.named_modules() (or glob patterns), such as {shown}"
            )
            raise ValueError(msg)
        found.update(hits)
    return found


def find_layouts(
    model: nn.Module, table: ParamTable, unit_groups: Mapping[str, str]
) -> list[UnitLayout]:
    """Return the unit layouts of every supported layer of ``model``."""
    layouts: list[UnitLayout] = []
    # Modules checked as heads, and embedding tables (a tied output layer's rows
    # are tokens), are not checked row by row.
    claimed: set[int] = set()
    tables = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag)
    }
    for name, module in resolve_modules(model, tuple(unit_groups)).items():
        layout = _children_layout(name, module, table)
        if layout is not None:
            layouts.append(layout)
    for name, module in model.named_modules():
        layout = _heads_layout(name, module, table, claimed)
        if layout is not None:
            layouts.append(layout)
    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        layout = _rows_layout(name, module, table)
        if layout is not None and id(layout.param.tensor) not in tables:
            layouts.append(layout)
    return layouts


def _infos(table: ParamTable, *tensors: torch.Tensor | None) -> list[ParamInfo] | None:
    infos = []
    for tensor in tensors:
        if tensor is None:
            continue
        info = table.get(tensor)
        if info is None or not info.trainable:
            return None
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            return None
        infos.append(info)
    return infos or None


def _rows_layout(name: str, module: nn.Module, table: ParamTable) -> UnitLayout | None:
    if not isinstance(module, (nn.Linear, *_CONVS)):
        return None
    infos = _infos(table, module.weight, module.bias)
    if infos is None:
        return None
    pieces = [_piece(infos[0], lambda t: t.flatten(1))]
    if module.bias is not None:
        pieces.append(_piece(infos[1], lambda t: t.unsqueeze(1)))
    count = module.weight.shape[0]
    kind_name = type(module).__name__
    return UnitLayout("rows", name, kind_name, infos[0], infos, count, pieces)


def _heads_layout(
    name: str, module: nn.Module, table: ParamTable, claimed: set[int]
) -> UnitLayout | None:
    if isinstance(module, nn.MultiheadAttention):
        return _mha_layout(name, module, table)
    heads = next(
        (getattr(module, a) for a in _HEAD_COUNT_ATTRS if hasattr(module, a)), None
    )
    if not isinstance(heads, int) or heads < 2:
        return None
    children = dict(module.named_children())
    trio = next((t for t in _QKV_NAMES if all(n in children for n in t)), None)
    if trio is None or not all(isinstance(children[n], nn.Linear) for n in trio):
        return None
    linears = [children[n] for n in trio]
    out = next((children[n] for n in _OUT_NAMES if n in children), None)
    out = out if isinstance(out, nn.Linear) else None
    layout = _qkv_layout(name, module, linears, out, heads, table)
    if layout is not None:
        claimed.update(id(m) for m in linears)
    return layout


def _qkv_layout(name, module, linears, out, heads, table) -> UnitLayout | None:
    """Heads of separate query, key and value ``nn.Linear`` layers."""
    tensors = [t for lin in linears for t in (lin.weight, lin.bias)]
    if out is not None:
        tensors.append(out.weight)
    infos = _infos(table, *tensors)
    if infos is None or any(lin.out_features % heads for lin in linears):
        return None
    by_tensor = {id(i.tensor): i for i in infos}
    pieces = []
    for lin in linears:
        pieces.append(_piece(by_tensor[id(lin.weight)], _head_rows(heads)))
        if lin.bias is not None:
            pieces.append(_piece(by_tensor[id(lin.bias)], _head_rows(heads)))
    if out is not None and out.in_features == linears[2].out_features:
        pieces.append(_piece(by_tensor[id(out.weight)], _head_columns(heads)))
    kind_name = type(module).__name__
    return UnitLayout("heads", name, kind_name, infos[0], infos, heads, pieces)


def _mha_layout(
    name: str, module: nn.MultiheadAttention, table: ParamTable
) -> UnitLayout | None:
    heads = module.num_heads
    if heads < 2:
        return None
    if module.in_proj_weight is not None:
        weights = [module.in_proj_weight]
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    infos = _infos(table, *weights, module.in_proj_bias, module.out_proj.weight)
    if infos is None:
        return None
    by_tensor = {id(i.tensor): i for i in infos}
    pieces = []
    # A packed in_proj stacks the query, key and value rows: split it in three.
    parts = 3 if len(weights) == 1 else 1
    for weight in weights:
        pieces.extend(_packed_pieces(by_tensor[id(weight)], parts, heads))
    if module.in_proj_bias is not None:
        pieces.extend(_packed_pieces(by_tensor[id(module.in_proj_bias)], 3, heads))
    out_info = by_tensor[id(module.out_proj.weight)]
    pieces.append(_piece(out_info, _head_columns(heads)))
    return UnitLayout(
        "heads", name, "MultiheadAttention", infos[0], infos, heads, pieces
    )


def _packed_pieces(info: ParamInfo, parts: int, heads: int) -> Iterator[Piece]:
    size = info.tensor.shape[0] // parts
    for index in range(parts):
        rows = _head_rows(heads)
        yield _piece(info, lambda t, i=index, r=rows: r(t[i * size : (i + 1) * size]))


def _head_rows(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """View output rows (or bias entries) grouped head by head."""
    return lambda t: t.reshape(heads, -1)


def _head_columns(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gather an output projection's input columns head by head (a copy)."""
    return lambda t: t.reshape(t.shape[0], heads, -1).transpose(0, 1).reshape(heads, -1)


def _children_layout(
    name: str, module: nn.Module, table: ParamTable
) -> UnitLayout | None:
    children = list(module.children())
    if len(children) < 2:
        return None
    shapes = [[tuple(p.shape) for p in c.parameters()] for c in children]
    if not shapes[0] or any(s != shapes[0] for s in shapes):
        return None
    columns = [list(c.parameters()) for c in children]
    infos = _infos(table, *(p for col in columns for p in col))
    if infos is None:
        return None
    pieces = [_stacked([col[j] for col in columns]) for j in range(len(columns[0]))]
    first = table.get(columns[0][0])
    assert first is not None
    return UnitLayout(
        "children", name, type(module).__name__, first, infos, len(children), pieces
    )


def _stacked(tensors: list[torch.Tensor]) -> Piece:
    def matrix(grads: bool) -> torch.Tensor | None:
        rows = []
        for tensor in tensors:
            value = tensor.grad if grads else tensor.detach()
            if value is None or value.is_sparse:
                return None
            rows.append(value.reshape(-1))
        return torch.stack(rows)

    return matrix
