"""Find the masks a model carries, and build watches for masks given by users.

Three kinds are found in the model itself:

- ``torch.nn.utils.prune``: a module with a parameter ``<name>_orig`` and a buffer
  ``<name>_mask``; the effective tensor ``<name>`` is recomputed before each
  forward as their product.
- A buffer whose name contains ``mask``, on the same module as a parameter whose
  shape it has or broadcasts to (a hand-written ``MaskedLinear``), holding only
  0 and 1. Where several parameters fit, the one the buffer's name names
  (``weight_mask`` for ``weight``) or else ``weight`` is taken.
- With ``track_zeros``, the exact zeros a parameter holds when the session starts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from gradwatch.masks.validate import is_binary
from gradwatch.masks.watch import MaskMode, MaskWatch, broadcasts

__all__ = [
    "TRACK_ZEROS_MIN_SPARSITY",
    "discover_masks",
    "explicit_watch",
    "zeros_watches",
]

#: ``track_zeros`` takes a parameter's zeros as its mask only when at least this
#: fraction of its entries is exactly zero. Below it, zeros are more likely
#: underflow of a low-precision initialisation, or a padding row, than pruning.
TRACK_ZEROS_MIN_SPARSITY = 0.01


def discover_masks(model: nn.Module) -> list[MaskWatch]:
    """Return a watch for every pruning mask and mask buffer in ``model``."""
    watches = []
    for qualname, module in model.named_modules():
        watches.extend(_prune_watches(qualname, module))
        watches.extend(_buffer_watches(qualname, module))
    return watches


def _prune_watches(qualname: str, module: nn.Module) -> Iterable[MaskWatch]:
    for pname, param in module._parameters.items():
        if param is None or not pname.endswith("_orig"):
            continue
        base = pname.removesuffix("_orig")
        if not isinstance(module._buffers.get(f"{base}_mask"), torch.Tensor):
            continue
        prefix = f"{qualname}." if qualname else ""
        yield MaskWatch(
            key=("prune", id(module), base, id(param)),
            source="prune",
            param=param,
            modules=[module],
            label=f"`{prefix}{base}_mask` (torch.nn.utils.prune)",
            mode="zero",
            in_graph=True,
            read_mask=lambda module=module, base=base: module._buffers.get(
                f"{base}_mask"
            ),
            read_target=lambda module=module, base=base: _tensor_attr(module, base),
            target_name=f"{prefix}{base}",
        )


def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _buffer_watches(qualname: str, module: nn.Module) -> Iterable[MaskWatch]:
    prefix = f"{qualname}." if qualname else ""
    for bname, buffer in module._buffers.items():
        if not _is_mask_buffer(module, bname, buffer):
            continue
        assert buffer is not None
        pname = _buffer_target(module, bname, buffer)
        if pname is None or not is_binary(buffer):
            continue
        param = module._parameters[pname]
        assert param is not None
        yield MaskWatch(
            key=("buffer", id(module), bname, id(param)),
            source="buffer",
            param=param,
            modules=[module],
            label=f"buffer `{prefix}{bname}`",
            mode="zero",
            in_graph=True,
            read_mask=lambda module=module, bname=bname: module._buffers.get(bname),
            read_target=lambda param=param: param,
        )


def _is_mask_buffer(module: nn.Module, name: str, buffer: object) -> bool:
    if not isinstance(buffer, torch.Tensor) or "mask" not in name.lower():
        return False
    if buffer.is_complex() or buffer.is_sparse or buffer.numel() < 2:
        return False
    pruned = name.endswith("_mask") and f"{name[:-5]}_orig" in module._parameters
    return not pruned


def _buffer_target(module: nn.Module, name: str, buffer: torch.Tensor) -> str | None:
    fitting = [
        pname
        for pname, param in module._parameters.items()
        if param is not None and broadcasts(buffer.shape, param.shape)
    ]
    named = name.lower().replace("mask", "").strip("_")
    if named in fitting:
        return named
    exact = [p for p in fitting if module._parameters[p].shape == buffer.shape]
    pool = exact or fitting
    if len(pool) == 1:
        return pool[0]
    return "weight" if "weight" in pool else None


def explicit_watch(
    name: str,
    param: nn.Parameter,
    modules: list[nn.Module],
    mask: torch.Tensor,
    mode: MaskMode,
    *,
    in_graph: bool = False,
    source: str = "explicit",
    label: str = "the mask passed to watch_mask",
) -> MaskWatch:
    """Return a watch of ``mask`` over ``param``, sampled when ``modules`` run.

    In ``"frozen"`` mode the parameter's values are copied now: they are the
    values masked entries must keep.
    """
    watch = MaskWatch(
        key=(source, id(param)),
        source=source,
        param=param,
        modules=modules,
        label=label,
        mode=mode,
        in_graph=in_graph,
        read_mask=lambda: mask,
        read_target=lambda: param,
    )
    watch.masked(param)
    if watch.unusable is not None:
        msg = f"the mask of `{name}` cannot be watched: {watch.unusable}"
        raise ValueError(msg)
    return watch


def zeros_watches(
    named: Iterable[tuple[str, nn.Parameter, list[nn.Module]]],
) -> list[MaskWatch]:
    """Return watches that take the exact zeros of each parameter as its mask.

    ``named`` yields ``(qualified name, parameter, modules that own it)``. Only
    floating parameters with at least :data:`TRACK_ZEROS_MIN_SPARSITY` zeros,
    and not all zero (zero-initialised tensors are meant to train), qualify.
    """
    candidates = [c for c in named if c[1].is_floating_point() and c[1].numel()]
    counts = _zero_counts([param for _, param, _ in candidates])
    watches = []
    for (name, param, modules), zeros in zip(candidates, counts, strict=True):
        if zeros == param.numel() or zeros < TRACK_ZEROS_MIN_SPARSITY * param.numel():
            continue
        keep = param.detach() != 0
        watches.append(
            explicit_watch(
                name,
                param,
                modules,
                keep,
                "zero",
                source="zeros",
                label="the zeros it held when the session started (track_zeros)",
            )
        )
    return watches


def _zero_counts(params: list[nn.Parameter]) -> list[int]:
    """Count each parameter's exact zeros, with one host transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for index, param in enumerate(params):
        by_device[param.device].append(index)
    counts = [0] * len(params)
    with torch.no_grad():
        for indices in by_device.values():
            zeros = torch.stack([torch.count_nonzero(params[i] == 0) for i in indices])
            for index, value in zip(indices, zeros.tolist(), strict=True):
                counts[index] = int(value)
    return counts
