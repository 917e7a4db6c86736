"""Input checks for masks that users register themselves."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.masks.watch import MASK_MODES, MaskMode, broadcasts

__all__ = ["check_mask", "check_mode", "is_binary", "resolve_param"]


def check_mode(mode: object) -> MaskMode:
    """Return ``mode`` if it is a valid mask mode.

    Raises:
        ValueError: ``mode`` is not one of :data:`MASK_MODES`.
    """
    if mode not in MASK_MODES:
        valid = ", ".join(repr(m) for m in MASK_MODES)
        msg = (
            f"mode must be one of {valid}, got {mode!r}: 'zero' when masked entries "
            f"must stay exactly zero (pruning), 'frozen' when they must keep their "
            f"values"
        )
        raise ValueError(msg)
    return mode  # type: ignore[return-value]


def resolve_param(model: nn.Module, param: object) -> tuple[str, nn.Parameter]:
    """Return the qualified name and tensor of ``param``, a parameter of ``model``.

    ``param`` is the parameter itself or its qualified name.

    Raises:
        TypeError: ``param`` is neither a tensor nor a string.
        ValueError: ``param`` is not a parameter of ``model``.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    if isinstance(param, str):
        if param in named:
            return param, named[param]
        msg = f"{param!r} is not a parameter of the watched model"
        hint = _pruned_hint(model, param)
        if hint:
            raise ValueError(f"{msg}; {hint}")
        close = [n for n in named if n.endswith(param.rpartition(".")[2])][:3]
        suggestion = f" (parameters with that leaf name: {close})" if close else ""
        raise ValueError(
            f"{msg}{suggestion}; pass a name from model.named_parameters()"
        )

    if not isinstance(param, torch.Tensor):
        msg = (
            f"param must be a parameter of the watched model or its qualified name, "
            f"got {type(param).__name__}"
        )
        raise TypeError(msg)
    for name, tensor in named.items():
        if tensor is param:
            return name, tensor
    shape = "x".join(str(d) for d in param.shape) or "scalar"
    msg = (
        f"the tensor passed as param ({shape}, {param.dtype}) is not a parameter of "
        f"the watched model; pass one of model.parameters() (not a copy, a slice "
        f"or a buffer), or its name from model.named_parameters()"
    )
    raise ValueError(msg)


def _pruned_hint(model: nn.Module, name: str) -> str | None:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if f"{leaf}_orig" in module._parameters and f"{leaf}_mask" in module._buffers:
        return (
            f"`{module_name or '<root>'}` is pruned with torch.nn.utils.prune, so its "
            f"parameter is `{name}_orig` and gradwatch already watches the mask "
            f"`{name}_mask`"
        )
    return None


def check_mask(mask: object, param: nn.Parameter, name: str) -> torch.Tensor:
    """Return ``mask`` on ``param``'s device after checking it fits ``param``.

    A mask is bool, or an integer or floating tensor holding only 0 and 1, with
    ``param``'s shape or a shape that broadcasts to it. A mask on another device
    is copied there once, so later in-place changes to the original are not seen.

    Raises:
        TypeError: ``mask`` is not a tensor, or has a complex dtype.
        ValueError: ``mask`` is on the meta device, does not broadcast to
            ``param``, or contains values other than 0 and 1.
    """
    if not isinstance(mask, torch.Tensor):
        msg = (
            f"the mask of `{name}` must be a torch.Tensor (bool, or 0/1 values), got "
            f"{type(mask).__name__}; convert it with torch.as_tensor(mask)"
        )
        raise TypeError(msg)
    if mask.is_complex() or mask.is_sparse:
        msg = (
            f"the mask of `{name}` must be a dense bool, integer or floating tensor, "
            f"got {mask.dtype} with layout {mask.layout}"
        )
        raise TypeError(msg)
    if mask.is_meta:
        msg = (
            f"the mask of `{name}` is on the meta device and has no values; build "
            f"it on {param.device} (or the CPU) from the values it should keep"
        )
        raise ValueError(msg)
    _check_shape(mask, param, name)
    if not is_binary(mask):
        msg = (
            f"the mask of `{name}` must hold only 0 and 1 (1 keeps an entry "
            f"trainable, 0 masks it), got values in "
            f"[{mask.min().item():g}, {mask.max().item():g}]; for a score or an "
            f"additive -inf mask pass (scores > threshold) or (mask == 0) instead"
        )
        raise ValueError(msg)
    return mask.detach().to(param.device)


def is_binary(mask: torch.Tensor) -> bool:
    """Return whether ``mask`` is bool or contains only 0 and 1 (a host transfer)."""
    if mask.dtype == torch.bool:
        return True
    if mask.numel() == 0:
        return True
    return bool(((mask == 0) | (mask == 1)).all())


def _check_shape(mask: torch.Tensor, param: nn.Parameter, name: str) -> None:
    shape, got = tuple(param.shape), tuple(mask.shape)
    if broadcasts(mask.shape, param.shape):
        return
    msg = (
        f"the mask of `{name}` has shape {got}, which does not broadcast to the "
        f"parameter's shape {shape}"
    )
    if mask.dim() == 2 and got[::-1] == shape:
        msg += "; it is the transpose of the expected mask: pass mask.T"
    else:
        msg += "; pass a mask of the parameter's shape, or one that broadcasts to it"
    raise ValueError(msg)
